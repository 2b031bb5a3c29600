"""Stage tuning with real Ray (local), real Optuna and the real trainable, on tiny data."""
from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
import ray
import torch
from optuna.trial import TrialState

from genre_ray import config, tuning
from genre_ray.errors import UserError
from genre_ray.features import build_features
from genre_ray.search_space import load_space
from genre_ray.export import CHECKPOINT_METRIC
from genre_ray.trainable import load_trial_state, share
from genre_ray.trials import FAILED, FINISHED, PRUNED, TrialRecord
from genre_ray.tuning import build_search


def cfg_with(**search) -> config.Config:
    """defaults.yaml with these `search` keys (num_samples=4, ...)."""
    return config.load(values={f"search.{key}": value for key, value in search.items()})
from tests.helpers import make_tree

PAIRS = [("MLP", "spectrogram"), ("MLP2", "waveform")]
MAX_EPOCHS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real tuning run: 2 pairs x 4 trials x up to 5 epochs, ASHA grace 1 (rungs 1, 2, 4)."""
    root = make_tree(tmp_path_factory.mktemp("tones"), tracks=3, seconds=6.0)
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("runs") / "test-run"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = cfg_with(num_samples=4, max_epochs=MAX_EPOCHS, grace_period=1, n_startup_trials=2)
        sets = [build_features(root, f, cfg, cache=cache) for f in ("spectrogram", "waveform")]
        refs = {fs.variant: share(fs) for fs in sets}
        storage = tuning.optuna_storage(run_dir)
        spaces = {m: load_space(m) for m, _ in PAIRS}
        searcher, scheduler = build_search(PAIRS, spaces, cfg, "test-run", storage)
        with pytest.MonkeyPatch.context() as env:
            env.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)  # make_tuner's own choice
            grid = tuning.fit(refs, searcher, scheduler, cfg, storage_path=str(run_dir.parent),
                              name=run_dir.name, num_trials=8, cpus_per_trial=1, gpus_per_trial=0,
                              max_concurrent=2, verbose=0)
    finally:
        ray.shutdown()
    return grid, storage, spaces


@pytest.mark.slow
def test_each_pair_has_its_own_study_with_the_first_point_first(run):
    grid, storage, spaces = run
    for model, feature in PAIRS:
        study = optuna.load_study(study_name=f"test-run/{model}_{feature}", storage=storage)
        assert len(study.trials) == 4
        assert study.trials[0].params == spaces[model].first_point
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


@pytest.mark.slow
def test_asha_stopped_trials_are_pruned_in_optuna(run):
    grid, storage, _ = run
    epochs = {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in grid}
    assert min(epochs.values()) < MAX_EPOCHS  # ASHA stopped someone at a rung
    for model, feature in PAIRS:
        study = optuna.load_study(study_name=f"test-run/{model}_{feature}", storage=storage)
        for t in study.trials:
            last_step = max(t.intermediate_values)
            assert (t.state == TrialState.PRUNED) == (last_step < MAX_EPOCHS), (t.number, t.state, last_step)


@pytest.mark.slow
def test_every_trial_reports_every_epoch_and_keeps_its_checkpoints_bounded(run):
    grid, _, _ = run
    assert len(grid) == 8 and not grid.errors
    for result in grid:
        history = result.metrics_dataframe
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        assert {"train_loss", "val_loss", "val_acc"} <= set(history.columns)
        assert len(history) == result.metrics[tuning.TIME_ATTR]
        assert 1 <= len(result.best_checkpoints) <= tuning.KEEP_CHECKPOINTS


@pytest.mark.slow
def test_the_tuner_writes_csv_and_json_results_and_no_tensorboard(run):
    grid, _, _ = run
    for result in grid:
        folder = Path(result.path)
        assert (folder / "result.json").is_file() and (folder / "progress.csv").is_file()
        assert not list(folder.glob("events.out.tfevents*"))


@pytest.mark.slow
def test_trials_checkpoint_their_best_state_only_at_asha_rungs_and_the_last_epoch(run):
    grid, _, _ = run
    allowed = {1, 2, 4, MAX_EPOCHS}
    search = cfg_with(max_epochs=MAX_EPOCHS, grace_period=1).search
    assert tuning.checkpoint_epochs(search) == sorted(allowed)
    for result in grid:
        history = result.metrics_dataframe.set_index("epoch")
        saved_at = set(history.index[history["checkpoint_dir_name"].notna()])
        assert saved_at and saved_at <= allowed, saved_at
        assert history.index.max() in allowed  # ASHA stops trials at rungs only: nothing unsaved is lost
        checkpoint, metrics = min(result.best_checkpoints, key=lambda c: c[1][CHECKPOINT_METRIC])
        state = load_trial_state(checkpoint)
        best_epoch = history["val_loss"].idxmin()
        assert state["metrics"]["epoch"] == best_epoch  # the best state, saved at or after its epoch
        assert state["metrics"]["val_loss"] == pytest.approx(history["val_loss"].min())
        assert metrics[CHECKPOINT_METRIC] == pytest.approx(history["val_loss"].min())
        assert all(t.device.type == "cpu" for t in state["trainer"]["model"].values())


def test_max_epochs_below_the_grace_period_still_builds_its_schedulers(tmp_path):
    cfg = cfg_with(num_samples=1, max_epochs=1, grace_period=2, n_startup_trials=1)
    _, scheduler = build_search([("MLP", "spectrogram")], {"MLP": load_space("MLP")}, cfg, "short",
                                tuning.optuna_storage(tmp_path))
    assert "MLP_spectrogram" in scheduler.debug_string()


def test_a_restored_search_fails_the_trials_asked_after_its_last_save(tmp_path):
    """A driver killed between asking Optuna for a trial and saving its searcher leaves
    that trial RUNNING in the study; the restored searcher tells it FAIL, keeps its own."""
    cfg = cfg_with(num_samples=3, max_epochs=2, grace_period=1, n_startup_trials=1)
    pairs, spaces, storage = [("MLP", "spectrogram")], {"MLP": load_space("MLP")}, \
        tuning.optuna_storage(tmp_path)
    searcher, _ = build_search(pairs, spaces, cfg, "killed", storage)
    as_built = pickle.dumps(searcher)  # what Tune keeps in tuner.pkl
    searcher.suggest("kept")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("orphan")  # asked, then the driver dies before the next save
    restored = pickle.loads(as_built)  # Tuner.restore: tuner.pkl, then the saved state
    restored.restore(str(tmp_path / "searcher.pkl"))
    study = optuna.load_study(study_name="killed/MLP_spectrogram", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL]


def test_a_finished_run_settles_the_trials_its_searcher_never_heard_end(tmp_path):
    """Trials Tune ended that a study still holds RUNNING are told as their records say;
    one no record names stays RUNNING."""
    cfg = cfg_with(num_samples=4, max_epochs=2, grace_period=1, n_startup_trials=1)
    storage = tuning.optuna_storage(tmp_path)
    searcher, _ = build_search([("MLP", "spectrogram")], {"MLP": load_space("MLP")}, cfg, "r", storage)
    for trial_id in ("done", "stopped", "broken", "unknown"):
        searcher.suggest(trial_id)
    epochs = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.25}]
    tuning.settle(storage, "r", [
        TrialRecord("done", "MLP_spectrogram", "spectrogram", {}, FINISHED, 2, epochs),
        TrialRecord("stopped", "MLP_spectrogram", "spectrogram", {}, PRUNED, 1, epochs[:1]),
        TrialRecord("broken", "MLP_spectrogram", "spectrogram", {}, FAILED, 1, epochs[:1])])
    trials = optuna.load_study(study_name="r/MLP_spectrogram", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                         TrialState.RUNNING]
    assert trials[0].value == 0.25


@pytest.mark.slow
def test_the_trial_device_follows_what_ray_assigned():
    """On a node with a (logical) GPU: a worker given no GPU gets no ids, so it trains on the
    CPU; one given the GPU gets its id, and a torch that cannot use it says so clearly."""
    from genre_ray.training import pick_device

    @ray.remote
    def chosen() -> tuple[list, str]:
        ids = ray.get_gpu_ids()
        try:
            return ids, str(pick_device(ids))
        except UserError as err:
            return ids, str(err)

    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cpu_trial = ray.get(chosen.options(num_gpus=0).remote())
        gpu_trial = ray.get(chosen.options(num_gpus=0.5).remote())
    finally:
        ray.shutdown()
    assert cpu_trial == ([], "cpu")
    assert gpu_trial[0] == [0] or gpu_trial[0] == ["0"]
    assert gpu_trial[1] == "cuda:0" if torch.cuda.is_available() else "no CUDA device" in gpu_trial[1]


def test_importances_score_asha_stopped_trials_by_their_best_loss(tmp_path):
    storage = tuning.optuna_storage(tmp_path)
    study = optuna.create_study(study_name="r/CEL_spectrogram", storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    width = optuna.distributions.CategoricalDistribution([16, 32, 64])
    for i in range(2):
        assert tuning.importances(storage, "r/CEL_spectrogram") == {}  # under 3 scored
        trial = study.ask({"learning_rate": lr, "nodes": width})
        trial.report(1.0 + i, 1)
        study.tell(trial, state=TrialState.PRUNED)  # as ASHA's stop lands in Optuna
    for i in range(6):  # the loss follows the learning rate alone; nodes does nothing
        trial = study.ask({"learning_rate": lr, "nodes": width})
        for epoch in (1, 2):
            trial.report(trial.params["learning_rate"] * 100 + 1 / epoch, epoch)
        study.tell(trial, state=TrialState.PRUNED if i % 2 else TrialState.COMPLETE,
                   values=None if i % 2 else trial.params["learning_rate"] * 100 + 0.5)
    found = tuning.importances(storage, "r/CEL_spectrogram")
    assert set(found) == {"learning_rate", "nodes"} and found["learning_rate"] > found["nodes"]
