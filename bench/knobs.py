"""One knob at a time: the first point against the first point with one key changed, for one
architecture on one feature, without Ray (the table in search_spaces/CEL.yaml comes from it).

    python -m bench.knobs --data-dir D --split D/split.json --model CEL2 \\
        --change '{"dropout_prob": 0.1}' '{"n_mels": 128}' '{"freq_mask": 0, "time_mask": 0}'

Each change (any key a search space may search, front end included: its features are built
and cached like a run's) trains from the same seeds as the first point; it prints the best
validation loss per seed, the test accuracy at the last epoch, and the seconds per run
against the first point's.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from bench import harness
from genre_ray import config
from genre_ray.features import build_features
from genre_ray.models import build_model
from genre_ray.search_space import first_point
from genre_ray.training import Trainer, evaluate, seed_everything
from genre_ray.transforms import batch_augmentation


def trained(data_dir: Path, run: config.Config, model: str, feature: str, hyper: dict,
            seed: int, epochs: int) -> tuple[float, float, float]:
    """(best val loss, last epoch's test accuracy, seconds) of one training from `seed`."""
    cfg = config.tuned(run, {**first_point(model, run.run.search_spaces, feature), **hyper}, feature)
    fs = build_features(data_dir, feature, cfg)  # the run's seed: the same segments for every seed
    seed_everything(seed)
    net = build_model(model, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    split = {name: (part.x, part.labels) for name, part in fs.splits.items()}
    trainer = Trainer(net, split["train"], split["val"], cfg.training, n_classes=len(fs.classes),
                      epochs=epochs, seed=seed,
                      transform=batch_augmentation(feature, cfg.batch_augment.of(feature)))
    start = time.perf_counter()
    history = trainer.fit(epochs)
    seconds = time.perf_counter() - start
    test = evaluate(trainer.model, *split["test"], len(fs.classes))
    return min(m["val_loss"] for m in history), test.accuracy, seconds


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--data-dir", type=Path, help="default: the embedded dataset")
    parser.add_argument("--split", default="random")
    parser.add_argument("--model", default="CEL2")
    parser.add_argument("--feature", default="spectrogram")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--change", nargs="+", default=[], type=json.loads,
                        help="JSON objects of keys to change, one per variant")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.change = 1, [0], [{"dropout_prob": 0.1}]
    run = config.load(values={"split.kind": args.split})
    data_dir = args.data_dir or harness.dataset(args.smoke)
    print(harness.context())
    print(f"{args.model} on {args.feature}, {args.epochs} epochs, seeds {args.seeds}, {data_dir}")
    base = loss = None
    for change in [{}, *args.change]:
        rows = [trained(data_dir, run, args.model, args.feature, change, seed, args.epochs)
                for seed in args.seeds]
        seconds, mean_loss = sum(r[2] for r in rows), sum(r[0] for r in rows) / len(rows)
        base, loss = base or seconds, loss or mean_loss
        print(f"{json.dumps(change) if change else 'first point':<40} best val loss "
              f"{' / '.join(f'{r[0]:.3f}' for r in rows)}; test acc "
              f"{' / '.join(f'{r[1]:.3f}' for r in rows)}; time {seconds / base:.2f} x the first point's",
              flush=True)
    print(harness.ratio(mean_loss / loss, "best val loss, mean over seeds, the last change over "
                        "the first point"))


if __name__ == "__main__":
    main()
