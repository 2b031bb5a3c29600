"""Stage tracking: W&B mode resolution, and real Tune runs logged by real W&B (offline),
read back from W&B's own run files with W&B's own reader (`wandb leet inspect`)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray import tune

from genre_ray import config, tuning
from genre_ray.errors import UserError
from genre_ray.export import CHECKPOINT_METRIC
from genre_ray.features import build_features
from genre_ray.search_space import load_space
from genre_ray.tracking import resolve_mode, sync_hint, wandb_callback
from genre_ray.tuning import build_search
from genre_ray.trainable import load_trial_state, share
from tests.helpers import closed_port, make_tree, read_runs

KEY = "WANDB_API_KEY"


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)


@pytest.fixture
def server(monkeypatch):
    """A local socket standing in for the W&B server ($WANDB_BASE_URL): it accepts connections."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening.getsockname()[1]}")
        yield


@pytest.mark.parametrize("line", ["WANDB_API_KEY=abc123", 'WANDB_API_KEY="abc123"',
                                  "export WANDB_API_KEY='abc123'  ",
                                  "WANDB_API_KEY=abc123  # mine"])
def test_auto_is_online_with_a_key_in_the_env_file_and_exports_it(no_key, server, tmp_path, line):
    env = tmp_path / ".env"
    env.write_text(f"# secrets\nOTHER=1\n{line}\n")
    assert resolve_mode("auto", env) == "online"
    assert os.environ[KEY] == "abc123"


def test_auto_is_online_with_a_key_in_the_environment(monkeypatch, server, tmp_path):
    monkeypatch.setenv(KEY, "from-env")
    (tmp_path / ".env").write_text("WANDB_API_KEY=from-file\n")
    assert resolve_mode("auto", tmp_path / ".env") == "online"
    assert os.environ[KEY] == "from-env"  # the environment wins


def test_auto_without_a_key_is_offline(no_key, tmp_path):
    (tmp_path / ".env").write_text("# WANDB_API_KEY=commented-out\nOTHER=1\n")
    assert resolve_mode("auto", tmp_path / ".env") == "offline"
    assert resolve_mode("auto", tmp_path / "missing.env") == "offline"
    assert KEY not in os.environ


@pytest.mark.parametrize("requested", ["online", "auto"])
def test_a_server_that_does_not_answer_means_offline_said_in_one_line(monkeypatch, capsys, tmp_path,
                                                                       requested):
    monkeypatch.setenv(KEY, "abc123")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    assert resolve_mode(requested, tmp_path / ".env") == "offline"
    out = capsys.readouterr().out
    assert re.fullmatch(r"W&B: cannot reach http://127\.0\.0\.1:\d+ \(.*\); logging offline instead: "
                        r"`wandb sync` uploads the runs later\n", out), out


@pytest.mark.parametrize("url", [" ", "not a url", "http://[::1", "http://h:99999", "ftp://h"])
def test_a_base_url_that_names_no_server_is_one_error(monkeypatch, tmp_path, url):
    monkeypatch.setenv(KEY, "abc123")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    with pytest.raises(UserError, match=rf"^WANDB_BASE_URL {re.escape(repr(url))} is not the http\(s\) "
                                        r"URL of a server; set it .*or unset it for api\.wandb\.ai$"):
        resolve_mode("auto", tmp_path / ".env")


def test_an_env_file_in_utf16_or_with_a_bom_is_read_and_latin1_is_refused(no_key, server, tmp_path):
    env = tmp_path / ".env"
    for encoding in ("utf-16", "utf-8-sig"):  # PowerShell's `echo > .env`; Notepad's UTF-8
        env.write_bytes("WANDB_API_KEY=abc123\n".encode(encoding))
        assert resolve_mode("auto", env) == "online" and os.environ.pop(KEY) == "abc123"
    env.write_bytes("# clé\nWANDB_API_KEY=abc123\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"\.env is not UTF-8 text \(byte \d+: b'\\xe9'\); save it as UTF-8"):
        resolve_mode("auto", env)


@pytest.mark.slow
def test_a_summary_run_w_and_b_cannot_take_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    from genre_ray import tracking

    monkeypatch.setenv(KEY, "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")  # the network went away
    monkeypatch.setattr(tracking, "SUMMARY_TIMEOUT_S", 5)
    tracking.log_summary("online", project="p", run_dir=tmp_path, name="r",
                         tables={"leaderboard": (["pair"], [{"pair": "MLP_waveform"}])}, files=[])
    out = capsys.readouterr().out
    assert re.fullmatch(rf"W&B: the summary run was not logged \(.+\); the leaderboard and plots "
                        rf"are in {re.escape(str(tmp_path))}\n", out), out


def test_online_without_a_key_names_the_fix(no_key, tmp_path):
    with pytest.raises(UserError, match="WANDB_API_KEY.*--wandb offline"):
        resolve_mode("online", tmp_path / ".env")


def test_off_and_offline_ignore_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY, "k")
    assert resolve_mode("off", tmp_path / ".env") is None
    assert resolve_mode("offline", tmp_path / ".env") == "offline"
    assert wandb_callback(None, project="p", run_dir=tmp_path, classes=["a"]) == []


def test_sync_hint_names_the_runs_folder(tmp_path):
    assert f"wandb sync {tmp_path}/wandb/offline-run-*" in sync_hint(tmp_path)


# ---- real Ray + real W&B offline ------------------------------------------------------

class InterruptOnFirstResult(tune.Callback):
    """Ctrl-C, once, as a user would, after a trial has reported (a second one would abort)."""

    fired = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def endless(config):
    for epoch in range(1, 10_000):
        tune.report({"epoch": epoch, "val_loss": 1.0 / epoch})
        time.sleep(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny tuning run (1 pair x 2 trials x up to 3 epochs), and one interrupted by Ctrl-C."""
    root = make_tree(tmp_path_factory.mktemp("tones"), tracks=3, seconds=6.0)
    base = tmp_path_factory.mktemp("runs")
    run_dir, stopped_dir = base / "tuned", base / "stopped"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        cfg = config.load(values={"search.num_samples": 2, "search.max_epochs": 3,
                                  "search.grace_period": 1, "search.n_startup_trials": 2})
        fs = build_features(root, "spectrogram", cfg, cache=tmp_path_factory.mktemp("cache"))
        searcher, scheduler = build_search([("MLP", "spectrogram")], {"MLP": load_space("MLP")},
                                           cfg, "tuned", tuning.optuna_storage(run_dir))
        grid = tuning.fit({fs.variant: share(fs)}, searcher, scheduler, cfg,
                          storage_path=str(base), name="tuned", num_trials=2, cpus_per_trial=1,
                          gpus_per_trial=0, max_concurrent=2, verbose=0,
                          callbacks=wandb_callback("offline", project="test", run_dir=run_dir,
                                                   classes=fs.classes))
        tune.Tuner(endless, param_space={"pair": "MLP_waveform", "model": "MLP",
                                         "feature": "waveform"},
                   run_config=tune.RunConfig(
                       storage_path=str(base), name="stopped", verbose=0,
                       callbacks=[*wandb_callback("offline", project="test",
                                                  run_dir=stopped_dir, classes=["a"]),
                                  InterruptOnFirstResult()])).fit()
    finally:
        ray.shutdown()
    return SimpleNamespace(grid=grid, run_dir=run_dir, classes=fs.classes, session=session,
                           wandb=read_runs(run_dir), stopped=read_runs(stopped_dir))


@pytest.mark.slow
def test_one_run_per_trial_grouped_by_pair_with_every_epoch(runs):
    assert len(runs.grid) == 2 and not runs.grid.errors
    assert sorted(runs.wandb) == sorted(r.metrics["trial_id"] for r in runs.grid)
    for result in runs.grid:
        _, run = runs.wandb[result.metrics["trial_id"]]
        assert run["group"] == "MLP_spectrogram" and run["exit"]["exit_code"] == 0
        assert set(run["tags"]) == {"MLP", "spectrogram"}
        tune_rows = result.metrics_dataframe
        assert [h["epoch"] for h in run["history"]] == list(tune_rows["epoch"])
        for h, (_, row) in zip(run["history"], tune_rows.iterrows()):
            for key in ("train_loss", "val_loss", "val_acc", "lr"):
                assert h[key] == pytest.approx(row[key])


@pytest.mark.slow
def test_summary_holds_the_best_epochs_confusion_matrix(runs):
    classes = runs.classes
    for result in runs.grid:
        folder, run = runs.wandb[result.metrics["trial_id"]]
        summary = run["summary"]
        checkpoint, _ = min(result.best_checkpoints, key=lambda c: c[1][CHECKPOINT_METRIC])
        best = load_trial_state(checkpoint)["metrics"]  # the best epoch's
        assert summary["best_val_loss"] == pytest.approx(best["val_loss"])
        assert summary["best_val_acc"] == pytest.approx(best["val_acc"])
        assert summary["best_epoch"] == best["epoch"]
        table = json.loads((folder / "files" / summary["val_confusion_table.path"]).read_text())
        matrix = [[0.0] * len(classes) for _ in classes]
        for actual, predicted, n in table["data"]:
            matrix[classes.index(actual)][classes.index(predicted)] = n
        reported = [json.loads(line) for line in Path(result.path, "result.json").read_text().splitlines()]
        assert matrix == next(r["val_confusion"] for r in reported if r["epoch"] == best["epoch"])


@pytest.mark.slow
def test_run_files_stay_under_the_run_dir(runs):
    wandb_files = list(runs.run_dir.parent.rglob("*.wandb"))
    assert len(wandb_files) == 2 + 1  # the tuned run's trials, and the interrupted one
    assert {f.parent.parent for f in wandb_files} == {runs.run_dir / "wandb",
                                                      runs.run_dir.parent / "stopped" / "wandb"}
    assert not list(runs.session.rglob("*.wandb")) and not list(runs.session.rglob("offline-run-*"))


@pytest.mark.slow
def test_ctrl_c_closes_the_runs_of_interrupted_trials(runs):
    ((_, run),) = runs.stopped.values()
    assert run["exit"] is not None and run["exit"]["exit_code"] == 0  # finished, not killed
    assert run["history"] and run["history"][0]["val_loss"] == 1.0
