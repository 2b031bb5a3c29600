"""predict: a real exported model classifies real audio files; foreign files are refused.

One tiny model is trained once (MLP on log-mels of three genres of distinct tones) and
exported; every test runs the command's main in-process, as `python -m genre_ray.predict`
would, from the folder a user would run it in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genre_ray import config, data, export
from genre_ray.export import Exported
from genre_ray.features import build_features
from genre_ray.models import build_model
from genre_ray.training import Trainer, seed_everything
from genre_ray.transforms import compute_feature
from tests.helpers import GENRES, REPO, arch, exported, make_tree, run_main, trial_config, write_tone

RATE = 22050


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tone dataset, its spectrogram features, and an MLP exported from them."""
    root = tmp_path_factory.mktemp("predict")
    tree = make_tree(root / "data", tracks=3, seconds=11.0)
    fs = build_features(tree, "spectrogram", config.load(), cache=root / "cache")
    seed_everything(0)
    model = build_model("MLP", fs.input_shape, len(fs.classes), arch("MLP"))
    split = {name: (s.x, s.labels) for name, s in fs.splits.items()}
    trainer = Trainer(model, split["train"], split["val"], trial_config("MLP").training,
                      n_classes=len(fs.classes), epochs=60, device=torch.device("cpu"))
    history = trainer.fit(60, lambda m, _: m["val_acc"] == 1.0 and m["train_loss"] < 0.05)
    assert history[-1]["val_acc"] == 1.0  # the tones are learned
    path = root / "models" / export.export_name("MLP", "spectrogram")
    exported(fs, "MLP", model.state_dict(), history[-1]).save([path])
    clips = {genre: write_tone(root / "clips" / f"{genre}.wav", 220.0 * (g + 1), 7.0)
             for g, genre in enumerate(GENRES)}
    short = write_tone(root / "clips" / "short.wav", 440.0, 2.0)
    return {"root": root, "tree": tree, "fs": fs, "model": path, "clips": clips, "short": short}


def predict(*args: str | Path, cwd: Path = REPO):
    """`python -m genre_ray.predict ARGS`, run from `cwd`, in this process
    (tests/test_bad_inputs.py runs the command as a subprocess)."""
    return run_main("genre_ray.predict", *args, cwd=cwd)


def _refused(proc, *words: str) -> str:
    """Exit 2 with exactly one line on stderr, no traceback, naming `words`."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def _with(model: Exported, path: Path, **changes) -> Path:
    dataclasses.replace(model, **changes).save([path])
    return path


# ---- one code path for features -------------------------------------------------------

def test_compute_feature_reproduces_the_training_features(trained):
    """Decoding, cutting and compute_feature on the val tracks give the cached val features."""
    fs, genres_dir = trained["fs"], trained["tree"] / "genres_original"
    val = fs.splits["val"]
    params = fs.params
    waves = torch.cat([data.segment(data.decode(genres_dir / tid.split(".")[0] / f"{tid}.wav", RATE),
                                    round(params["data"]["segment_seconds"] * RATE),
                                    round(params["data"]["min_tail_seconds"] * RATE))
                       for tid in val.track_ids])
    x = compute_feature(waves, fs.feature, params["sample_rate"], params["feature_params"], fs.stats)
    assert torch.equal(x, val.x)


# ---- predictions ---------------------------------------------------------------------

def test_json_names_each_tone_genre_and_pads_a_short_clip(trained):
    clips = trained["clips"]
    proc = predict(*clips.values(), trained["short"], "--model", trained["model"], "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)  # stdout is one JSON document and nothing else
    assert [r["file"] for r in results] == [str(p) for p in [*clips.values(), trained["short"]]]
    for result, genre in zip(results, [*clips, "classical"]):  # short.wav is 440 Hz: classical
        assert set(result) >= {"file", "model", "top", "segments", "padded"}
        assert result["model"] == str(trained["model"])
        assert result["top"][0]["genre"] == genre
        assert len(result["top"]) == len(GENRES)
        assert sum(t["probability"] for t in result["top"]) == pytest.approx(1.0, abs=1e-4)
    assert [r["segments"] for r in results] == [1, 1, 1, 1]  # 7 s: one 5 s segment, 2 s tail dropped
    assert [r["padded"] for r in results] == [False, False, False, True]
    assert str(trained["model"]) in proc.stderr  # which model: on stderr, stdout stays JSON


def test_plain_top_2_is_sorted_and_says_a_clip_was_padded(trained):
    proc = predict(trained["short"], "--model", trained["model"], "--top", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"model: {trained['model']} (MLP on spectrogram" in out
    assert "padded: 2.0 s clip < 5 s segment" in out
    ranked = re.findall(r"^\s+\d\. (\w+)\s+([01]\.\d+)$", out, flags=re.M)
    probs = [float(p) for _, p in ranked]
    assert len(ranked) == 2 and ranked[0][0] == "classical"
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0


# ---- choosing a model from a folder ----------------------------------------------------

def test_models_dir_picks_the_best_test_track_accuracy(trained, tmp_path):
    payload = Exported.load(trained["model"])
    val = {"val_loss": 0.1, "epoch": 3}
    _with(payload, tmp_path / "a.pth", val={**val, "val_acc": 1.0},
          test={"accuracy": 0.9, "track_accuracy": 0.5, "macro_f1": 0.5})
    chosen = _with(payload, tmp_path / "b.pth", val={**val, "val_acc": 0.2},
                   test={"accuracy": 0.8, "track_accuracy": 0.9, "macro_f1": 0.8})
    torch.save({"a": 1}, tmp_path / "foreign.pth")  # skipped, not fatal
    proc = predict(trained["clips"]["jazz"], "--models-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert str(chosen) in first and "test track accuracy (0.900)" in first
    assert "jazz" in proc.stdout.splitlines()[2]


def test_default_folder_falls_back_to_validation_accuracy(trained, tmp_path):
    payload = Exported.load(trained["model"])
    folder = tmp_path / "best_models"  # the default --models-dir, relative to where it runs
    chosen = _with(payload, folder / "a.pth", val={"val_loss": 0.3, "val_acc": 0.9, "epoch": 2})
    _with(payload, folder / "b.pth", val={"val_loss": 0.1, "val_acc": 0.3, "epoch": 2})
    proc = predict(trained["clips"]["blues"], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["model"] == str(chosen.relative_to(tmp_path))
    assert "validation accuracy (0.900" in proc.stderr and "no export there has test scores" in proc.stderr


def test_a_folder_without_exports_is_a_clear_error(trained, tmp_path):
    torch.save({"a": 1}, tmp_path / "foreign.pth")
    _refused(predict(trained["short"], "--models-dir", tmp_path), str(tmp_path), "tune_main.py")
    _refused(predict(trained["short"], "--models-dir", tmp_path / "absent"), "does not exist")


# ---- refusals --------------------------------------------------------------------------

class _Opens:
    """Unpickling this creates `marker` (with open): code a model file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _Shell(_Opens):
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _foreign(path: Path, marker: Path) -> None:
    torch.save({"a": 1}, path)


def _truncated(path: Path, marker: Path, source: Path) -> None:
    raw = source.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _pickle_open(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"format": export.FORMAT, "state_dict": _Opens(marker)}, f)


def _torch_shell(path: Path, marker: Path) -> None:
    torch.save({"format": export.FORMAT, "state_dict": _Shell(marker)}, path)


@pytest.mark.parametrize("write", [_foreign, _truncated, _pickle_open, _torch_shell],
                         ids=["foreign", "truncated", "pickle-open", "torch-save-os-system"])
def test_files_that_are_not_our_exports_are_refused_without_running_code(trained, tmp_path, write):
    path, marker = tmp_path / "model.pth", tmp_path / "marker"
    if write is _truncated:
        write(path, marker, trained["model"])
    else:
        write(path, marker)
    assert not marker.exists()
    _refused(predict(trained["short"], "--model", path), str(path), "not a genre-ray model")
    assert not marker.exists()
    if write in (_pickle_open, _torch_shell):  # the file really runs code when trusted
        with path.open("rb") as f:
            pickle.load(f) if write is _pickle_open else torch.load(f, weights_only=False)
        assert marker.exists()


def test_missing_and_non_audio_files_are_named(trained, tmp_path):
    missing = tmp_path / "nope.wav"
    _refused(predict(missing, "--model", trained["model"]), str(missing), "does not exist")
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n")
    _refused(predict(text, "--model", trained["model"]), str(text), "does not decode")
    _refused(predict(tmp_path, "--model", trained["model"]), str(tmp_path), "is a folder")


CAPPED = """
import resource, sys
cap = 1 << 30  # bytes of data memory: resampling 44,101 Hz by the reduced ratio took 3.9 GB
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
from genre_ray import predict
predict.main(sys.argv[1:])
"""


@pytest.mark.slow  # a subprocess under a memory cap
def test_an_odd_sample_rate_is_classified_in_bounded_memory(trained, tmp_path):
    odd = write_tone(tmp_path / "odd.wav", 220.0 * (GENRES.index("classical") + 1), 6.0, rate=44101)
    out = subprocess.run([sys.executable, "-c", CAPPED, str(odd), "--model", str(trained["model"]), "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    [answer] = json.loads(out.stdout)
    assert answer["top"][0]["genre"] == "classical"

