"""Stage report: the leaderboard and the plots of a run, from its trial records
(trials.TrialRecord) and its pairs' exports (export.PairExport) only.

Each pair's export carries its test scores (export.test_scores): accuracy per segment,
per track (a track's class is the argmax of its segments' mean probability), macro F1
and the confusion matrix. The leaderboard ranks the pairs by test track accuracy; `<run>/leaderboard.md` holds it with the run's
context, `<run>/leaderboard.csv` the same rows, and `tune_main.py` prints it. Plots land
in `<run>/plots/`: per pair its test confusion matrix and its best trial's learning
curves; for the run, validation vs test accuracy of every pair, every trial's
validation loss by epoch (ASHA-stopped trials visible), and each pair's hyperparameter
importances beside its first point's score. The leaderboard says too whether the first point
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
import platform
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genre_ray import cost, plots
from genre_ray.export import PairExport, TestScores
from genre_ray.files import atomic_path
from genre_ray.trials import COST_KEYS, EXCLUDED, FAILED, FINISHED, PRUNED, TrialRecord, of_pair

COLUMNS = ["pair", "test_track_acc", "test_acc", "test_macro_f1", "val_acc", "val_loss",
           "first_point_val_loss", "winner", "params", "latency_ms", "pareto", "epochs", "finished",
           "pruned", "failed", "excluded", "cpu_s", "gpu_s", "trial_id", "config", "importance"]
# pareto.csv: the trials of each feature's Pareto front (validation loss vs latency)
PARETO_COLUMNS = ["feature", "pair", "trial_id", "val_loss", "latency_ms", "latency_ms_b64",
                  "params", "exported"]
LIBRARIES = ("torch", "torchaudio", "ray", "optuna", "wandb")


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
    first_point_val_loss: float = math.nan  # the first point's (the search space's first_point) best
    winner: str = ""  # "first point" when it is the exported trial, else "searched"
    importance: dict[str, float] = field(default_factory=dict)  # hyperparameter -> importance
    excluded: int = 0  # over a cost limit: ended untrained (cost.violations)
    latency_ms: float = math.nan  # the export's, per 5 s segment at batch 1 (cost.Cost)
    pareto: str = ""  # "yes" when the export is on its feature's Pareto front, else "no"

    def row(self) -> dict[str, Any]:
        test = self.test.summary() if self.test else {}
        return {"pair": self.pair, "test_track_acc": test.get("track_accuracy", math.nan),
                "test_acc": test.get("accuracy", math.nan),
                "test_macro_f1": test.get("macro_f1", math.nan), "val_acc": self.val_acc,
                "val_loss": self.val_loss, "first_point_val_loss": self.first_point_val_loss,
                "winner": self.winner, "params": self.params, "latency_ms": self.latency_ms,
                "pareto": self.pareto, "epochs": self.epochs, "finished": self.finished,
                "pruned": self.pruned, "failed": self.failed, "excluded": self.excluded,
                "cpu_s": round(self.cpu_s),
                "gpu_s": round(self.gpu_s), "trial_id": self.trial_id,
                "config": json.dumps(self.config, sort_keys=True),
                "importance": json.dumps(self.importance)}


@dataclass
class RunSummary:
    """Per-pair results (leaderboard rows), and how busy the Tuner kept its trial slots."""

    pairs: list[PairResult]
    run_dir: Path
    tuning_s: float
    slots: int
    utilisation: float | None  # None for a continued run: its trials' times span sessions
    copied_to: str | None = None  # URI storage: where the run's files are
    failures: list[str] = dataclasses.field(default_factory=list)  # a line per failed trial


def pair_results(pairs: list[str], records: list[TrialRecord], exports: dict[str, PairExport | None],
                 first_points: dict[str, dict[str, Any]], importances: dict[str, dict[str, float]],
                 per_trial: tuple[float, float]) -> tuple[list[PairResult], list[dict[str, Any]]]:
    """The leaderboard's rows, one per pair of `pairs`, and every trial's cost marked on its
    feature's Pareto front (pareto_front). `per_trial`: (CPUs, GPUs) each trial held."""
    exported = {e.exported.trial_id for e in exports.values() if e}
    costs = pareto_front(trial_costs(records, exported))
    by_trial = {t["trial_id"]: t for t in costs}
    rows = [pair_result(pair, of_pair(records, pair), exports.get(pair), first_points[pair],
                        importances.get(pair, {}), per_trial, by_trial) for pair in pairs]
    return rows, costs


def pair_result(pair: str, records: list[TrialRecord], export: PairExport | None,
                first_point: dict[str, Any], importance: dict[str, float],
                per_trial: tuple[float, float], costs: dict[str, dict[str, Any]]) -> PairResult:
    """A pair's leaderboard row: its trials' outcomes and cost, its export, and whether the
    first point (the search space's first_point) or a searched configuration won."""
    ended = Counter(r.outcome for r in records)
    busy = sum(r.busy_s for r in records)
    trial_id = export.exported.trial_id if export else ""
    first = [r for r in records if r.hyper == first_point and r.scored]
    row = PairResult(pair, ended[FINISHED], ended[PRUNED], ended[FAILED], busy * per_trial[0],
                     busy * per_trial[1], excluded=ended[EXCLUDED], importance=importance,
                     first_point_val_loss=first[0].best_val_loss if first else math.nan,
                     winner=("first point" if first[0].trial_id == trial_id else "searched") if first else "")
    if export is None:
        return row
    best = next(r for r in records if r.trial_id == trial_id)
    exported, cost_ = export.exported, costs.get(trial_id)
    return dataclasses.replace(
        row, export_path=export.path, onnx_path=export.onnx_path, onnx_problem=export.onnx_problem,
        val_loss=exported.val["val_loss"], val_acc=exported.val["val_acc"], test=export.scores,
        params=export.params, config=exported.hyper, trial_id=trial_id, epochs=best.last_epoch,
        history=[{k: e[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")} for e in best.epochs],
        latency_ms=cost_["latency_ms"] if cost_ else math.nan,
        pareto=("yes" if cost_["front"] else "no") if cost_ else "")


def trial_costs(records: list[TrialRecord], exported: set[str]) -> list[dict[str, Any]]:
    """Each trial that trained and measured its cost: its pair, feature, best validation
    loss and cost, and whether it is its pair's export (`exported`: those trial ids)."""
    found = []
    for r in records:
        if r.scored and set(COST_KEYS) <= set(r.cost) and math.isfinite(r.best_val_loss):
            found.append({"feature": r.feature, "pair": r.pair, "trial_id": r.trial_id,
                          "val_loss": r.best_val_loss, "exported": r.trial_id in exported, **r.cost})
    return found


def search_trials(records: list[TrialRecord]) -> list[dict[str, Any]]:
    """Every trial's validation loss by epoch, as plots.search_view takes them."""
    return [{"pair": r.pair, "trial_id": r.trial_id, "epochs": [e["epoch"] for e in r.epochs],
             "val_loss": [e["val_loss"] for e in r.epochs], "stopped": r.outcome == PRUNED,
             "failed": r.outcome == FAILED}
            for r in records if r.scored]  # not those that failed or were excluded untrained


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
                                    "first_point_val_loss": r.first_point_val_loss, "winner": r.winner}
                                   for r in results], folder / "importance.png"))
    if trials:  # none when every trial failed before its first epoch
        paths.append(plots.search_view(trials, folder / "search.png", max_epochs))
    if costs:
        paths.append(plots.pareto_view(list(costs), folder / "pareto.png"))
    return paths


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


def summary_table(summary: RunSummary) -> str:
    """What tune_main.py prints at the end of a run: the leaderboard, exports, utilisation."""
    lines = [table(summary.pairs), ""]
    lines += [f"{r.pair:<22}{_exports(r)}" for r in summary.pairs]
    lines.append(f"leaderboard, plots: {summary.run_dir / 'leaderboard.md'}, "
                 f"{summary.run_dir / 'plots'}/")
    if summary.copied_to:
        lines.append(f"the run's files are in {summary.copied_to}/")
    if summary.failures:
        lines.append(f"{len(summary.failures)} trial(s) failed (an error's traceback is in "
                     f"{summary.run_dir}/<trial>/error.txt):")
        lines += [f"  {line}" for line in summary.failures]
    busy = "continued run" if summary.utilisation is None else \
        f"busy {summary.utilisation:.0%} of the time"
    lines.append(f"tuning took {summary.tuning_s:.0f} s on {summary.slots} trial slots, {busy}")
    return "\n".join(lines)


def _exports(row: PairResult) -> str:
    """A pair's export files, or why it has none."""
    if row.export_path is None:
        return "no export: no trial finished an epoch"
    onnx = f"+ {row.onnx_path.suffix}" if row.onnx_path else f"(no .onnx: {row.onnx_problem})"
    return f"{row.export_path} {onnx}"
