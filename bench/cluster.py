"""A real two-node Ray cluster on this machine, as a user makes one: `ray start --head` and
`ray start --address=...`, each with its own --num-cpus and token authentication.

Each node runs `ray start --block` as the leader of its own session; its raylet, GCS and
worker processes stay in that session (workers get process groups of their own). A node
is stopped by killing every process of the session this module started (never by name,
never `ray stop`, which would stop every Ray on the machine), also when the test fails.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Ray's CLI through this interpreter: its `ray` script need not sit beside it (a --target
# install, a system Python with a user-site Ray).
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
RAY_TMP = Path("/tmp/ray")  # Ray's temp folder: its sessions and what `ray start` leaves
CURRENT_CLUSTER = RAY_TMP / "ray_current_cluster"  # for ray.init() to join


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # RAY_AUTH_MODE=token: what every process that joins needs
    head: subprocess.Popen
    worker: subprocess.Popen
    jobs: str | None = None  # the job server's http://127.0.0.1:PORT, if it runs one


@contextlib.contextmanager
def two_node_cluster(logs: Path, head_cpus: int = 1, worker_cpus: int = 1, jobs: bool = False,
                     env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start the head and one worker node, wait until both are alive, stop both after.
    `jobs`: the head runs the dashboard and its job server, on 127.0.0.1 only. `env`: the
    nodes' environment (every process they start inherits it), os.environ by default."""
    env = {**(env or os.environ), "RAY_AUTH_MODE": "token"}
    address = f"127.0.0.1:{free_port()}"
    server = f"http://127.0.0.1:{free_port()}" if jobs else None
    dashboard = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", server.rsplit(":", 1)[1]] if jobs else \
        ["--include-dashboard", "false"]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start_node(["--head", "--port", address.split(":")[1], "--num-cpus",
                                 str(head_cpus), *dashboard], env, logs / "head.log"))
        nodes.append(start_node(["--address", address, "--num-cpus", str(worker_cpus)], env,
                            logs / "worker.log"))
        wait_for_nodes(address, 2, env)
        yield Cluster(address, env, *nodes, jobs=server)
    finally:
        for node in reversed(nodes):
            kill_node(node)
        if CURRENT_CLUSTER.is_file() and CURRENT_CLUSTER.read_text().strip().endswith(
                address.split(":")[1]):
            CURRENT_CLUSTER.unlink()  # else a later ray.init() would join the dead cluster


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL every process of the node's session: `ray start`, raylet, GCS, workers."""
    for pid in node_pids(node):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait()


def node_pids(node: subprocess.Popen) -> list[int]:
    """The processes of the session `node` leads."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == node.pid:
                    pids.append(int(entry.name))
    return pids


def start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ARGS`, with free ports where Ray would take fixed ones, so that
    another Ray on the machine (a test's local one beside it) cannot clash with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port",
             *(["--ray-client-server-port"] if "--head" in args else [])]
    ports = [arg for flag in flags for arg in (flag, str(free_port()))]
    with open(log, "w") as out:
        return subprocess.Popen([*RAY, "start", "--block", "--disable-usage-stats", *ports, *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 90) -> None:
    probe = ("import ray, sys, time\n"
             "ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "end = time.time() + float(sys.argv[3])\n"
             "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.time() < end:\n"
             "    time.sleep(0.5)\n"
             "print(sum(n['Alive'] for n in ray.nodes()))\n")
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address, str(count),
                              str(deadline - time.time())], env=env, capture_output=True, text=True)
        # The count is the last line: Ray may print before it (a fresh machine's first
        # token, say).
        if out.returncode == 0 and out.stdout.split()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"the cluster at {address} did not reach {count} nodes in {timeout} s; "
                       f"the last probe exited {out.returncode}: {(out.stdout + out.stderr)[-600:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
