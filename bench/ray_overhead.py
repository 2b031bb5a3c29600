"""Ray overhead: epoch throughput inside a Tune trial over the plain loop, same run.

    python -m bench.ray_overhead [--epochs 6] [--cpus 2] [--wandb offline|off]

For CEL on spectrograms and MLP on waveforms at the notebook's cfg, the same model
trains for `--epochs` epochs three times: with the plain loop (`Trainer.fit`, what
`python -m genre_ray.training` runs), then as one trial of the real Tuner (features from
the object store, a report every epoch, checkpoints at ASHA's rungs and the last epoch, W&B logging),
then with the plain loop again, so drift in machine load falls on both sides. Each side
gets `--cpus` threads (Ray gives a trial OMP_NUM_THREADS = its CPUs). An epoch's time in
the trial is Tune's `time_this_iter_s` (training, evaluation, report, checkpoint); the
first epoch of each side is dropped (setup, warm-up), and medians are compared.
Goal: ratio >= 0.9.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import harness
from genre_ray import config, tuning
from genre_ray.features import FeatureSet, build_features
from genre_ray.models import build_model
from genre_ray.search_space import first_point
from genre_ray.tracking import wandb_callback
from genre_ray.trainable import share
from genre_ray.training import Trainer, seed_everything
from genre_ray.transforms import batch_augmentation

PAIRS = [("CEL", "spectrogram"), ("MLP", "waveform")]
SMOKE = {"pairs": [("CEL", "spectrogram")], "epochs": 2}  # the first epoch is not counted


def plain_epochs(model_name: str, fs: FeatureSet, epochs: int) -> list[float]:
    """Seconds per epoch of the plain loop (the trainable's work without Ray)."""
    cfg = config.tuned(config.load(), first_point(model_name))
    seed_everything(0)
    model = build_model(model_name, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    train, val = fs.splits["train"], fs.splits["val"]
    trainer = Trainer(model, (train.x, train.labels), (val.x, val.labels), cfg.training,
                      n_classes=len(fs.classes), epochs=epochs,
                      transform=batch_augmentation(fs.feature, cfg.batch_augment.of(fs.feature)))
    stamps = [time.perf_counter()]
    trainer.fit(epochs, lambda metrics, evaluation: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def trial_epochs(model_name: str, fs: FeatureSet, ref, epochs: int, cpus: int, wandb: str,
                 folder: Path) -> list[float]:
    """Seconds per epoch (Tune's time_this_iter_s) of one trial of the real Tuner."""
    name = tuning.pair_name(model_name, fs.feature)
    cfg = config.load(values={
        "search.num_samples": 1, "search.max_epochs": epochs, "search.grace_period": epochs,
        "search.reduction_factor": 2, "search.n_startup_trials": 1, "run.seed": 0})
    callbacks = (wandb_callback("offline", project="bench", run_dir=folder / name, classes=fs.classes)
                 if wandb == "offline" else [])
    grid = harness.tune([(model_name, fs.feature)], {fs.variant: ref}, cfg, folder, name, 1,
                        callbacks=callbacks, cpus_per_trial=cpus)
    return grid[0].metrics_dataframe["time_this_iter_s"].tolist()


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--wandb", choices=["offline", "off"], default="offline")
    args = parser.parse_args(argv)
    vars(args).update({"pairs": PAIRS, **(SMOKE if args.smoke else {})})
    torch.set_num_threads(args.cpus)
    with harness.local_ray(num_cpus=args.cpus) as slots, tempfile.TemporaryDirectory() as tmp:
        print(harness.context())
        cpus = min(args.cpus, slots)  # a Ray already up (the smoke test's) may have fewer
        for model_name, feature in args.pairs:
            fs = build_features(harness.dataset(args.smoke), feature, config.load())  # the first point's
            plain = plain_epochs(model_name, fs, args.epochs)[1:]
            trial = trial_epochs(model_name, fs, share(fs), args.epochs, cpus, args.wandb,
                                 Path(tmp))[1:]
            plain += plain_epochs(model_name, fs, args.epochs)[1:]
            rate = {side: len(fs.splits["train"].x) / statistics.median(times)
                    for side, times in (("plain", plain), ("trial", trial))}
            print(f"{model_name} on {feature}: plain loop {rate['plain']:.0f} seg/s, "
                  f"Tune trial {rate['trial']:.0f} seg/s (W&B {args.wandb})", flush=True)
            print(harness.ratio(rate["trial"] / rate["plain"], "Tune trial over plain loop",
                                0.9, at_least=True), flush=True)


if __name__ == "__main__":
    main()
