"""The generated battery: every flag and argument of every command, tried with a table of
hostile values chosen by the argument's own type (read from the parser the command
builds), so a new flag is covered without a new test. Each case must end with exit 0
or 2, never a traceback; exit 2 with an `error:` line; and where the command writes
nothing (tune_main.py --check, predict, data), the files it could touch are unchanged.
Commands run in-process, with a small, real dataset and export."""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest

import tune_main
from genre_ray import config, data, predict, synthetic, training
from genre_ray.features import build_features
from genre_ray.models import build_model
from tests.helpers import arch, exported, make_tree, write_tone

pytestmark = pytest.mark.slow  # a few hundred commands, in-process

HUGE = "99999999999999999999"
HOSTILE: dict[object, list[str]] = {  # an argument's type -> the values it is tried with
    int: ["", " ", "-1", "0", "nan", "abc", "2.5", HUGE],
    float: ["", " ", "-1", "0", "nan", "inf", "-inf", "1e400", "abc"],
    None: ["", " ", "-", "../escaped", "x" * 300, "a,a"],  # text and paths
}
NOT_A_COUNT = {"", " ", "-1", "nan", "inf", "-inf", "1e400", "abc", "2.5"}  # refused by every number


@dataclass(frozen=True)
class Command:
    """A command's `main`, a valid command line for it, and whether it may write."""

    name: str
    main: Callable[[list[str]], int]
    argv: Callable[[Path, Path], dict[str, list[str]]]  # (world, scratch) -> dest's words
    writes: bool = False  # positionals first


def parser_of(main: Callable, argv: list[str]) -> argparse.ArgumentParser:
    """The parser `main` builds, caught as it parses `argv` (nothing of the command runs)."""
    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            main(argv)
        except Caught as caught:
            return caught.args[0]
    raise AssertionError(f"{main} parsed nothing")


CASE_S = 120  # a case still running after this hangs (the slowest takes a few seconds)


@pytest.fixture(autouse=True)
def bounded():
    """Each case bounded: one that hangs (as `--gpus-per-trial nan` once did) fails here
    instead of holding the suite until CI's own limit."""
    def hung(signum, frame):
        raise TimeoutError(f"the case ran over {CASE_S} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(CASE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny dataset and an export of it, shared by every case (read-only to them)."""
    root = tmp_path_factory.mktemp("hostile")
    make_tree(root / "data", tracks=3, seconds=6.0)
    fs = build_features(root / "data", "spectrogram", config.load(), cache=root / "cache")
    net = build_model("MLP", fs.input_shape, len(fs.classes), arch("MLP"))
    exported(fs, "MLP", net.state_dict()).save([root / "best" / "MLP_spectrogram_best_model.pth"])
    write_tone(root / "clip.wav", 330.0, 6.0)
    return root


COMMANDS = [
    Command("tune_main", tune_main.main, lambda w, _: {
        "check": ["--check"], "run.data_dir": ["--data-dir", str(w / "data")],
        "run.models": ["--models", "MLP"], "run.features": ["--features", "spectrogram"],
        "run.storage_path": ["--storage-path", str(w / "runs")],
        "run.output_dir": ["--output-dir", str(w / "best")], "tracking.wandb": ["--wandb", "off"]}),
    Command("predict", predict.main, lambda w, _: {
        "audio": [str(w / "clip.wav")], "model": ["--model", str(w / "best" / "MLP_spectrogram_best_model.pth")]}),
    Command("data", data.main, lambda w, _: {"data_dir": [str(w / "data")]}),
    Command("training", training.main, lambda w, _: {
        "data_dir": ["--data-dir", str(w / "data")], "model": ["--model", "MLP"], "epochs": ["--epochs", "1"]},
        writes=True),
    Command("synthetic", synthetic.main, lambda _, scratch: {
        "out_dir": [str(scratch / "out")], "tracks_per_genre": ["--tracks-per-genre", "1"],
        "seconds": ["--seconds", "0.5"], "workers": ["--workers", "1"]}, writes=True),
]


def cases() -> list:
    """(command, dest, value) for every argument of every command and every hostile value
    of its type; the parsers are read from the commands themselves."""
    found = []
    for command in COMMANDS:
        for action in parser_of(command.main, [])._actions:  # argparse lists them nowhere public
            if action.dest == "help" or action.nargs == 0 or action.choices:
                continue  # flags without a value; a fixed set of choices is argparse's to refuse
            for value in HOSTILE.get(action.type if action.type in (int, float) else None):
                found.append(pytest.param(command, action, value, id=f"{command.name} {action.dest}={value[:12]!r}"))
    return found


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for folder in folders for p in [folder, *folder.rglob("*")] if p.exists()}


def command_line(command: Command, action: argparse.Action, value: str, world: Path,
                 scratch: Path) -> list[str]:
    """The command's valid line with `action` given `value` (last given wins in argparse)."""
    parts = command.argv(world, scratch)
    parts[action.dest] = [action.option_strings[0], value] if action.option_strings else [value]
    return [word for words in parts.values() for word in words]


@pytest.mark.parametrize("command,action,value", cases())
def test_a_hostile_value_is_taken_or_refused_in_one_line(command, action, value, world, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.setenv("GENRE_RAY_CACHE", str(world / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where relative paths land: ../escaped stays in tmp_path
    argv = command_line(command, action, value, world, tmp_path)
    before = snapshot(world / "data", world / "best", world / "runs")
    with pytest.raises(SystemExit) as end:
        command.main(argv)
    err = capsys.readouterr().err
    assert end.value.code in (0, 2), err[-2000:]
    if action.type in (int, float) and value in NOT_A_COUNT:
        assert end.value.code == 2, f"{value!r} taken"
    if end.value.code == 2:
        assert re.search(r"(^|: )error: \S", err.strip().splitlines()[-1]), err[-2000:]
    if not command.writes:
        assert snapshot(world / "data", world / "best", world / "runs") == before


def test_the_battery_covers_every_argument_of_every_command():
    covered = {(p.values[0].name, p.values[1].dest) for p in cases()}
    assert {name for name, _ in covered} == {c.name for c in COMMANDS}
    assert ("tune_main", "search.num_samples") in covered and ("predict", "audio") in covered
    assert len(cases()) >= 200


# ---- every text file the project reads, in the encodings people have ------------------

ENCODINGS = {"utf-8": 0, "utf-8-sig": 0, "utf-16": 0, "latin-1": 2}  # -> the exit expected
TEXT_FILES = {  # a file a user writes -> (its name, its text, the flags that read it)
    "search space": ("spaces/MLP.yaml", "# largeur (é)\nparams:\n  nodes: {choice: [32, 64]}\n"
                     "first_point: {nodes: 64}\n", ["--search-spaces", "{dir}/spaces"]),
    "--config": ("run.yaml", "# réglages\nsearch: {num_samples: 2}\n", ["--config", "{dir}/run.yaml"]),
    ".env": (".env", "# clé de W&B\nOTHER=1\n", ["--wandb", "auto"]),
    "split file": ("split.json", json.dumps({"train": ["blues.00000", "classical.00000", "jazz.00000",
                                                       "jazz.déjà"],
                                             "val": ["blues.00001", "classical.00001", "jazz.00001"],
                                             "test": ["blues.00002", "classical.00002", "jazz.00002"]},
                                            ensure_ascii=False),
                   ["--split", "{dir}/split.json", "--data-dir", "{dir}/data"]),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", TEXT_FILES)
def test_every_text_file_reads_in_utf8_or_utf16_and_refuses_other_encodings(
        kind, encoding, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENRE_RAY_CACHE", str(world / "cache"))
    monkeypatch.chdir(tmp_path)  # .env is read from where the command runs
    name, text, flags = TEXT_FILES[kind]
    shutil.copytree(world / "data", tmp_path / "data")  # with a track a split file names in UTF-8
    write_tone(tmp_path / "data" / "genres_original" / "jazz" / "jazz.déjà.wav", 600.0, 6.0)
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(text.encode(encoding))
    argv = command_line(COMMANDS[0], argparse.Action([], "check"), "--check", world, tmp_path)
    with pytest.raises(SystemExit) as end:
        tune_main.main([*argv[1:], "--check", *(f.format(dir=tmp_path) for f in flags)])
    err = capsys.readouterr().err
    assert end.value.code == ENCODINGS[encoding], err[-2000:]
    if ENCODINGS[encoding]:
        assert re.fullmatch(rf"error: \S*{re.escape(name.split('/')[-1])} is not UTF-8 text \(byte \d+: "
                            r"b'\\x\w\w'\); save it as UTF-8\n", err), err


# ---- every environment variable the project reads ----------------------------------------

CLOSED = "http://127.0.0.1:1"  # a W&B server that refuses at once: no case waits on a network
ENVIRONMENT = {  # variable -> (the commands that read it, its hostile values -> the exit expected)
    "GENRE_RAY_CACHE": (["tune_main", "training"],  # "": the default's
                        {" ": 0, "a-file": 2, "a-file/below": 2, "x" * 300: 2}),
    "WANDB_API_KEY": (["tune_main"], {"": 0, " ": 0, "x" * 300: 0, "clé\x7f": 0}),  # offline: CLOSED
    "WANDB_BASE_URL": (["tune_main"], {" ": 2, "not a url": 2, "http://[::1": 2, "http://h:99999": 2,
                                       "ftp://h": 2, CLOSED: 0, "http://" + "x" * 300: 0}),
}


def environment_cases() -> list:
    return [pytest.param(command, var, value, exit, id=f"{command.name} {var}={value[:12]!r}")
            for var, (names, values) in ENVIRONMENT.items() for value, exit in values.items()
            for command in COMMANDS if command.name in names]


@pytest.mark.parametrize("command,var,value,exit", environment_cases())
def test_a_hostile_environment_variable_is_taken_or_refused_in_one_line(
        command, var, value, exit, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where a relative cache folder lands
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GENRE_RAY_CACHE", str(world / "cache"))
    monkeypatch.setenv("WANDB_API_KEY", "k")  # --wandb auto goes online, to WANDB_BASE_URL
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED)
    monkeypatch.setenv(var, value)
    argv = [w for words in command.argv(world, tmp_path).values() for w in words]
    if command.name == "tune_main":
        argv += ["--wandb", "auto"]
    with pytest.raises(SystemExit) as end:
        command.main(argv)
    err = capsys.readouterr().err
    assert end.value.code == exit, err[-2000:]
    assert exit == 0 or re.fullmatch(r"error: \S.*\n", err), err
