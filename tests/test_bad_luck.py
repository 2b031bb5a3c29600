"""Bad luck in training, in one real run: a learning rate that makes the loss NaN, and a
model too big for the memory cap this test sets on the run's processes. Each such trial
ends alone, is recorded as failed in Ray, in Optuna and on the leaderboard, and the run
finishes and exports both pairs."""
from __future__ import annotations

import csv
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune import ExperimentAnalysis, ResultGrid

from genre_ray import export, report, tuning
from genre_ray.search_space import SPACES_DIR
from tests.helpers import REPO, make_tree

pytestmark = pytest.mark.slow  # whole tune_main runs

CAP = 4 << 30  # bytes of data memory per process (RLIMIT_DATA): Ray runs well under it
# MLP: SGD at a learning rate of 1e4 turns the loss NaN in its first epoch.
# MLP2: 300,000 hidden nodes over 64 x 108 spectrogram inputs is an 8.3 GB first layer.
SPACES = {
    "MLP": {"params": {"learning_rate": {"choice": [0.01, 10000.0]}, "optimizer": {"choice": ["sgd"]}},
            "first_point": {"learning_rate": 10000.0, "optimizer": "sgd"}},
    "MLP2": {"params": {"nodes": {"choice": [32, 300000]}, "hidden_layers": {"choice": [1]}},
             "first_point": {"nodes": 300000, "hidden_layers": 1}},
}
SAMPLES, SEED = 2, 10  # with this seed each pair's second trial (TPE's random start) is a healthy one


def bad(pair: str, config: dict) -> bool:
    return config.get("learning_rate") == 10000.0 if pair.startswith("MLP_") else \
        config.get("nodes") == 300000


def cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_luck")
    make_tree(base / "data", tracks=3, seconds=11.0)
    spaces = shutil.copytree(SPACES_DIR, base / "spaces")
    for model, space in SPACES.items():
        (spaces / f"{model}.yaml").write_text(json.dumps(space))  # JSON is YAML
    out = subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(base / "data"),
         "--models", "MLP", "MLP2", "--features", "spectrogram", "--num-samples", str(SAMPLES),
         "--seed", str(SEED), "--max-epochs", "3", "--grace-period", "1", "--search-spaces", str(spaces),
         "--storage-path", str(base / "runs"),
         "--name", "r", "--output-dir", str(base / "best"), "--wandb", "offline"],
        cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=cap_memory)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    trials = {}
    for folder in (base / "runs" / "r").glob("MLP*_spectrogram_*"):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        config = json.loads((folder / "params.json").read_text())
        error = folder / "error.txt"
        trials[folder.name] = (config, rows, error.read_text() if error.is_file() else None)
    return base, out, trials


def test_the_run_finishes_and_exports_both_pairs(run):
    base, _, trials = run
    assert len(trials) == 2 * SAMPLES
    for model in SPACES:
        path = base / "best" / export.export_name(model, "spectrogram")
        assert not bad(f"{model}_", export.Exported.load(path).hyper)


def test_a_diverging_trial_ends_itself_once_and_is_not_retried(run):
    _, _, trials = run
    diverged = {name: rows for name, (config, rows, _) in trials.items()
                if name.startswith("MLP_") and bad(name, config)}
    assert diverged
    for name, rows in diverged.items():
        assert [bool(r.get("diverged")) for r in rows] == [False] * (len(rows) - 1) + [True], name
        assert "lower the learning rate" in rows[-1]["diverged"]
        assert [r["iterations_since_restore"] for r in rows] == list(range(1, len(rows) + 1))
        assert trials[name][2] is None  # ended, not errored


def test_an_out_of_memory_trial_fails_alone_after_a_bounded_number_of_tries(run):
    _, _, trials = run
    oom = {name: error for name, (config, _, error) in trials.items()
           if name.startswith("MLP2_") and bad(name, config)}
    assert oom
    for name, error in oom.items():
        assert error is not None and "can't allocate memory" in error, name
        assert error.count("Failure # ") == 1 + tuning.MAX_FAILURES
    healthy = [rows for name, (config, rows, _) in trials.items() if not bad(name, config)]
    assert healthy and all(rows[-1]["val_loss"] == rows[-1]["val_loss"] for rows in healthy)


def test_optuna_the_leaderboard_and_the_summary_record_them_as_failed(run):
    base, out, trials = run
    failed_lines = {line.split(":")[0].strip() for line in out.stdout.splitlines()
                    if line.startswith("  MLP")}
    assert failed_lines == {name for name, (config, _, _) in trials.items() if bad(name, config)}
    storage = JournalStorage(JournalFileBackend(str(base / "runs" / "r" / "optuna.journal")))
    with open(base / "runs" / "r" / "leaderboard.csv", newline="") as f:
        rows = {row["pair"]: row for row in csv.DictReader(f)}
    for model in SPACES:
        pair = f"{model}_spectrogram"
        study = optuna.load_study(study_name=f"r/{pair}", storage=storage)
        assert len(study.trials) == SAMPLES
        for t in study.trials:
            assert (t.state == TrialState.FAIL) == bad(pair, t.params), t
        failed = sum(bad(pair, config) for name, (config, _, _) in trials.items()
                     if name.startswith(pair))
        assert int(rows[pair]["failed"]) == failed


def test_each_trial_has_one_outcome_in_optuna_the_leaderboard_and_the_search_plot(run):
    """Finished, pruned, diverged and errored trials: one rule (trials.outcome) for all."""
    base, _, trials = run
    run_dir = base / "runs" / "r"
    grid = ResultGrid(ExperimentAnalysis(str(run_dir)))
    ended = {r.metrics["trial_id"]: tuning.result_outcome(r, 3) for r in grid}
    assert {tuning.FINISHED, tuning.FAILED} <= set(ended.values())
    plotted = {t["trial_id"]: t for t in report.search_trials(tuning.records(grid, 3))}
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    with open(run_dir / "leaderboard.csv", newline="") as f:
        rows = {row["pair"]: row for row in csv.DictReader(f)}
    for model in SPACES:
        pair = f"{model}_spectrogram"
        ids = [r.metrics["trial_id"] for r in grid if Path(r.path).name.startswith(f"{pair}_")]
        study = optuna.load_study(study_name=f"r/{pair}", storage=storage)
        assert sorted(tuning.OPTUNA_STATE[ended[i]] for i in ids) == sorted(t.state for t in study.trials)
        for kind in (tuning.FINISHED, tuning.PRUNED, tuning.FAILED):
            assert int(rows[pair][kind]) == sum(ended[i] == kind for i in ids), (pair, kind)
        for i in ids:
            if i in plotted:  # a trial that reported no epoch is not drawn
                assert plotted[i]["failed"] == (ended[i] == tuning.FAILED)
                assert plotted[i]["stopped"] == (ended[i] == tuning.PRUNED)
