"""The report's figures: confusion matrix, learning curves, pair comparison, search view,
hyperparameter importance, accuracy against cost (Pareto front).

Each function takes plain Python data, draws one `matplotlib.figure.Figure` (no pyplot,
so no global state and no GUI backend) and writes one PNG atomically, returning its
path. Sizes follow the number of classes, pairs and trials so labels never overlap.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from genre_ray.files import atomic_path

DPI = 120
FINISHED, STOPPED, BEST, FAILED = "tab:blue", "0.55", "tab:red", "tab:purple"


def normalise_rows(counts: Any) -> np.ndarray:
    """(n, n) counts -> (n, n) float rows summing to 1; an all-zero row stays zeros."""
    m = np.asarray(counts, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion counts must be a square matrix, got shape {m.shape}")
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def confusion_matrix(counts: Any, classes: list[str], title: str, path: Path) -> Path:
    """Row-normalised (n, n) confusion PNG; counts[i][j]: segments of true i predicted as j."""
    rates = normalise_rows(counts)
    n = len(classes)
    if rates.shape != (n, n):
        raise ValueError(f"{n} classes but confusion counts of shape {rates.shape}")
    totals = np.asarray(counts, dtype=float).sum(axis=1)
    side = max(4.5, 0.55 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true genre's segments")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), [f"{c} (n={t:.0f})" for c, t in zip(classes, totals)])
    ax.set_xlabel("predicted genre")
    ax.set_ylabel("true genre")
    ax.set_title(title)
    if n <= 30:
        size = 9 if n <= 10 else max(5, 9 - (n - 10) // 4)
        for i in range(n):
            for j in range(n):
                r, g, b, _ = image.cmap(image.norm(rates[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")
    return _save(fig, path)


def learning_curves(history: list[dict[str, float]], title: str, path: Path) -> Path:
    """Loss and accuracy by epoch PNG; rows: {epoch, train_loss, val_loss, val_acc}."""
    if not history:
        raise ValueError("learning curves need at least one epoch of history")
    rows = sorted(history, key=lambda r: r["epoch"])
    epochs = [int(r["epoch"]) for r in rows]
    column = {k: np.array([r.get(k, math.nan) for r in rows], dtype=float)
              for k in ("train_loss", "val_loss", "val_acc")}
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    marker = 6 if len(epochs) <= 15 else 3
    loss_ax.plot(epochs, column["train_loss"], "o-", ms=marker, label="train loss")
    loss_ax.plot(epochs, column["val_loss"], "s-", ms=marker, label="validation loss")
    loss_ax.set_ylabel("cross-entropy loss")
    _log_if_wide(loss_ax, np.concatenate([column["train_loss"], column["val_loss"]]))
    acc_ax.plot(epochs, column["val_acc"], "s-", ms=marker, color="tab:green",
                label="validation accuracy")
    acc_ax.set_ylabel("accuracy (segments)")
    acc_ax.set_ylim(0, 1)
    finite = np.isfinite(column["val_loss"])
    if finite.any():
        best = int(np.flatnonzero(finite)[np.argmin(column["val_loss"][finite])])
        label = f"best epoch {epochs[best]} (val loss {column['val_loss'][best]:.3f})"
        for ax in (loss_ax, acc_ax):
            ax.axvline(epochs[best], color="0.4", linestyle=":", label=label)
        loss_ax.plot(epochs[best], column["val_loss"][best], "*", color=BEST, markersize=14,
                     zorder=3)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "validation accuracy")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        _epoch_axis(ax, epochs[0], epochs[-1])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def pair_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of val_acc, test_acc (and test_track_acc) per pair PNG; NaN draws no bar."""
    if not rows:
        raise ValueError("pair comparison needs at least one pair")
    series = [("val_acc", "validation (segments)", "tab:blue"),
              ("test_acc", "test (segments)", "tab:orange")]
    if any("test_track_acc" in r for r in rows):
        series.append(("test_track_acc", "test (tracks)", "tab:green"))
    n, k = len(rows), len(series)
    height = 0.8 / k
    fig = Figure(figsize=(8, max(3.5, 0.22 * n * k + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    for s, (key, label, colour) in enumerate(series):
        values = [_number(r.get(key)) for r in rows]
        ys = [i - 0.4 + height * (s + 0.5) for i in range(n)]
        drawn = [(y, v) for y, v in zip(ys, values) if math.isfinite(v)]
        ax.barh([y for y, _ in drawn], [v for _, v in drawn], height=height * 0.92,
                color=colour, label=label)
        for y, v in drawn:
            inside = v > 0.12
            ax.text(v - 0.01 if inside else v + 0.01, y, f"{v:.2f}", va="center",
                    ha="right" if inside else "left", fontsize=7,
                    color="white" if inside else "black")
    for i, r in enumerate(rows):
        if not any(math.isfinite(_number(r.get(key))) for key, _, _ in series):
            ax.text(0.01, i, "no export", va="center", fontsize=8, color="0.4", style="italic")
    ax.set_yticks(range(n), [str(r["pair"]) for r in rows])
    ax.set_ylim(n - 0.5, -0.5)  # first row at the top
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_ylabel("pair (model_feature)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Validation vs held-out test accuracy")
    fig.legend(loc="outside lower center", ncols=k, fontsize=9)
    return _save(fig, path)


def importance(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per pair of its hyperparameters' importances (bars), titled with the first
    point's val loss beside the winner's; rows: {pair, importance: {name: value},
    first_point_val_loss, val_loss, winner}. A pair without importances says so."""
    if not rows:
        raise ValueError("importance needs at least one pair")
    cols = min(3, len(rows))
    grid = (math.ceil(len(rows) / cols), cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * grid[0]), layout="constrained")
    for i, row in enumerate(rows):
        ax = fig.add_subplot(*grid, i + 1)
        names = list(row["importance"])[::-1]  # most important on top
        ax.barh(names, [row["importance"][n] for n in names], color="tab:blue")
        if not names:
            ax.text(0.5, 0.5, "under 3 trials scored", ha="center", va="center", color="0.4",
                    style="italic", transform=ax.transAxes)
            ax.set_yticks([])
        ax.set_xlim(0, 1)
        first, best = (_loss(row.get(k)) for k in ("first_point_val_loss", "val_loss"))
        ax.set_title(f"{row['pair']}: first point {first}, best {best} ({row.get('winner') or '-'})", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.supxlabel("importance to validation loss (Optuna PED-ANOVA)", fontsize=9)
    return _save(fig, path)


def search_view(trials: list[dict[str, Any]], path: Path, max_epochs: int) -> Path:
    """Grid (one panel per pair) of every trial's val loss by epoch PNG; ASHA stops and
    failed trials (diverged or errored) marked.

    Each trial: {pair, trial_id, epochs: list[int], val_loss: list[float], stopped: bool,
    failed: bool (optional)}.
    """
    pairs = list(dict.fromkeys(t["pair"] for t in trials))
    if not pairs:
        raise ValueError("search view needs at least one trial")
    ncols = min(5, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = Figure(figsize=(max(6.0, 3.0 * ncols + 0.8), 2.6 * nrows + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for ax, pair in zip(axes, pairs):
        _search_panel(ax, [t for t in trials if t["pair"] == pair], max_epochs)
        ax.set_title(pair, fontsize=10)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:len(pairs)]):
        ax.tick_params(labelbottom=True, labelsize=8)
        if i + ncols >= len(pairs):  # nothing drawn below it
            ax.set_xlabel("epoch")
    fig.supylabel("validation loss")
    fig.suptitle("Search: validation loss of every trial by epoch")
    handles = [Line2D([], [], color=FINISHED, lw=1.3, label=f"ran to epoch {max_epochs}"),
               Line2D([], [], color=STOPPED, lw=1.1, ls="--", marker="x",
                      label="stopped early by ASHA (x: last epoch)"),
               Line2D([], [], color=BEST, lw=2.5, marker="*", markersize=10,
                      label="best trial of the pair (*: its best epoch)")]
    if any(t.get("failed") for t in trials):
        handles.append(Line2D([], [], color=FAILED, lw=1.3, ls=":", marker="o", mfc="none",
                              label="failed: diverged or errored (o: last finite epoch)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=3 if ncols >= 3 else 1,
               fontsize=9)
    return _save(fig, path)


def pareto_view(trials: list[dict[str, Any]], path: Path) -> Path:
    """One panel per feature: every trial's best validation loss against its latency per
    5 s segment (log scale), coloured by pair; the Pareto front's trials ringed and joined.

    Each trial: {feature, pair, val_loss, latency_ms, front: bool, exported: bool}.
    """
    features = list(dict.fromkeys(t["feature"] for t in trials))
    if not features:
        raise ValueError("the Pareto view needs at least one trial")
    pairs = list(dict.fromkeys(t["pair"] for t in trials))
    colours = {pair: f"C{i % 10}" for i, pair in enumerate(pairs)}
    fig = Figure(figsize=(5.2 * len(features) + 0.6, 4.6), layout="constrained")
    for ax, feature in zip(np.atleast_1d(fig.subplots(1, len(features), squeeze=False)).ravel(), features):
        mine = [t for t in trials if t["feature"] == feature]
        for t in mine:
            ax.scatter(t["latency_ms"], t["val_loss"], s=22, color=colours[t["pair"]], alpha=0.75,
                       marker="*" if t["exported"] else "o", zorder=3)
        front = sorted((t["latency_ms"], t["val_loss"]) for t in mine if t["front"])
        ax.step(*zip(*front), where="post", color="black", lw=1, zorder=2)
        ax.scatter(*zip(*front), s=90, facecolors="none", edgecolors="black", lw=1.2, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, not 2x10^0
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("latency per 5 s segment, batch 1 (ms)")
        ax.set_ylabel("best validation loss")
        ax.set_title(f"{feature}: {len(front)} of {len(mine)} trials on the front", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colours[p], marker="o", ls="", label=p) for p in pairs]
    handles += [Line2D([], [], color="black", marker="o", mfc="none", ms=9, label="Pareto front"),
                Line2D([], [], color="0.3", marker="*", ls="", ms=9, label="a pair's export")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8)
    fig.suptitle("Accuracy against cost: no ringed trial is beaten on both axes")
    return _save(fig, path)


def _search_panel(ax: Axes, trials: list[dict[str, Any]], max_epochs: int) -> None:
    """One pair's trials: finished solid, stopped grey dashed with an x, failed purple
    dotted with an o, best in red."""
    curves = []
    for t in trials:
        points = [(int(e), float(v)) for e, v in zip(t["epochs"], t["val_loss"])
                  if math.isfinite(_number(v))]
        if points:
            curves.append((t, [e for e, _ in points], [v for _, v in points]))
    best = min(curves, key=lambda c: min(c[2]))[0] if curves else None
    for t, xs, ys in sorted(curves, key=lambda c: c[0] is best):  # best drawn last, on top
        ls = "--" if t.get("stopped") else "-"
        if t is best:
            ax.plot(xs, ys, color=BEST, lw=2.5, ls=ls, zorder=3)
            i = int(np.argmin(ys))
            ax.plot(xs[i], ys[i], "*", color=BEST, markersize=11, zorder=4)
        elif t.get("failed"):
            ax.plot(xs, ys, color=FAILED, lw=1.3, ls=":")
        elif t.get("stopped"):
            ax.plot(xs, ys, color=STOPPED, lw=1.1, ls=ls)
        else:
            ax.plot(xs, ys, color=FINISHED, lw=1.3, alpha=0.8)
        if t.get("failed"):
            ax.plot(xs[-1], ys[-1], "o", color=FAILED, mfc="none", markersize=7, mew=1.8,
                    zorder=4)
        elif t.get("stopped"):
            ax.plot(xs[-1], ys[-1], "x", color=BEST if t is best else STOPPED, markersize=7,
                    mew=1.8, zorder=4)
    if not curves:
        ax.text(0.5, 0.5, "no finished epoch", transform=ax.transAxes, ha="center",
                va="center", color="0.4", style="italic")
    else:
        _log_if_wide(ax, np.concatenate([c[2] for c in curves]))
    _epoch_axis(ax, 1, max_epochs)
    ax.grid(alpha=0.3)


def _log_if_wide(ax: Axes, values: np.ndarray) -> None:
    """Log y scale when positive values span over 20x: a divergent curve flattens the rest."""
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")


def _epoch_axis(ax: Axes, first: int, last: int) -> None:
    """x from epoch `first` to `last`, ticks on whole epochs only."""
    ax.set_xlim(first - 0.5, last + 0.5)
    if last - first < 10:
        ax.set_xticks(range(first, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def _number(value: Any) -> float:
    """A metric as float; None or missing is NaN."""
    return math.nan if value is None else float(value)


def _loss(value: Any) -> str:
    """A loss for a title: three decimals, or "-" when missing or NaN."""
    number = _number(value)
    return f"{number:.3f}" if math.isfinite(number) else "-"


def _save(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` as PNG, atomically (whole file or none)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path
