"""The embedded dataset's difficulty: logistic regression on log-mel statistics vs the CNN.

    python -m bench.baseline [--epochs 20] [--data-dir D [--split D/split.json]] [--model CEL]

Baseline: scikit-learn's LogisticRegression on each segment's log-mel mean and std
over time per mel band (2 x n_mels numbers), standardised. CNN: the CEL family on the
full spectrogram at the notebook's settings, trained with genre_ray's loop; its epoch of
best validation loss is scored. Both see the same track-level split (val and test
tracks never in training) and the same augmented training segments. The dataset must
be learnable but not trivial: the baseline clearly above chance (10 %) and clearly
below 100 %, and the CNN above the baseline (it sees rhythm, which averages lose).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench import harness
from genre_ray import config
from genre_ray.features import FeatureSet, build_features
from genre_ray.models import build_model
from genre_ray.search_space import first_point
from genre_ray.training import Trainer, evaluate, seed_everything, track_accuracy
from genre_ray.transforms import batch_augmentation


def summary(x: torch.Tensor) -> torch.Tensor:
    """Mean and std over time per mel band: (n, n_mels, frames) -> (n, 2 * n_mels)."""
    return torch.cat([x.mean(dim=2), x.std(dim=2)], dim=1)


def logistic_baseline(fs: FeatureSet) -> dict[str, float]:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    train = fs.splits["train"]
    clf.fit(summary(train.x).numpy(), train.labels.numpy())
    scores = {}
    for name in ("val", "test"):
        part = fs.splits[name]
        probs = torch.from_numpy(clf.predict_proba(summary(part.x).numpy())).float()
        scores[name] = (probs.argmax(dim=1) == part.labels).float().mean().item()
        scores[f"{name}_track"] = track_accuracy(probs, part.track, part.labels)
    return scores


def cnn(fs: FeatureSet, cfg: config.Config, model_name: str, epochs: int) -> dict[str, float]:
    cfg = config.tuned(cfg, first_point(model_name))
    seed_everything(0)
    model = build_model(model_name, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    split = {n: (s.x, s.labels) for n, s in fs.splits.items()}
    trainer = Trainer(model, split["train"], split["val"], cfg.training, n_classes=len(fs.classes),
                      epochs=epochs,
                      transform=batch_augmentation(fs.feature, cfg.batch_augment.of(fs.feature)))
    best = {"val_loss": float("inf")}

    def keep_best(metrics, _):
        print(f"  epoch {metrics['epoch']:2d} val_loss {metrics['val_loss']:.3f} "
              f"val_acc {metrics['val_acc']:.3f}", flush=True)
        if metrics["val_loss"] < best["val_loss"]:
            best.update(metrics, state=copy.deepcopy(model.state_dict()))

    trainer.fit(epochs, keep_best)
    model.load_state_dict(best["state"])
    scores = {"epoch": best["epoch"]}
    for name in ("val", "test"):
        result = evaluate(model, *split[name], len(fs.classes))
        scores[name] = result.accuracy
        scores[f"{name}_track"] = track_accuracy(result.probs, fs.splits[name].track, fs.splits[name].labels)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--model", default="CEL")
    parser.add_argument("--split", default="random", help="random, or a JSON split file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    data_dir = args.data_dir or harness.dataset(args.smoke)
    print(harness.context())
    cfg = config.load(values={"split.kind": args.split})
    fs = build_features(data_dir, "spectrogram", cfg)
    sizes = {n: f"{len(s.track_ids)} tracks/{len(s.x)} segments" for n, s in fs.splits.items()}
    print(f"{data_dir}: {sizes}")
    base = logistic_baseline(fs)
    print(f"{args.model} on spectrogram, {args.epochs} epochs:")
    net = cnn(fs, cfg, args.model, args.epochs)
    for name, scores in (("logistic regression", base), (args.model, net)):
        print(f"{name:>20}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                            if k != "epoch"))
    print(f"chance 0.100; on val segments {args.model}/baseline = {net['val'] / base['val']:.2f}")
    print(harness.ratio(net["test"] / base["test"], f"{args.model} over the baseline, test segments"))


if __name__ == "__main__":
    main()
