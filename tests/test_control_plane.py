"""The control plane's share of a run: what the searcher keeps per trial (what the Tuner
writes is checked on test_tuning's run).

bench/control_plane.py measures the costs; these tests pin the behaviour behind them.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import optuna
from optuna.trial import TrialState

from genre_ray import config, tuning
from genre_ray.internals import asked
from genre_ray.search_space import load_space
from genre_ray.tuning import build_search

PAIR = ("MLP", "spectrogram")


def search(tmp_path: Path, num_samples: int, max_epochs: int = 4):
    """A searcher and scheduler of PAIR; the run's Config; its Optuna storage."""
    cfg = config.load(values={"search.num_samples": num_samples, "search.max_epochs": max_epochs,
                              "search.grace_period": 1, "search.n_startup_trials": 2})
    storage = tuning.optuna_storage(tmp_path)
    searcher, scheduler = build_search([PAIR], {"MLP": load_space("MLP")}, cfg, "cp", storage)
    return searcher, scheduler, cfg, storage


def finish(searcher, trial_id: str, last: int, max_epochs: int = 4) -> None:
    """Report epochs 1..last-1, then complete at `last` (ASHA's stop when last < max_t)."""
    for step in range(1, last):
        searcher.on_trial_result(trial_id, {tuning.METRIC: 2.0 / step, tuning.TIME_ATTR: step})
    searcher.on_trial_complete(trial_id, {tuning.METRIC: 1.0 / last, tuning.TIME_ATTR: last})


def test_the_saved_search_holds_the_running_trials_not_the_finished_ones(tmp_path):
    searcher, _, _, storage = search(tmp_path, num_samples=40)
    sizes = []
    for i in range(40):
        searcher.suggest(f"t{i}")
        if i >= 2:
            finish(searcher, f"t{i - 2}", last=1 + i % 4)  # two trials running throughout
        sizes.append(len(pickle.dumps(searcher.__dict__)))
    pair = searcher._searchers[tuning.pair_name(*PAIR)]
    assert sorted(asked(pair)) == ["t38", "t39"]
    # what still grows per finished trial: its id and the journal's line offsets (~50 B);
    # each trial's Optuna handle made it ~400 B
    assert (sizes[-1] - sizes[10]) / 29 < 150
    study = optuna.load_study(study_name="cp/MLP_spectrogram", storage=storage)
    states = [t.state for t in study.trials]
    assert states[-2:] == [TrialState.RUNNING, TrialState.RUNNING]
    assert states[:-2] == [TrialState.COMPLETE if (1 + i % 4) == 4 else TrialState.PRUNED
                           for i in range(2, 40)]


def test_a_late_result_or_completion_of_a_finished_trial_changes_nothing(tmp_path):
    searcher, _, _, storage = search(tmp_path, num_samples=2)
    searcher.suggest("a")
    finish(searcher, "a", last=2)
    searcher.on_trial_result("a", {tuning.METRIC: 0.1, tuning.TIME_ATTR: 3})
    searcher.on_trial_complete("a", {tuning.METRIC: 0.1, tuning.TIME_ATTR: 3})
    study = optuna.load_study(study_name="cp/MLP_spectrogram", storage=storage)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 2.0, 2: 0.5}


def test_a_restored_search_still_finishes_its_running_trials_and_fails_the_orphans(tmp_path):
    searcher, _, _, storage = search(tmp_path, num_samples=4)
    as_built = pickle.dumps(searcher)
    searcher.suggest("done")
    finish(searcher, "done", last=4)
    searcher.suggest("running")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("orphan")  # asked after the last save, then the driver dies
    restored = pickle.loads(as_built)
    restored.restore(str(tmp_path / "searcher.pkl"))
    finish(restored, "running", last=2)
    study = optuna.load_study(study_name="cp/MLP_spectrogram", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.FAIL]
