"""Control plane at cluster size, simulated: how busy the tuner keeps many slots of short trials.

    python -m bench.control_plane [--slots 32] [--trials 2000] [--pairs 10] [--epochs 8]
                                  [--epoch-s 0.5] [--budget-s 150] [--keep-checkpoints 2]

A local Ray with `--slots` logical CPUs runs the project's real search (build_search over
`--pairs` pairs of the real search spaces, MLP, MLP2, CEL, CEL2, CEL3 x waveform,
spectrogram: seeded TPE, one ASHA per pair, the run's Optuna journal) and real tuner
(make_tuner: concurrency limit, reused actors, checkpoints kept per trial, failure
config), with a function trainable that does no work: it sleeps `--epoch-s` per epoch
and reports a synthetic val_loss computed from its config (a bowl in the unit cube of
the pair's space, approached faster with a larger learning rate, plus noise), and
checkpoints as the real trainable does (at ASHA's rungs and the last epoch, when the loss
improved since its last checkpoint: trainable.BestSaver). The driver therefore
does everything a real run does (suggest, route results, ASHA, tell Optuna, persist
checkpoints, snapshot the experiment) at a cluster's rate of events.

Why 0.5 s per epoch: what loads the control plane is events per second, slots / epoch
time. A GTZAN-sized epoch (~5,000 five-second segments) takes ~1-2 s on a GPU and trials
share a GPU four ways, so 32 slots at 0.5 s make the events of ~64-128 such slots (16-32
GPUs). Caveat of simulating on a small machine: each simulated epoch also costs its
worker process ~0.1 s of CPU (Tune's report path and checkpoint persistence), so 32
slots at 0.5 s need ~6 cores of workers; with fewer, the workers, not the driver, cap
the utilisation. The driver's own CPU per trial is printed too: it does not depend on
the machine's other load, and 1 / it is the trial rate one driver core sustains.

Two Tuners run one after the other on the same Ray, each for at most `--budget-s`
seconds of tuning (a run that has not finished its trials by then is stopped: rates are
compared over the same wall time): the baseline keeps one checkpoint per trial,
which makes Tune snapshot the experiment after every checkpoint; the other keeps
`--keep-checkpoints` (default: make_tuner's, 2). Printed per run: utilisation (busy
trial-seconds over wall x slots, tuning.utilisation; "steady" counts from when every
slot had started its first trial: starting 32 worker processes on a small machine is
not the control plane), trials started per second, driver CPU per trial, and the time
of PairSearcher.suggest by the pair's trial number; then their ratio. Before them, one
pair's searcher is driven alone, as Tune drives it, to `--curve` trials (default 500),
on the run's journal storage and on Optuna's in-memory one, to show how its time per
suggestion grows with the study and how much of it is the journal's writes.
Goal: steady utilisation >= 90% with 32 slots, 2,000 trials over 10 pairs.
"""
from __future__ import annotations

import math
import pickle
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune

from bench import harness
from genre_ray import config, tuning
from genre_ray.config import Config
from genre_ray.export import CHECKPOINT_METRIC
from genre_ray.search_space import load_space

MODELS = ("MLP", "MLP2", "CEL", "CEL2", "CEL3")
FEATURES = ("waveform", "spectrogram")
MARKS = (10, 50, 100, 200, 500)  # a pair's trial numbers at which suggest's time is printed
SUGGEST_TIMES: list[tuple[int, float]] = []  # (the pair's trial number, seconds), this process
DRIVER_CPU: list[float] = []  # the driver's CPU seconds (time.process_time) at each suggestion


class TimedPairSearcher(tuning.PairSearcher):
    """PairSearcher that records the wall time of each suggestion (kept module-wide, not
    in the instance: Tune pickles the searcher at every experiment snapshot)."""

    def suggest(self, trial_id: str):
        start = time.perf_counter()
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            SUGGEST_TIMES.append((self._started[config["pair"]], time.perf_counter() - start))
            DRIVER_CPU.append(time.process_time())
        return config


def suggest_ms(times: list[tuple[int, float]], mark: int, window: int = 5) -> float | None:
    """Median suggest time (ms) over the trials numbered mark +- window, every pair."""
    near = [t for n, t in times if abs(n - mark) <= window]
    return 1000 * statistics.median(near) if near else None


def unit_coder(distribution) -> tuple:
    """How the trainable maps a value of `distribution` into [0, 1]."""
    if isinstance(distribution, CategoricalDistribution):
        return ("choice", list(distribution.choices))
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        return ("log" if distribution.log else "linear", distribution.low, distribution.high)
    raise ValueError(f"no unit coder for {distribution!r}")


def landscape(pairs: list[tuple[str, str]], epoch_s: float, seed: int = 0) -> dict[str, Any]:
    """What the synthetic trainable reads (given as its `feature_refs`): per pair, each
    key's unit coder and the pair's optimum in the unit cube; and the epoch's sleep."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"epoch_s": epoch_s, "pairs": {}}
    for model, feature in pairs:
        coders = {k: unit_coder(d) for k, d in load_space(model).distributions.items()}
        out["pairs"][tuning.pair_name(model, feature)] = (coders, {k: rng.random() for k in coders})
    return out


def synthetic_trial(config: dict[str, Any], feature_refs: dict[str, Any],
                    run_cfg: Config) -> None:
    """A function trainable that reports as the real one does (every epoch; a checkpoint
    at ASHA's rungs and the last epoch when it improved since the last one, as
    trainable.BestSaver; a resume from it) and does no work: sleeps, then reports a loss
    computed from `config`; the run's `run_cfg` goes unused. Imports
    inside: it is pickled by value from the driver and must not pull torch or the rest
    of genre_ray into every worker."""
    import json
    import logging
    import math
    import random
    import tempfile
    import time
    from pathlib import Path

    from ray import tune

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # as train_pair

    def unit(value, coder):
        kind, *args = coder
        if kind == "choice":
            return args[0].index(value) / max(1, len(args[0]) - 1)
        low, high = args
        if kind == "log":
            return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        return (value - low) / (high - low)

    started = time.time()
    coders, optimum = feature_refs["pairs"][config["pair"]]
    x = {k: unit(config[k], coder) for k, coder in coders.items()}
    final = 0.5 + sum((x[k] - optimum[k]) ** 2 for k in coders)
    speed = 0.15 + 0.6 * x.get("learning_rate", 0.5)  # fast starters, as ASHA's rungs see them
    noise = random.Random(json.dumps(config, sort_keys=True))
    epoch, best, pending = 0, math.inf, None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            epoch, best = json.loads((Path(folder) / "state.json").read_text())
    for epoch in range(epoch + 1, config["max_epochs"] + 1):
        time.sleep(feature_refs["epoch_s"])
        loss = final + (2.3 - final) * math.exp(-speed * epoch) + noise.gauss(0, 0.02)
        metrics = {"epoch": epoch, "val_loss": loss, "started": started}
        if loss < best:
            best = pending = loss
        if pending is None or epoch not in config["checkpoint_epochs"]:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps([epoch, best]))
            tune.report({**metrics, CHECKPOINT_METRIC: best},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        pending = None


class WallBudget(tune.Stopper):
    """Ends the whole run `seconds` after it is built (just before fit)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.monotonic() > self.deadline


def cfg_for(args, num_samples: int) -> Config:
    return config.load(values={"search.num_samples": num_samples, "search.max_epochs": args.epochs,
                               "run.seed": 0})


def run_tuner(pairs, args, folder: Path, label: str, keep: int) -> dict[str, Any]:
    """One Tuner over `pairs` with the synthetic trainable, for at most --budget-s."""
    cfg = cfg_for(args, math.ceil(args.trials / len(pairs)))
    searcher, scheduler = tuning.build_search(pairs, {m: load_space(m) for m, _ in pairs}, cfg,
                                              label, tuning.optuna_storage(folder / label))
    searcher.__class__ = TimedPairSearcher
    SUGGEST_TIMES.clear()
    DRIVER_CPU.clear()
    tuner = tuning.make_tuner(landscape(pairs, args.epoch_s), searcher, scheduler, cfg,
                              storage_path=str(folder), name=label,
                              num_trials=cfg.search.num_samples * len(pairs), cpus_per_trial=1,
                              gpus_per_trial=0, max_concurrent=args.slots, verbose=0,
                              stop=WallBudget(args.budget_s), trainable=synthetic_trial,
                              keep_checkpoints=keep or None)
    cpu = time.process_time()
    start = time.time()
    grid = tuner.fit()
    end, cpu = time.time(), time.process_time() - cpu
    spans = sorted((r.metrics["started"], r.metrics["started"] + r.metrics["time_total_s"])
                   for r in grid if r.metrics and "started" in r.metrics)
    full = spans[min(args.slots, len(spans)) - 1][0]  # every slot has started a trial
    steady = sum(max(0.0, min(b, end) - max(a, full)) for a, b in spans) / ((end - full) * args.slots)
    return {"label": label, "keep": keep, "wall": end - start, "trials": len(spans),
            "errors": len(grid.errors), "startup": full - start, "cpu": cpu,
            "epochs": sum(r.metrics.get(tuning.TIME_ATTR, 0) for r in grid if r.metrics),
            "busy": tuning.busy_seconds(grid), "steady": steady,
            "utilisation": tuning.utilisation(grid, end - start, args.slots),
            "steady_rate": (len(spans) - args.slots) / max(1e-9, spans[-1][0] - full),
            "suggest": list(SUGGEST_TIMES), "cpu_growth": cpu_growth(DRIVER_CPU, args.slots)}


def cpu_growth(cpu: list[float], slots: int) -> list[tuple[int, int, float]]:
    """Driver CPU seconds per trial started, over quarters of the trials started after
    the first `slots` (the first wave starts the worker processes)."""
    if len(cpu) < slots + 8:
        return []
    bounds = [slots + (len(cpu) - 1 - slots) * q // 4 for q in range(5)]
    return [(a, b, (cpu[b] - cpu[a]) / (b - a)) for a, b in zip(bounds, bounds[1:]) if b > a]


def suggest_curve(model: str, feature: str, n: int, args, folder: Path,
                  storage=None) -> tuple[list[tuple[int, float]], int, float]:
    """One pair's searcher driven alone to `n` trials as Tune drives it: slots / pairs
    trials running at once, each reporting ASHA-like results (half stopped at the grace
    period) before it is told. Returns the suggest times, and the size (bytes) and time
    (s) of pickling the searcher's state at the end (what PairSearcher.save writes at
    every experiment snapshot)."""
    run_dir = folder / f"curve-{'journal' if storage is None else 'memory'}"
    cfg = cfg_for(args, n)
    searcher, _ = tuning.build_search([(model, feature)], {model: load_space(model)}, cfg,
                                      run_dir.name, storage or tuning.optuna_storage(run_dir))
    searcher.__class__ = TimedPairSearcher
    SUGGEST_TIMES.clear()
    rng, running = random.Random(0), []
    grace = cfg.search.grace_period
    for i in range(n):
        searcher.suggest(f"curve_{i}")
        running.append(f"curve_{i}")
        if len(running) > max(1, args.slots // args.pairs):
            done = running.pop(0)
            last = grace if rng.random() < 0.5 else args.epochs
            for step in range(1, last):
                searcher.on_trial_result(done, {tuning.METRIC: 1 + rng.random() / step,
                                                tuning.TIME_ATTR: step})
            searcher.on_trial_complete(done, {tuning.METRIC: rng.random(), tuning.TIME_ATTR: last})
    start = time.perf_counter()
    size = len(pickle.dumps(searcher.__dict__))
    return list(SUGGEST_TIMES), size, time.perf_counter() - start


def curve_line(times: list[tuple[int, float]]) -> str:
    return ", ".join(f"{m}: {ms:.1f}" for m in MARKS if (ms := suggest_ms(times, m)) is not None)


SMOKE = {"slots": 2, "trials": 8, "pairs": 2, "epochs": 2, "epoch_s": 0.05, "budget_s": 20,
         "curve": 12}


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--slots", type=int, default=32, help="logical CPUs of the local Ray")
    parser.add_argument("--trials", type=int, default=2000, help="trials in all, over the pairs")
    parser.add_argument("--pairs", type=int, default=10, help="(model, feature) pairs, 1-10")
    parser.add_argument("--epochs", type=int, default=config.load().search.max_epochs,
                        help="ASHA's max_t (grace period and reduction factor: defaults.yaml)")
    parser.add_argument("--epoch-s", type=float, default=0.5, help="seconds a trial sleeps per epoch")
    parser.add_argument("--budget-s", type=float, default=150, help="most seconds of tuning per run")
    parser.add_argument("--keep-checkpoints", type=int, default=tuning.KEEP_CHECKPOINTS,
                        help="checkpoints kept per trial in the run compared with the baseline's 1 "
                             "(0: no limit)")
    parser.add_argument("--curve", type=int, default=500, help="trials of the one-pair suggest curve")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if not 1 <= args.pairs <= len(MODELS) * len(FEATURES):
        parser.error(f"--pairs must be 1-{len(MODELS) * len(FEATURES)}")
    pairs = [(m, f) for f in FEATURES for m in MODELS][:args.pairs]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(harness.context())
    with tempfile.TemporaryDirectory() as tmp:
        journal, size, pickle_s = suggest_curve(*pairs[0], args.curve, args, Path(tmp))
        memory, _, _ = suggest_curve(*pairs[0], args.curve, args, Path(tmp),
                                     optuna.storages.InMemoryStorage())
        with harness.local_ray(num_cpus=args.slots, log_to_driver=False):
            runs = [run_tuner(pairs, args, Path(tmp), f"keep{keep}", keep)
                    for keep in (1, args.keep_checkpoints)]
    print(f"{args.slots} logical slots, {len(pairs)} pairs, {args.trials} trials, up to "
          f"{args.epochs} epochs of {args.epoch_s} s, at most {args.budget_s:.0f} s per run")
    pair = tuning.pair_name(*pairs[0])
    print(f"one pair ({pair}) alone, suggest ms at its trial {curve_line(journal)} (journal); "
          f"{curve_line(memory)} (in memory); its pickled state at trial {args.curve}: "
          f"{size / 1e3:.0f} kB in {1000 * pickle_s:.1f} ms")
    for r in runs:
        per_trial = r["cpu"] / max(1, r["trials"])
        print(f"{r['keep'] or 'any number of'} checkpoint(s) kept per trial: {r['trials']} trials started "
              f"({r['errors']} failed), {r['epochs']} epochs in {r['wall']:.0f} s "
              f"(all slots busy after {r['startup']:.0f} s): {r['trials'] / r['wall']:.1f} trials/s, "
              f"{r['steady_rate']:.1f} steady; utilisation {r['utilisation']:.0%}, steady "
              f"{r['steady']:.0%} (goal >= 90%)")
        print(f"  driver CPU {1000 * per_trial:.0f} ms per trial: one driver core starts "
              f"{1 / per_trial:.1f} trials/s, enough to keep {r['busy'] / r['trials'] / (0.9 * per_trial):.0f} "
              f"slots 90% busy with these {r['busy'] / r['trials']:.1f} s trials; suggest ms at a "
              f"pair's trial {curve_line(r['suggest'])}")
        print("  driver CPU ms per trial as the run grows: " + ", ".join(
            f"trials {a}-{b}: {1000 * c:.0f}" for a, b, c in r["cpu_growth"]))
    base, other = runs
    kept = other["keep"] or "any number of"
    print(f"driver CPU per trial {(base['cpu'] / max(1, base['trials'])) / max(1e-9, other['cpu'] / max(1, other['trials'])):.1f}x "
          f"lower with {kept} checkpoints kept per trial than with 1")
    print(harness.ratio(other["steady"] / max(1e-9, base["steady"]),
                        f"steady utilisation, {kept} checkpoints kept per trial over 1"))


if __name__ == "__main__":
    main()
