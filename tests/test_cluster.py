"""tune_main.py against a real two-node Ray cluster started on this machine."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cluster import RAY_TMP, kill_node, two_node_cluster
from tests.helpers import REPO, make_tree

pytestmark = pytest.mark.slow  # real multi-node Ray clusters


def tune_args(cluster, data, tmp_path, *args: str) -> list[str]:
    """tune_main.py joining `cluster`: MLP on spectrograms of `data` unless `args` say
    otherwise (argparse keeps the last), files under tmp_path."""
    return [sys.executable, str(REPO / "tune_main.py"), "--address", cluster.address,
            "--data-dir", str(data), "--models", "MLP", "--features", "spectrogram",
            "--storage-path", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "best"),
            "--wandb", "off", "--name", "run", *args]


def tune_main(cluster, data, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tune_args(cluster, data, tmp_path, *args), cwd=tmp_path,
                          env=cluster.env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The module's two-node cluster: the tests that leave it as they found it, then the
    last test, which loses its worker node."""
    base = tmp_path_factory.mktemp("cluster")
    with two_node_cluster(base / "logs") as running:
        yield running, make_tree(base / "data", tracks=3, seconds=6.0)


def test_a_node_local_storage_path_is_refused_before_any_trial(cluster, tmp_path):
    cluster, data = cluster
    out = tune_main(cluster, data, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "2 nodes" in error[0] and "--shared-storage" in error[0]
    assert not (tmp_path / "runs").exists()  # nothing of the run was written
    assert not list((tmp_path / "best").glob("*"))


def test_a_shared_storage_run_on_two_nodes_tunes_and_exports(cluster, tmp_path):
    cluster, data = cluster
    out = tune_main(cluster, data, tmp_path, "--shared-storage", "--num-samples", "2",
                    "--max-epochs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "best" / "MLP_spectrogram_best_model.pth").is_file()
    assert "on 2 trial slots" in out.stdout  # one CPU on each node


def test_a_trial_on_a_lost_node_is_retried_from_its_checkpoint(cluster, tmp_path):
    """ASHA's one rung is epoch 2 (grace 2 x 4 reaches max_epochs 8): a trial checkpoints
    there, and runs on to epoch 8, so the node is lost mid-trial. Both trials train the
    same configuration (a one-point space) with the same seed, so neither is worse at the
    rung and ASHA stops neither, whichever reaches it second."""
    data = make_tree(tmp_path / "data", tracks=4, seconds=40.0)  # CEL epochs of about 1 s
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "CEL.yaml").write_text("params: {learning_rate: {choice: [0.001]}}\n"
                                     "first_point: {learning_rate: 0.001}\n")
    run = tmp_path / "runs" / "run"
    cluster, _ = cluster
    job = subprocess.Popen(
        tune_args(cluster, data, tmp_path, "--shared-storage", "--models", "CEL",
                  "--num-samples", "2", "--max-epochs", "8", "--grace-period", "2",
                  "--reduction-factor", "4", "--search-spaces", str(spaces)),
        cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        _wait_until(lambda: _both_checkpointed(run), timeout=240)
        kill_node(cluster.worker)  # every process of the worker node (the module's last test)
        output, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    assert (tmp_path / "best" / "CEL_spectrogram_best_model.pth").is_file()
    restarts = [row for f in run.glob("*/result.json") for row in map(json.loads, f.open())
                if row["iterations_since_restore"] == 1 and row["epoch"] > 1]
    assert restarts, ("no trial resumed from its checkpoint after its node was lost: "
                      + output[-3000:])


def _both_checkpointed(run: Path, trials: int = 2) -> bool:
    """Whether each of the run's `trials` has saved its rung's checkpoint and not its last
    (both have epochs to go, whichever node each runs on), and the driver has received the
    rung's result, so that Tune knows the checkpoint to restore. A trial's checkpoints reach
    the storage path as it saves them; the driver writes the results it receives to its
    staging folder in the Ray session (the storage's result.json only when Tune syncs)."""
    folders = [d for d in run.glob("CEL_spectrogram_*") if d.is_dir()]
    return len(folders) == trials and all(
        (d / "checkpoint_000000").is_dir() and not (d / "checkpoint_000001").exists()
        and _received(d.name, epoch=2) for d in folders)


def _received(trial: str, epoch: int) -> bool:
    """Whether the driver has received the trial's result of `epoch` (read from its whole
    lines: the one it may be writing is left)."""
    for log in RAY_TMP.glob(f"session_*/artifacts/*/run/driver_artifacts/{trial}/result.json"):
        if any(json.loads(line)["training_iteration"] >= epoch
               for line in log.read_text().split("\n")[:-1]):
            return True
    return False


def _wait_until(condition, timeout: float) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out after {timeout} s"
        time.sleep(0.2)
