"""Stage data: find GTZAN-layout audio, decode, resample, cut 5 s segments, split by track.

Layouts read: `genres/<genre>/<genre>.NNNNN.au` (original), `genres_original/<genre>/
<genre>.NNNNN.wav` (re-release), or any root holding `<genre>/` folders of audio.
Genres are the folder names in sorted order. A file that does not decode is skipped
and reported, never fatal. Splits are by track, so no track is ever in two splits.

Segments: a track is cut into consecutive, non-overlapping segments of
`segment_seconds`. A last piece of at least `min_tail_seconds` is zero-padded to a
full segment; a shorter one is dropped. A track shorter than `min_tail_seconds`
yields no segment and is reported as skipped.

    python -m genre_ray.data [DATA_DIR] [--split random|fault-filtered|FILE] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import soundfile as sf
import torch
import torchaudio.functional as AF

from genre_ray.config import defaults
from genre_ray.errors import UserError, exit_on_user_error

SPLITS = ("train", "val", "test")
LAYOUT_ROOTS = ("genres_original", "genres", ".")
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
    ignored: list[Path] = field(default_factory=list)  # non-audio files (.DS_Store, README.txt)


@dataclass
class Split:
    """Segments of one split. waves: (n, samples); labels, track: (n,) int64."""

    waves: torch.Tensor
    labels: torch.Tensor
    track: torch.Tensor  # index into track_ids
    track_ids: list[str]


@dataclass
class SegmentSet:
    """A dataset cut into segments: one Split per name in SPLITS."""

    classes: list[str]
    splits: dict[str, Split]
    sample_rate: int
    skipped: list[tuple[Path, str]]  # (file, reason)
    ignored: list[Path]
    missing: list[str]  # track ids a listed split names that are not on disk


def find_root(data_dir: Path) -> Path:
    """The folder whose subfolders are genres, for any of the supported layouts."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; pass the folder that "
                        "holds GTZAN (with genres/ or genres_original/ inside)")
    for name in LAYOUT_ROOTS:
        root = (data_dir / name).resolve()
        if root.is_dir() and any(_audio_files(d) for d in _subdirs(root)):
            return root
    raise UserError(f"{data_dir} holds no genre folders of audio; expected genres/<genre>/*.au, "
                    "genres_original/<genre>/*.wav, or <genre>/ folders of audio files")


def scan(data_dir: Path) -> Scan:
    """List the tracks of every genre folder; non-audio files are ignored and counted."""
    root = find_root(data_dir)
    genres, tracks, ignored = [], [], []
    for genre_dir in _subdirs(root):
        files = sorted(p for p in genre_dir.iterdir() if p.is_file())
        audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
        ignored += [p for p in files if p.suffix.lower() not in AUDIO_SUFFIXES]
        if audio:
            genres.append(genre_dir.name)
            tracks += [Track(p.stem, genre_dir.name, p) for p in audio]
    if len(genres) < 2:
        raise UserError(f"{root} has audio for {len(genres)} genre(s) ({', '.join(genres)}); "
                        "a classifier needs at least two genre folders with audio files")
    return Scan(root, genres, _unique_ids(tracks), ignored)


def decode(path: Path, sample_rate: int) -> torch.Tensor:
    """Decode any file libsndfile reads into mono float32 at `sample_rate`: (samples,)."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(audio).mean(dim=1)
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave


def segment(wave: torch.Tensor, length: int, min_tail: int) -> torch.Tensor:
    """Cut (samples,) into (n, length); a tail >= min_tail is zero-padded, else dropped."""
    n_full, tail = divmod(wave.numel(), length)
    if tail >= min_tail:
        wave = torch.nn.functional.pad(wave, (0, length - tail))
        n_full += 1
    return wave[: n_full * length].reshape(n_full, length)


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


def load_segments(data_dir: Path, split: str | Path | None = None, *, seed: int | None = None,
                  fractions: dict[str, float] | None = None) -> SegmentSet:
    """Scan, split by track, decode and cut every track of `data_dir` (params: defaults.yaml)."""
    params, split_params = defaults("data"), defaults("split")
    found = scan(data_dir)
    assigned = split_tracks(found.tracks, split or split_params["kind"],
                            seed=split_params["seed"] if seed is None else seed,
                            fractions=fractions or split_params["fractions"])
    rate = params["sample_rate"]
    length = round(params["segment_seconds"] * rate)
    min_tail = round(params["min_tail_seconds"] * rate)
    skipped: list[tuple[Path, str]] = []
    splits = {name: _cut_split(assigned[name], found.genres, rate, length, min_tail, skipped)
              for name in SPLITS}
    _require_tracks({name: part.track_ids for name, part in splits.items()}, "decodable ")
    _require_every_genre(splits, found.genres, skipped)
    return SegmentSet(found.genres, splits, rate, skipped, found.ignored,
                      missing_tracks(found.tracks, split or split_params["kind"]))


def _require_every_genre(splits: dict[str, Split], genres: list[str],
                         skipped: list[tuple[Path, str]]) -> None:
    present = set(torch.cat([part.labels for part in splits.values()]).tolist())
    for label, genre in enumerate(genres):
        if label not in present:
            reasons = [f"{p.name}: {why}" for p, why in skipped if p.parent.name == genre]
            raise UserError(f"genre folder {genre!r} has no decodable audio ({len(reasons)} file(s) "
                            f"skipped, e.g. {reasons[0] if reasons else 'none'}); fix or remove "
                            "its files, or remove the folder")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _audio_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]


def _unique_ids(tracks: list[Track]) -> list[Track]:
    """Track id = file stem; stems that repeat across genres become `<genre>/<stem>`."""
    counts = Counter(t.track_id for t in tracks)
    tracks = [t if counts[t.track_id] == 1 else Track(f"{t.genre}/{t.track_id}", t.genre, t.path)
              for t in tracks]
    repeated = [tid for tid, n in Counter(t.track_id for t in tracks).items() if n > 1]
    if repeated:
        raise UserError(f"two files share the track id {repeated[0]!r} in one genre folder "
                        "(same name, different extension?); keep one of them")
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
        lists = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"split file {path} is not valid JSON ({err}); write "
                        "{\"train\": [...], \"val\": [...], \"test\": [...]} of track ids") from None
    if not isinstance(lists, dict) or set(lists) != set(SPLITS) or \
            not all(isinstance(v, list) for v in lists.values()):
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


def _cut_split(tracks: list[Track], classes: list[str], rate: int, length: int, min_tail: int,
               skipped: list[tuple[Path, str]]) -> Split:
    waves, labels, index, ids = [], [], [], []
    for track in tracks:
        try:
            pieces = segment(decode(track.path, rate), length, min_tail)
        except (RuntimeError, OSError, ValueError) as err:  # sf.LibsndfileError is a RuntimeError
            skipped.append((track.path, f"does not decode: {err}"))
            continue
        if not len(pieces):
            skipped.append((track.path, f"shorter than {min_tail / rate:g} s"))
            continue
        waves.append(pieces)
        labels += [classes.index(track.genre)] * len(pieces)
        index += [len(ids)] * len(pieces)
        ids.append(track.track_id)
    return Split(torch.cat(waves) if waves else torch.zeros(0, length),
                 torch.tensor(labels, dtype=torch.long), torch.tensor(index, dtype=torch.long), ids)


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
    lines.append(f"skipped {len(data.skipped)} file(s)" + (":" if data.skipped else ""))
    lines += [f"  {path}: {reason}" for path, reason in data.skipped]
    lines.append(f"ignored {len(data.ignored)} non-audio file(s)")
    if data.missing:
        lines.append(f"{len(data.missing)} listed track(s) not on disk: "
                     f"{', '.join(data.missing[:10])}" + (" ..." if len(data.missing) > 10 else ""))
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genre_ray.data", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path,
                        help="GTZAN folder (default: the embedded synthetic dataset, generated once)")
    parser.add_argument("--split", default=defaults("split")["kind"],
                        help="random | fault-filtered | path to a JSON split file")
    parser.add_argument("--seed", type=int, default=defaults("split")["seed"])
    args = parser.parse_args(argv)
    if args.data_dir is None:
        from genre_ray.synthetic import embedded_dataset

        args.data_dir = embedded_dataset()
    data = load_segments(args.data_dir, args.split, seed=args.seed)
    print(f"{find_root(args.data_dir)}: {len(data.classes)} genres, split {args.split}, "
          f"{data.sample_rate} Hz segments of {data.splits['train'].waves.shape[1]} samples")
    print(report(data))
    return 0


if __name__ == "__main__":
    main()
