"""Search: TPE + ASHA (genre_ray's tuner) against random search + FIFO, same trial-epochs.

    python -m bench.search [--model CEL] [--feature spectrogram] [--trials 10] [--max-epochs 8] [--seed 0]

The baseline samples `--trials` configurations of the pair's search space at random
(Optuna's RandomSampler, no first point) and trains each for `--max-epochs` epochs (FIFO:
nothing is stopped early): a budget of trials x max_epochs trial-epochs. genre_ray's
side is the real tuner of one pair (the first point first, then seeded TPE, ASHA as in
defaults.yaml) given as many trials as it can start, stopped when it has used the same
budget. Both run on the embedded dataset with the machine's CPUs as trial slots.

A search's best is what the tuner exports: the trial-epoch of lowest validation loss
(the metric both searches minimise), printed with its validation accuracy. Printed: each
side's best, and the trial-epochs genre_ray's tuner had used (all trials, in the order
epochs were reported) when its best first matched the baseline's, over the budget.
Goal: <= 1/3. The loss, not the accuracy, decides "matched": on the embedded dataset's
120 validation segments accuracy moves in steps of 0.008, and the highest of many
epochs' accuracies is mostly the luckiest.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from bench import harness
from genre_ray import config, tuning
from genre_ray.search_space import load_space
from genre_ray.trials import TrialKeys


# The baseline's sampler seed is offset: TPE's startup trials draw from a RandomSampler of
# the run's seed, and the same stream would hand both sides the same first configurations.
RANDOM_STREAM = 1_000_003
SMOKE = {"model": "MLP", "trials": 2, "max_epochs": 1}


class EpochBudget(tune.Stopper):
    """Ends the whole run once its trials have reported `budget` epochs in all.

    Epochs are counted as distinct (trial, iteration): Tune also hands the stopper a
    trial's last result once more when its function returns."""

    def __init__(self, budget: int) -> None:
        self.budget, self.seen = budget, set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen.add((trial_id, result[tuning.TIME_ATTR]))
        return False

    def stop_all(self) -> bool:
        return len(self.seen) >= self.budget


def random_fifo(model: str, feature: str, cfg: config.Config, study: str,
                storage: optuna.storages.BaseStorage):
    """The baseline's searcher and scheduler: random configurations, every one trained fully."""
    pair, search, seed = tuning.pair_name(model, feature), cfg.search, cfg.run.seed
    searcher = tuning.PrunedOptunaSearch(
        load_space(model).of(feature).distributions, metric=tuning.METRIC, mode=tuning.MODE,
        sampler=optuna.samplers.RandomSampler(seed=seed + RANDOM_STREAM),
        storage=storage, study_name=f"{study}/{pair}", max_t=search.max_epochs)
    keys = TrialKeys(pair, model, feature, search.max_epochs, seed, tuning.checkpoint_epochs(search))
    return (tuning.PairSearcher({pair: searcher}, {pair: search.num_samples},
                                {pair: dataclasses.asdict(keys)}),
            FIFOScheduler())


def epochs_in_order(grid) -> list[tuple[float, float]]:
    """(val_loss, val_acc) of every reported epoch, all trials, in the order reported."""
    rows = [row for r in grid if r.metrics_dataframe is not None and len(r.metrics_dataframe)
            for row in r.metrics_dataframe[["timestamp", "val_loss", "val_acc"]].itertuples(index=False)]
    return [(loss, acc) for _, loss, acc in sorted(rows)]


def search(kind: str, model: str, feature: str, args, refs, folder: Path,
           slots: int) -> list[tuple[float, float]]:
    cfg = config.load(values={
        "search.max_epochs": args.max_epochs, "run.seed": args.seed,
        "search.num_samples": args.trials if kind == "random" else 10 * args.trials})
    stop = EpochBudget(args.trials * args.max_epochs)
    if kind == "random":
        searcher, scheduler = random_fifo(model, feature, cfg, kind, tuning.optuna_storage(folder / kind))
        grid = tuning.fit(refs, searcher, scheduler, cfg, storage_path=str(folder), name=kind,
                          num_trials=cfg.search.num_samples, cpus_per_trial=1, gpus_per_trial=0,
                          max_concurrent=slots, verbose=0, stop=stop)
    else:
        grid = harness.tune([(model, feature)], refs, cfg, folder, kind, slots, stop=stop)
    for result in grid.errors:
        print(f"{kind}: a trial failed: {type(result).__name__}: {str(result)[:300]}")
    return epochs_in_order(grid)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default="CEL")
    parser.add_argument("--feature", default="spectrogram")
    parser.add_argument("--trials", type=int, default=10, help="the baseline's trials")
    parser.add_argument("--max-epochs", type=int, default=config.load().search.max_epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    budget = args.trials * args.max_epochs
    with harness.local_ray() as slots, tempfile.TemporaryDirectory() as tmp:
        print(harness.context())
        _, refs = harness.shared_features([(args.model, args.feature)], config.load(),
                                          harness.dataset(args.smoke))
        rows = {kind: search(kind, args.model, args.feature, args, refs, Path(tmp), slots)
                for kind in ("random", "tpe")}
    epochs = {kind: len(r) for kind, r in rows.items()}
    best = {kind: min(r) for kind, r in rows.items()}
    needed = next(i + 1 for i, row in enumerate(rows["tpe"]) if row[0] <= best["random"][0]
                  ) if best["tpe"] <= best["random"] else None
    print(f"{args.model} on {args.feature}, budget {budget} trial-epochs, {slots} slots, seed {args.seed}")
    for kind, label in (("random", "random + FIFO"), ("tpe", "TPE + ASHA")):
        print(f"{label:<13} best val_loss {best[kind][0]:.3f} (val_acc {best[kind][1]:.3f}), "
              f"{epochs[kind]} trial-epochs")
    if needed is None:  # more than the budget: no finite figure, and the goal missed
        print("TPE + ASHA did not match random's best within the budget")
    print(harness.ratio(needed / budget if needed else math.inf, "trial-epochs TPE + ASHA needed to "
                        "match random's best, over the budget", 0.33))


if __name__ == "__main__":
    main()
