"""Tune every (model, feature) pair with Ray Tune + Optuna + ASHA, log to W&B, export the best.

    python tune_main.py                      # the embedded dataset, local Ray, W&B offline
    python tune_main.py --data-dir ~/data/gtzan --address auto --gpus-per-trial 0.25

Every setting has its default in genre_ray/defaults.yaml; a --config file of the same
sections overrides them, and the flags override both (genre_ray.config.FLAGS: each flag,
the field it sets and its help).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from genre_ray import config, runs
from genre_ray.errors import UserError, exit_on_user_error
from genre_ray.files import read_text

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once, and none where absence is described in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def listed(tokens: list[str]) -> list[str]:
    """A list flag's values, given as separate words, commas, or both: CEL,MLP2 MLP."""
    return [value for token in tokens for value in token.split(",") if value]


def from_file(path: Path) -> dict[str, Any]:
    """The sections a --config file gives: a YAML of defaults.yaml's sections, or a run's
    run.json (its saved configuration, replayed)."""
    try:
        doc = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--config {path} cannot be read as YAML ({err}); pass a YAML file of "
                        "settings or a run's run.json") from None
    doc = doc.get("config", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict):
        raise UserError(f"--config {path} is not a mapping of sections; write e.g. "
                        "search: {num_samples: 5}")
    doc.pop("spaces", None)  # an older run.json keeps its search spaces here: the files are read again
    return doc


def parse(argv: list[str] | None = None) -> tuple[config.Config, runs.Session]:
    """The run's configuration (defaults.yaml < --config FILE < flags) and the session."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_Help)
    p.add_argument("--config", type=Path,
                   help="YAML of defaults.yaml's sections (search: {num_samples: 5}), or a run's "
                        "run.json to replay its configuration; flags given beside it win")
    pre = argparse.ArgumentParser(add_help=False)  # --config first: it sets the flags' defaults
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    file = from_file(known.config) if known.config else None
    loaded = config.load(file, source=f"--config {known.config}")
    base = config.as_json(loaded)
    for name, flag in config.FLAGS.items():
        section, key = flag.field.split(".")
        p.add_argument(name, dest=flag.field, default=base[section][key], help=flag.help,
                       metavar=key.upper(), type=flag.type, nargs="+" if flag.many else None,
                       choices=flag.choices)
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT "
                                     "(absent: $RAY_ADDRESS, as Ray sets it for a submitted "
                                     "job, else a new local Ray)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the storage path is mounted on every node of the cluster (NFS); "
                        "needed to run on more than one node with a path rather than a bucket")
    p.add_argument("--name", help="run name (absent: the newest interrupted run of this command, "
                                  "if any, else tune-<date>-<time>)")
    p.add_argument("--check", action="store_true",
                   help="check the flags, files, data and memory as a run would, say what it "
                        "would run, and exit (no Ray; nothing of a run is written)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name names, or the newest interrupted run under "
                        "--storage-path, with the configuration it was started with")
    p.add_argument("--more-samples", type=int, metavar="N",
                   help="grow the finished run --name names by N trials per pair: its Optuna "
                        "studies go on, and its exports, leaderboard and plots are rebuilt over "
                        "every trial (it keeps its own configuration, as --resume does)")
    args = vars(p.parse_args(argv))
    if args["more_samples"] is not None and args["more_samples"] < 1:
        raise UserError(f"--more-samples must be >= 1, got {args['more_samples']}")
    values = {flag.field: args[flag.field] for flag in config.FLAGS.values()}
    for field in ("run.models", "run.features"):
        values[field] = listed(values[field])
    cfg = config.replaced(loaded, values)
    return cfg, runs.Session(args["name"], args["resume"], args["address"],
                             args["shared_storage"], args["check"], args["more_samples"] or 0)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Exit 0; 2 for a user's mistake; 130 after Ctrl-C and 143 after SIGTERM (128 + the
    signal, the shell's codes), the run saved for the same command to continue."""
    start = time.perf_counter()
    stopped_by = [signal.SIGINT]

    def terminate(signum: int, _frame) -> None:  # kill, schedulers, `ray job stop`, pods
        stopped_by[0] = signum
        runs.stopping()  # recorded at once: a SIGKILL may follow
        signal.raise_signal(signal.SIGINT)  # stop as Ctrl-C does: Tune saves, then Interrupted

    signal.signal(signal.SIGTERM, terminate)
    try:
        cfg, session = parse(argv)
        from genre_ray import experiment, report  # after the flags: a mistake or --help in 0.3 s
        if session.check:
            print(experiment.check(cfg, session))
            return 0
        summary = experiment.run(cfg, session)
    except runs.Interrupted as stop:
        print(stop, file=sys.stderr)
        return 128 + stopped_by[0]
    except KeyboardInterrupt:  # a stop outside tuning: what Tune saved is kept
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 128 + stopped_by[0]
    print(report.summary_table(summary))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    main()
