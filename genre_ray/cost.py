"""Stage cost: what a model costs to serve, the limits a search respects, and the trials
no other trial beats on both accuracy and cost (the Pareto front).

A trial's cost is measured by the trainable before it trains, on the device it runs on:
its parameters, and the latency per 5 s segment of the whole served path (`Served`: the
feature front end, the network and the softmax, what the `.onnx` export runs) at batch 1
and at batch 64, a median after a warm-up. Limits (`--max-latency-ms`, `--max-params`)
prune before training: a trial over a limit ends at once, untrained, and its study is
told so through Optuna's constraints (tuning.PrunedOptunaSearch), so TPE learns where
the limits are; no export can come from it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from genre_ray.config import Search
from genre_ray.models import count_parameters

BATCHES = {"latency_ms": (1, 5), "latency_ms_b64": (64, 1)}  # metric -> (batch, timed runs)


class Served(nn.Module):
    """Raw segments to genre probabilities: (batch, samples) -> (batch, n_classes)."""

    def __init__(self, front: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.front, self.net = front, net

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        return self.net(self.front(segments)).softmax(dim=1)


@dataclass(frozen=True)
class Cost:
    """A model's cost: its parameters, and ms per 5 s segment at batch 1 and 64."""

    params: int
    latency_ms: float
    latency_ms_b64: float

    def metrics(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure(served: Served, samples: int, device: torch.device) -> Cost:
    """`served`'s Cost on `device` (where its weights are), on segments of `samples`."""
    was_training = served.training
    served.eval()
    latency = {name: _per_segment_ms(served, samples, batch, runs, device)
               for name, (batch, runs) in BATCHES.items()}
    served.train(was_training)
    return Cost(count_parameters(served.net), **latency)


def _per_segment_ms(served: Served, samples: int, batch: int, runs: int,
                    device: torch.device) -> float:
    # latency does not depend on the values; a generator of its own leaves training's RNG be
    x = (torch.randn(batch, samples, generator=torch.Generator().manual_seed(0)) * 0.1).to(device)
    times = []
    for _ in range(runs + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        served(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]) * 1e3 / batch, 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def violations(cost: Cost, search: Search) -> list[str]:
    """What `cost` exceeds of the search's limits, as the user set them."""
    found = []
    if search.max_latency_ms is not None and cost.latency_ms > search.max_latency_ms:
        found.append(f"latency {cost.latency_ms:g} ms > --max-latency-ms {search.max_latency_ms:g}")
    if search.max_params is not None and cost.params > search.max_params:
        found.append(f"{cost.params} parameters > --max-params {search.max_params}")
    return found


def constraint_values(metrics: dict[str, Any], search: Search) -> list[float]:
    """Optuna's constraint values of a trial's cost metrics: > 0 violates a limit (by how
    much, relative to it); a limit not set, or a cost not measured, gives 0."""
    def over(key: str, limit: float | None) -> float:
        return 0.0 if limit is None or key not in metrics else metrics[key] / limit - 1

    return [over("latency_ms", search.max_latency_ms), over("params", search.max_params)]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the points (loss, cost) no other point dominates: none is as good on both
    and better on one. Lower is better on both; equal points are all kept."""
    return [i for i, (loss, cost) in enumerate(points)
            if not any(l2 <= loss and c2 <= cost and (l2 < loss or c2 < cost)
                       for l2, c2 in points)]
