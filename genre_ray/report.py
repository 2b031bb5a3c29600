"""Stage report: held-out test scores, the leaderboard and the plots of a run.

Each pair's exported model is scored once on the test split, which no trial and no
selection ever touched: accuracy per segment, per track (a track's class is the argmax
of its segments' mean probability), macro F1 and the confusion matrix. The leaderboard
ranks the pairs by test track accuracy; `<run>/leaderboard.md` holds it with the run's
context, `<run>/leaderboard.csv` the same rows, and `tune_main.py` prints it. Plots land
in `<run>/plots/`: per pair its test confusion matrix and its best trial's learning
curves; for the run, validation vs test accuracy of every pair, every trial's
validation loss by epoch (ASHA-stopped trials visible), and each pair's hyperparameter
importances beside its seed point's score. The leaderboard says too whether the seed point
(the search space's first_point) or a searched configuration won each pair. Accuracy
against cost: every trial's best validation loss and latency (cost.Cost), the Pareto
front of each feature across its pairs in `<run>/pareto.csv`, `leaderboard.md` and
`plots/pareto.png`, and whether each pair's export is on it (column `pareto`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from genre_ray import cost, plots
from genre_ray.features import FeatureSplit
from genre_ray.files import atomic_path
from genre_ray.training import evaluate, track_accuracy

COLUMNS = ["pair", "test_track_acc", "test_acc", "test_macro_f1", "val_acc", "val_loss",
           "seed_val_loss", "winner", "params", "latency_ms", "pareto", "epochs", "finished",
           "pruned", "failed", "excluded", "cpu_s", "gpu_s", "trial_id", "config", "importance"]
# pareto.csv: the trials of each feature's Pareto front (validation loss vs latency)
PARETO_COLUMNS = ["feature", "pair", "trial_id", "val_loss", "latency_ms", "latency_ms_b64",
                  "params", "exported"]
LIBRARIES = ("torch", "torchaudio", "ray", "optuna", "wandb")


@dataclass
class TestScores:
    """Scores on the test split; confusion[i][j]: segments of class i predicted as j."""

    accuracy: float
    track_accuracy: float
    macro_f1: float
    confusion: list[list[int]]

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "track_accuracy": self.track_accuracy,
                "macro_f1": self.macro_f1}


@dataclass
class PairResult:
    """One leaderboard row: a pair's search and its exported model (None: no export)."""

    pair: str
    finished: int
    pruned: int
    failed: int  # errored after its retries (e.g. out of memory), or diverged (NaN loss)
    cpu_s: float
    gpu_s: float
    export_path: Path | None = None
    onnx_path: Path | None = None  # the export as an ONNX graph (onnx_export), beside it
    onnx_problem: str = ""  # why there is no ONNX graph, when there is an export
    val_loss: float = math.nan
    val_acc: float = math.nan
    test: TestScores | None = None
    params: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    trial_id: str = ""
    epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # best trial, per epoch
    seed_val_loss: float = math.nan  # the seed point's (the search space's first_point) best
    winner: str = ""  # "seed point" when it is the exported trial, else "searched"
    importance: dict[str, float] = field(default_factory=dict)  # hyperparameter -> importance
    excluded: int = 0  # over a cost limit: ended untrained (cost.violations)
    latency_ms: float = math.nan  # the export's, per 5 s segment at batch 1 (cost.Cost)
    pareto: str = ""  # "yes" when the export is on its feature's Pareto front, else "no"

    def row(self) -> dict[str, Any]:
        test = self.test.summary() if self.test else {}
        return {"pair": self.pair, "test_track_acc": test.get("track_accuracy", math.nan),
                "test_acc": test.get("accuracy", math.nan),
                "test_macro_f1": test.get("macro_f1", math.nan), "val_acc": self.val_acc,
                "val_loss": self.val_loss, "seed_val_loss": self.seed_val_loss,
                "winner": self.winner, "params": self.params, "latency_ms": self.latency_ms,
                "pareto": self.pareto, "epochs": self.epochs, "finished": self.finished,
                "pruned": self.pruned, "failed": self.failed, "excluded": self.excluded,
                "cpu_s": round(self.cpu_s),
                "gpu_s": round(self.gpu_s), "trial_id": self.trial_id,
                "config": json.dumps(self.config, sort_keys=True),
                "importance": json.dumps(self.importance)}


def test_scores(model: nn.Module, split: FeatureSplit, n_classes: int) -> TestScores:
    """Score `model` (eval mode) on a split's segments and tracks."""
    from sklearn.metrics import f1_score  # here: importing it takes a second, and every command imports this module

    result = evaluate(model, split.x, split.labels, n_classes)
    predicted = result.probs.argmax(dim=1)
    f1 = f1_score(split.labels.numpy(), predicted.numpy(), labels=list(range(n_classes)),
                  average="macro", zero_division=0)
    return TestScores(result.accuracy, track_accuracy(result.probs, split.track, split.labels),
                      float(f1), result.confusion.tolist())


def ranked(results: list[PairResult]) -> list[PairResult]:
    """Best test track accuracy first (then test segment accuracy); pairs without an export last."""
    def key(r: PairResult) -> tuple[float, float]:
        return (-r.test.track_accuracy, -r.test.accuracy) if r.test else (math.inf, math.inf)
    return sorted(results, key=key)


def table(results: list[PairResult]) -> str:
    """The leaderboard as a Markdown table (what tune_main.py prints)."""
    return _markdown([r.row() for r in ranked(results)], COLUMNS)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def context(data_dir: Path, split: str, seed: int, sizes: dict[str, tuple[int, int]],
            hardware: str, wall_s: float) -> dict[str, str]:
    """The run's context beside the leaderboard. sizes: split -> (tracks, segments)."""
    return {"dataset": str(data_dir),
            "size": ", ".join(f"{name} {t} tracks / {s} segments" for name, (t, s) in sizes.items()),
            "split": str(split), "seed": str(seed), "hardware": hardware,
            "libraries": ", ".join(f"{lib} {_version(lib)}" for lib in LIBRARIES)
            + f", python {platform.python_version()}",
            "wall time": f"{wall_s:.0f} s"}


def _version(library: str) -> str:
    """Its installed version; a run with tracking off needs no wandb installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return "not installed"


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`trials` (each: feature, pair, trial_id, val_loss, the cost.Cost keys, exported),
    each marked `front`: on its feature's Pareto front of validation loss vs latency at
    batch 1 (cost.pareto), across every pair of that feature."""
    marked = [{**t, "front": False} for t in trials]
    for feature in dict.fromkeys(t["feature"] for t in marked):
        mine = [t for t in marked if t["feature"] == feature]
        for i in cost.pareto([(t["val_loss"], t["latency_ms"]) for t in mine]):
            mine[i]["front"] = True
    return marked


def write_leaderboard(run_dir: Path, results: list[PairResult], ctx: dict[str, str],
                      trials: list[dict[str, Any]] = ()) -> list[Path]:
    """`leaderboard.md` (context, table, Pareto fronts), `leaderboard.csv` (rows) and
    `pareto.csv` (the fronts' trials) in `run_dir`; `trials`: pareto_front's."""
    front = sorted((t for t in trials if t["front"]), key=lambda t: (t["feature"], t["latency_ms"]))
    md = "# Leaderboard\n\n" + "".join(f"- {k}: {v}\n" for k, v in ctx.items()) + \
        "\nRanked by test accuracy per track (mean of its segments' probabilities).\n\n" + \
        table(results) + "\n\n## Pareto front per feature\n\nNo other trial of the feature " \
        "has both a lower validation loss and a lower latency per 5 s segment (batch 1).\n\n" + \
        _markdown(front, PARETO_COLUMNS) + "\n"
    paths = [run_dir / "leaderboard.md", run_dir / "leaderboard.csv", run_dir / "pareto.csv"]
    texts = (md, _csv([r.row() for r in ranked(results)], COLUMNS), _csv(front, PARETO_COLUMNS))
    for path, text in zip(paths, texts):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths


def write_plots(run_dir: Path, results: list[PairResult], classes: list[str],
                trials: list[dict[str, Any]], max_epochs: int,
                costs: list[dict[str, Any]] = ()) -> list[Path]:
    """Every PNG of the run under `<run_dir>/plots/`; `trials` as plots.search_view takes,
    `costs` as pareto_front gives."""
    folder = run_dir / "plots"
    paths = []
    for r in results:
        if r.test is not None:
            paths.append(plots.confusion_matrix(
                r.test.confusion, classes, f"{r.pair}: test confusion (rows: true genre)",
                folder / f"{r.pair}_confusion.png"))
        if r.history:
            paths.append(plots.learning_curves(r.history, f"{r.pair}: best trial {r.trial_id}",
                                               folder / f"{r.pair}_curves.png"))
    comparison = [{"pair": r.pair, "val_acc": r.val_acc,
                   "test_acc": r.test.accuracy if r.test else math.nan,
                   "test_track_acc": r.test.track_accuracy if r.test else math.nan}
                  for r in ranked(results)]
    paths.append(plots.pair_comparison(comparison, folder / "comparison.png"))
    paths.append(plots.importance([{"pair": r.pair, "importance": r.importance, "val_loss": r.val_loss,
                                    "seed_val_loss": r.seed_val_loss, "winner": r.winner}
                                   for r in results], folder / "importance.png"))
    if trials:  # none when every trial failed before its first epoch
        paths.append(plots.search_view(trials, folder / "search.png", max_epochs))
    if costs:
        paths.append(plots.pareto_view(list(costs), folder / "pareto.png"))
    return paths


def hardware(nodes: list[dict[str, Any]]) -> str:
    """The driver's machine and the Ray cluster's nodes (`ray.nodes()`), in words. GPUs
    are read from the nodes' resources, not this process's CUDA: a cluster's head (the
    driver) usually has none."""
    alive = [node["Resources"] for node in nodes if node["Alive"]]
    kinds = Counter()
    for node in alive:
        for key in node:
            if key.startswith("accelerator_type:"):
                kinds[key.removeprefix("accelerator_type:")] += int(node.get("GPU", 0))
    named = f" ({', '.join(f'{n} x {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    total = {kind: sum(node.get(kind, 0) for node in alive) for kind in ("CPU", "GPU")}
    return (f"driver: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"Ray cluster: {len(alive)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs{named}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)
