"""The main job as a user runs it: `python tune_main.py ...` on tiny data, real Ray,
real Optuna, real W&B offline; then what it leaves behind."""
from __future__ import annotations

import shutil
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from genre_ray import export
from genre_ray.features import build_features
from genre_ray.search_space import SPACES_DIR, load_space
from genre_ray.training import evaluate
from tests.helpers import REPO, make_tree

PAIRS = [("MLP", "spectrogram"), ("CEL", "spectrogram")]


def tune_main(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tune_main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One real run: 2 pairs x 3 trials x up to 3 epochs on three genres of tones."""
    base = tmp_path_factory.mktemp("job")
    data = make_tree(base / "data", tracks=3, seconds=11.0)
    args = ["--data-dir", str(data), "--models", "MLP", "CEL", "--features", "spectrogram",
            "--num-samples", "3", "--max-epochs", "3", "--storage-path", str(base / "runs"),
            "--name", "job", "--output-dir", str(base / "best"), "--wandb", "offline"]
    out = tune_main(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return base, data, out


def test_exports_load_safely_and_reproduce_the_reported_val_accuracy(job):
    base, data, _ = job
    fs = build_features(data, "spectrogram")
    for model, feature in PAIRS:
        path = base / "best" / export.export_name(model, feature)
        payload = torch.load(path, weights_only=True)
        assert payload["model"] == model and payload["classes"] == fs.classes
        net = export.rebuild(payload)
        result = evaluate(net, fs.splits["val"].x, fs.splits["val"].labels, len(fs.classes))
        assert result.accuracy == pytest.approx(payload["val"]["val_acc"], abs=1e-6)
        assert result.loss == pytest.approx(payload["val"]["val_loss"], rel=1e-4)
        assert (base / "runs" / "job" / "best_models" / path.name).is_file()  # the run's copy


def test_each_pair_has_a_study_with_the_seed_point_first(job):
    base, _, _ = job
    storage = JournalStorage(JournalFileBackend(str(base / "runs" / "job" / "optuna.journal")))
    for model, feature in PAIRS:
        study = optuna.load_study(study_name=f"job/{model}_{feature}", storage=storage)
        assert len(study.trials) == 3
        assert study.trials[0].params == load_space(model).first_point
        for t in study.trials:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            assert (t.state == TrialState.PRUNED) == (max(t.intermediate_values) < 3)


def test_summary_names_every_pair_and_export(job):
    base, _, out = job
    for model, feature in PAIRS:
        line = next(l for l in out.stdout.splitlines() if l.startswith(f"{model}_{feature} "))
        assert str(base / "best" / export.export_name(model, feature)) in line
    assert "wandb sync" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--models", "RNN"], "unknown model 'RNN'"),
    (["--features", "mfcc"], "unknown feature 'mfcc'"),
    (["--search-spaces", "{bad}"], "params.nodes"),
    (["--num-samples", "0"], "--num-samples must be > 0"),
])
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    bad = tmp_path / "spaces"
    shutil.copytree(SPACES_DIR, bad)
    (bad / "MLP.yaml").write_text((bad / "MLP.yaml").read_text().replace("nodes: {choice", "nodes: {gauss"))
    argv = [a.format(bad=bad) for a in args]
    out = tune_main(*argv, "--output-dir", str(tmp_path / "best"), "--storage-path",
                    str(tmp_path / "runs"), "--wandb", "off", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert not (tmp_path / "runs").exists() and not (tmp_path / "best").exists()
