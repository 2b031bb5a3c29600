"""A run's trials as plain records: what tuning leaves for export and report.

Tune's results are read once, at the end of tuning (tuning.records); everything after
reads these records only, so export, the leaderboard, the Pareto front, importances and
plots are functions of them, testable on records made by hand. The outcome rule lives
here too: Optuna's states, the leaderboard's counts and the search plot all use it, and
the trial contract: what a trial's Tune config holds beside its hyperparameters.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

FINISHED, PRUNED, FAILED, EXCLUDED = "finished", "pruned", "failed", "excluded"
COST_KEYS = ("params", "latency_ms", "latency_ms_b64")  # cost.Cost, in every trial's results
EPOCH_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "lr")  # a trial's per-epoch metrics


def outcome(last_epoch: int, max_epochs: int, failed: bool, excluded: bool = False) -> str:
    """How a trial ended: EXCLUDED when its model broke a cost limit and it never trained
    (cost.violations); FAILED when it errored after its retries or its loss was not finite
    (diverged); else FINISHED when it reached `max_epochs`, PRUNED when ASHA (or the run's
    end) stopped it before."""
    if excluded:
        return EXCLUDED
    if failed:
        return FAILED
    return FINISHED if last_epoch >= max_epochs else PRUNED


@dataclass(frozen=True)
class TrialKeys:
    """What each trial's Tune config holds beside its sampled hyperparameters (the one
    owner of these keys: tuning puts them there, the trainable and the export read them)."""

    pair: str
    model: str
    feature: str
    max_epochs: int
    seed: int
    checkpoint_epochs: list[int]  # tuning.checkpoint_epochs

    @classmethod
    def split(cls, tune_config: Mapping[str, Any]) -> tuple[TrialKeys, dict[str, Any]]:
        """(the keys, the sampled hyperparameters) of a trial's Tune config."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in tune_config.items() if k in names}), hyperparameters(tune_config)


def hyperparameters(tune_config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled hyperparameters: its Tune config without the TrialKeys (any part
    of a config: one a saved run holds for a trial that failed before reporting is empty)."""
    names = {f.name for f in dataclasses.fields(TrialKeys)}
    return {k: v for k, v in tune_config.items() if k not in names}


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a run. `config`: its Tune config (TrialKeys and the sampled
    hyperparameters); `epochs`: per epoch reported, its last report's EPOCH_KEYS (NaN
    where it reported none); `checkpoints`: (checkpoint, loss of the state it holds) of
    the checkpoints Tune kept, each checkpoint as trainable.load_trial_state reads it."""

    trial_id: str
    pair: str
    feature: str
    config: dict[str, Any]
    outcome: str
    last_epoch: int  # its last result's epoch; 0 if it reported none, or ended untrained
    epochs: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # COST_KEYS it measured
    busy_s: float = 0.0  # in its trainable: setup and epochs (Tune's time_total_s)
    checkpoints: list[tuple[Any, float]] = field(default_factory=list)
    failure: str = ""  # `<trial folder>: why`, when it failed

    @property
    def best_val_loss(self) -> float:
        """The lowest validation loss it reported (NaN ignored); NaN if none."""
        losses = [e["val_loss"] for e in self.epochs if not math.isnan(e.get("val_loss", math.nan))]
        return min(losses, default=math.nan)

    @property
    def hyper(self) -> dict[str, Any]:
        """Its sampled hyperparameters (empty if it failed before its first report)."""
        return hyperparameters(self.config)

    @property
    def scored(self) -> bool:
        """Whether it reported a validation loss (it trained at least one epoch)."""
        return any("val_loss" in e for e in self.epochs)


def of_pair(records: list[TrialRecord], pair: str) -> list[TrialRecord]:
    return [r for r in records if r.pair == pair]
