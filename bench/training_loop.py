"""Training loop: segments/s of genre_ray's loop over a plain DataLoader loop, same run.

    python -m bench.training_loop [--epochs 3] [--data-dir D]

For CEL on spectrograms and MLP on waveforms (the seed's settings), each loop trains
its own copy of the same initial model on the same tensors with the same batch size.
genre_ray's side is what `Trainer` builds: data resident on the device, batches by
index gather, fused Adam, conv2d weights in channels_last. The baseline is the textbook loop: DataLoader(TensorDataset)
collating item by item, default torch.optim.Adam. Epochs alternate between the two
loops, in ABBA order, to share any drift in machine load. Goal: ratio >= 1.0.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.common import context
from genre_ray import config
from genre_ray.features import build_features
from genre_ray.models import build_model
from genre_ray.search_space import first_point
from genre_ray.synthetic import embedded_dataset
from genre_ray.training import Trainer, seed_everything, train_epoch

PAIRS = [("CEL", "spectrogram"), ("MLP", "waveform")]


def dataloader_epoch(model, optimizer, loader: DataLoader, device: torch.device) -> float:
    """The baseline: the textbook DataLoader loop."""
    model.train()
    total = 0.0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
    return total / len(loader.dataset)


def bench_pair(model_name: str, feature: str, data_dir: Path, epochs: int) -> float:
    cfg = config.load()
    fs = build_features(data_dir, feature, cfg)
    x, y = fs.splits["train"].x, fs.splits["train"].labels
    cfg = config.tuned(cfg, first_point(model_name))
    models = []
    for _ in range(2):
        seed_everything(0)
        models.append(build_model(model_name, fs.input_shape, len(fs.classes),
                                  dataclasses.asdict(cfg.model)))
    trainer = Trainer(models[0], (x, y), (x[:1], y[:1]), cfg.training, n_classes=len(fs.classes),
                      epochs=epochs)
    device = trainer.device
    baseline = models[1].to(device)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=cfg.training.learning_rate)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.training.batch_size, shuffle=True)
    loops = {"genre_ray": lambda: train_epoch(trainer.model, trainer.optimizer, *trainer.train_xy,
                                              trainer.batch_size, trainer.generator),
             "DataLoader": lambda: dataloader_epoch(baseline, optimizer, loader, device)}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for round_ in range(epochs + 1):  # round 0 warms up and is dropped
        for name in (list(loops) if round_ % 2 else list(loops)[::-1]):
            start = time.perf_counter()
            loops[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                rates[name].append(len(x) / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["genre_ray"] / median["DataLoader"]
    print(f"{model_name} on {feature} {fs.input_shape}, {len(x)} segments, {device}: "
          f"genre_ray {median['genre_ray']:.0f} seg/s, DataLoader {median['DataLoader']:.0f} seg/s, "
          f"ratio {ratio:.2f} (goal >= 1.0)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    data_dir = args.data_dir or embedded_dataset()
    print(context())
    for model_name, feature in PAIRS:
        bench_pair(model_name, feature, data_dir, args.epochs)


if __name__ == "__main__":
    main()
