"""Tune every (model, feature) pair with Ray Tune + Optuna + ASHA, log to W&B, export the best.

    python tune_main.py                      # the embedded dataset, local Ray, W&B offline
    python tune_main.py --data-dir ~/data/gtzan --address auto --gpus-per-trial 0.25

Defaults live in genre_ray/defaults.yaml (section `tune`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from genre_ray import experiment
from genre_ray.config import defaults
from genre_ray.errors import UserError, exit_on_user_error
from genre_ray.search_space import SPACES_DIR
from genre_ray.tracking import MODES


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once, and none where absence is described in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def listed(tokens: list[str] | str) -> list[str]:
    """A list flag's values, given as separate words, commas, or both: CEL,MLP2 MLP."""
    tokens = [tokens] if isinstance(tokens, str) else tokens
    return [value for token in tokens for value in str(token).split(",") if value]


def from_file(path: Path, fields: set[str]) -> dict:
    """The settings a --config file gives: a mapping of `fields`, or a run.json's spec."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--config {path} cannot be read as YAML ({err}); pass a YAML file of "
                        "settings or a run's run.json") from None
    doc = doc.get("spec", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict):
        raise UserError(f"--config {path} is not a mapping of settings; write e.g. num_samples: 5")
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; "
                        f"settings: {', '.join(sorted(fields))}")
    return doc


def parse(argv: list[str] | None = None) -> experiment.Options:
    d, split = defaults("tune"), defaults("split")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_Help)
    p.add_argument("--data-dir", type=Path, help="GTZAN folder (absent: the embedded dataset)")
    p.add_argument("--models", nargs="+", default=d["models"],
                   help="architectures to tune, as words or commas: CEL MLP2 or CEL,MLP2")
    p.add_argument("--features", nargs="+", default=d["features"],
                   help="waveform, spectrogram, or both (words or commas)")
    p.add_argument("--num-samples", type=int, default=d["num_samples"], help="trials per pair")
    p.add_argument("--max-epochs", type=int, default=d["max_epochs"], help="epochs per trial (ASHA max_t)")
    p.add_argument("--grace-period", type=int, default=d["grace_period"],
                   help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=int, default=d["reduction_factor"],
                   help="ASHA: keep the best 1/REDUCTION_FACTOR of the trials at each rung")
    p.add_argument("--n-startup-trials", type=int, default=d["n_startup_trials"],
                   help="TPE: random trials per pair before it models the space")
    p.add_argument("--cpus-per-trial", type=float, default=d["cpus_per_trial"],
                   help="CPUs Ray reserves for each trial (its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, default=d["gpus_per_trial"],
                   help="fractional: 0.25 puts four trials on a GPU")
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT "
                                     "(absent: start a local Ray)")
    p.add_argument("--storage-path", default=d["storage_path"],
                   help="runs live in STORAGE_PATH/NAME; a path or s3://, gs://, file:// URI")
    p.add_argument("--shared-storage", action="store_true",
                   help="the storage path is mounted on every node of the cluster (NFS); "
                        "needed to run on more than one node with a path rather than a bucket")
    p.add_argument("--name", help="run name (absent: the newest interrupted run with these "
                                  "settings, if any, else tune-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name names, or the newest interrupted run under "
                        "--storage-path, with the settings it was started with")
    p.add_argument("--split", default=split["kind"], help="random | fault-filtered | JSON split file")
    p.add_argument("--wandb", choices=MODES, default=d["wandb"],
                   help="auto: online with a WANDB_API_KEY (environment or .env), else offline")
    p.add_argument("--wandb-project", default=d["wandb_project"], help="W&B project of the runs")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seeds the split, the augmentation, TPE and every trial")
    p.add_argument("--output-dir", type=Path, default=Path(d["output_dir"]),
                   help="where {model}_{feature}_best_model.pth land")
    p.add_argument("--search-spaces", type=Path, default=SPACES_DIR,
                   help="folder of <MODEL>.yaml search-space files")
    p.add_argument("--config", type=Path,
                   help="YAML of these settings by field name (num_samples: 5, models: [CEL]), or a "
                        "run's run.json to replay its settings; flags given beside it win")
    known, _ = p.parse_known_args(argv)
    if known.config is not None:
        p.set_defaults(**from_file(known.config, set(vars(known)) - {"config"}))
    args = p.parse_args(argv)
    del args.config
    args.models, args.features = listed(args.models), listed(args.features)
    return experiment.Options(**vars(args), env_file=Path(d["env_file"]))


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        summary = experiment.run(parse(argv))
    except experiment.Interrupted as stop:
        print(stop, file=sys.stderr)
        return 130  # the shell's code for a Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C outside tuning: what Tune saved is kept
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(experiment.summary_table(summary))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    main()
