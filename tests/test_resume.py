"""Ctrl-C and resume as a user does them: SIGINT to a real run's process group (what a
terminal's Ctrl-C sends) once some trials have finished, then the same command again.
Real Ray, Optuna and W&B offline; then which run a command picks, and storage URIs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

from genre_ray import config, export, runs
from genre_ray.errors import UserError
from genre_ray.search_space import load_space
from genre_ray.storage import Storage, storage
from tests.helpers import REPO, make_tree, read_run, record_of

MODELS, SAMPLES = ["MLP", "CEL"], 3


def project_copy(base: Path) -> Path:
    """The project's code and files in `base/project`, so a test can edit its defaults.yaml
    and search spaces as a user would edit theirs, leaving the repository's alone."""
    project = base / "project"
    for name in ("genre_ray", "search_spaces"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tune_main.py", project)
    return project


def command(base, *extra: str) -> list[str]:
    """The chain's command, on two trial slots (not tests.helpers.ONE_SLOT): the Ctrl-C must
    find a trial running, whose W&B run the continued run goes on."""
    return [sys.executable, str(base / "project" / "tune_main.py"), "--data-dir", str(base / "data"),
            "--models", *MODELS, "--features", "spectrogram", "--num-samples", str(SAMPLES),
            "--max-epochs", "5", "--storage-path", str(base / "runs"), "--name", "r",
            "--output-dir", str(base / "best"), "--wandb", "offline", *extra]


def done_trials(run_dir) -> dict[str, str]:
    """Trial folder -> hash of its result.json, for trials that reported `done`."""
    done = {}
    for result in run_dir.glob("*/result.json"):
        if any('"done": true' in line for line in result.read_text().splitlines()):
            done[result.parent.name] = hashlib.sha256(result.read_bytes()).hexdigest()
    return done


def finished_trials(run_dir) -> dict[str, str]:
    """`done_trials` that Tune's saved state also holds as ended. A trial's last result
    is written before Tune has processed the checkpoint that came with it; a Ctrl-C in
    between leaves the trial unfinished in the state, and resuming reruns its last epoch
    from the checkpoint before (Tune delivers results at least once)."""
    ended = {f"{t.config['pair']}_{t.trial_id}" for t in ExperimentAnalysis(str(run_dir)).trials
             if t.status == Trial.TERMINATED}
    return {name: digest for name, digest in done_trials(run_dir).items() if name in ended}


def tree_hash(folder) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run sent SIGINT once two trials have finished; what it left, and how it exited."""
    base = tmp_path_factory.mktemp("resume")
    make_tree(base / "data", tracks=3, seconds=11.0)
    project_copy(base)
    log = open(base / "first.log", "w")
    proc = subprocess.Popen(command(base), cwd=base, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while len(done_trials(base / "runs" / "r")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (base / "first.log").read_text()
        time.sleep(0.2)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(120)
    seconds = time.monotonic() - sent
    return base, code, seconds, finished_trials(base / "runs" / "r")


def edited(path: Path, old: str, new: str) -> str:
    """Replace `old` by `new` in the file at `path`; returns its text before."""
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return text


@pytest.fixture(scope="module")
def changed(interrupted):
    """The same command after defaults.yaml, then a search-space file, was edited: how
    each ended, and whether the run's files stayed as they were. Both files are restored."""
    base, project = interrupted[0], interrupted[0] / "project"
    before = tree_hash(base / "runs" / "r")
    ends = {}
    for file, old, new in [(project / "genre_ray" / "defaults.yaml", "weight_decay: 0.0", "weight_decay: 0.5"),
                           (project / "search_spaces" / "CEL.yaml", "mixup: {uniform: [0.0, 0.3]}", "mixup: {uniform: [0.0, 0.2]}")]:
        text = edited(file, old, new)
        ends[file.name] = subprocess.run(command(base), cwd=base, capture_output=True, text=True,
                                         timeout=300)
        file.write_text(text)
    return ends, before == tree_hash(base / "runs" / "r")


@pytest.fixture(scope="module")
def resumed(interrupted, changed):
    """The run continued with --resume after defaults.yaml changed: with its saved configuration."""
    base = interrupted[0]
    wandb_before = sorted((base / "runs" / "r" / "wandb").glob("offline-run-*"))
    defaults = base / "project" / "genre_ray" / "defaults.yaml"
    text = edited(defaults, "weight_decay: 0.0", "weight_decay: 0.5")
    try:
        out = subprocess.run(command(base, "--resume"), cwd=base, capture_output=True, text=True,
                             timeout=600)
    finally:
        defaults.write_text(text)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return base, out, wandb_before


@pytest.mark.slow
def test_ctrl_c_stops_the_run_within_30_s_with_its_state_saved(interrupted):
    base, code, seconds, finished = interrupted
    log = (base / "first.log").read_text()
    assert code == 130 and seconds < 30, log[-3000:]
    assert "interrupted" in log and "--resume --name r" in log
    run_dir = base / "runs" / "r"
    assert record_of(run_dir)["status"] == "interrupted"
    assert runs.tune_state_exists(storage(str(base / "runs")), "r")
    assert 0 < len(finished) < len(MODELS) * SAMPLES  # stopped before its end, after some ended
    assert not (base / "best").exists() or not any((base / "best").iterdir())
    for folder in (run_dir / "wandb").glob("offline-run-*"):
        assert read_run(folder)["exit"] is not None, folder  # every W&B run closed


@pytest.mark.slow
def test_a_changed_defaults_yaml_or_search_space_stops_the_same_command_naming_the_change(changed):
    ends, untouched = changed
    for file, says in [("defaults.yaml", r"training\.weight_decay 0\.0 \(now 0\.5\)"),
                       ("CEL.yaml", r"search space CEL")]:
        out = ends[file]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert re.fullmatch(rf"error: run 'r' was interrupted with another configuration .*{says}"
                            r".*--resume.*\n", out.stderr), out.stderr
    assert untouched


@pytest.mark.slow
def test_resume_continues_with_the_configuration_the_run_was_started_with(resumed):
    base, out, _ = resumed
    record = record_of(base / "runs" / "r")
    assert record["config"]["training"]["weight_decay"] == 0.0  # not the edited 0.5
    assert record["config_hash"] == config.digest(config.identity(record["config"], record["spaces"]))
    assert sorted(record["spaces"]) == sorted(MODELS) and "spaces" not in record["config"]


@pytest.mark.slow
def test_the_continued_run_does_not_rerun_finished_trials(interrupted, resumed):
    _, _, _, finished = interrupted
    base, out, wandb_before = resumed
    run_dir = base / "runs" / "r"
    assert "continuing interrupted run 'r'" in out.stdout
    now = finished_trials(run_dir)
    assert len(now) == len(MODELS) * SAMPLES
    assert {trial: now[trial] for trial in finished} == finished  # not one result more
    new_wandb = set(run_dir.glob("wandb/offline-run-*")) - set(wandb_before)
    rerun = {read_run(f)["id"] for f in new_wandb} & {t.rsplit("_", 1)[1] for t in finished}
    assert not rerun
    assert record_of(run_dir)["status"] == "finished"


@pytest.mark.slow
def test_a_continued_trial_goes_on_in_its_own_wandb_run(resumed):
    base, _, wandb_before = resumed
    before = {read_run(f)["id"] for f in wandb_before}
    continued = [(folder, read_run(folder)) for folder in (base / "runs" / "r").glob("wandb/offline-run-*")
                 if folder not in wandb_before]
    continued = [(folder, run) for folder, run in continued if run["id"] in before]
    assert continued  # a trial that was running when Ctrl-C came
    for folder, run in continued:
        assert run["resume"], folder  # offline: `wandb sync` appends it to the first


@pytest.mark.slow
def test_each_optuna_study_holds_every_trial_once_and_its_first_point_once(resumed):
    base, _, _ = resumed
    storage = JournalStorage(JournalFileBackend(str(base / "runs" / "r" / "optuna.journal")))
    for model in MODELS:
        study = optuna.load_study(study_name=f"r/{model}_spectrogram", storage=storage)
        assert len(study.trials) == SAMPLES
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
        params = Counter(json.dumps(t.params, sort_keys=True) for t in study.trials)
        assert params[json.dumps(load_space(model).of("spectrogram").first_point, sort_keys=True)] == 1


@pytest.mark.slow
def test_the_continued_run_exports_every_pair(resumed):
    base, _, _ = resumed
    for model in MODELS:
        assert export.Exported.load(base / "best" / export.export_name(model, "spectrogram")).model == model


@pytest.mark.slow
def test_a_finished_run_rerun_says_where_its_results_are(resumed):
    base, _, _ = resumed
    before = tree_hash(base / "runs" / "r"), tree_hash(base / "best")
    out = subprocess.run(command(base), cwd=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is finished" in out.stderr and str(base / "runs" / "r" / "leaderboard.md") in out.stderr
    assert "--name" in out.stderr
    assert (tree_hash(base / "runs" / "r"), tree_hash(base / "best")) == before


@pytest.mark.slow
def test_sigterm_while_every_trial_is_running_stops_the_run_as_ctrl_c_does(tmp_path):
    """What `kill`, a scheduler or a container stop sends, to the driver alone: one line,
    exit 143, the run saved and resumable. Sent once Tune has made every trial, whose
    ResultGrid then calls them all TERMINATED: the run must still say interrupted (judged
    from Tune's saved state)."""
    make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    argv = [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(tmp_path / "data"),
            "--models", "MLP", "CEL", "--features", "spectrogram", "--num-samples", "1",
            "--max-epochs", "50", "--storage-path", str(tmp_path / "runs"), "--name", "live",
            "--output-dir", str(tmp_path / "best"), "--wandb", "off"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "runs" / "live").glob("*/checkpoint_*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("run 'live' was interrupted"), err[-3000:]
    assert record_of(tmp_path / "runs" / "live")["status"] == "interrupted"
    assert runs.tune_state_exists(storage(str(tmp_path / "runs")), "live")
    assert not (tmp_path / "best").exists()


@pytest.mark.slow
def test_a_run_stopped_after_tuning_says_why_and_the_same_command_continues_it(
        tmp_path, monkeypatch, capsys):
    """A disk that fills as the leaderboard is written (an error no check could foresee),
    then a Ctrl-C there: the record says which each time, and the same command finishes
    the run."""
    import tune_main
    from genre_ray import report

    make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    argv = ["--data-dir", str(tmp_path / "data"), "--models", "MLP", "--features", "spectrogram",
            "--num-samples", "1", "--max-epochs", "1", "--storage-path", str(tmp_path / "runs"),
            "--name", "full", "--output-dir", str(tmp_path / "best"), "--wandb", "off"]
    write_leaderboard = report.write_leaderboard
    continuing = "continuing {} run 'full'"
    for stop, status, reason, said in [
            (OSError(28, "No space left on device"), "failed",
             "OSError: [Errno 28] No space left on device", None),
            (KeyboardInterrupt(), "interrupted", None, continuing.format("failed"))]:
        def stopped(*args, **kwargs):
            raise stop

        monkeypatch.setattr(report, "write_leaderboard", stopped)
        with pytest.raises(SystemExit if status == "interrupted" else OSError) as first:
            tune_main.main(argv)
        assert status == "failed" or first.value.code == 130
        record = record_of(tmp_path / "runs" / "full")
        assert (record["status"], record.get("reason")) == (status, reason)
        assert said is None or said in capsys.readouterr().out
    monkeypatch.setattr(report, "write_leaderboard", write_leaderboard)
    with pytest.raises(SystemExit) as done:
        tune_main.main(argv)
    assert done.value.code == 0 and continuing.format("interrupted") in capsys.readouterr().out
    assert record_of(tmp_path / "runs" / "full")["status"] == "finished"


# Which run a command picks: records and locks written by the module itself.

def doc(**values) -> dict:
    """A configuration as a run saves it: defaults.yaml with `values` ({"search.max_epochs": 3})."""
    return config.as_json(config.load(values={"run.models": ["MLP"], "run.output_dir": "/x",
                                              "search.max_epochs": 3, **values}))


SPEC = doc()


def make_run(store: Storage, name: str, status: str, spec: dict, age: float) -> runs.Run:
    run = runs.Run(name, spec, {}, resume=False)
    with runs.claimed(store, run):
        runs.write_record(run, status)
    stamp = time.time() - age
    os.utime(run.dir / runs.RECORD, (stamp, stamp))
    return run


def test_without_a_name_the_newest_interrupted_run_with_these_settings_continues(tmp_path):
    store = storage(str(tmp_path))
    make_run(store, "old", "interrupted", SPEC, age=300)
    make_run(store, "newer", "interrupted", SPEC, age=200)
    make_run(store, "other", "interrupted", doc(**{"search.max_epochs": 9}), age=100)
    make_run(store, "done", "finished", SPEC, age=0)
    chosen = runs.choose(store, None, SPEC, {}, resume=False)
    assert (chosen.name, chosen.resume) == ("newer", True)
    chosen = runs.choose(store, None, SPEC, {}, resume=True)  # --resume: any settings
    assert (chosen.name, chosen.config["search"]["max_epochs"]) == ("other", 9)
    fresh = runs.choose(store, None, doc(**{"search.max_epochs": 4}), {}, resume=False)
    assert fresh.name is None and not fresh.resume
    with runs.claimed(store, fresh) as run:
        assert run.name.startswith("tune-") and (run.dir / runs.LOCK).is_file()


def test_the_same_command_from_another_folder_continues_the_run_writing_where_it_says(tmp_path):
    """Where a machine keeps things (a new head, a resubmitted job's working folder) is not
    what a run is: the command continues the run and writes where it says now; --resume
    keeps the run's own."""
    store = storage(str(tmp_path))
    make_run(store, "r", "interrupted", SPEC, age=0)
    elsewhere = doc(**{"run.output_dir": "/y", "run.search_spaces": "/job/search_spaces"})
    chosen = runs.choose(store, None, elsewhere, {}, resume=False)
    assert (chosen.name, chosen.resume) == ("r", True)
    assert chosen.config["run"]["output_dir"] == "/y" and chosen.config["search"] == SPEC["search"]
    assert runs.choose(store, "r", elsewhere, {}, resume=True).config["run"]["output_dir"] == "/x"
    other = doc(**{"run.output_dir": "/y", "search.max_epochs": 9})
    with pytest.raises(UserError, match=r"--max-epochs 3 \(now 9\)\)"):  # what it runs: refused
        runs.choose(store, "r", other, {}, resume=False)


def test_a_run_saved_with_its_search_spaces_inside_its_configuration_still_continues(tmp_path):
    """run.json keeps the search spaces beside the configuration; a record that keeps them
    inside it (as genre-ray wrote them before) is continued the same, and a changed space
    is named."""
    store, spaces = storage(str(tmp_path)), {"MLP": load_space("MLP").doc}
    run = make_run(store, "r", "interrupted", SPEC, age=0)
    record = record_of(run.dir)
    assert record["spaces"] == {} and "spaces" not in record["config"]
    inside = {**record, "config": {**SPEC, "spaces": spaces}}
    inside.pop("spaces")
    inside["config_hash"] = config.digest(inside["config"])
    (run.dir / runs.RECORD).write_text(json.dumps(inside))
    chosen = runs.choose(store, None, SPEC, spaces, resume=False)
    assert (chosen.name, chosen.config, chosen.spaces) == ("r", SPEC, spaces)
    edited = {"MLP": {**spaces["MLP"], "first_point": {}}}
    with pytest.raises(UserError, match=r"\(search space MLP\)"):
        runs.choose(store, "r", SPEC, edited, resume=False)


def test_a_run_held_by_another_process_is_neither_chosen_nor_claimed(tmp_path):
    store = storage(str(tmp_path))
    make_run(store, "busy", "interrupted", SPEC, age=0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(store.local / "busy" / runs.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runs.choose(store, None, SPEC, {}, resume=False).name is None
        with pytest.raises(UserError, match="running in another driver"):
            with runs.claimed(store, runs.choose(store, "busy", SPEC, {}, resume=False)):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_named_run_with_other_settings_is_refused_with_the_difference(tmp_path):
    store = storage(str(tmp_path))
    make_run(store, "r", "interrupted", SPEC, age=0)
    five = doc(**{"search.max_epochs": 5})
    with pytest.raises(UserError, match=r"--max-epochs 3 \(now 5\).*--resume"):
        runs.choose(store, "r", five, {}, resume=False)
    assert runs.choose(store, "r", five, {}, resume=True).config == SPEC
    with pytest.raises(UserError, match="no run 'x'.*drop --resume"):
        runs.choose(store, "x", SPEC, {}, resume=True)


def test_a_run_taken_by_another_process_between_choice_and_lock_is_refused(tmp_path):
    store = storage(str(tmp_path))
    chosen = runs.choose(store, "r", SPEC, {}, resume=False)  # no such run yet: a new one
    make_run(store, "r", "interrupted", SPEC, age=0)  # another process ran it meanwhile
    with pytest.raises(UserError, match="another process"):
        with runs.claimed(store, chosen):
            pass


def test_a_run_saved_by_another_format_is_not_continued(tmp_path):
    store = storage(str(tmp_path))
    run = make_run(store, "old", "interrupted", SPEC, age=0)
    record = record_of(run.dir)
    (run.dir / runs.RECORD).write_text(json.dumps({**record, "format": runs.FORMAT - 1}))
    assert runs.choose(store, None, SPEC, {}, resume=False).name is None
    with pytest.raises(UserError, match="another version of genre-ray"):
        runs.choose(store, "old", SPEC, {}, resume=False)


def test_a_folder_in_the_storage_that_is_not_a_run_is_refused(tmp_path):
    store = storage((tmp_path / "bucket").as_uri())
    saved = tmp_path / "bucket" / "r"
    saved.mkdir(parents=True)
    (saved / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    with pytest.raises(UserError, match="exists and is not a genre-ray run"):
        runs.choose(store, "r", SPEC, {}, resume=False)
    assert runs.choose(store, "s", SPEC, {}, resume=False).name == "s"


def test_a_run_name_goes_before_a_storage_uri_query():
    store = Storage("s3://bucket/runs?endpoint_override=localhost:9000", Path("/cache/x"))
    assert store.tune_path("r") == "s3://bucket/runs/r?endpoint_override=localhost:9000"
    assert Storage("/data/runs", Path("/data/runs")).tune_path("r") == "/data/runs/r"
