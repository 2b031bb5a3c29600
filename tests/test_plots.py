"""The report's figures: each writes one readable PNG, atomically, from plain data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from genre_ray import plots

GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
          "reggae", "rock"]
PAIRS = [f"{m}_{f}" for m in ("MLP", "MLP2", "CEL", "CEL2", "CEL3")
         for f in ("waveform", "spectrogram")]
MAX_EPOCHS = 8


def counts(seed: int = 0, n: int = 10) -> list[list[int]]:
    """A plausible test confusion: mostly diagonal, some genres confused, one empty row."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 6, size=(n, n))
    m[np.arange(n), np.arange(n)] = rng.integers(40, 110, size=n)
    m[n - 1] = 0  # a genre with no test segments
    return m.tolist()


def history(epochs: int = MAX_EPOCHS) -> list[dict[str, float]]:
    """A best trial's curves: training keeps falling, validation bottoms out mid-way."""
    return [{"epoch": e, "train_loss": 2.2 * 0.75 ** e, "val_loss": 1.0 + 0.05 * (e - 5) ** 2,
             "val_acc": min(0.9, 0.2 + 0.12 * e), "lr": 1e-3} for e in range(1, epochs + 1)]


def comparison() -> list[dict[str, float]]:
    """Every pair's scores; one pair has no export (NaN everywhere)."""
    rng = np.random.default_rng(1)
    rows = [{"pair": p, "val_acc": float(rng.uniform(0.3, 0.95)),
             "test_acc": float(rng.uniform(0.3, 0.95)),
             "test_track_acc": float(rng.uniform(0.3, 1.0))} for p in PAIRS]
    rows[-1].update(val_acc=math.nan, test_acc=math.nan, test_track_acc=math.nan)
    rows[3]["test_acc"] = 0.05  # a bar too short to hold its label
    return rows


def trials() -> list[dict]:
    """Four trials per pair: ASHA stops some at epoch 2 or 4 of 8; one loss is NaN."""
    rng = np.random.default_rng(2)
    out = []
    for p, pair in enumerate(PAIRS):
        for t, last in enumerate((MAX_EPOCHS, 2, 4, MAX_EPOCHS)):
            start, rate = rng.uniform(1.6, 2.4), rng.uniform(0.05, 0.3)
            epochs = list(range(1, last + 1))
            loss = [start * math.exp(-rate * e) + rng.uniform(0, 0.1) for e in epochs]
            out.append({"pair": pair, "trial_id": f"{p:02d}{t:03d}", "epochs": epochs,
                        "val_loss": loss, "stopped": last < MAX_EPOCHS})
    out[0]["val_loss"][3] = math.nan
    return out


def importances() -> list[dict]:
    """Every pair's importances; one pair had too few trials to score."""
    rng = np.random.default_rng(3)
    names = ["learning_rate", "batch_size", "nodes", "hidden_layers", "dropout_prob", "dense_layers"]
    rows = []
    for p, pair in enumerate(PAIRS):
        share = rng.dirichlet(np.ones(len(names)))
        rows.append({"pair": pair, "importance": dict(sorted(zip(names, share.round(3).tolist()),
                                                             key=lambda kv: -kv[1])),
                     "first_point_val_loss": float(rng.uniform(0.5, 1.5)), "val_loss": float(rng.uniform(0.3, 1.0)),
                     "winner": "searched" if p % 2 else "first point"})
    rows[-1].update(importance={}, val_loss=math.nan, winner="")
    return rows


def write_all(folder: Path) -> list[Path]:
    """Every figure from the realistic inputs above, into `folder`."""
    return [plots.confusion_matrix(counts(), GENRES, "CEL3_spectrogram: test confusion",
                                   folder / "confusion.png"),
            plots.learning_curves(history(), "CEL3_spectrogram: best trial 00003",
                                  folder / "curves.png"),
            plots.pair_comparison(comparison(), folder / "comparison.png"),
            plots.search_view(trials(), folder / "search.png", MAX_EPOCHS),
            plots.importance(importances(), folder / "importance.png")]


def assert_png(path: Path) -> None:
    """A whole, decodable PNG of a readable size, and no temp file beside it."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every byte: a truncated file fails here
        width, height = image.size
    assert 400 <= width <= 4000 and 400 <= height <= 4000, (path.name, image.size)
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*"))


def test_every_figure_is_one_whole_png(tmp_path):
    paths = write_all(tmp_path)
    assert [p.parent for p in paths] == [tmp_path] * 5
    for p in paths:
        assert_png(p)
    assert sorted(tmp_path.iterdir()) == sorted(paths)


def test_rows_are_normalised_and_an_empty_row_stays_zero():
    rates = plots.normalise_rows([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    assert rates.shape == (3, 3)
    np.testing.assert_allclose(rates[0], [0.75, 0.25, 0.0])
    np.testing.assert_array_equal(rates[1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(rates.sum(axis=1), [1.0, 0.0, 1.0])
    assert np.isfinite(rates).all()


def test_rows_accept_arrays_and_reject_non_square():
    np.testing.assert_allclose(plots.normalise_rows(np.eye(4) * 7), np.eye(4))
    with pytest.raises(ValueError, match="square"):
        plots.normalise_rows([[1, 2, 3], [4, 5, 6]])


def test_mismatched_classes_raise_and_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="9 classes"):
        plots.confusion_matrix(counts(), GENRES[:9], "t", tmp_path / "confusion.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "curves.png"
    plots.learning_curves(history(), "old", target)
    before = target.read_bytes()

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plots.learning_curves(history(), "new", target)
    assert target.read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]


def test_sizes_follow_the_number_of_classes_and_pairs(tmp_path):
    small = plots.confusion_matrix(counts(n=3), GENRES[:3], "t", tmp_path / "small.png")
    big = plots.confusion_matrix(counts(n=10), GENRES, "t", tmp_path / "big.png")
    with Image.open(small) as s, Image.open(big) as b:
        assert b.size[0] > s.size[0] and b.size[1] > s.size[1]
    one = plots.search_view(trials()[:4], tmp_path / "one.png", MAX_EPOCHS)
    assert_png(one)


def test_edge_inputs_draw(tmp_path):
    """One epoch, a pair with only NaN losses, rows without track accuracy, an empty row."""
    assert_png(plots.learning_curves(history(1), "one epoch", tmp_path / "a.png"))
    nan_trial = {"pair": "MLP_waveform", "trial_id": "x", "epochs": [1, 2],
                 "val_loss": [math.nan, math.inf], "stopped": True}
    assert_png(plots.search_view([nan_trial], tmp_path / "b.png", MAX_EPOCHS))
    rows = [{"pair": "MLP_waveform", "val_acc": 0.5, "test_acc": math.nan}]
    assert_png(plots.pair_comparison(rows, tmp_path / "c.png"))
    zeros = [[0] * 10 for _ in range(10)]
    assert_png(plots.confusion_matrix(zeros, GENRES, "nothing", tmp_path / "d.png"))


def test_empty_inputs_raise(tmp_path):
    for draw in (lambda: plots.learning_curves([], "t", tmp_path / "a.png"),
                 lambda: plots.pair_comparison([], tmp_path / "b.png"),
                 lambda: plots.search_view([], tmp_path / "c.png", MAX_EPOCHS)):
        with pytest.raises(ValueError):
            draw()
    assert list(tmp_path.iterdir()) == []


def purple_pixels(path: Path) -> int:
    """Pixels of the failed-trial colour (tab:purple, #9467bd), give or take antialiasing."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - [0x94, 0x67, 0xbd]).sum(axis=2) < 30).sum())


def test_failed_trials_are_drawn_apart(tmp_path):
    healthy = trials()[:4]
    failed = {"pair": healthy[0]["pair"], "trial_id": "bad", "epochs": [1, 2, 3],
              "val_loss": [5.0, 40.0, math.nan], "stopped": False, "failed": True}
    assert purple_pixels(plots.search_view(healthy, tmp_path / "a.png", MAX_EPOCHS)) == 0
    assert purple_pixels(plots.search_view([*healthy, failed], tmp_path / "b.png",
                                           MAX_EPOCHS)) > 50
