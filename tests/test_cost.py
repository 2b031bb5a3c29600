"""Accuracy against cost: each trial's measured cost, the Pareto front in the leaderboard,
and the limits a search respects (a real tune_main run with --max-params)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from genre_ray import config, cost, export, report
from genre_ray.models import build_model, count_parameters
from genre_ray.transforms import FrontEnd, unit_stats
from tests.helpers import REPO, arch, make_tree

# (name, feature, val_loss, latency_ms): a hand-built field with a known front
TRIALS = [("a", "spectrogram", 0.5, 10.0), ("b", "spectrogram", 0.4, 20.0),
          ("c", "spectrogram", 0.6, 5.0), ("d", "spectrogram", 0.6, 12.0),   # d: a beats it
          ("e", "spectrogram", 0.4, 25.0),                                    # e: b beats it
          ("f", "spectrogram", 0.5, 10.0),                                    # f: equals a, kept
          ("g", "spectrogram", 0.3, 30.0),
          ("h", "spectrogram", 0.7, 40.0),                                    # h: all beat it
          ("w1", "waveform", 0.9, 50.0), ("w2", "waveform", 1.0, 60.0)]      # w2: w1 beats it
FRONT = {"a", "b", "c", "f", "g", "w1"}


def hand_built() -> list[dict]:
    return [{"feature": f, "pair": f"X_{f}", "trial_id": name, "val_loss": loss, "latency_ms": ms,
             "latency_ms_b64": ms / 10, "params": 1000, "exported": name == "g"}
            for name, f, loss, ms in TRIALS]


def test_the_pareto_set_is_exactly_the_non_dominated_trials():
    assert set(cost.pareto([(1.0, 1.0)])) == {0}
    marked = report.pareto_front(hand_built())
    assert {t["trial_id"] for t in marked if t["front"]} == FRONT
    # the waveform trials are a front of their own: w1 is on it though spectrogram ones beat it
    assert {t["trial_id"] for t in marked if t["front"] and t["feature"] == "waveform"} == {"w1"}


def test_the_leaderboard_and_pareto_csv_list_the_front_and_mark_the_exports(tmp_path):
    costs = report.pareto_front(hand_built())
    row = report.PairResult("X_spectrogram", 3, 0, 0, 1.0, 0.0, trial_id="g", latency_ms=30.0,
                            pareto="yes")
    report.write_leaderboard(tmp_path, [row], {"dataset": "hand-built"}, costs)
    with open(tmp_path / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.PARETO_COLUMNS
    assert {r["trial_id"] for r in rows} == FRONT
    assert [r["exported"] for r in rows if r["trial_id"] == "g"] == ["True"]
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        [board] = list(csv.DictReader(f))
    assert (board["pareto"], board["latency_ms"]) == ("yes", "30.0")
    md = (tmp_path / "leaderboard.md").read_text()
    front_lines = [line for line in md.split("## Pareto front per feature")[1].splitlines()
                   if line.startswith("| ") and "trial_id" not in line]
    assert len(front_lines) == len(FRONT)


def test_a_cost_counts_the_network_and_times_the_whole_served_path():
    cfg = config.load()
    front = FrontEnd("spectrogram", cfg.data.sample_rate, cfg.features.of("spectrogram"),
                     unit_stats("spectrogram"))
    shape = front(torch.zeros(1, 110250)).shape[1:]
    net = build_model("CEL2", tuple(shape), 10, arch("CEL2")).train()
    measured = cost.measure(cost.Served(front, net), 110250, torch.device("cpu"))
    assert measured.params == count_parameters(net)
    assert math.isfinite(measured.latency_ms) and measured.latency_ms > 0
    assert math.isfinite(measured.latency_ms_b64) and measured.latency_ms_b64 > 0
    assert net.training  # left as it was found: the trial trains it next


def test_limits_name_what_is_over_and_tell_optuna_only_a_violation():
    search = config.load(values={"search.max_latency_ms": 5.0, "search.max_params": 1000}).search
    within, over = cost.Cost(1000, 5.0, 1.0), cost.Cost(1001, 7.5, 1.0)
    assert cost.violations(within, search) == []
    assert cost.violations(over, search) == ["latency 7.5 ms > --max-latency-ms 5",
                                             "1001 parameters > --max-params 1000"]
    assert cost.constraint_values(within.metrics(), search) == [0.0, 0.0]
    assert all(v > 0 for v in cost.constraint_values(over.metrics(), search))
    assert cost.violations(over, config.load().search) == []  # no limits by default


@pytest.mark.slow  # a whole tune_main run
def test_a_limit_excludes_every_trial_over_it_from_training_and_export(tmp_path):
    """MLP whose first point (nodes 128) is over --max-params and whose other trials may not
    be: one trial slot, so the seeded search is the same every time (seed 2: trials 2 and 3
    draw 64 and 128)."""
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "MLP.yaml").write_text(
        "params:\n  nodes: {choice: [64, 128]}\n  learning_rate: {log_uniform: [1.0e-3, 3.0e-3]}\n"
        "first_point: {nodes: 128, learning_rate: 0.001}\n")
    data = make_tree(tmp_path / "data", tracks=3, seconds=11.0)
    limit = 500_000  # nodes 64: 446,787 parameters on these spectrograms; nodes 128: 893,443
    out = subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(data), "--models", "MLP",
         "--features", "spectrogram", "--num-samples", "3", "--max-epochs", "2", "--seed", "2",
         "--cpus-per-trial", "2", "--max-params", str(limit), "--search-spaces", str(spaces),
         "--storage-path", str(tmp_path / "runs"), "--name", "c", "--output-dir",
         str(tmp_path / "best"), "--wandb", "off"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "c"
    results = {p.parent: [json.loads(line) for line in p.open()] for p in run.glob("*/result.json")}
    over = {folder for folder, rows in results.items() if rows[-1]["params"] > limit}
    assert over and len(over) < len(results)  # both kinds of trial happened
    for folder, rows in results.items():
        assert ("excluded" in rows[-1]) == (folder in over)
        if folder in over:  # ended before its first epoch: nothing trained, nothing saved
            assert [r["epoch"] for r in rows] == [0] and not list(folder.glob("checkpoint_*"))
            assert rows[-1]["excluded"] == f"{rows[-1]['params']} parameters > --max-params {limit}"
    saved = export.Exported.load(tmp_path / "best" / "MLP_spectrogram_best_model.pth")
    assert count_parameters(saved.rebuild()) <= limit
    study = optuna.load_study(study_name="c/MLP_spectrogram", storage=JournalStorage(
        JournalFileBackend(str(run / "optuna.journal"))))
    for trial in study.trials:  # TPE's constraints see every trial's cost
        assert (trial.user_attrs["cost"]["params"] > limit) == (trial.state.name == "PRUNED" and
                                                                 trial.params["nodes"] == 128)
    with open(run / "leaderboard.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert int(row["excluded"]) == len(over)
