"""A search over the spectrogram's front end, as a user runs it: `tune_main.py` with a search
space whose `features.spectrogram` section chooses hop_length and n_mels. Each parameter set
is computed and cached once, every trial trains on the one its config names, and the export
carries the winner's front end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from genre_ray import config, export
from genre_ray.features import build_variants
from genre_ray.training import evaluate
from tests.helpers import ONE_SLOT, REPO, make_tree

pytestmark = pytest.mark.slow  # a whole tune_main run

SPACE = """\
params:
  learning_rate: {log_uniform: [1.0e-3, 1.0e-2]}
first_point: {learning_rate: 0.003}
features:
  spectrogram:
    params:
      hop_length: {choice: [512, 1024]}
      n_mels: {choice: [16, 32]}
      freq_mask: {int: [0, 4]}
    first_point: {hop_length: 1024, n_mels: 32, freq_mask: 2}
"""
TRIALS = 6  # over 4 front ends: some share one
FRAMES = {512: 216, 1024: 108}  # of a 5 s segment at 22,050 Hz (centred frames)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = tmp_path_factory.mktemp("job")
    data = make_tree(base / "data", tracks=3, seconds=6.0)
    (base / "spaces").mkdir()
    (base / "spaces" / "MLP.yaml").write_text(SPACE)
    cache = base / "cache"
    args = ["--data-dir", str(data), "--models", "MLP", "--features", "spectrogram",
            "--search-spaces", str(base / "spaces"), "--num-samples", str(TRIALS), "--max-epochs", "2",
            "--storage-path", str(base / "runs"), "--name", "front", "--output-dir", str(base / "best"),
            "--wandb", "off", *ONE_SLOT]
    out = subprocess.run([sys.executable, str(REPO / "tune_main.py"), *args], cwd=REPO, timeout=900,
                         capture_output=True, text=True, env={**os.environ, "GENRE_RAY_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr[-3000:]
    return base, data, cache


def _trials(base) -> list[tuple[dict, dict]]:
    """(sampled config, saved state) of every trial's latest checkpoint."""
    found = []
    for params in (base / "runs" / "front").glob("*/params.json"):
        checkpoints = sorted(params.parent.glob("checkpoint_*/trial_state.pt"))
        if checkpoints:
            found.append((json.loads(params.read_text()),
                          torch.load(checkpoints[-1], map_location="cpu", weights_only=True)))
    return found


def test_each_front_end_is_computed_once_whatever_the_trials(job):
    base, _, cache = job
    entries = sorted(p.name for p in (cache / "features").iterdir())
    assert len(entries) == 4 and all(name.startswith("spectrogram-") for name in entries)


def test_every_trial_trains_on_the_front_end_its_config_names(job):
    """MLP's first layer takes n_mels x frames inputs: its weights say which features it saw."""
    trials = _trials(job[0])
    assert len(trials) == TRIALS
    assert len({(c["hop_length"], c["n_mels"]) for c, _ in trials}) > 1  # the search moved
    for sampled, state in trials:
        first_layer = next(w for k, w in state["trainer"]["model"].items() if k.endswith("weight"))
        assert first_layer.shape[1] == sampled["n_mels"] * FRAMES[sampled["hop_length"]], sampled


def test_the_export_carries_the_winners_front_end_and_reproduces_its_score(job):
    base, data, cache = job
    saved = export.Exported.load(base / "best" / export.export_name("MLP", "spectrogram"))
    assert {k: saved.feature_params[k] for k in ("hop_length", "n_mels")} == \
        {k: saved.hyper[k] for k in ("hop_length", "n_mels")}
    cfg = config.load()
    [fs] = build_variants(data, [("spectrogram", saved.feature_params)], cfg, cache=cache).values()
    assert fs.from_cache and list(saved.input_shape) == list(fs.input_shape)
    result = evaluate(saved.rebuild(), fs.splits["val"].x, fs.splits["val"].labels, len(fs.classes))
    assert result.accuracy == pytest.approx(saved.val["val_acc"], abs=1e-6)
