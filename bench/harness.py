"""The bench kit: what every bench shares.

A bench is a module with `main(argv)`, which reads its arguments with `parser(__doc__)`:
that adds `--smoke`, the bench's own code at its smallest, so that a change that breaks a
bench fails tests/test_bench.py, which runs every smoke in one process and one Ray (a
smoke's figures mean nothing). A bench prints `context()` first and ends with `ratio`'s
line: its figure against a baseline measured in the same run. `local_ray`,
`shared_features` and `tune` are the setup a tuning bench needs, as tune_main.py's
stages make it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path
from typing import Any, Iterator

from genre_ray.config import Config

SMOKE_TRACKS = 3  # per genre, in a smoke run's dataset: every genre in every split


def parser(doc: str) -> argparse.ArgumentParser:
    """The bench's argument parser, its description the docstring's first line, with --smoke."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="the bench's code at its smallest, to check that it runs; its figures "
                        "mean nothing")
    return p


def context() -> str:
    """Hardware and library versions, so a figure is never read without them."""
    import torch
    import torchaudio

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU found, CPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, {device}; torch {torch.__version__}, "
            f"torchaudio {torchaudio.__version__}, python {platform.python_version()}")


def dataset(smoke: bool) -> Path:
    """The embedded dataset; for a smoke run, its first SMOKE_TRACKS tracks of each genre."""
    from genre_ray.synthetic import embedded_dataset

    return embedded_dataset(SMOKE_TRACKS if smoke else None)


@contextlib.contextmanager
def local_ray(**init: Any) -> Iterator[int]:
    """A new local Ray (`init`: ray.init's keywords, e.g. num_cpus), shut down after; yields
    its CPUs, the trial slots at one CPU each. A Ray already up is used as it is and left
    up: the smoke test runs every bench in one."""
    import ray

    if ray.is_initialized():
        yield int(ray.cluster_resources()["CPU"])
        return
    ray.init(address="local", include_dashboard=False, configure_logging=False, **init)
    try:
        yield int(ray.cluster_resources()["CPU"])
    finally:
        ray.shutdown()


def shared_features(pairs: list[tuple[str, str]], cfg: Config,
                    data_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The feature sets the trials of `pairs` (model, feature) train on, every front end
    their search spaces choose among, each put once in Ray's object store: (variant ->
    FeatureSet, variant -> its object ref). Needs Ray up (`local_ray`)."""
    from genre_ray.checks import feature_variants
    from genre_ray.features import build_variants
    from genre_ray.search_space import load_space
    from genre_ray.trainable import share

    spaces = {model: load_space(model) for model, _ in pairs}
    sets = build_variants(data_dir, feature_variants(pairs, spaces, cfg), cfg)
    return sets, {variant: share(fs) for variant, fs in sets.items()}


def tune(pairs: list[tuple[str, str]], refs: dict[str, Any], cfg: Config, folder: Path,
         name: str, slots: int, *, spaces: dict | None = None, **fit: Any):
    """One Tuner over `pairs`, cfg.search.num_samples trials each, searched as tune_main.py
    searches (TPE after each pair's first point, ASHA); its run is folder/name, its
    ResultGrid returned. `spaces`: model -> SearchSpace (absent: the project's); `fit`:
    tuning.make_tuner's keywords beyond these (callbacks, stop, cpus_per_trial, ...)."""
    from genre_ray import tuning
    from genre_ray.search_space import load_space

    spaces = spaces or {model: load_space(model) for model, _ in pairs}
    searcher, scheduler = tuning.build_search(pairs, spaces, cfg, name,
                                              tuning.optuna_storage(folder / name))
    return tuning.fit(refs, searcher, scheduler, cfg, **{
        "storage_path": str(folder), "name": name, "num_trials": cfg.search.num_samples * len(pairs),
        "cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": slots, "verbose": 0, **fit})


def ratio(value: float, what: str, goal: float | None = None, *, at_least: bool = False) -> str:
    """The line a bench ends with: `value` (`what`: of what over what), against its goal
    where it has one."""
    if goal is None:
        return f"ratio {value:.3f} ({what})"
    met = value >= goal if at_least else value <= goal
    return (f"ratio {value:.3f} ({what}; goal {'>=' if at_least else '<='} {goal:g}): "
            f"{'met' if met else 'MISSED'}")
