"""Two runs of the same command at once, into one storage path and one output folder:
each gets its own run (name, lock, Optuna studies), and every export written under them
loads whole."""
from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from genre_ray import export, runs
from genre_ray.onnx_export import onnx_name
from genre_ray.onnx_runtime import OnnxModel
from tests.helpers import ONE_SLOT, REPO, make_tree, record_of

pytestmark = pytest.mark.slow  # two whole tune_main runs at once

PAIRS = ["MLP_spectrogram"]  # one pair: the two runs still share its study name and export
SAMPLES = 2


def test_two_runs_at_once_keep_their_studies_apart_and_their_exports_whole(tmp_path):
    make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    command = [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(tmp_path / "data"),
               "--models", "MLP", "--features", "spectrogram", "--num-samples", str(SAMPLES),
               "--max-epochs", "2", "--storage-path", str(tmp_path / "runs"),
               "--output-dir", str(tmp_path / "best"), "--wandb", "off", *ONE_SLOT]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]

    run_dirs = sorted(p.parent for p in (tmp_path / "runs").glob(f"*/{runs.RECORD}"))
    assert len(run_dirs) == 2
    trial_ids = {}
    for run_dir in run_dirs:
        assert record_of(run_dir)["status"] == "finished"
        storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        assert names == sorted(f"{run_dir.name}/{pair}" for pair in PAIRS)  # its own only
        for name in names:
            assert len(optuna.load_study(study_name=name, storage=storage).trials) == SAMPLES
        trial_ids[run_dir.name] = {json.loads((t / "result.json").read_text().splitlines()[0])
                                   ["trial_id"] for t in run_dir.glob("*_spectrogram_*")}
    assert not set.intersection(*trial_ids.values())

    for pair in PAIRS:
        payload = torch.load(tmp_path / "best" / export.export_name(*pair.split("_")),
                             weights_only=True)  # whole: one run's export or the other's
        assert any(payload["trial_id"] in ids for ids in trial_ids.values())
        graph = OnnxModel.load(tmp_path / "best" / onnx_name(*pair.split("_")))  # whole too
        meta = json.loads(graph.session.get_modelmeta().custom_metadata_map["genre_ray"])
        assert any(meta["trial_id"] in ids for ids in trial_ids.values())
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == sorted(  # no temporary left
        name for pair in PAIRS for name in (export.export_name(*pair.split("_")),
                                            onnx_name(*pair.split("_"))))
