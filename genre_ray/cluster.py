"""Ray for a run: a new local Ray, or the cluster --address (or a submitted job's
$RAY_ADDRESS) names, reached, checked and sized before any trial: the trials that fit
at once, node by node, in CPUs, GPUs and memory."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import signal
import socket
from collections import Counter
from typing import Any, Iterator

from genre_ray import capacity, config, storage
from genre_ray.config import Config
from genre_ray.errors import UserError


@contextlib.contextmanager
def ray_for(cfg: Config, address: str | None, shared_storage: bool, store: storage.Storage,
            need: capacity.Need) -> Iterator[int]:
    """Ray up (a new local one with an object store sized for the data, or the cluster
    --address or $RAY_ADDRESS names: `cluster_address`'s answer) and checked; yields the
    trials that fit at once; down after."""
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial
    logging.getLogger("ray.tune.tune").addFilter(_not_tune_resume_hint)
    require_reachable(address)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a submitted job's driver
        # It starts in the job's working folder, which Ray deletes and unpacks anew when
        # another job of the same code sets up (seen with Ray 2.60: Tune's os.getcwd()
        # failed at the end of a run). Every path of the run is absolute by now.
        config.cache_dir().mkdir(parents=True, exist_ok=True)
        os.chdir(config.cache_dir())
    sized = {} if address else {"object_store_memory": capacity.local_store_bytes(need, cfg.memory)}
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:  # absent --address: a new local Ray, never a cluster an earlier `ray start` left running
        ray.init(address=address or "local", include_dashboard=False,
                 configure_logging=False, **sized)
    except ConnectionError as err:  # --address auto, and no cluster runs here
        raise UserError(f"--address {address}: {str(err).rstrip('.')}; start one with "
                        "`ray start --head`, or drop --address to run on a new local Ray") from None
    signal.signal(signal.SIGTERM, on_sigterm)  # ray.init's exits at once (sys.exit): the command's
    try:
        _require_shared_storage(shared_storage, store)
        yield _slots(need)
    finally:
        ray.shutdown()


def _require_shared_storage(shared_storage: bool, store: storage.Storage) -> None:
    """On a cluster of more than one node, every node saves its trials' checkpoints to the
    storage path: a path only this machine has would lose them. UserError before any trial."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and store.node_local and not shared_storage:
        raise UserError(
            f"the Ray cluster has {nodes} nodes but --storage-path {store.uri} may be "
            "a path on this machine only: trials on other nodes could not save their "
            "checkpoints there. Pass a bucket (s3://..., gs://...), or a path every node mounts "
            "(NFS) and add --shared-storage")


def cluster_address(address: str | None) -> str | None:
    """The cluster this command joins: --address, else $RAY_ADDRESS (Ray sets it to the
    cluster's for a submitted job's command; an http:// one names a job server, for
    `ray job submit`, not a cluster to join); None: a new local Ray."""
    env = os.environ.get("RAY_ADDRESS", "")
    if address is not None:
        return address
    return env if env and not env.startswith(("http://", "https://")) else None


def require_reachable(address: str | None) -> None:
    """UserError unless HOST:PORT (or ray://HOST:PORT) answers within 5 s: ray.init would
    retry an unreachable address for minutes."""
    if address in (None, "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot reach a Ray cluster at --address {address} ({err}); check the "
                        "address (HOST:PORT of the head, e.g. 10.0.0.5:6379, or auto), start "
                        "the head with `ray start --head`, or drop --address to run locally") from None


def _slots(need: capacity.Need) -> int:
    """Trials to run at once: as many as the nodes' CPUs, GPUs and memory hold, node by
    node; says so when memory holds fewer than the CPUs and GPUs would run."""
    import ray

    nodes = ray.nodes()
    slots = capacity.slots(need, nodes)
    unbounded = capacity.slots(dataclasses.replace(need, trial=1), nodes)
    if slots < unbounded:
        print(f"memory: {slots} trial(s) at once, not {unbounded}: each trial is given "
              f"{need.trial / capacity.GB:.1f} GB beside the {need.store / capacity.GB:.1f} GB "
              "of features that a node's trials share")
    return slots


def _not_tune_resume_hint(record: logging.LogRecord) -> bool:
    """Drop Tune's "Resume experiment with: Tuner.restore(...)": Interrupted says how."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def hardware(nodes: list[dict[str, Any]]) -> str:
    """The driver's machine and the Ray cluster's nodes (`ray.nodes()`), in words. GPUs
    are read from the nodes' resources, not this process's CUDA: a cluster's head (the
    driver) usually has none."""
    alive = [node["Resources"] for node in nodes if node["Alive"]]
    kinds = Counter()
    for node in alive:
        for key in node:
            if key.startswith("accelerator_type:"):
                kinds[key.removeprefix("accelerator_type:")] += int(node.get("GPU", 0))
    named = f" ({', '.join(f'{n} x {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    total = {kind: sum(node.get(kind, 0) for node in alive) for kind in ("CPU", "GPU")}
    return (f"driver: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"Ray cluster: {len(alive)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs{named}")
