"""The one table of bad input: every mistake a user can make, and messy data, through
the real commands' `main` in-process, on files each case writes into its own folder.

A mistake must end with exit code 2 and one `error: ...` line on stderr that names the
thing (a regex per case), with no exception escaping, leaving every file under the output
folder (which holds an export beforehand) and the runs folder (which holds an earlier run)
as it was: compared by hash before and after. Messy data must not stop a command: it exits
0 and says what it skipped, padded or ignored. One case per command runs again as a real
subprocess, for the exit code and the one-line stderr a shell sees.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from genre_ray import config
from genre_ray.features import build_features, probe_segments
from genre_ray.models import build_model
from genre_ray.onnx_export import export_onnx
from genre_ray.onnx_runtime import META_KEY
from genre_ray.search_space import SPACES_DIR
from genre_ray.transforms import FEATURES
from tests.helpers import REPO, arch, exported, make_tree, write_tone

RATE = 22050
CASE_S = 60  # a command that fails early takes seconds; a hang must not stall the suite
ROOT = os.name == "posix" and os.geteuid() == 0  # root reads and writes whatever the mode
NEEDS_USER = pytest.mark.skipif(ROOT, reason="root ignores file permissions")


@dataclass
class World:
    """One case's folders under tmp_path. `best` holds an export and `runs` an earlier
    run before the command starts: a failing command must leave both as they were."""

    root: Path
    best: Path
    runs: Path
    cache: Path
    cwd: Path

    def tree(self, name: str = "data", **kwargs) -> Path:
        """A tiny GTZAN-layout dataset: 3 genres x 3 tracks of 5 s (kwargs: make_tree's)."""
        return make_tree(self.root / name, **{"tracks": 3, "seconds": 5.0, **kwargs})

    def genre(self, tree: Path, genre: str = "blues") -> Path:
        return tree / "genres_original" / genre


@dataclass(frozen=True)
class Case:
    """argv: the command line after `python`, built in a World. says: a regex the one
    error line (exit 2) or stdout (exit 0) must match. writes: the command may change
    best/ and runs/. check: more assertions once it has run."""

    id: str
    argv: Callable[[World], list[str]]
    says: str
    code: int = 2
    writes: bool = False
    ray: bool = False  # starts Ray first (the slow tier), which prints its own lines on stderr
    check: Callable[[World], None] | None = None
    marks: tuple = ()


# ---- the commands -------------------------------------------------------------------

def tune(w: World, *args: str, data: Path | None = None) -> list[str]:
    """tune_main.py on a tiny dataset, one pair, W&B off; later flags override these."""
    data = data if data is not None else w.tree()
    return [str(REPO / "tune_main.py"), "--data-dir", str(data), "--models", "MLP",
            "--features", "spectrogram", "--num-samples", "1", "--max-epochs", "2",
            "--wandb", "off", "--storage-path", str(w.runs), "--output-dir", str(w.best), *args]


def names(*parts: str) -> str:
    """A regex matching a line in which every regex of `parts` occurs, in any order: for
    messages whose wording may change but which must name these things."""
    return "".join(f"(?=.*{part})" for part in parts)


def data_cli(*args: str | Path) -> list[str]:
    return ["-m", "genre_ray.data", *map(str, args)]


def predict_cli(*args: str | Path) -> list[str]:
    return ["-m", "genre_ray.predict", *map(str, args)]


# ---- data builders ------------------------------------------------------------------

def write_audio(path: Path, samples: np.ndarray, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, RATE, subtype=subtype)
    return path


def extra_track(w: World, tree: Path, samples: np.ndarray, **kwargs) -> Path:
    """A fourth blues track holding `samples`."""
    return write_audio(w.genre(tree) / "blues.00003.wav", samples, **kwargs)


def seconds_of_tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return 0.5 * np.sin(2 * np.pi * 330 * t)


def split_file(w: World, lists: dict) -> Path:
    path = w.root / "split.json"
    path.write_text(json.dumps(lists))
    return path


def spaces_with(w: World, text: str) -> Path:
    """A copy of the search-space folder whose MLP.yaml is `text`."""
    folder = w.root / "spaces"
    folder.mkdir()
    for src in SPACES_DIR.glob("*.yaml"):
        (folder / src.name).write_text(src.read_text())
    (folder / "MLP.yaml").write_text(text)
    return folder


def mlp_space(old: str, new: str) -> str:
    text = (SPACES_DIR / "MLP.yaml").read_text()
    assert old in text
    return text.replace(old, new)


# ---- messy data: the data command succeeds and reports --------------------------------

def with_non_audio(w: World) -> list[str]:
    tree = w.tree()
    (w.genre(tree) / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (w.genre(tree, "disco")).mkdir()  # a genre whose audio was not copied
    (w.genre(tree, "disco") / "README.txt").write_text("liner notes\n")
    (w.genre(tree, "classical") / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (w.genre(tree) / "._blues.00000.wav").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    return data_cli(tree)


def with_broken(w: World) -> list[str]:
    tree = w.tree()
    (w.genre(tree) / "blues.00003.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return data_cli(tree)


def with_seconds(seconds: float) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        tree = w.tree()
        extra_track(w, tree, seconds_of_tone(seconds))
        return data_cli(tree)
    return build


def with_nan(w: World) -> list[str]:
    tree = w.tree()
    samples = seconds_of_tone(5.0).astype(np.float32)
    samples[1000:1010] = np.nan
    extra_track(w, tree, samples, subtype="FLOAT")
    return data_cli(tree)


def with_silent_and_clipped(w: World) -> list[str]:
    tree = w.tree()
    for genre in ("blues", "jazz"):  # every split of two genres gets a silent track
        for i in range(3):
            write_audio(w.genre(tree, genre) / f"{genre}.{i:05d}.wav", np.zeros(5 * RATE))
    square = np.where(seconds_of_tone(5.0) >= 0, 32767, -32768).astype(np.int16)  # clipped
    for i in range(3):
        write_audio(w.genre(tree, "classical") / f"classical.{i:05d}.wav", square)
    return data_cli(tree)


def features_are_finite(w: World) -> None:
    for feature in FEATURES:
        fs = build_features(w.root / "data", feature, config.load(), cache=w.cache)
        for name, part in fs.splits.items():
            assert torch.isfinite(part.x).all(), f"{feature} {name} holds NaN or inf"


def with_unreadable(w: World) -> list[str]:
    tree = w.tree()
    extra_track(w, tree, seconds_of_tone(5.0)).chmod(0)
    return data_cli(tree)


def with_unicode_path(w: World) -> list[str]:
    """`my data/género/...`: spaces and non-ASCII in folders, genres and file names."""
    root = w.root / "my data"
    for g, genre in enumerate(["género", "hip hop", "rock"]):
        for i in range(3):
            write_tone(root / genre / f"{genre} canción {i}.wav", 220.0 * (g + 1) + 7 * i, 5.0)
    return data_cli(root)


MESSY = [
    Case("non-audio files and folders are ignored and reported", with_non_audio, code=0,
         says=r"ignored 4 non-audio or hidden file\(s\): \.DS_Store, \._blues\.00000\.wav, "
              r"README\.txt, cover\.png\nignored 1 folder\(s\) without audio files, not genres: "
              r"disco\n"),
    Case("broken file is skipped and reported", with_broken, code=0,
         says=r"skipped 1 file\(s\):\n  \S+blues\.00003\.wav: does not decode \(.+\); use a file "
              r"libsndfile reads"),
    Case("2 s file is skipped and reported", with_seconds(2.0), code=0,
         says=r"skipped 1 file\(s\):\n  \S+blues\.00003\.wav: 2\.0 s, shorter than 2\.5 s: too "
              r"short to pad to a 5 s segment\npadded 0 file"),
    Case("3 s file is padded and reported", with_seconds(3.0), code=0,
         says=r"skipped 0 file\(s\)\npadded 1 file\(s\) shorter than one segment:\n  "
              r"\S+blues\.00003\.wav: 3\.0 s, zero-padded to one 5 s segment"),
    Case("file with NaN samples is skipped and reported", with_nan, code=0,
         says=r"skipped 1 file\(s\):\n  \S+blues\.00003\.wav: holds NaN or infinite samples"),
    Case("silent and clipped files give finite features", with_silent_and_clipped, code=0,
         says=r"skipped 0 file\(s\)", check=features_are_finite),
    Case("unreadable file is skipped and reported", with_unreadable, code=0,
         says=r"skipped 1 file\(s\):\n  \S+blues\.00003\.wav: cannot be read \(permission denied\)",
         marks=(NEEDS_USER,)),
    Case("spaces and non-ASCII in paths work", with_unicode_path, code=0,
         says=r"3 genres.*\n(.*\n)*género .*\n(.*\n)*hip hop .*\n(.*\n)*skipped 0 file"),
]


# ---- data mistakes -------------------------------------------------------------------

def one_genre(w: World) -> list[str]:
    return data_cli(w.tree(genres=["rock"]))


def empty_dir(w: World) -> list[str]:
    (w.root / "empty").mkdir()
    return data_cli(w.root / "empty")


def all_broken_genre(w: World) -> list[str]:
    tree = w.tree()
    for path in w.genre(tree, "jazz").iterdir():
        path.write_bytes(b"not audio at all")
    return data_cli(tree)


def split_cli(lists: dict) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        return data_cli(w.tree(), "--split", split_file(w, lists))
    return build


def malformed_split(w: World) -> list[str]:
    path = w.root / "split.json"
    path.write_text('{"train": ["blues.00000",')
    return data_cli(w.tree(), "--split", path)


LISTS = {"train": ["blues.00000", "jazz.00000", "classical.00000"], "val": ["blues.00001"],
         "test": ["jazz.00001"]}

DATA_MISTAKES = [
    Case("data: missing data dir", lambda w: data_cli(w.root / "nope"),
         says=r"data directory \S+nope does not exist; pass the folder that holds GTZAN"),
    Case("data: empty data dir", empty_dir,
         says=r"\S+empty holds no genre folders of audio; expected genres/<genre>/\*\.au"),
    Case("data: one genre only", one_genre,
         says=r"audio for 1 genre\(s\) \(rock\); a classifier needs at least two genre folders"),
    Case("data: genre folder of broken files", all_broken_genre,
         says=r"genre folder 'jazz' has no usable audio \(3 file\(s\) skipped, e\.g\. jazz\.0000\d"
              r"\.wav: does not decode \(Format not recognised\)\); fix or remove its files"),
    Case("data: empty split", split_cli({**LISTS, "val": []}),
         says=r"the val split has no track; add audio files or change --split"),
    Case("data: split file naming unknown tracks", split_cli({**LISTS, "test": ["disco.00042"]}),
         says=r"split file \S+split\.json names 1 track\(s\) not in the dataset, e\.g\. "
              r"'disco\.00042'; use track ids that are file stems"),
    Case("data: split file whose ids are lists", split_cli({**LISTS, "train": [["blues.00000"]]}),
         says=r"split file \S+split\.json must hold exactly the keys train, val and test, each a "
              r"list of track ids"),
    Case("data: malformed split file", malformed_split,
         says=r"split file \S+split\.json is not valid JSON .*; write \{\"train\""),
    Case("data: unknown split name", lambda w: data_cli(w.tree(), "--split", "artist"),
         says=r"split 'artist' is neither 'random', 'fault-filtered' nor an existing JSON file"),
]


# ---- tune_main mistakes --------------------------------------------------------------

def output_dir_is_a_file(w: World) -> list[str]:
    return tune(w, "--output-dir", str(w.best / "MLP_spectrogram_best_model.pth"))


def read_only_output_dir(w: World) -> list[str]:
    w.best.chmod(0o555)
    return tune(w, "--output-dir", str(w.best / "new"))


def bad_yaml(w: World) -> list[str]:
    return tune(w, "--search-spaces", str(spaces_with(w, "params: {learning_rate: [1, 2\n")))


def unknown_yaml_key(w: World) -> list[str]:
    text = mlp_space("\nparams:\n", "\nparams:\n  momentum: {uniform: [0.5, 0.99]}\n")
    return tune(w, "--search-spaces", str(spaces_with(w, text)))


def missing_data_dir(w: World) -> list[str]:
    return tune(w, data=w.root / "nope")


TUNE_MISTAKES = [
    Case("tune: unknown model", lambda w: tune(w, "--models", "RNN"),
         says=r"unknown model 'RNN'; valid models: MLP, MLP2, CEL, CEL2, CEL3"),
    Case("tune: unknown feature", lambda w: tune(w, "--features", "mfcc"),
         says=r"unknown feature 'mfcc'; choose one of waveform, spectrogram"),
    Case("tune: unknown split name", lambda w: tune(w, "--split", "artist"),
         says=r"split 'artist' is neither 'random', 'fault-filtered' nor an existing JSON file"),
    Case("tune: malformed search-space file", bad_yaml,
         says=r"\S+spaces/MLP\.yaml: invalid YAML at line \d+, column \d+: .*; fix the file"),
    Case("tune: unknown key in search-space file", unknown_yaml_key,
         says=r"\S+spaces/MLP\.yaml: params\.momentum: model MLP does not take this key; "
              r"searchable keys: "),
    Case("tune: zero --num-samples", lambda w: tune(w, "--num-samples", "0"),
         says=r"--num-samples must be >= 1, got 0"),
    Case("tune: zero --more-samples", lambda w: tune(w, "--more-samples", "0", "--name", "r"),
         says=r"--more-samples must be >= 1, got 0"),
    Case("tune: negative --seed", lambda w: tune(w, "--seed", "-1"), says=r"--seed must be >= 0, got -1"),
    Case("tune: huge --seed", lambda w: tune(w, "--seed", "99999999999999999999999"),
         says=r"--seed must be < 2147483648"),
    Case("tune: nan --cpus-per-trial", lambda w: tune(w, "--cpus-per-trial", "nan"),
         says=r"--cpus-per-trial: input should be a finite number"),
    Case("tune: nan --gpus-per-trial", lambda w: tune(w, "--gpus-per-trial", "nan"),
         says=r"--gpus-per-trial: input should be a finite number"),
    Case("tune: tiny --cpus-per-trial", lambda w: tune(w, "--cpus-per-trial", "0.00001"),
         says=r"--cpus-per-trial must be >= 0\.0001, got 1e-05"),
    Case("tune: --name escaping the storage", lambda w: tune(w, "--name", "../escaped"),
         says=r"--name '\.\./escaped' is not a folder name"),
    Case("tune: empty --name", lambda w: tune(w, "--name", ""), says=r"--name '' is not a folder name"),
    Case("tune: empty --storage-path", lambda w: tune(w, "--storage-path", ""),
         says=r"--storage-path is empty"),
    Case("tune: empty --output-dir", lambda w: tune(w, "--output-dir", ""), says=r"--output-dir is empty"),
    Case("tune: blank --wandb-project", lambda w: tune(w, "--wandb-project", " "),
         says=r"--wandb-project is empty"),
    Case("tune: --check with an empty --address", lambda w: tune(w, "--check", "--address", ""),
         says=r"cannot reach a Ray cluster at --address"),
    Case("tune: negative --max-epochs", lambda w: tune(w, "--max-epochs", "-1"),
         says=r"--max-epochs must be >= 1, got -1"),
    Case("tune: --reduction-factor 1", lambda w: tune(w, "--reduction-factor", "1"),
         says=r"--reduction-factor must be >= 2, got 1"),
    Case("tune: missing data dir", missing_data_dir,
         says=r"data directory \S+nope does not exist"),
    Case("tune: data dir is a file", lambda w: tune(w, data=write_tone(w.root / "song.wav", 330.0, 1.0)),
         says=r"data directory \S+song\.wav is a file, not a folder; pass the folder"),
    Case("tune: --output-dir is a file", output_dir_is_a_file,
         says=names(r"--output-dir", r"/MLP_spectrogram_best_model\.pth", r"is a file, not a folder")),
    Case("tune: read-only --output-dir", read_only_output_dir,
         says=names(r"--output-dir", r"best_models/new", r"Permission denied"),
         marks=(NEEDS_USER,)),
    Case("tune: --gpus-per-trial above the cluster's GPUs",
         lambda w: tune(w, "--gpus-per-trial", "64"), ray=True,
         says=names(r"--gpus-per-trial 64\b", r"GPU", r"lower --gpus-per-trial")),
    Case("tune: unreachable --address", lambda w: tune(w, "--address", "127.0.0.1:1"),
         says=names(r"--address 127\.0\.0\.1:1\b", r"cannot reach", r"check the address")),
]


# ---- predict mistakes ----------------------------------------------------------------

def foreign_pth(w: World) -> list[str]:
    path = w.root / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, path)
    clip = write_tone(w.root / "clip.wav", 330.0, 6.0)
    return predict_cli(clip, "--model", path)


def edited_pth(**changes) -> Callable[[World], list[str]]:
    """predict with our export, its contents edited: keys right, values wrong."""
    def argv(w: World) -> list[str]:
        contents = torch.load(w.best / "MLP_spectrogram_best_model.pth", weights_only=True)
        for key, edit in changes.items():
            contents[key] = edit(contents[key])
        torch.save(contents, w.root / "edited.pth")
        return predict_cli(write_tone(w.root / "clip.wav", 330.0, 6.0), "--model", w.root / "edited.pth")
    return argv


def truncated_pth(w: World) -> list[str]:
    raw = (w.best / "MLP_spectrogram_best_model.pth").read_bytes()
    path = w.root / "truncated.pth"
    path.write_bytes(raw[: len(raw) // 2])
    clip = write_tone(w.root / "clip.wav", 330.0, 6.0)
    return predict_cli(clip, "--model", path)


def edited_onnx(edit: Callable[[onnx.ModelProto], None]) -> Callable[[World], list[str]]:
    """predict with our .onnx export, edited by `edit` as a damaged copy would be."""
    def argv(w: World) -> list[str]:
        proto = onnx.load(str(w.best / "MLP_spectrogram_best_model.onnx"))
        edit(proto)
        onnx.save(proto, str(w.root / "edited.onnx"))
        return predict_cli(write_tone(w.root / "clip.wav", 330.0, 6.0), "--model", w.root / "edited.onnx")
    return argv


def flipped_weights(proto: onnx.ModelProto) -> None:
    weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weights.raw_data)
    raw[len(raw) // 2: len(raw) // 2 + 4] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 4])
    weights.raw_data = bytes(raw)


def metadata(**changes) -> Callable[[onnx.ModelProto], None]:
    def edit(proto: onnx.ModelProto) -> None:
        [entry] = [p for p in proto.metadata_props if p.key == META_KEY]
        entry.value = json.dumps({**json.loads(entry.value), **changes})
    return edit


def no_exports(w: World) -> list[str]:
    folder = w.root / "models"
    folder.mkdir()
    torch.save({"weights": torch.zeros(3)}, folder / "other.pth")
    return predict_cli(write_tone(w.root / "clip.wav", 330.0, 6.0), "--models-dir", folder)


def nan_clip(w: World) -> list[str]:
    samples = seconds_of_tone(6.0).astype(np.float32)
    samples[5] = np.inf
    clip = write_audio(w.root / "clip.wav", samples, subtype="FLOAT")
    return predict_cli(clip, "--models-dir", w.best)


def unicode_clip(w: World) -> list[str]:
    clip = write_tone(w.root / "my clips" / "género" / "canción corta.wav", 330.0, 3.0)
    return predict_cli(clip, "--models-dir", w.best)


PREDICT = [
    Case("predict: foreign .pth", foreign_pth,
         says=r"\S+foreign\.pth is not a genre-ray model \(no genre-ray-model/2 metadata\); pass a "
              r"file exported by tune_main\.py"),
    Case("predict: export with wrongly shaped weights",
         edited_pth(state_dict=lambda sd: {k: v[..., :1] for k, v in sd.items()}),
         says=r"the export's weights do not fit its MLP \(.*size mismatch.*\); the file is damaged"),
    Case("predict: export with empty normalisation stats", edited_pth(stats=lambda stats: {}),
         says=r"\S+edited\.pth lacks the normalisation statistics of its log-mels"),
    Case("predict: .onnx with flipped bytes in its weights", edited_onnx(flipped_weights),
         says=r"\S+edited\.onnx's graph does not match the SHA-256 its metadata records: the file "
              r"is damaged"),
    Case("predict: .onnx whose metadata has a negative rate",
         edited_onnx(metadata(classes=["a", "b", "c"], sample_rate=-5)),
         says=r"\S+edited\.onnx's metadata is damaged \(sample_rate: input should be greater than 0, "
              r"got -5\)"),
    Case("predict: .onnx whose metadata names fewer classes than the graph has outputs",
         edited_onnx(metadata(classes=["a", "b"])),
         says=r"\S+edited\.onnx's metadata names 2 classes for a graph of 3 outputs"),
    Case("predict: truncated .pth", truncated_pth,
         says=r"\S+truncated\.pth is not a genre-ray model \(\w+\); pass a file exported by "
              r"tune_main\.py"),
    Case("predict: --model given a folder", lambda w: predict_cli(write_tone(w.root / "clip.wav", 330.0, 6.0),
                                                                  "--model", w.best),
         says=r"model file \S+best_models is a folder \(pass it as --models-dir\)"),
    Case("predict: models folder without exports", no_exports,
         says=r"models folder \S+models holds no genre-ray export \(\*\.pth\); run tune_main\.py"),
    Case("predict: clip with infinite samples", nan_clip,
         says=r"audio file \S+clip\.wav holds NaN or infinite samples; re-export it"),
    Case("predict: spaces and non-ASCII in paths work, a short clip is padded", unicode_clip,
         code=0, says=r"my clips/género/canción corta\.wav: 3\.0 s, 1 segment\(s\) of 5 s\n  "
                      r"padded: 3\.0 s clip < 5 s segment"),
]

# ---- the other commands --------------------------------------------------------------

def training_cli(*args: str) -> Callable[[World], list[str]]:
    return lambda w: ["-m", "genre_ray.training", "--data-dir", str(w.tree()), *args]


def synthetic_cli(*args: str) -> Callable[[World], list[str]]:
    return lambda w: ["-m", "genre_ray.synthetic", str(w.root / "out"), "--tracks-per-genre", "1", *args]


MODULES = [
    Case("training: --config not JSON", training_cli("--config", "{bad"),
         says=r"--config is not JSON \(.*\); write e\.g\."),
    Case("training: negative learning rate", training_cli("--config", '{"learning_rate": -1}'),
         says=r"training\.learning_rate: input should be greater than 0, got -1"),
    Case("training: unknown optimizer", training_cli("--config", '{"optimizer": "adamax"}'),
         says=r"training\.optimizer: input should be 'adam', 'adamw' or 'sgd', got 'adamax'"),
    Case("training: batch size 0", training_cli("--config", '{"batch_size": 0}'),
         says=r"training\.batch_size: input should be greater than or equal to 1, got 0"),
    Case("training: --epochs -1", training_cli("--epochs", "-1"), says=r"--epochs must be in \[1, 10000\], got -1"),
    Case("synthetic: --seed -1", synthetic_cli("--seed", "-1"), says=r"cannot generate with seed -1; pass a seed in \[0, 2\*\*32\)"),
    Case("synthetic: --seconds nan", synthetic_cli("--seconds", "nan"), says=r"cannot generate 1 tracks per genre of nan s .*a duration in \(0, 3600\] s"),
]

CASES = MESSY + DATA_MISTAKES + TUNE_MISTAKES + PREDICT + MODULES


# ---- running a case ------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_bytes(tmp_path_factory) -> dict[str, bytes]:
    """A real (untrained) genre-ray export, .pth and .onnx: MLP on the log-mels of a tiny dataset."""
    root = tmp_path_factory.mktemp("export")
    tree = make_tree(root / "data", tracks=3, seconds=5.0)
    fs = build_features(tree, "spectrogram", config.load(), cache=root / "cache")
    model = build_model("MLP", fs.input_shape, len(fs.classes), arch("MLP"))
    saved = exported(fs, "MLP", model.state_dict())
    saved.save([root / "export.pth"])
    assert export_onnx(saved, probe_segments(tree, config.load()), [root / "export.onnx"]) is None
    return {suffix: (root / f"export{suffix}").read_bytes() for suffix in (".pth", ".onnx")}


@pytest.fixture
def world(tmp_path, export_bytes) -> Iterator[World]:
    w = World(tmp_path, tmp_path / "best_models", tmp_path / "runs", tmp_path / "cache",
              tmp_path / "cwd")
    w.best.mkdir()
    for suffix, raw in export_bytes.items():
        (w.best / f"MLP_spectrogram_best_model{suffix}").write_bytes(raw)
    earlier = w.runs / "tune-20250101-000000"
    earlier.mkdir(parents=True)
    (earlier / "leaderboard.md").write_text("| pair | test_track_acc |\n")
    (earlier / "optuna.journal").write_text('{"op_code": 0}\n')
    w.cwd.mkdir()
    yield w
    w.best.chmod(0o755)  # a case may make it read-only; pytest removes it later


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders`: path -> sha256 of its bytes ("dir" for a folder)."""
    paths = [path for folder in folders for path in [folder, *folder.rglob("*")]]
    return {str(p): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in paths}


def main_of(argv: list[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """`python ARGV` -> (the command's main, its arguments): `-m MODULE` or tune_main.py."""
    module, args = (argv[1], argv[2:]) if argv[0] == "-m" else (Path(argv[0]).stem, argv[1:])
    return importlib.import_module(module).main, args


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def run_main(world, capsys, monkeypatch) -> Callable[[list[str]], Ran]:
    """Runs `python ARGV`'s main in-process as a user would run the command: from an empty
    folder, with the world's cache, within CASE_S (SIGALRM) and with its own SIGTERM handler."""
    monkeypatch.chdir(world.cwd)
    monkeypatch.setenv("GENRE_RAY_CACHE", str(world.cache))
    monkeypatch.setenv("WANDB_MODE", "offline")

    def hung(signum, frame):
        raise TimeoutError(f"the command ran over {CASE_S} s: a hang")

    def run(argv: list[str]) -> Ran:
        main, args = main_of(argv)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(args)
        captured = capsys.readouterr()
        return Ran(stop.value.code, captured.out, captured.err)

    handlers = signal.signal(signal.SIGALRM, hung), signal.getsignal(signal.SIGTERM)
    signal.alarm(CASE_S)
    yield run
    signal.alarm(0)
    signal.signal(signal.SIGALRM, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])


def said(case: Case, ran: Ran) -> None:
    """The contract: the exit code, and one `error:` line naming the thing (only it, unless
    Ray printed its own), or stdout saying what was done with messy data."""
    assert ran.code == case.code, f"exit {ran.code}\n{ran.err[-3000:]}"
    if case.code == 2:
        errors = [line for line in ran.err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, ran.err[-3000:]
        assert re.search(case.says, errors[0]), errors[0]
        if not case.ray:
            assert ran.err.strip() == errors[0]
    else:
        assert re.search(case.says, ran.out), ran.out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=(*c.marks, *[pytest.mark.slow] * c.ray))
                                  for c in CASES])
def test_bad_input(case: Case, world: World, run_main):
    argv = case.argv(world)
    before = snapshot(world.best, world.runs)
    said(case, run_main(argv))
    if not case.writes:
        assert snapshot(world.best, world.runs) == before
    if case.check:
        case.check(world)


AS_COMMANDS = ["tune: unknown model", "data: missing data dir", "predict: foreign .pth",
               "training: --epochs -1", "synthetic: --seed -1"]  # one per command


@pytest.mark.slow  # five interpreters importing torch
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.id in AS_COMMANDS])
def test_a_command_ends_a_mistake_with_exit_2_and_one_line_on_stderr(case: Case, world: World):
    """`python ARGV` as a user runs it, from an empty folder: exit 2, stderr exactly the one
    line (no warning, no traceback), nothing written."""
    argv = case.argv(world)
    before = snapshot(world.best, world.runs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENRE_RAY_CACHE": str(world.cache)}
    proc = subprocess.run([sys.executable, *argv], cwd=world.cwd, env=env, text=True,
                          capture_output=True, timeout=CASE_S)
    said(case, Ran(proc.returncode, proc.stdout, proc.stderr))
    assert snapshot(world.best, world.runs) == before
