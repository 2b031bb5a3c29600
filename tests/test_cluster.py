"""tune_main.py against a real two-node Ray cluster started on this machine."""
from __future__ import annotations

import subprocess
import sys

from tests.cluster import two_node_cluster
from tests.helpers import REPO, make_tree


def tune_main(cluster, data, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """tune_main.py joining `cluster`: MLP on spectrograms of `data`, files under tmp_path."""
    return subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "--address", cluster.address,
         "--data-dir", str(data), "--models", "MLP", "--features", "spectrogram",
         "--storage-path", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "best"),
         "--wandb", "off", "--name", "run", *args],
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)


def test_a_node_local_storage_path_is_refused_before_any_trial(tmp_path):
    data = make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    with two_node_cluster(tmp_path / "logs") as cluster:
        out = tune_main(cluster, data, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "2 nodes" in error[0] and "--shared-storage" in error[0]
    assert not (tmp_path / "runs").exists()  # nothing of the run was written
    assert not list((tmp_path / "best").glob("*"))


def test_a_shared_storage_run_on_two_nodes_tunes_and_exports(tmp_path):
    data = make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    with two_node_cluster(tmp_path / "logs") as cluster:
        out = tune_main(cluster, data, tmp_path, "--shared-storage", "--num-samples", "2",
                        "--max-epochs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "best" / "MLP_spectrogram_best_model.pth").is_file()
    assert "on 2 trial slots" in out.stdout  # one CPU on each node
