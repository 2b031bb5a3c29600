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
runs finish. Runs are written from threads of the driver, not from Ray's per-trial actors
(internals.WandbThreadLogger says why).
"""
from __future__ import annotations

import os
import shlex
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from genre_ray.config import WANDB_MODES
from genre_ray.errors import UserError
from genre_ray.export import CHECKPOINT_METRIC
from genre_ray.files import read_text
from genre_ray.internals import WandbThreadCallback, WandbThreadLogger

KEY = "WANDB_API_KEY"
# Ray bookkeeping that would clutter the W&B history (training_iteration stays: it is the step).
EXCLUDES = ["time_this_iter_s", "time_since_restore", "iterations_since_restore", "timestamp",
            "checkpoint_dir_name", CHECKPOINT_METRIC]
CONNECT_TIMEOUT_S = 5  # to the W&B server, before a run logs online
SUMMARY_TIMEOUT_S = 60  # for the summary run to start (wandb's default: 90 s)
UPLOAD_TIMEOUT = {"offline": 30, "online": 120}  # Ray's default, 1800 s, stalls a Ctrl-C


def resolve_mode(requested: str, env_file: Path) -> str | None:
    """'online', 'offline' or None (off) for `--wandb requested`.

    auto: online iff WANDB_API_KEY is in the environment or in `env_file` (a `.env` of
    KEY=VALUE lines); a key found only in the file is put into os.environ, from where the
    callback hands it to its logging actors. online without a key is a UserError. Online,
    but the W&B server does not answer within CONNECT_TIMEOUT_S (no network, a firewall):
    offline, said in one line, rather than a run whose every W&B call waits and fails.
    """
    if requested not in WANDB_MODES:
        raise UserError(f"unknown --wandb mode {requested!r}: use one of {', '.join(WANDB_MODES)}")
    if requested in ("off", "offline"):
        return None if requested == "off" else "offline"
    if not os.environ.get(KEY) and (key := read_env_file(env_file).get(KEY)):
        os.environ[KEY] = key
    if os.environ.get(KEY):
        return _online_or_offline()
    if requested == "online":
        raise UserError(f"--wandb online needs {KEY}: set it in the environment or in {env_file}, "
                        "or use --wandb offline")
    return "offline"


def _online_or_offline() -> str:
    """online if the W&B server ($WANDB_BASE_URL, else api.wandb.ai) accepts a connection."""
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        socket.create_connection(_host_and_port(base), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, UnicodeError) as err:  # UnicodeError: a host name IDNA cannot encode
        print(f"W&B: cannot reach {base} ({err}); logging offline instead: "
              "`wandb sync` uploads the runs later", flush=True)
        return "offline"
    return "online"


def _host_and_port(base: str) -> tuple[str, int]:
    """The server a W&B base URL names; UserError if it names none."""
    try:
        url = urllib.parse.urlsplit(base)
        if url.scheme in ("http", "https") and url.hostname:
            return url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # an unclosed IPv6 bracket, a port that is no number or out of range
        pass
    raise UserError(f"WANDB_BASE_URL {base!r} is not the http(s) URL of a server; set it to "
                    "your W&B server's (e.g. https://wandb.example.com), or unset it for api.wandb.ai")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file ('#' comments, optional `export` and quotes); {} if absent."""
    values = {}
    for line in read_text(path).splitlines() if path.is_file() else []:
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
        settings={"silent": True})]  # no banner and summary per trial: sync_hint says it once


def sync_hint(run_dir: Path) -> str:
    """The one line to print after an offline run: how to upload its W&B runs."""
    runs = f"{shlex.quote(str(run_dir / 'wandb'))}/offline-run-*"
    return f"W&B runs saved offline; upload them with: wandb sync {runs}"


@dataclass(frozen=True)
class ModelFiles:
    """A pair's export as a W&B model artifact: its name (the pair), its leaderboard row as
    metadata, and its files: local paths to upload, or URIs (s3://, gs://, file://) of the
    storage's copies, logged as references (W&B records each one's digest, uploads nothing)."""

    pair: str
    metadata: dict[str, Any]
    files: list[str]


def model_files(row: Any, remote_run: str | None) -> ModelFiles:
    """A pair's export for W&B (`row`: its report.PairResult): with the run in a URI storage
    at `remote_run`, the storage's copies, by reference (uploaded once already); else the
    files on this machine."""
    files = [path for path in (row.export_path, row.onnx_path) if path is not None]
    if remote_run:
        base = remote_run.partition("?")[0]
        files = [f"{base}/best_models/{path.name}" for path in files]
    return ModelFiles(row.pair, row.row(), [str(f) for f in files])


def log_summary(mode: str, *, project: str, run_dir: Path, name: str,
                tables: dict[str, tuple[list[str], list[dict[str, Any]]]], files: list[Path],
                models: list[ModelFiles] = ()) -> None:
    """One W&B run for the whole experiment (`<name>-summary`, group `summary`): `tables`
    (name -> (columns, rows): the leaderboard, the Pareto fronts) as W&B tables, every
    plot (`files`' PNGs) as an image, and each pair's export (`models`) as a model artifact
    with aliases `best` and the run's name. If W&B fails (the network went away during
    the run), one line says so: the run's results are on disk."""
    import wandb

    try:
        run = wandb.init(project=project, name=f"{name}-summary", group="summary",
                         job_type="summary", dir=str(Path(run_dir).resolve()), mode=mode,
                         settings={"silent": True, "init_timeout": SUMMARY_TIMEOUT_S},
                         reinit="create_new")
        logged = {key: wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
                  for key, (columns, rows) in tables.items()}
        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        run.log({**logged, **images})
        for model in models:
            run.log_artifact(_artifact(model), aliases=["best", name])
        run.finish()
    except wandb.errors.Error as err:
        print(f"W&B: the summary run was not logged ({str(err).splitlines()[0]}); the "
              f"leaderboard and plots are in {run_dir}", flush=True)


def _artifact(model: ModelFiles) -> Any:
    import wandb

    artifact = wandb.Artifact(model.pair, type="model", metadata=model.metadata)
    for file in model.files:
        if "://" in file:
            artifact.add_reference(file, name=file.rsplit("/", 1)[-1])
        else:
            artifact.add_file(file)
    return artifact


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


class _TrialLogger(WandbThreadLogger):
    """A trial's W&B run, which also logs `val_confusion` (Ray's logger drops it) as a chart,
    and the best epoch's scores in its summary."""

    def __init__(self, *args: Any, classes: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classes = classes

    def row(self, result: dict) -> tuple[dict, dict]:
        confusion = result.pop("val_confusion", None)
        row, config_update = super().row(result)
        if confusion is not None:
            row["val_confusion"] = confusion_chart(confusion, self.classes)
            self.wandb_run.summary.update({"best_val_loss": result.get("val_loss"),
                                           "best_val_acc": result.get("val_acc"),
                                           "best_epoch": result.get("epoch")})
        return row, config_update


class TrialWandbCallback(WandbThreadCallback):
    """One W&B run per trial, grouped by pair and tagged with model and feature."""

    def __init__(self, classes: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes = list(classes)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if self.kwargs.get("mode") != "offline":  # Ray's key check only knows WANDB_MODE
            super().setup(*args, **kwargs)

    def new_logger(self, trial: Any, queue: Queue, exclude: list[str],
                   init_kwargs: dict[str, Any]) -> WandbThreadLogger:
        Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        pair = trial.config["pair"]
        # resume="allow" (Ray passes False): a trial continued after a restore goes on in
        # its run, id = trial id; offline, `wandb sync` appends its second folder to the first
        init_kwargs.update(group=pair, name=f"{pair}-{trial.trial_id}", resume="allow",
                           tags=[trial.config["model"], trial.config["feature"]])
        return _TrialLogger(trial.local_path, queue, exclude, self.AUTO_CONFIG_KEYS,
                            classes=self.classes, **init_kwargs)
