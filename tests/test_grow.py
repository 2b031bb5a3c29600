"""Growing a finished run: `tune_main.py --name R --more-samples N` as a user runs it, real
Ray, Optuna and W&B offline; then what the grown run holds."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune import ExperimentAnalysis

from genre_ray import export
from genre_ray.search_space import load_space
from tests.helpers import ONE_SLOT, REPO, make_tree, read_runs, run_main

pytestmark = pytest.mark.slow  # whole tune_main runs

PAIRS, FIRST, MORE = ["MLP_spectrogram", "CEL_spectrogram"], 2, 3


def tune_main(base: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tune_main.py"), "--storage-path",
                           str(base / "runs"), *args], cwd=base, capture_output=True, text=True,
                          timeout=900)


def studies(run: Path) -> dict[str, list[tuple]]:
    """pair -> (number, params, state, value) of each trial of its Optuna study."""
    storage = JournalStorage(JournalFileBackend(str(run / "optuna.journal")))
    return {pair: [(t.number, t.params, t.state.name, t.value)
                   for t in optuna.load_study(study_name=f"g/{pair}", storage=storage).trials]
            for pair in PAIRS}


def folders(experiment: Path) -> dict[str, str]:
    """Trial folder -> a hash of its files, for every trial of a Tune experiment folder."""
    return {d.name: hashlib.sha256(b"".join(p.name.encode() + p.read_bytes()
                                            for p in sorted(d.rglob("*")) if p.is_file())).hexdigest()
            for d in experiment.iterdir() if d.is_dir() and d.name.split("_")[0] in ("MLP", "CEL")}


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """A finished run of FIRST trials per pair; then `--name g --more-samples MORE`, Ctrl-C
    (SIGINT to the process group) once two of the new round's trials are done; then the same
    command again, which finishes the round. What each step left."""
    base = tmp_path_factory.mktemp("grow")
    make_tree(base / "data", tracks=3, seconds=11.0)
    first = tune_main(base, "--data-dir", str(base / "data"), "--models", "MLP", "CEL",
                      "--features", "spectrogram", "--num-samples", str(FIRST), "--max-epochs", "2",
                      "--name", "g", "--output-dir", str(base / "best"), "--wandb", "offline",
                      *ONE_SLOT)
    assert first.returncode == 0, first.stderr[-3000:]
    run = base / "runs" / "g"
    before = {"studies": studies(run), "trials": folders(run)}
    command = [sys.executable, str(REPO / "tune_main.py"), "--storage-path", str(base / "runs"),
               "--name", "g", "--more-samples", str(MORE)]  # nothing else: the run's own
    with open(base / "grow.log", "w") as log:
        proc = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(re.findall(r"Trial \S+ completed after", (base / "grow.log").read_text())) < 2:
            # the driver says so at once; its trials' result.json reach the run's folder only
            # with its syncs, often after the round's end
            assert proc.poll() is None and time.monotonic() < deadline, (base / "grow.log").read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(120)
    stopped = {"code": code, "record": json.loads((run / "run.json").read_text()),
               "done": done(run / "more-1"), "log": (base / "grow.log").read_text()}
    stopped["kept"] = finished(run / "more-1", stopped["done"])  # ended in Tune's saved state
    again = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    return {"base": base, "run": run, "before": before, "stopped": stopped, "again": again,
            "after": done(run / "more-1")}


def test_a_grown_run_has_n_more_trials_per_pair_in_its_studies_none_rerun(grown):
    run, before = grown["run"], grown["before"]
    assert f"growing run 'g' ({run}) by {MORE} trial(s) per pair, after its {FIRST}" in grown["stopped"]["log"]
    after = studies(run)
    for pair in PAIRS:
        assert len(after[pair]) == FIRST + MORE
        assert after[pair][:FIRST] == before["studies"][pair]  # the earlier trials, as they were
        seed = load_space(pair.split("_")[0]).of("spectrogram").first_point
        assert [t[1] for t in after[pair]].count(seed) == 1  # the first point is not run again
        assert all(state in ("COMPLETE", "PRUNED") for _, _, state, _ in after[pair])


def test_the_new_trials_are_in_tunes_results_and_the_earlier_ones_untouched(grown):
    run, before = grown["run"], grown["before"]
    assert folders(run) == before["trials"]  # no earlier trial ran again, nothing rewritten
    earlier = ExperimentAnalysis(str(run)).trials
    later = ExperimentAnalysis(str(run / "more-1")).trials
    for pair in PAIRS:
        assert sum(t.config["pair"] == pair for t in earlier) == FIRST
        assert sum(t.config["pair"] == pair for t in later) == MORE
    assert not {t.trial_id for t in earlier} & {t.trial_id for t in later}
    assert json.loads((run / "run.json").read_text())["rounds"] == [FIRST, MORE]


def test_exports_and_leaderboard_are_rebuilt_over_every_trial(grown):
    base, run = grown["base"], grown["run"]
    with open(run / "leaderboard.csv", newline="") as f:
        rows = {r["pair"]: r for r in csv.DictReader(f)}
    results = [json.loads(line) for path in run.glob("**/result.json") for line in path.open()]
    for pair in PAIRS:
        assert int(rows[pair]["finished"]) + int(rows[pair]["pruned"]) == FIRST + MORE
        saved = export.Exported.load(base / "best" / f"{pair}_best_model.pth")
        losses = [r["checkpoint_val_loss"] for r in results
                  if r["config"]["pair"] == pair and "checkpoint_val_loss" in r]
        assert saved.val["val_loss"] == pytest.approx(min(losses))  # the best of both rounds
        assert rows[pair]["trial_id"] == saved.trial_id
        assert (base / "best" / f"{pair}_best_model.onnx").is_file()


def test_the_new_trials_are_logged_to_wandb_beside_the_earlier_ones(grown):
    run = grown["run"]
    logged = read_runs(run)
    trials = [*ExperimentAnalysis(str(run)).trials, *ExperimentAnalysis(str(run / "more-1")).trials]
    assert {t.trial_id for t in trials} <= set(logged)
    assert sum(r["group"] == "summary" for _, r in logged.values()) == 2  # one per round's end


@pytest.mark.parametrize("args,says", [
    (["--more-samples", "2"], "--more-samples grows a finished run: name it with --name"),
    (["--name", "absent", "--more-samples", "2"], "there is no run 'absent'"),
    (["--name", "g"], "or --more-samples N to add N trials per pair to it"),
    (["--name", "g", "--more-samples", "-1"], "--more-samples must be >= 1, got -1"),
])
def test_growing_needs_a_finished_run_named(grown, args, says):
    """In-process: tests/test_bad_inputs.py runs tune_main.py's one-line contract as a command."""
    base, run = grown["base"], grown["run"]
    before = folders(run)
    out = run_main("tune_main", "--storage-path", base / "runs", *args, cwd=base)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert says in out.stderr
    assert folders(run) == before


def test_an_interrupted_growth_is_continued_by_the_same_command(grown):
    """The same command again finishes the round without rerunning the trials it had ended."""
    run, stopped, again, after = (grown[k] for k in ("run", "stopped", "again", "after"))
    assert stopped["code"] == 130, stopped["log"]
    assert (stopped["record"]["status"], stopped["record"]["rounds"]) == ("interrupted", [FIRST, MORE])
    assert stopped["kept"] and len(stopped["kept"]) < MORE * len(PAIRS)
    assert "continuing interrupted run 'g'" in again.stdout
    assert len(after) == MORE * len(PAIRS)
    assert all(after[name] == stopped["done"][name] for name in stopped["kept"])
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def done(experiment: Path) -> dict[str, str]:
    """Trial folder -> hash of its result.json, for the trials that reported `done`."""
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in experiment.glob("*/result.json") if '"done": true' in p.read_text()}


def finished(experiment: Path, names) -> set[str]:
    """Of `names`, the trials Tune's saved state holds as ended: one whose last result came
    just before the Ctrl-C may rerun its last epoch (Tune delivers results at least once)."""
    from ray.tune.experiment import Trial

    ended = {f"{t.config['pair']}_{t.trial_id}" for t in ExperimentAnalysis(str(experiment)).trials
             if t.status == Trial.TERMINATED}
    return set(names) & ended
