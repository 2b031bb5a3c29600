"""Stage tracking: every Tune trial is one W&B run, logged by WandbLoggerCallback only.

One run per trial (id = trial id), grouped by pair, tagged with model and feature. Its
history holds the learning curves (`train_loss`, `val_loss`, `val_acc`, `lr` per epoch,
step = epoch); its summary holds the confusion matrix of the trial's best epoch as a W&B
confusion-matrix chart (key `val_confusion`, table `val_confusion_table`) and
`best_val_loss` / `best_val_acc` / `best_epoch`. The trainable reports `val_confusion`
only on epochs that improve the validation loss, so the last one logged is the best.

Each trial is logged through this callback only, never `setup_wandb` in the trainable
(both would write the run with id = trial id). Files go to `<run_dir>/wandb/` via an
absolute `dir=`, not into Ray's session dir, whose copy to storage happens before the
logging actors finish.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from genre_ray.errors import UserError

MODES = ("auto", "online", "offline", "off")
KEY = "WANDB_API_KEY"
# Ray bookkeeping that would clutter the W&B history (training_iteration stays: it is the step).
EXCLUDES = ["time_this_iter_s", "time_since_restore", "iterations_since_restore", "timestamp",
            "checkpoint_dir_name"]
UPLOAD_TIMEOUT = {"offline": 30, "online": 120}  # Ray's default, 1800 s, stalls a Ctrl-C


def resolve_mode(requested: str, env_file: Path) -> str | None:
    """'online', 'offline' or None (off) for `--wandb requested`.

    auto: online iff WANDB_API_KEY is in the environment or in `env_file` (a `.env` of
    KEY=VALUE lines); a key found only in the file is put into os.environ, from where the
    callback hands it to its logging actors. online without a key is a UserError.
    """
    if requested not in MODES:
        raise UserError(f"unknown --wandb mode {requested!r}: use one of {', '.join(MODES)}")
    if requested in ("off", "offline"):
        return None if requested == "off" else "offline"
    if not os.environ.get(KEY) and (key := read_env_file(env_file).get(KEY)):
        os.environ[KEY] = key
    if os.environ.get(KEY):
        return "online"
    if requested == "online":
        raise UserError(f"--wandb online needs {KEY}: set it in the environment or in {env_file}, "
                        "or use --wandb offline")
    return "offline"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file ('#' comments, optional `export` and quotes); {} if absent."""
    values = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            value = value.strip()
            quoted = len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]
            values[key.strip()] = value[1:-1] if quoted else value.split(" #")[0].strip()
    return values


def wandb_callback(mode: str | None, *, project: str, run_dir: Path, classes: list[str]) -> list:
    """Tune callbacks for `mode` (from resolve_mode): [] when off.

    A trial's W&B files land in `<run_dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<trial_id>/`
    (online: `run-...`), its records in `run-<trial_id>.wandb` there, and wandb's debug
    logs in `<run_dir>/wandb/`. `classes` name the confusion matrix's rows and columns.
    """
    if mode is None:
        return []
    return [TrialWandbCallback(
        classes, project=project, mode=mode, dir=str(Path(run_dir).resolve()), job_type="trial",
        excludes=EXCLUDES, log_config=False, upload_timeout=UPLOAD_TIMEOUT[mode],
        settings={"show_info": False})]  # no banner per trial (warnings and errors still show)


def sync_hint(run_dir: Path) -> str:
    """The one line to print after an offline run: how to upload its W&B runs."""
    runs = f"{shlex.quote(str(run_dir / 'wandb'))}/offline-run-*"
    return f"W&B runs saved offline; upload them with: wandb sync {runs}"


def confusion_chart(confusion: list[list[float]], classes: list[str]) -> Any:
    """A W&B confusion-matrix chart (what wandb.plot.confusion_matrix draws) from counts.

    `confusion[i][j]`: segments of true class i predicted as class j.
    """
    import wandb

    columns = ["Actual", "Predicted", "nPredictions"]
    rows = [[classes[i], classes[j], float(n)]
            for i, row in enumerate(confusion) for j, n in enumerate(row)]
    return wandb.plot_table("wandb/confusion_matrix/v1", wandb.Table(columns=columns, data=rows),
                            {c: c for c in columns}, {"title": "Best-epoch confusion"})


class _TrialLoggingActor(_WandbLoggingActor):
    """The per-trial logging actor; also logs `val_confusion`, which Ray's actor drops."""

    def __init__(self, *args: Any, classes: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes = classes

    def _handle_result(self, result: dict) -> tuple[dict, dict]:
        confusion = result.pop("val_confusion", None)
        log, config_update = super()._handle_result(result)
        if confusion is not None:
            log["val_confusion"] = confusion_chart(confusion, self._classes)
            self._wandb.run.summary.update({"best_val_loss": result.get("val_loss"),
                                            "best_val_acc": result.get("val_acc"),
                                            "best_epoch": result.get("epoch")})
        return log, config_update


class TrialWandbCallback(WandbLoggerCallback):
    """WandbLoggerCallback with per-trial group/name/tags and a shutdown bounded on Ctrl-C."""

    _logger_actor_cls = _TrialLoggingActor

    def __init__(self, classes: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes = list(classes)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if self.kwargs.get("mode") != "offline":  # Ray's key check only knows WANDB_MODE
            super().setup(*args, **kwargs)

    def _start_logging_actor(self, trial, exclude_results: list[str], **init_kwargs: Any) -> None:
        Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        pair = trial.config["pair"]
        init_kwargs.update(group=pair, name=f"{pair}-{trial.trial_id}", classes=self.classes,
                           tags=[trial.config["model"], trial.config["feature"]])
        super()._start_logging_actor(trial, exclude_results, **init_kwargs)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # On Ctrl-C Tune stops trials without log_trial_end, so their actors would wait for
        # results until upload_timeout and then be killed with the run unclosed: tell each
        # one to finish first (queue END -> wandb.finish()), then wait as usual.
        for trial in list(self._trial_logging_actors):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)
