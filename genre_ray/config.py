"""The run's configuration: typed, frozen, built once and passed down.

`load()` reads genre_ray/defaults.yaml, lays a `--config` file's sections over it, then
the flags' values (`FLAGS`: each flag, its field and its help), and checks every
field's type and range in one pass (pydantic validates the dataclasses): a bad value is
one UserError naming its flag or its `section.key`. No other module reads defaults.yaml;
each stage takes the sections it needs. `as_json` is what a run's `run.json` keeps, and
`changes` names what differs between two of them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import pydantic
import yaml
from pydantic import Field, StringConstraints

from genre_ray.errors import UserError

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
CACHE_DIR = "~/.cache/genre-ray"  # where datasets and feature caches live; $GENRE_RAY_CACHE wins

WANDB_MODES = ("auto", "online", "offline", "off")


@dataclass(frozen=True)
class Flag:
    """A tune_main.py flag: the field it sets (its default is the field's), its help, and
    how argparse reads it (`many`: one or more words)."""

    field: str
    help: str
    type: type | None = None
    many: bool = False
    choices: tuple[str, ...] | None = None


# Each tune_main.py flag that sets a field, declared once. A field without a flag is set in
# defaults.yaml or a --config file.
FLAGS: dict[str, Flag] = {
    "--data-dir": Flag("run.data_dir", "GTZAN folder (absent: the embedded dataset)"),
    "--models": Flag("run.models", "architectures to tune, as words or commas: CEL MLP2 or CEL,MLP2",
                     many=True),
    "--features": Flag("run.features", "waveform, spectrogram, or both (words or commas)", many=True),
    "--num-samples": Flag("search.num_samples", "trials per pair", int),
    "--max-epochs": Flag("search.max_epochs", "epochs per trial (ASHA max_t)", int),
    "--grace-period": Flag("search.grace_period", "ASHA: epochs before a trial can be stopped", int),
    "--reduction-factor": Flag("search.reduction_factor", "ASHA: keep the best 1/REDUCTION_FACTOR "
                               "of the trials at each rung", int),
    "--n-startup-trials": Flag("search.n_startup_trials", "TPE: random trials per pair before it "
                               "models the space", int),
    "--max-latency-ms": Flag("search.max_latency_ms", "a trial whose model takes longer per 5 s "
                             "segment (batch 1, on its device, features included) ends untrained", float),
    "--max-params": Flag("search.max_params", "a trial whose model has more parameters ends untrained", int),
    "--cpus-per-trial": Flag("resources.cpus_per_trial", "CPUs Ray reserves for each trial (its torch "
                             "threads)", float),
    "--gpus-per-trial": Flag("resources.gpus_per_trial", "fractional: 0.25 puts four trials on a GPU", float),
    "--storage-path": Flag("run.storage_path", "runs live in STORAGE_PATH/NAME; a path or s3://, gs://, "
                           "file:// URI"),
    "--split": Flag("split.kind", "random | fault-filtered | JSON split file"),
    "--wandb": Flag("tracking.wandb", "auto: online with a WANDB_API_KEY (environment or .env), else "
                    "offline", choices=WANDB_MODES),
    "--wandb-project": Flag("tracking.wandb_project", "W&B project of the runs"),
    "--seed": Flag("run.seed", "seeds the split, the augmentation, TPE and every trial", int),
    "--output-dir": Flag("run.output_dir", "where {model}_{feature}_best_model.pth land"),
    "--search-spaces": Flag("run.search_spaces", "folder of <MODEL>.yaml search-space files (absent: "
                            "search_spaces/)"),
    "--cache-gb": Flag("run.cache_gb", "the feature cache's bound: least recently used entries beyond "
                       "it are removed", float),
}

# Where this machine keeps things, not what a run is: left out of a run's identity
# (`digest`, `command`), and a run continued elsewhere (a new head, a resubmitted job, its
# working folder another) takes them from the command that continues it (`here`).
MACHINE_FIELDS = ("run.output_dir", "run.storage_path", "run.search_spaces", "run.env_file")

MAX_EPOCHS = 10_000  # of a trial: beyond, a typo (an extra zero) would run for days
Count = Annotated[int, Field(ge=0, strict=True)]  # strict: True is not 1, 2.0 is not 2
Positive = Annotated[int, Field(ge=1, strict=True)]
Text = Annotated[str, StringConstraints(pattern=r"\S")]  # not empty, not only blanks
Seed = Annotated[int, Field(ge=0, lt=2**31, strict=True)]  # numpy's and Optuna's range, per pair
Share = Annotated[float, Field(ge=0, strict=True)]  # strict: an int is a float, True is not
Rate = Annotated[float, Field(gt=0, strict=True)]
# a misspelt key is an error, not ignored; so is a NaN or infinite number
_STRICT = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class RunSection:
    """What the run tunes, where its data comes from and where its results go."""

    __pydantic_config__ = _STRICT
    models: Annotated[tuple[Text, ...], Field(min_length=1)]
    features: Annotated[tuple[Text, ...], Field(min_length=1)]
    data_dir: Text | None  # None: the embedded dataset
    output_dir: Text
    storage_path: Text
    search_spaces: Text | None  # None: the project's search_spaces/
    seed: Seed  # the split, the augmentation, TPE and every trial
    cache_gb: Rate  # the feature cache's bound (cache.trim)
    env_file: Text  # read for WANDB_API_KEY


@dataclass(frozen=True)
class Data:
    __pydantic_config__ = _STRICT
    sample_rate: Positive
    segment_seconds: Rate
    min_tail_seconds: Share


@dataclass(frozen=True)
class Split:
    __pydantic_config__ = _STRICT
    kind: Text  # random | fault-filtered | path to a JSON split file
    fractions: dict[Literal["train", "val", "test"], Rate]


@dataclass(frozen=True)
class Spectrogram:
    __pydantic_config__ = _STRICT
    n_fft: Positive
    hop_length: Positive
    n_mels: Positive
    f_min: Share
    top_db: Rate


@dataclass(frozen=True)
class Waveform:
    __pydantic_config__ = _STRICT


class _PerFeature:
    def of(self, feature: str) -> dict[str, Any]:
        """The parameters of `feature` (waveform | spectrogram), as keyword arguments."""
        return dataclasses.asdict(getattr(self, feature))


@dataclass(frozen=True)
class Features(_PerFeature):
    """Each feature's parameters."""

    __pydantic_config__ = _STRICT
    waveform: Waveform
    spectrogram: Spectrogram


@dataclass(frozen=True)
class Augment:
    __pydantic_config__ = _STRICT
    copies: Count
    time_stretch: tuple[Rate, Rate]
    pitch_shift: tuple[Annotated[int, Field(strict=True)], Annotated[int, Field(strict=True)]]


@dataclass(frozen=True)
class Noise:
    __pydantic_config__ = _STRICT
    noise_std: Share


@dataclass(frozen=True)
class Masks:
    __pydantic_config__ = _STRICT
    freq_mask: Count
    time_mask: Count


@dataclass(frozen=True)
class BatchAugment(_PerFeature):
    """On-the-fly training augmentation per feature."""

    __pydantic_config__ = _STRICT
    waveform: Noise
    spectrogram: Masks


@dataclass(frozen=True)
class Model:
    """Architecture keys; a search space may search any of them (models.py checks values)."""

    __pydantic_config__ = _STRICT
    nodes: Positive
    hidden_layers: Positive
    dropout_prob: Annotated[float, Field(ge=0, lt=1, strict=True)]
    dense_layers: Count
    stem_kernel: Positive
    stem_stride: Positive
    pooling: Literal["mean", "meanmax"]  # models.POOLINGS (a test holds them equal)


@dataclass(frozen=True)
class Training:
    """The training loop's keys; a search space may search all but eval_batch_size."""

    __pydantic_config__ = _STRICT
    learning_rate: Rate
    batch_size: Positive
    optimizer: Literal["adam", "adamw", "sgd"]  # optim.OPTIMIZERS (a test holds them equal)
    weight_decay: Share
    label_smoothing: Annotated[float, Field(ge=0, lt=1, strict=True)]
    mixup: Share  # alpha of mixup's Beta(alpha, alpha); 0: off
    scheduler: Literal["none", "plateau", "cosine"]  # optim.SCHEDULERS
    precision: Literal["fp32", "bf16"]  # training.PRECISIONS
    eval_batch_size: Positive


@dataclass(frozen=True)
class Search:
    __pydantic_config__ = _STRICT
    num_samples: Positive
    max_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS, strict=True)]
    grace_period: Positive
    reduction_factor: Annotated[int, Field(ge=2, strict=True)]
    n_startup_trials: Count
    max_latency_ms: Rate | None  # limits a trial's model must keep (cost.violations)
    max_params: Positive | None


@dataclass(frozen=True)
class Resources:
    __pydantic_config__ = _STRICT
    cpus_per_trial: Annotated[float, Field(ge=1e-4, strict=True)]  # Ray counts in 1/10,000ths
    gpus_per_trial: Share


@dataclass(frozen=True)
class Tracking:
    __pydantic_config__ = _STRICT
    wandb: Literal[WANDB_MODES]
    wandb_project: Text


@dataclass(frozen=True)
class Memory:
    __pydantic_config__ = _STRICT
    trial_gb: dict[Literal["waveform", "spectrogram"], Rate]
    driver_gb: Share
    store_headroom: Annotated[float, Field(ge=1, strict=True)]
    store_extra_gb: Share
    store_min_gb: Share


@dataclass(frozen=True)
class Config:
    """One run's whole configuration: defaults.yaml's sections, with the flags' and a
    --config file's values in place."""

    __pydantic_config__ = _STRICT
    run: RunSection
    data: Data
    split: Split
    features: Features
    augment: Augment
    batch_augment: BatchAugment
    model: Model
    training: Training
    search: Search
    resources: Resources
    tracking: Tracking
    memory: Memory


_ADAPTER = pydantic.TypeAdapter(Config)
_SECTIONS = typing.get_type_hints(Config)
_FIELD_FLAGS = {f.field: flag for flag, f in FLAGS.items()}


@functools.cache
def _defaults() -> dict[str, Any]:
    with DEFAULTS_FILE.open() as f:
        return yaml.safe_load(f)


def load(file: Mapping[str, Any] | None = None, values: Mapping[str, Any] | None = None,
         source: str = "--config") -> Config:
    """defaults.yaml, with `file`'s sections ({section: {key: value}}) laid over it, then
    `values` ({"section.key": value}, the flags'). UserError for an unknown section or key,
    or a value of the wrong type or out of range."""
    return _validated(_set(_merged(_defaults(), file or {}, source), values or {}))


def replaced(cfg: Config, values: Mapping[str, Any]) -> Config:
    """`cfg` with `values` ({"section.key": value}) in place, checked as `load` checks."""
    return _validated(_set(as_json(cfg), values))


def _set(doc: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`doc` with each dotted path of `values` (`section.key`, `features.spectrogram.n_mels`)
    set, the mappings on its way copied, not changed."""
    for path, value in values.items():
        *outer, key = path.split(".")
        doc = _with(doc, outer, key, value)
    return doc


def _with(doc: dict[str, Any], outer: list[str], key: str, value: Any) -> dict[str, Any]:
    if not outer:
        return {**doc, key: value}
    return {**doc, outer[0]: _with(doc[outer[0]], outer[1:], key, value)}


def from_json(doc: Mapping[str, Any]) -> Config:
    """The Config that `as_json` gave (a run's saved configuration)."""
    return _validated(dict(doc))


def as_json(cfg: Config) -> dict[str, Any]:
    """`cfg` as plain JSON values (tuples as lists): what run.json keeps."""
    return _ADAPTER.dump_python(cfg, mode="json")


def identity(doc: Mapping[str, Any], spaces: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: a configuration (as_json's) and each tuned model's
    search space as read (its file with `extends` applied), which run.json keeps beside it.
    `digest` and `changes` compare these."""
    return {**doc, "spaces": dict(spaces)}


def digest(doc: Mapping[str, Any]) -> str:
    """A short hash of what a run (`identity`'s) runs, MACHINE_FIELDS left out."""
    return hashlib.sha256(json.dumps(_portable(doc), sort_keys=True).encode()).hexdigest()[:16]


def _portable(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`doc` without MACHINE_FIELDS: the same on every machine."""
    run = {k: v for k, v in (doc.get("run") or {}).items() if f"run.{k}" not in MACHINE_FIELDS}
    return {**doc, "run": run}


def here(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration `saved` with `now`'s MACHINE_FIELDS: a run continued by this command."""
    run = {**saved["run"], **{f.split(".")[1]: now["run"][f.split(".")[1]] for f in MACHINE_FIELDS}}
    return {**saved, "run": run}


def changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs from run `saved` in `now` (`identity`'s), one phrase each:
    `--num-samples 3 (now 5)` for a flag's field, `training.learning_rate 0.001 (now 0.01)`
    for a file's, `search space CEL` for a model's search space."""
    found = []
    saved, now = _portable(saved), _portable(now)
    for section in sorted(set(saved) | set(now)):
        old, new = saved.get(section) or {}, now.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = f"{section}.{key}"
                found.append(f"search space {key}" if section == "spaces" else
                             f"{_FIELD_FLAGS.get(name, name)} {old.get(key)} (now {new.get(key)})")
    return found


def tuned(cfg: Config, hyper: Mapping[str, Any], feature: str | None = None) -> Config:
    """`cfg` with a trial's hyperparameters in place, each in the section that owns it:
    model or training, or for `feature` its front end (features.<feature>) or its batch
    augmentation (batch_augment.<feature>); checked as `load` checks."""
    owners = hyper_sections(feature)
    values = {}
    for key, value in hyper.items():
        section = next((s for s, names in owners.items() if key in names), None)
        if section is None:
            raise UserError(f"unknown hyperparameter {key!r}; "
                            f"{' and '.join(owners)} keys: {', '.join(sorted(set().union(*owners.values())))}")
        values[f"{section}.{key}"] = value
    return replaced(cfg, values)


def hyper_sections(feature: str | None = None) -> dict[str, set[str]]:
    """Section -> the keys a trial's hyperparameters may set in it: model, training and,
    given a feature, `features.<feature>` and `batch_augment.<feature>` (no key is in two)."""
    owners = {"model": keys("model"), "training": keys("training")}
    if feature is not None:
        for section in ("features", "batch_augment"):
            owners[f"{section}.{feature}"] = keys(f"{section}.{feature}")
    return owners


def keys(section: str) -> set[str]:
    """The keys of one section (config.Model's, config.Training's, ...; dotted for one
    inside another, `batch_augment.spectrogram`)."""
    return {f.name for f in dataclasses.fields(_section_type(section))}


def checked(section: str, key: str, value: Any) -> Any:
    """`value` as `section.key` holds it (an int given for a float is a float), checked as
    `load` checks; UserError saying why it cannot be."""
    hints = typing.get_type_hints(_section_type(section), include_extras=True)
    if key not in hints:
        raise UserError(f"{section}.{key}: unknown setting; {section} takes {', '.join(sorted(hints))}")
    try:
        return pydantic.TypeAdapter(hints[key], config=_STRICT).validate_python(value)
    except pydantic.ValidationError as err:
        raise UserError(_describe({**err.errors()[0], "loc": (section, key)})) from None


def _section_type(section: str) -> type:
    """The dataclass of a section, dotted for one inside another (`features.spectrogram`)."""
    outer, *inner = section.split(".")
    kind = _SECTIONS[outer]
    for name in inner:
        kind = typing.get_type_hints(kind)[name]
    return kind


def problem(section: str, key: str, value: Any) -> str | None:
    """Why `section.key` cannot be `value` (`checked`'s message), or None."""
    try:
        checked(section, key, value)
    except UserError as err:
        return str(err)
    return None


def command(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a configuration's (as_json's) fields that flags set, MACHINE_FIELDS
    left out: two runs with the same are the same command."""
    fields = [flag.field for flag in FLAGS.values() if flag.field not in MACHINE_FIELDS]
    return {field: (doc.get(field.split(".")[0]) or {}).get(field.split(".")[1]) for field in fields}


def cache_dir() -> Path:
    """Where generated datasets and feature caches live ($GENRE_RAY_CACHE wins); UserError
    when it cannot be written (a file, a read-only folder), before anything is computed."""
    return _writable_cache(Path(os.environ.get("GENRE_RAY_CACHE") or CACHE_DIR).expanduser().absolute())


@functools.cache
def _writable_cache(root: Path) -> Path:
    from genre_ray.files import writable_folder

    return writable_folder(root, "the cache folder", "set GENRE_RAY_CACHE to a folder you can write to")


def _merged(base: dict[str, Any], over: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(over) - set(base))
    if unknown:
        raise UserError(f"{source}: unknown section(s) {', '.join(unknown)}; sections: "
                        f"{', '.join(base)}")
    doc = dict(base)
    for section, keys in over.items():
        if not isinstance(keys, Mapping):
            raise UserError(f"{source}: {section} must be a mapping of its keys, e.g. "
                            f"{section}: {{{next(iter(base[section] or {'key': 0}))}: ...}}")
        doc[section] = {**(base[section] or {}), **keys}
    return doc


def _validated(doc: dict[str, Any]) -> Config:
    try:
        return _ADAPTER.validate_python(doc)
    except pydantic.ValidationError as err:
        raise UserError(_describe(err.errors()[0])) from None


_BOUNDS = {"ge": ">=", "gt": ">", "lt": "<", "le": "<="}


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as this project's one-line messages: `--num-samples must be >= 1,
    got 0` for a flag's field; `training.learning_rate: <why>, got -1` for a file's."""
    loc = [str(part) for part in error["loc"]]
    name = ".".join(loc[:2])
    where = _FIELD_FLAGS.get(name) or ".".join(loc)
    bound = next(((op, v) for op, v in (error.get("ctx") or {}).items() if op in _BOUNDS), None)
    if bound and name in _FIELD_FLAGS:
        return f"{where} must be {_BOUNDS[bound[0]]} {bound[1]}, got {error['input']}"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{where}: unknown setting; see {DEFAULTS_FILE} for the settings of each section"
    if error["type"] == "string_pattern_mismatch":
        return f"{where} is empty; give it a value"
    if error["type"] == "too_short":
        return f"{where} needs at least one value"
    if error["type"] == "missing":
        return f"{where}: missing; every key of {DEFAULTS_FILE} needs a value"
    return f"{where}: {error['msg'].lower()}, got {error.get('input')!r}"
