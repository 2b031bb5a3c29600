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

from genre_ray import experiment
from genre_ray.config import defaults
from genre_ray.errors import exit_on_user_error
from genre_ray.search_space import SPACES_DIR
from genre_ray.tracking import MODES


def parse(argv: list[str] | None = None) -> experiment.Options:
    d, split = defaults("tune"), defaults("split")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="GTZAN folder (absent: the embedded dataset)")
    p.add_argument("--models", nargs="+", default=d["models"], help="architectures to tune")
    p.add_argument("--features", nargs="+", default=d["features"], help="waveform, spectrogram")
    p.add_argument("--num-samples", type=int, default=d["num_samples"], help="trials per pair")
    p.add_argument("--max-epochs", type=int, default=d["max_epochs"], help="epochs per trial (ASHA max_t)")
    p.add_argument("--cpus-per-trial", type=float, default=d["cpus_per_trial"])
    p.add_argument("--gpus-per-trial", type=float, default=d["gpus_per_trial"],
                   help="fractional: 0.25 puts four trials on a GPU")
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT "
                                     "(absent: start a local Ray)")
    p.add_argument("--storage-path", default=d["storage_path"], help="runs live in STORAGE_PATH/NAME")
    p.add_argument("--shared-storage", action="store_true",
                   help="the storage path is mounted on every node of the cluster (NFS); "
                        "needed to run on more than one node with a path rather than a bucket")
    p.add_argument("--name", help="run name (default: the newest interrupted run with these "
                                  "settings, if any, else tune-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name names, or the newest interrupted run under "
                        "--storage-path, with the settings it was started with")
    p.add_argument("--split", default=split["kind"], help="random | fault-filtered | JSON split file")
    p.add_argument("--wandb", choices=MODES, default=d["wandb"])
    p.add_argument("--wandb-project", default=d["wandb_project"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--output-dir", type=Path, default=Path(d["output_dir"]),
                   help="where {model}_{feature}_best_model.pth land")
    p.add_argument("--search-spaces", type=Path, default=SPACES_DIR,
                   help="folder of <MODEL>.yaml search-space files")
    args = p.parse_args(argv)
    hidden = {k: d[k] for k in ("grace_period", "reduction_factor", "n_startup_trials")}
    return experiment.Options(**vars(args), **hidden, env_file=Path(d["env_file"]))


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
