"""Export and report as functions of a run's trial records, on records made by hand: the
leaderboard's rows, the first point's score and who won, costs and the Pareto front, the
search plot's trials, the best checkpoint, the run's files and plots. No Ray starts."""
from __future__ import annotations

import csv
import math
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray.tune import Result

from genre_ray import export, report, tuning
from genre_ray.export import PairExport, TestScores
from genre_ray.trials import EXCLUDED, FAILED, FINISHED, PRUNED, TrialRecord

PAIR, FIRST = "MLP_spectrogram", {"learning_rate": 0.001, "nodes": 128}
KEYS = {"pair": PAIR, "model": "MLP", "feature": "spectrogram", "max_epochs": 4, "seed": 0,
        "checkpoint_epochs": [1, 2, 4]}


def record(trial_id: str, outcome: str, losses: list[float], hyper: dict | None = None,
           pair: str = PAIR, cost: dict | None = None, busy_s: float = 1.0, **fields) -> TrialRecord:
    """A trial of `pair` that reported `losses` by epoch."""
    model, feature = pair.split("_")
    config = {**KEYS, "pair": pair, "model": model, "feature": feature,
              **(hyper if hyper is not None else {"learning_rate": 0.01, "nodes": 64})}
    epochs = [{"epoch": i, "train_loss": 1.0, "val_loss": loss, "val_acc": 0.5, "lr": 0.01}
              for i, loss in enumerate(losses, 1)]
    return TrialRecord(trial_id, pair, feature, config, outcome, len(losses), epochs,
                       cost or {}, busy_s, **fields)


def pair_export(trial_id: str, val_loss: float = 0.3) -> PairExport:
    """What export.export_pair gives, its model reduced to the fields report reads."""
    exported = SimpleNamespace(trial_id=trial_id, val={"val_loss": val_loss, "val_acc": 0.9},
                               hyper={"learning_rate": 0.01})
    return PairExport(exported, TestScores(0.8, 0.9, 0.75, [[2, 0], [1, 2]]), 1234,
                      Path("best") / f"{PAIR}_best_model.pth", Path("best") / "m.onnx")


def cost(params: int, latency: float) -> dict:
    return {"params": params, "latency_ms": latency, "latency_ms_b64": latency / 10}


def row_of(records: list[TrialRecord], exports: dict, per_trial=(1.0, 0.0)):
    rows, costs = report.pair_results([PAIR], records, exports, {PAIR: FIRST}, {PAIR: {"nodes": 0.7}},
                                      per_trial)
    return rows[0], costs


def test_a_pairs_row_counts_each_outcome_and_what_its_trials_held():
    records = [record("a", FINISHED, [1.0, 0.5, 0.4, 0.3], busy_s=10.0),
               record("b", PRUNED, [1.2], busy_s=4.0),
               record("c", FAILED, [math.nan], busy_s=2.0, failure="c: diverged"),
               record("d", EXCLUDED, [], busy_s=0.5),
               record("z", FINISHED, [0.1], pair="CEL_spectrogram", busy_s=99.0)]  # another pair's
    row, _ = row_of(records, {PAIR: None}, per_trial=(2.0, 0.5))
    assert (row.finished, row.pruned, row.failed, row.excluded) == (1, 1, 1, 1)
    assert (row.cpu_s, row.gpu_s) == (33.0, 8.25)
    assert row.export_path is None and math.isnan(row.val_loss) and row.importance == {"nodes": 0.7}


def test_the_export_fills_the_row_with_its_best_trials_scores_and_curves():
    records = [record("a", FINISHED, [1.0, 0.5, 0.4, 0.3], cost=cost(1234, 2.0)),
               record("b", PRUNED, [1.2], cost=cost(99, 1.0))]
    row, costs = row_of(records, {PAIR: pair_export("a")})
    assert (row.trial_id, row.val_loss, row.val_acc, row.params, row.epochs) == ("a", 0.3, 0.9, 1234, 4)
    assert row.test.track_accuracy == 0.9 and row.onnx_path == Path("best") / "m.onnx"
    assert [h["val_loss"] for h in row.history] == [1.0, 0.5, 0.4, 0.3]
    assert set(row.history[0]) == {"epoch", "train_loss", "val_loss", "val_acc"}
    assert (row.latency_ms, row.pareto) == (2.0, "yes")  # the lowest loss: on the front
    assert {t["trial_id"]: t["exported"] for t in costs} == {"a": True, "b": False}
    assert row.row()["config"] == '{"learning_rate": 0.01}'


@pytest.mark.parametrize("exported, winner", [("first", "first point"), ("other", "searched")])
def test_the_first_points_best_loss_ignores_nan_and_says_whether_it_won(exported, winner):
    records = [record("first", PRUNED, [0.9, math.nan, 0.6], hyper=FIRST),
               record("other", FINISHED, [0.8, 0.5])]
    row, _ = row_of(records, {PAIR: pair_export(exported)})
    assert (row.first_point_val_loss, row.winner) == (0.6, winner)


def test_without_a_first_point_trial_that_scored_there_is_no_winner():
    row, _ = row_of([record("first", EXCLUDED, [], hyper=FIRST)], {PAIR: None})
    assert math.isnan(row.first_point_val_loss) and row.winner == ""


def test_costs_are_the_trials_that_scored_and_measured_their_cost():
    records = [record("a", FINISHED, [0.5], cost=cost(10, 3.0)),
               record("b", PRUNED, [math.inf], cost=cost(10, 1.0)),  # never a finite loss
               record("c", EXCLUDED, [], cost=cost(10**7, 1.0)),  # untrained
               record("d", FINISHED, [0.4], cost={"params": 10}),  # latency not measured
               record("w", FINISHED, [0.9], pair="MLP_waveform", cost=cost(10, 9.0))]
    found = report.trial_costs(records, {"a"})
    assert [(t["trial_id"], t["feature"], t["val_loss"], t["exported"]) for t in found] == \
        [("a", "spectrogram", 0.5, True), ("w", "waveform", 0.9, False)]
    assert list(found[0]) == ["feature", "pair", "trial_id", "val_loss", "exported", *tuning.COST_KEYS]


def test_the_search_plot_draws_every_trial_that_scored_with_how_it_ended():
    records = [record("a", FINISHED, [0.5, 0.4]), record("b", PRUNED, [0.9]),
               record("c", FAILED, [math.nan]), record("d", EXCLUDED, [])]
    drawn = report.search_trials(records)
    assert [(t["trial_id"], t["epochs"], t["stopped"], t["failed"]) for t in drawn] == \
        [("a", [1, 2], False, False), ("b", [1], True, False), ("c", [1], False, True)]


def test_the_best_checkpoint_is_the_lowest_finite_loss_over_the_pairs_trials():
    loaded = []

    def load_state(checkpoint):
        loaded.append(checkpoint)
        return {"metrics": {"val_loss": float(checkpoint[1:]), "epoch": 2}, "trainer": {"model": {}}}

    records = [record("a", FINISHED, [0.5], checkpoints=[("c0.7", 0.7), ("cnan", math.nan)]),
               record("b", FINISHED, [0.3], checkpoints=[("c0.3", 0.3), ("c0.9", 0.9)]),
               record("c", FAILED, [math.inf], checkpoints=[("cinf", math.inf)])]
    best = export.best_of_pair(records, load_state)
    assert (best.trial_id, best.metrics["val_loss"], best.config["nodes"]) == ("b", 0.3, 64)
    assert loaded == ["c0.7", "c0.3"]  # only a better checkpoint is read
    assert export.best_of_pair([record("d", EXCLUDED, [])], load_state) is None


def test_a_tune_result_becomes_its_record():
    frame = pd.DataFrame({"training_iteration": [1, 2, 2, 3], "epoch": [1, 2, 2, 3],
                          "val_loss": [0.9, 0.8, 0.7, math.nan], "val_acc": [0.1, 0.2, 0.3, 0.4],
                          "train_loss": [1.0] * 4, "lr": [0.1] * 4, "time_this_iter_s": [1.0] * 4})
    metrics = {"trial_id": "t1", "training_iteration": 3, "time_total_s": 12.5, "diverged": "NaN loss",
               "config": {**KEYS, "learning_rate": 0.01}, **cost(5, 1.5)}
    result = Result(metrics=metrics, checkpoint=None, error=None, path="/runs/r/MLP_spectrogram_t1",
                    metrics_dataframe=frame, best_checkpoints=[("ck", {"checkpoint_val_loss": 0.7})],
                    _storage_filesystem=None)
    [rec] = tuning.records([result], max_epochs=4)
    assert (rec.trial_id, rec.pair, rec.feature, rec.outcome, rec.last_epoch) == \
        ("t1", PAIR, "spectrogram", FAILED, 3)
    assert [e["epoch"] for e in rec.epochs] == [1, 2, 3] and rec.epochs[1]["val_loss"] == 0.7  # its last report
    assert set(rec.epochs[0]) == {"epoch", "train_loss", "val_loss", "val_acc", "lr"}
    assert rec.best_val_loss == 0.7 and rec.busy_s == 12.5 and rec.cost == cost(5, 1.5)
    assert rec.checkpoints == [("ck", 0.7)] and rec.failure == "MLP_spectrogram_t1: NaN loss"


def test_a_trial_that_failed_before_reporting_is_recorded_from_its_folder():
    """A saved run's result of such a trial has no metrics and no config."""
    result = Result(metrics={}, checkpoint=None, error=RuntimeError("CUDA error\nout of memory"),
                    path="/runs/r/CEL2_spectrogram_ab12cd34", metrics_dataframe=None)
    [rec] = tuning.records([result], max_epochs=4)
    assert (rec.trial_id, rec.pair, rec.feature, rec.outcome, rec.last_epoch, rec.epochs) == \
        ("ab12cd34", "CEL2_spectrogram", "spectrogram", FAILED, 0, [])
    assert rec.failure == "CEL2_spectrogram_ab12cd34: out of memory" and not rec.scored


def test_a_trial_that_failed_before_reporting_is_counted_on_its_pairs_row():
    """Its record holds no config (above): the row counts it failed, and the first point's
    trial is still found among the others."""
    failed = TrialRecord("x", PAIR, "spectrogram", {}, FAILED, 0, failure="x: out of memory")
    records = [failed, record("a", FINISHED, [0.3]), record("b", PRUNED, [0.9], hyper=FIRST)]
    row, _ = row_of(records, {PAIR: pair_export("a")})
    assert (row.finished, row.pruned, row.failed) == (1, 1, 1)
    assert (row.first_point_val_loss, row.winner) == (0.9, "searched")


def test_a_runs_files_and_plots_are_written_from_the_rows(tmp_path):
    records = [record("a", FINISHED, [1.0, 0.5, 0.4, 0.3], cost=cost(1234, 2.0)),
               record("b", PRUNED, [1.2], hyper=FIRST, cost=cost(99, 1.0))]
    rows, costs = report.pair_results([PAIR], records, {PAIR: pair_export("a")}, {PAIR: FIRST},
                                      {PAIR: {"nodes": 0.7, "learning_rate": 0.3}}, (1.0, 0.0))
    files = report.write_leaderboard(tmp_path, rows, {"dataset": "by hand"}, costs)
    files += report.write_plots(tmp_path, rows, ["a", "b"], report.search_trials(records), 4, costs)
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        [board] = list(csv.DictReader(f))
    assert (board["pair"], board["winner"], board["first_point_val_loss"], board["pareto"]) == \
        (PAIR, "searched", "1.2", "yes")
    assert {p.name for p in files} == {"leaderboard.md", "leaderboard.csv", "pareto.csv",
                                       f"{PAIR}_confusion.png", f"{PAIR}_curves.png", "comparison.png",
                                       "importance.png", "search.png", "pareto.png"}
    assert all(p.stat().st_size > 0 for p in files)


def test_the_summary_says_where_each_export_is_or_why_there_is_none():
    rows, _ = report.pair_results([PAIR, "CEL_spectrogram"], [record("a", FINISHED, [0.3])],
                                  {PAIR: pair_export("a"), "CEL_spectrogram": None},
                                  {PAIR: FIRST, "CEL_spectrogram": FIRST}, {}, (1.0, 0.0))
    text = report.summary_table(report.RunSummary(rows, Path("runs/r"), 12.0, 2, 0.5,
                                                  failures=["c: diverged"]))
    assert f"{PAIR}       best/{PAIR}_best_model.pth + .onnx" in text
    assert "CEL_spectrogram       no export: no trial finished an epoch" in text
    assert "1 trial(s) failed" in text and "busy 50% of the time" in text


def test_the_context_names_a_library_that_is_not_installed(monkeypatch):
    """A run with tracking off needs no wandb; its leaderboard says so instead of crashing
    (as on a GPU image whose Python had no wandb)."""
    monkeypatch.setattr(report, "LIBRARIES", ("torch", "no-such-library-genre-ray"))
    ctx = report.context(Path("d"), "random", 0, {"train": (1, 2)}, "cpu", 1.0)
    assert ctx["libraries"].startswith(f"torch {version('torch')}, no-such-library-genre-ray not installed, python ")
