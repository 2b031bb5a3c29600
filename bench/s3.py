"""A real S3 server on 127.0.0.1 for tests and benches: moto's server mode (moto_server), speaking the
S3 protocol to pyarrow's S3 filesystem and boto3 as AWS does, with IAM authentication on:
a `writer` (s3:*) and a `reader` (get and list only) with their own keys. Clients reach it
through a TCP relay that a test can stop and start again: the server goes away for its
clients and comes back holding what it held."""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bench.cluster import free_port

REGION = "us-east-1"
SETUP_ACTIONS = 6  # requests moto takes without signatures: two users, their policies, keys
POLICIES = {"writer": ["s3:*"], "reader": ["s3:GetObject", "s3:ListBucket"]}


@dataclass
class S3:
    endpoint: str  # the relay's http://127.0.0.1:PORT
    keys: dict[str, tuple[str, str]]  # user -> (access key, secret key)
    relay: Relay
    log: Path  # the server's log: a line per request

    def env(self, user: str = "writer") -> dict[str, str]:
        """The environment a process reaches the server with, as `user` (any other name:
        keys the server never issued)."""
        key, secret = self.keys.get(user, ("AKIAIOSFODNN7EXAMPLE", "not-a-secret"))
        return {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, user: str = "writer"):
        import boto3

        key, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def bucket(self, name: str) -> str:
        """A new bucket `name`; its s3:// URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "", suffix: str = "") -> dict[str, bytes]:
        """Key -> content of every object under `prefix` whose key ends with `suffix` (one a
        running job deletes between the listing and its reading, as Tune deletes a trial's
        older checkpoints, is left)."""
        client, found = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith(suffix):
                    continue
                with contextlib.suppress(client.exceptions.NoSuchKey):
                    found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found


@contextlib.contextmanager
def s3_server(logs: Path) -> Iterator[S3]:
    """moto_server on a free port, its two users made, behind a relay; stopped after."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)},
        stdout=open(logs / "moto.log", "w"), stderr=subprocess.STDOUT)
    relay = Relay(port)
    try:
        _wait_for(port)
        keys = _users(f"http://127.0.0.1:{port}")
        relay.start()
        yield S3(f"http://127.0.0.1:{relay.port}", keys, relay, logs / "moto.log")
    finally:
        relay.stop()
        server.kill()
        server.wait()


def _wait_for(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.2)
    raise TimeoutError(f"moto_server did not listen on {port} in {timeout} s")


def _users(endpoint: str) -> dict[str, tuple[str, str]]:
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    keys = {}
    for user, actions in POLICIES.items():
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    return keys


@dataclass
class Relay:
    """Forwards 127.0.0.1:`port` (a free one) to the server's `target` port. `stop` closes
    the listening socket and every open connection: clients are refused, as by a server
    that went away; `start` listens on the same port again."""

    target: int
    port: int = field(default_factory=free_port)
    _thread: threading.Thread | None = None
    _running: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._running.set()
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _serve(self, listener: socket.socket) -> None:
        selector, peers = selectors.DefaultSelector(), {}
        selector.register(listener, selectors.EVENT_READ)
        while self._running.is_set():
            for key, _ in selector.select(timeout=0.1):
                if key.fileobj not in peers and key.fileobj is not listener:
                    continue  # closed with its peer in this round
                if key.fileobj is listener:
                    client, _ = listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.target))
                    peers[client], peers[server] = server, client
                    selector.register(client, selectors.EVENT_READ)
                    selector.register(server, selectors.EVENT_READ)
                    continue
                data = b""
                with contextlib.suppress(OSError):
                    data = key.fileobj.recv(65536)
                if data:
                    with contextlib.suppress(OSError):  # its peer closed: seen next round
                        peers[key.fileobj].sendall(data)
                else:
                    for sock in (key.fileobj, peers.pop(key.fileobj)):
                        peers.pop(sock, None)
                        selector.unregister(sock)
                        sock.close()
        for sock in [*peers, listener]:
            sock.close()
        selector.close()
