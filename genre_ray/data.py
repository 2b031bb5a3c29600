"""Stage data: find GTZAN-layout audio, decode, resample, cut 5 s segments, split by track.

Layouts read: `genres/<genre>/<genre>.NNNNN.au` (original), `genres_original/<genre>/
<genre>.NNNNN.wav` (re-release), or any root holding `<genre>/` folders of audio.
Genres are the folder names in sorted order. A file that does not decode is skipped
and reported, never fatal. Splits are by track, so no track is ever in two splits.

Segments: a track is cut into consecutive, non-overlapping segments of
`segment_seconds`. A last piece of at least `min_tail_seconds` is zero-padded to a
full segment; a shorter one is dropped. A track shorter than one segment is padded
(reported as padded) or, shorter than `min_tail_seconds`, skipped (reported as skipped).
A file that cannot be read (permissions), does not decode, or holds NaN or infinite
samples is skipped and reported too.

    python -m genre_ray.data [DATA_DIR] [--split random|fault-filtered|FILE] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import soundfile as sf
import torch
import torchaudio.functional as AF

from genre_ray import config
from genre_ray.audio import Unusable, mono, read, resampling_ratio
from genre_ray.audio import segment as audio_segment
from genre_ray.errors import UserError, exit_on_user_error
from genre_ray.files import read_text

SPLITS = ("train", "val", "test")
LAYOUT_ROOTS = ("genres_original", "genres", ".")
CHUNK = 64  # segments decoded and handed on at a time: bounds peak memory
AUDIO_SUFFIXES = frozenset("." + fmt.lower() for fmt in sf.available_formats()) | {".aif", ".aiff"}


@dataclass(frozen=True)
class Track:
    track_id: str  # the file's stem, as in torchaudio's GTZAN lists: "blues.00029"
    genre: str
    path: Path


@dataclass
class Scan:
    """What a data directory holds: its genres, audio tracks, and ignored files."""

    root: Path
    genres: list[str]
    tracks: list[Track]
    ignored: list[Path] = field(default_factory=list)  # non-audio or hidden (.DS_Store, ._x.wav)
    not_genres: list[Path] = field(default_factory=list)  # folders beside them without audio


@dataclass
class SegmentSplit:
    """Segments of one split. waves: (n, samples); labels, track: (n,) int64."""

    waves: torch.Tensor
    labels: torch.Tensor
    track: torch.Tensor  # index into track_ids
    track_ids: list[str]


@dataclass
class SegmentSet:
    """A dataset cut into segments: one SegmentSplit per name in SPLITS."""

    classes: list[str]
    splits: dict[str, SegmentSplit]
    sample_rate: int
    skipped: list[tuple[Path, str]]  # (file, reason)
    ignored: list[Path]
    missing: list[str]  # track ids a listed split names that are not on disk
    padded: list[tuple[Path, str]] = field(default_factory=list)  # (file, note): < 1 segment
    not_genres: list[Path] = field(default_factory=list)  # folders without audio
    absent: list[str] = field(default_factory=list)  # "<genre>: <split>, ..." it has no track in

    def notes(self) -> dict[str, list[str]]:
        """What loading left out or padded, as plain strings (a FeatureSet's `report`)."""
        return {"skipped": [f"{path}: {why}" for path, why in self.skipped],
                "padded": [f"{path}: {note}" for path, note in self.padded],
                "ignored": [str(path) for path in self.ignored], "missing": list(self.missing),
                "not_genres": [str(path) for path in self.not_genres], "absent": list(self.absent)}


def find_root(data_dir: Path) -> Path:
    """The folder whose subfolders are genres, for any of the supported layouts."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise UserError(f"data directory {data_dir} {what}; pass the folder that "
                        "holds GTZAN (with genres/ or genres_original/ inside)")
    for name in LAYOUT_ROOTS:
        root = (data_dir / name).resolve()
        if root.is_dir() and any(_audio_files(d) for d in _subdirs(root)):
            return root
    raise UserError(f"{data_dir} holds no genre folders of audio; expected genres/<genre>/*.au, "
                    "genres_original/<genre>/*.wav, or <genre>/ folders of audio files")


def scan(data_dir: Path) -> Scan:
    """List the tracks of every genre folder, its sub-folders included; non-audio and
    hidden files, and folders without audio, are ignored and reported."""
    root = find_root(data_dir)
    genres, tracks, ignored, not_genres = [], [], [], []
    for genre_dir in _subdirs(root):
        listed = files(genre_dir)
        audio = [p for p in listed if _is_audio(p)]
        ignored += [p for p in listed if not _is_audio(p)]
        if not audio:
            not_genres.append(genre_dir)
            continue
        genres.append(genre_dir.name)
        tracks += [Track(p.stem, genre_dir.name, p) for p in audio]
    if len(genres) < 2:
        raise UserError(f"{root} has audio for {len(genres)} genre(s) ({', '.join(genres)}); "
                        "a classifier needs at least two genre folders with audio files")
    return Scan(root, genres, _unique_ids(tracks), ignored, not_genres)


def decode(path: Path, sample_rate: int) -> torch.Tensor:
    """Decode any file libsndfile reads into mono float32 at `sample_rate`: (samples,)."""
    audio, rate = read(path)
    wave = torch.from_numpy(mono(audio))
    return resampled(wave, rate, sample_rate) if rate != sample_rate else wave


def resampled(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    """(samples,) at `rate` -> (about samples * sample_rate / rate,) at `sample_rate`.

    torchaudio sizes its kernel by the reduced ratio (a row per phase, new / gcd): 44,101
    -> 22,050 Hz would take 3.9 GB. The ratio is the nearest fraction with a denominator
    up to audio.MAX_DENOMINATOR, so 44,101 Hz is taken as 44,100 (0.002 % slower,
    inaudible); the usual rates (44,100, 48,000, 16,000, 8,000 Hz) reduce exactly."""
    ratio = resampling_ratio(rate, sample_rate)
    return AF.resample(wave, ratio.denominator, ratio.numerator)


def segment(wave: torch.Tensor, length: int, min_tail: int) -> torch.Tensor:
    """audio.segment of a (samples,) CPU tensor: (n, length)."""
    return torch.from_numpy(audio_segment(wave.numpy(), length, min_tail))


def split_tracks(tracks: list[Track], kind: str | Path, *, seed: int,
                 fractions: dict[str, float]) -> dict[str, list[Track]]:
    """Assign tracks to train/val/test: `random`, `fault-filtered`, or a JSON split file."""
    if kind == "random":
        assigned = _random_split(tracks, seed, fractions)
    elif kind == "fault-filtered":
        assigned = _listed_split(tracks, _fault_filtered_lists(), None)
    else:
        path = split_file(kind)
        assigned = _listed_split(tracks, _read_split_file(path), path)
    _require_tracks(assigned, "")
    return assigned


def split_file(kind: str | Path) -> Path:
    """The JSON split file that a --split value other than random/fault-filtered names."""
    path = Path(kind).expanduser()
    if not path.is_file():
        raise UserError(f"split {str(kind)!r} is neither 'random', 'fault-filtered' nor an existing "
                        "JSON file of {\"train\": [...], \"val\": [...], \"test\": [...]} track ids")
    return path


def _require_tracks(lists: dict[str, list], what: str) -> None:
    for name in SPLITS:
        if not lists[name]:
            raise UserError(f"the {name} split has no {what}track; add audio files or change "
                            "--split (every split needs at least one track)")


@dataclass
class Plan:
    """A dataset scanned and split by track but not yet decoded. `chunks` decodes a split
    as it is read, a chunk of segments at a time, so memory holds a chunk, not the dataset;
    `finish` then checks what was decoded and says what was left out."""

    found: Scan
    assigned: dict[str, list[Track]]
    split: str | Path
    cutter: _Cutter
    track_ids: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in SPLITS})
    labels_in: dict[str, set[int]] = field(default_factory=lambda: {n: set() for n in SPLITS})

    @property
    def classes(self) -> list[str]:
        return self.found.genres

    @property
    def sample_rate(self) -> int:
        return self.cutter.rate

    def chunks(self, name: str, size: int) -> Iterator[Chunk]:
        """Split `name`'s segments in track order, about `size` at a time (whole tracks)."""
        pieces: list[Chunk] = []
        for track in self.assigned[name]:
            waves = self.cutter.cut(track.path)
            if not len(waves):
                continue
            label = self.classes.index(track.genre)
            self.labels_in[name].add(label)
            index = torch.full((len(waves),), len(self.track_ids[name]), dtype=torch.long)
            self.track_ids[name].append(track.track_id)
            pieces.append(Chunk(waves, torch.full_like(index, label), index))
            if sum(len(c.waves) for c in pieces) >= size:
                yield Chunk.cat(pieces)
                pieces = []
        if pieces:
            yield Chunk.cat(pieces)

    def estimated_segments(self, name: str) -> int:
        """Segments split `name` will hold, from the files' headers (nothing decoded)."""
        return sum(self.cutter.expected(t.path) for t in self.assigned[name])

    def finish(self) -> SegmentSet:
        """UserError if a split or a genre has no usable track; else what was read, with
        every split's track ids and notes (its `splits` hold no segments)."""
        _require_tracks(self.track_ids, "usable ")
        _require_every_genre(set().union(*self.labels_in.values()), self.classes, self.cutter.skipped)
        empty = torch.zeros(0, dtype=torch.long)
        splits = {n: SegmentSplit(torch.zeros(0, self.cutter.length), empty, empty, self.track_ids[n])
                  for n in SPLITS}
        return SegmentSet(self.classes, splits, self.sample_rate, self.cutter.skipped,
                          self.found.ignored, missing_tracks(self.found.tracks, self.split),
                          self.cutter.padded, self.found.not_genres, self._absent())

    def _absent(self) -> list[str]:
        """"<genre>: <split>, ..." for each genre missing from a split (too few usable tracks
        for a random split to deal it to all three, or a split file that lists none)."""
        out = []
        for label, genre in enumerate(self.classes):
            missing = [name for name in SPLITS if label not in self.labels_in[name]]
            out += [f"{genre}: {', '.join(missing)}"] if missing else []
        return out


@dataclass
class Chunk:
    """Consecutive segments of one split. waves: (n, samples); labels, track: (n,) int64."""

    waves: torch.Tensor
    labels: torch.Tensor
    track: torch.Tensor

    @staticmethod
    def cat(chunks: list[Chunk]) -> Chunk:
        return Chunk(*(torch.cat([getattr(c, k) for c in chunks]) for k in ("waves", "labels", "track")))


def plan(data_dir: Path, params: config.Data, split: config.Split, seed: int, *,
         estimate: bool = False) -> Plan:
    """Scan `data_dir` and split its tracks as `split` says (random splits drawn with
    `seed`). A random split deals out only the tracks that decode to a segment: a file
    that cannot give one (it does not decode, holds NaN, is too short) is skipped and
    reported, never dealt to a split it would leave without that genre. That decodes
    every file once more; `estimate` (the memory preflight's) reads headers only, so a
    file whose header is fine and data is not may be dealt."""
    found = scan(data_dir)
    rate = params.sample_rate
    cutter = _Cutter(rate, round(params.segment_seconds * rate), round(params.min_tail_seconds * rate))
    tracks = found.tracks
    if split.kind == "random":
        tracks = [t for t in tracks if (cutter.expected(t.path) > 0 if estimate else cutter.usable(t.path))]
    assigned = split_tracks(tracks, split.kind, seed=seed, fractions=split.fractions)
    return Plan(found, assigned, split.kind, cutter)


def load_segments(data_dir: Path, params: config.Data, split: config.Split,
                  seed: int) -> SegmentSet:
    """Scan, split by track, decode and cut every track of `data_dir` into memory."""
    read = plan(data_dir, params, split, seed)
    chunks = {name: list(read.chunks(name, CHUNK)) for name in SPLITS}
    segs = read.finish()
    for name, part in segs.splits.items():
        if chunks[name]:
            whole = Chunk.cat(chunks[name])
            part.waves, part.labels, part.track = whole.waves, whole.labels, whole.track
    return segs


def _require_every_genre(present: set[int], genres: list[str],
                         skipped: list[tuple[Path, str]]) -> None:
    for label, genre in enumerate(genres):
        if label not in present:
            reasons = [f"{p.name}: {why.split('; ')[0]}"  # the problem, not the file's fix
                       for p, why in skipped if p.parent.name == genre]
            raise UserError(f"genre folder {genre!r} has no usable audio ({len(reasons)} file(s) "
                            f"skipped, e.g. {reasons[0] if reasons else 'none'}); fix or remove "
                            "its files, or remove the folder")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _audio_files(folder: Path) -> list[Path]:
    return [p for p in files(folder) if _is_audio(p)]


def files(folder: Path) -> list[Path]:
    """Every file under `folder`, in sub-folders too (a genre's disc1/, disc2/), through
    symbolic links (each folder once), not in hidden folders; sorted."""
    found, seen = [], set()
    for parent, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link back up, or a second link to one folder
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [f for f in folders if not f.startswith(".")]
        found += [Path(parent, name) for name in names]
    return sorted(p for p in found if p.is_file())


def _is_audio(path: Path) -> bool:
    """An audio suffix, and not hidden: macOS copies leave `._<name>.wav` beside each file."""
    return path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def _unique_ids(tracks: list[Track]) -> list[Track]:
    """Track id = file stem; stems that repeat across genres become `<genre>/<stem>`."""
    counts = Counter(t.track_id for t in tracks)
    tracks = [t if counts[t.track_id] == 1 else Track(f"{t.genre}/{t.track_id}", t.genre, t.path)
              for t in tracks]
    repeated = [tid for tid, n in Counter(t.track_id for t in tracks).items() if n > 1]
    if repeated:
        paths = [str(t.path) for t in tracks if t.track_id == repeated[0]]
        raise UserError(f"two files share the track id {repeated[0]!r} in one genre folder "
                        f"({' and '.join(paths)}: one name, in two sub-folders or with two "
                        "extensions); rename or remove one of them")
    return tracks


def _random_split(tracks: list[Track], seed: int, fractions: dict[str, float]) -> dict[str, list[Track]]:
    """Stratified by genre, seeded; every genre with >= 3 tracks lands in all three splits."""
    if set(fractions) != set(SPLITS) or any(f < 0 for f in fractions.values()) or \
            abs(sum(fractions.values()) - 1) > 1e-6:
        raise UserError(f"split fractions {fractions} must give train, val and test, each >= 0, "
                        "summing to 1")
    out: dict[str, list[Track]] = {name: [] for name in SPLITS}
    rng = random.Random(seed)
    for genre in sorted({t.genre for t in tracks}):
        group = [t for t in tracks if t.genre == genre]
        rng.shuffle(group)
        n_val, n_test = (_share(len(group), fractions[name]) for name in ("val", "test"))
        out["val"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    return out


def _share(n: int, fraction: float) -> int:
    """Tracks a held-out split gets from a genre of n: rounded, at least 1 when n >= 3."""
    return max(round(n * fraction), 1 if n >= 3 and fraction > 0 else 0)


def _fault_filtered_lists() -> dict[str, list[str]]:
    from torchaudio.datasets import gtzan

    return {"train": gtzan.filtered_train, "val": gtzan.filtered_valid, "test": gtzan.filtered_test}


def _read_split_file(path: Path) -> dict[str, list[str]]:
    try:
        lists = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"split file {path} is not valid JSON ({err}); write "
                        "{\"train\": [...], \"val\": [...], \"test\": [...]} of track ids") from None
    if not isinstance(lists, dict) or set(lists) != set(SPLITS) or not all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in lists.values()):
        raise UserError(f"split file {path} must hold exactly the keys train, val and test, "
                        "each a list of track ids such as \"blues.00029\"")
    return lists


def _listed_split(tracks: list[Track], lists: dict[str, list[str]],
                  path: Path | None) -> dict[str, list[Track]]:
    """Tracks by listed id. The fault-filtered lists (path None) tolerate tracks missing
    on disk, which are reported; a split file (path) must name only tracks on disk."""
    by_id = {t.track_id: t for t in tracks}
    source = f"split file {path}" if path else "the fault-filtered split"
    seen: dict[str, str] = {}
    for name in SPLITS:
        for tid in lists[name]:
            if tid in seen:
                raise UserError(f"{source} puts track {tid!r} in both {seen[tid]} and {name}; "
                                "a track may be in one split only")
            seen[tid] = name
    unknown = [tid for tid in seen if tid not in by_id]
    if path and unknown:
        raise UserError(f"{source} names {len(unknown)} track(s) not in the dataset, e.g. "
                        f"{unknown[0]!r}; use track ids that are file stems of this dataset "
                        f"(e.g. {tracks[0].track_id!r})")
    if len(unknown) == len(seen):
        raise UserError(f"{source} names none of the {len(tracks)} tracks found (e.g. "
                        f"{tracks[0].track_id!r}); use track ids that are file stems of this dataset")
    return {name: [by_id[tid] for tid in lists[name] if tid in by_id] for name in SPLITS}


def missing_tracks(tracks: Iterable[Track], split: str | Path) -> list[str]:
    """Ids a listed split (fault-filtered or file) names that are not on disk."""
    if split == "random":
        return []
    lists = _fault_filtered_lists() if split == "fault-filtered" else _read_split_file(split_file(split))
    on_disk = {t.track_id for t in tracks}
    return [tid for name in SPLITS for tid in lists[name] if tid not in on_disk]


@dataclass
class _Cutter:
    """Cuts files into segments (lengths in samples) and notes the files it skips or pads."""

    rate: int
    length: int
    min_tail: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    padded: list[tuple[Path, str]] = field(default_factory=list)

    def cut(self, path: Path) -> torch.Tensor:
        """(n, length) segments of one file; n = 0 when it is skipped."""
        try:
            wave = decode(path, self.rate)
        except Unusable as err:
            return self._skip(path, str(err))
        if not self._long_enough(path, wave.numel()):
            return torch.zeros(0, self.length)
        if wave.numel() < self.length:
            self.padded.append((path, f"{wave.numel() / self.rate:.1f} s, zero-padded to one "
                                      f"{self.length / self.rate:g} s segment"))
        return segment(wave, self.length, self.min_tail)

    def usable(self, path: Path) -> bool:
        """Whether `cut` will give `path` a segment: the whole file decoded (not resampled);
        a file that will not is skipped with its reason, as `cut` would."""
        try:
            audio, rate = read(path)
        except Unusable as err:
            self._skip(path, str(err))
            return False
        return self._long_enough(path, math.ceil(len(audio) * self.rate / rate))

    def _long_enough(self, path: Path, samples: int) -> bool:
        """Whether `samples` (at `rate`) make a segment; if not, the file is skipped."""
        if samples >= self.min_tail:
            return True
        self._skip(path, f"{samples / self.rate:.1f} s, shorter than {self.min_tail / self.rate:g} s: "
                         f"too short to pad to a {self.length / self.rate:g} s segment")
        return False

    def expected(self, path: Path) -> int:
        """Segments `cut` will give `path`, from its header; 0 if the header is unreadable."""
        try:
            with open(path, "rb") as f:
                info = sf.info(f)
        except (RuntimeError, OSError, ValueError):
            return 0
        samples = math.ceil(info.frames * self.rate / info.samplerate)
        if samples < self.min_tail:
            return 0
        n_full, tail = divmod(samples, self.length)
        return n_full + (tail >= self.min_tail)

    def _skip(self, path: Path, reason: str) -> torch.Tensor:
        self.skipped.append((path, reason))
        return torch.zeros(0, self.length)


def report(data: SegmentSet) -> str:
    """A table of tracks and segments per genre per split, then skipped and ignored files."""
    lines = [f"{'genre':<12}" + "".join(f"{name + ' tracks/segs':>20}" for name in SPLITS)]
    for label, genre in enumerate(data.classes):
        cells = []
        for name in SPLITS:
            part = data.splits[name]
            mask = part.labels == label
            cells.append(f"{len(set(part.track[mask].tolist()))}/{int(mask.sum())}")
        lines.append(f"{genre:<12}" + "".join(f"{c:>20}" for c in cells))
    totals = [f"{len(data.splits[n].track_ids)}/{len(data.splits[n].labels)}" for n in SPLITS]
    lines.append(f"{'total':<12}" + "".join(f"{c:>20}" for c in totals))
    return "\n".join(lines + describe_notes(data.notes()))


def describe_notes(notes: dict[str, list[str]]) -> list[str]:
    """Lines for the user on what loading skipped, padded and ignored (`SegmentSet.notes()`,
    or a FeatureSet's `report`): every skipped and padded file with its reason."""
    skipped, padded = notes.get("skipped", []), notes.get("padded", [])
    ignored, missing = notes.get("ignored", []), notes.get("missing", [])
    lines = [f"skipped {len(skipped)} file(s)" + (":" if skipped else "")]
    lines += [f"  {line}" for line in skipped]
    lines.append(f"padded {len(padded)} file(s) shorter than one segment" + (":" if padded else ""))
    lines += [f"  {line}" for line in padded]
    names = sorted({Path(path).name for path in ignored})
    lines.append(f"ignored {len(ignored)} non-audio or hidden file(s)"
                 + (f": {_some(names)}" if names else ""))
    folders = [Path(path).name for path in notes.get("not_genres", [])]
    if folders:
        lines.append(f"ignored {len(folders)} folder(s) without audio files, not genres: "
                     f"{_some(folders)}")
    if missing:
        lines.append(f"{len(missing)} listed track(s) not on disk: {_some(missing)}")
    for line in notes.get("absent", []):
        genre, _, splits = line.rpartition(": ")
        lines.append(f"warning: genre {genre!r} has no usable track in {splits}, whose accuracy "
                     "leaves it out; add tracks (a random split deals 3 or more to every split) "
                     "or list one there in a --split file")
    return lines


def _some(items: list[str], shown: int = 10) -> str:
    return ", ".join(items[:shown]) + (" ..." if len(items) > shown else "")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genre_ray.data", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path,
                        help="GTZAN folder (default: the embedded synthetic dataset, generated once)")
    cfg = config.load()
    parser.add_argument("--split", default=cfg.split.kind,
                        help="random | fault-filtered | path to a JSON split file")
    parser.add_argument("--seed", type=int, default=cfg.run.seed)
    args = parser.parse_args(argv)
    if args.data_dir is None:
        from genre_ray.synthetic import embedded_dataset

        args.data_dir = embedded_dataset()
    cfg = config.replaced(cfg, {"split.kind": args.split, "run.seed": args.seed})
    data = load_segments(args.data_dir, cfg.data, cfg.split, cfg.run.seed)
    print(f"{find_root(args.data_dir)}: {len(data.classes)} genres, split {args.split}, "
          f"{data.sample_rate} Hz segments of {data.splits['train'].waves.shape[1]} samples")
    print(report(data))
    return 0


if __name__ == "__main__":
    main()
