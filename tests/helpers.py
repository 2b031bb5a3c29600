"""Test helpers: tiny real audio trees written with soundfile, and running commands."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from genre_ray import config

REPO = Path(__file__).resolve().parents[1]
GENRES = ["blues", "classical", "jazz"]
TREE_MTIME = 1_700_000_000  # make_tree's files
# Whole runs whose checks do not need trials side by side: one trial slot on this 2-core
# machine, so one trial worker (a process that imports torch) serves every trial of a run.
ONE_SLOT = ("--cpus-per-trial", "2")


def trial_config(model: str, **hyper) -> config.Config:
    """defaults.yaml with `model`'s first search point, then `hyper`, in place: what a trial
    of it trains with (`.training` for the Trainer, `.model` for build_model)."""
    from genre_ray.search_space import first_point

    return config.tuned(config.load(), {**first_point(model), **hyper})


def arch(model: str, **keys) -> dict:
    """The architecture keys `model` is built with at its first point, `keys` in place."""
    return dataclasses.asdict(trial_config(model, **keys).model)


def exported(fs, model: str, state_dict: dict, metrics: dict | None = None):
    """The export tune_main.py would make of weights `state_dict` (`model` at its first
    point, built with `arch(model)`) trained on the feature set `fs`."""
    from genre_ray import export
    from genre_ray.search_space import first_point

    hyper = first_point(model)
    best = export.Best("t0", {"model": model, **hyper},
                       metrics or {"val_loss": 1.0, "val_acc": 0.5, "epoch": 1}, state_dict)
    return export.Exported.of(best, fs, arch(model), hyper)


def write_tone(path: Path, freq: float, seconds: float, rate: int = 22050, channels: int = 1,
               fmt: str | None = None) -> Path:
    """A sine tone with a little noise, as 16-bit PCM; format from the suffix (.wav, .au)."""
    rng = np.random.default_rng(int(freq))
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    audio = np.repeat(mono[:, None], channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype="PCM_16", format=fmt)
    return path


def make_tree(root: Path, *, layout: str = "genres_original", ext: str = ".wav",
              genres: list[str] = GENRES, tracks: int = 3, seconds: float = 6.0,
              rate: int = 22050, channels: int = 1) -> Path:
    """GTZAN-named files `<layout>/<genre>/<genre>.000NN<ext>`; a tone per genre. Each
    file's mtime is fixed, so equal trees are one dataset to the feature cache (keyed by
    names, sizes and mtimes) and the session's shared cache builds their features once."""
    base = root / layout if layout != "." else root
    for g, genre in enumerate(genres):
        for i in range(tracks):
            path = write_tone(base / genre / f"{genre}.{i:05d}{ext}", 220.0 * (g + 1) + 7 * i,
                              seconds, rate, channels)
            os.utime(path, (TREE_MTIME, TREE_MTIME))
    return root


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing answers (a W&B server out of reach)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        return listening.getsockname()[1]  # closed on return


def record_of(run_dir: Path) -> dict:
    """The record (run.json) of the run whose folder is `run_dir`."""
    return json.loads((Path(run_dir) / "run.json").read_text())


def run_module(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ARGS` as a user would; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def run_main(module: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in this process, from `cwd`: the command's `main` with its
    stdout and stderr caught, as `run_module` returns them (an exception that is not the
    command's exit fails the test, as a traceback would)."""
    main = importlib.import_module(module).main
    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    on_sigterm = signal.getsignal(signal.SIGTERM)  # tune_main sets its own
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as stop:
                code = stop.code
    finally:
        os.chdir(before)
        signal.signal(signal.SIGTERM, on_sigterm)
    return subprocess.CompletedProcess([module, *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def read_run(folder: Path) -> dict:
    """One W&B run folder as W&B's own reader (`wandb leet inspect --json`) decodes it:
    the run record (id, group, tags, resume), history rows, the final summary, the exit
    record, and the artifacts it logged (each with its manifest)."""
    cli = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(folder)]
    out = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    run = {"history": [], "summary": {}, "exit": None, "artifacts": []}
    for record in map(json.loads, out.splitlines()):
        kind, body = record["type"], record.get(record["type"])
        if kind == "run":
            run.update(id=body["run_id"], group=body["run_group"], tags=body.get("tags", []),
                       resume=body.get("resume", False))
        elif kind == "history":
            run["history"].append(body["item"])
        elif kind == "summary":
            run["summary"].update(body.get("update", {}))  # nested keys joined with "."
        elif kind == "exit":
            run["exit"] = body
        elif kind == "artifact":
            run["artifacts"].append(body)
    return run


def read_runs(run_dir: Path) -> dict[str, tuple[Path, dict]]:
    """trial id -> (folder, run) for every W&B run folder of a tuning run."""
    runs = [(f, read_run(f)) for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
    return {run["id"]: (folder, run) for folder, run in runs}
