"""Search spaces: `search_spaces/<MODEL>.yaml` read into Optuna distributions and a first point.

A file is data, not code (format documented at the top of `search_spaces/MLP.yaml`):

    params:                                   # searched config key -> one distribution
      learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}
      batch_size: {choice: [16, 32, 64]}
      hidden_layers: {int: [2, 4]}            # both ends included
      dropout_prob: {uniform: [0.0, 0.5]}
    first_point: {learning_rate: 0.001, ...}  # the notebook's configuration, evaluated first
    features:                                 # optional: what one feature's pairs search too
      spectrogram:
        params: {hop_length: {choice: [512, 1024]}, freq_mask: {int: [0, 16]}}
        first_point: {hop_length: 1024, freq_mask: 8}

A feature's section may search its front end (defaults.yaml `features.<feature>`), its
batch augmentation (`batch_augment.<feature>`) and any model or training key. Front-end
keys take `choice` only, at most MAX_VARIANTS combinations per feature: each combination
is a feature variant, computed and cached once before the run (genre_ray.features) and
shared by every trial that samples it, so a search's disk cache and object store hold a
bounded, known set of feature arrays (the memory preflight counts them all).

Every mistake a user can make in such a file (YAML syntax, an unknown distribution, an
empty or reversed range, a key the model does not take, a range the model cannot build,
a first point outside its range) is one UserError naming the file and the key, raised
when the file is loaded rather than as failing trials later. No Ray here: `tuning` turns
a SearchSpace into OptunaSearch's `space` and `points_to_evaluate`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from optuna.distributions import (
    BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution)

from genre_ray import config, models
from genre_ray.errors import UserError
from genre_ray.files import read_text

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
# Training keys a search must not vary: they do not change the result.
NOT_SEARCHABLE = frozenset({"eval_batch_size"})
_SPACE_KEYS = ("params", "first_point")
_TOP_LEVEL = (*_SPACE_KEYS, "features", "extends")  # extends: another model's file, whose keys it takes
FEATURES = tuple(sorted(config.keys("features")))
# Front-end combinations one feature's section may search: each is a cached copy of the
# whole feature set (on disk and in every node's object store).
MAX_VARIANTS = 4


class _SpecError(ValueError):
    """A bad distribution spec; the loader adds the file and the key to the message."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(arg: Any, *, integer: bool = False, positive: bool = False) -> tuple[Any, Any]:
    """`[low, high]` with low < high (and low > 0 for a log scale) or _SpecError."""
    kind = "integers" if integer else "numbers"
    if not (isinstance(arg, list) and len(arg) == 2
            and all(models.is_int(v) if integer else _is_number(v) for v in arg)):
        hint = " (write 2, not 2.0)" if integer else ""
        raise _SpecError(f"needs [low, high], two {kind}{hint}, got {arg!r}")
    low, high = arg
    if low >= high:
        raise _SpecError(f"needs low < high, got [{low}, {high}]")
    if positive and low <= 0:
        raise _SpecError(f"needs low > 0 (a log scale), got [{low}, {high}]; "
                         f"use uniform to include 0")
    return low, high


def _choices(arg: Any) -> CategoricalDistribution:
    if not (isinstance(arg, list) and arg):
        raise _SpecError(f"needs a non-empty list of values, got {arg!r}")
    for value in arg:
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise _SpecError(f"values must be numbers, strings, booleans or null, got {value!r}")
        if sum(_same(value, other) for other in arg) > 1:
            raise _SpecError(f"lists {value!r} more than once")
    return CategoricalDistribution(arg)


# Distribution name in a file -> its Optuna distribution, built from the name's argument.
DISTRIBUTIONS: dict[str, Callable[[Any], BaseDistribution]] = {
    "log_uniform": lambda arg: FloatDistribution(*_bounds(arg, positive=True), log=True),
    "uniform": lambda arg: FloatDistribution(*_bounds(arg)),
    "int": lambda arg: IntDistribution(*_bounds(arg, integer=True)),
    "choice": _choices,
}

@dataclass(frozen=True)
class SearchSpace:
    """One architecture's search space, as read from `path`.

    distributions: searched key -> Optuna distribution (FloatDistribution, log or not;
    IntDistribution; CategoricalDistribution), in file order. first_point: a value for
    every searched key, inside its distribution: the first configuration to evaluate.
    """

    model: str
    path: Path
    distributions: dict[str, BaseDistribution]
    first_point: dict[str, Any]
    doc: dict[str, Any]  # the mapping it was read from, `extends` applied (a run keeps it)
    features: dict[str, SearchSpace] = dataclasses.field(default_factory=dict)  # own keys only

    def of(self, feature: str) -> SearchSpace:
        """The space of the (model, `feature`) pair: the model's keys and the feature's."""
        own = self.features.get(feature)
        if own is None:
            return dataclasses.replace(self, features={})
        return dataclasses.replace(self, distributions={**self.distributions, **own.distributions},
                                   first_point={**self.first_point, **own.first_point}, features={})

    def variants(self, feature: str) -> list[dict[str, Any]]:
        """Every front-end setting `feature`'s pairs can sample: {key: value} of the searched
        front-end keys, one per combination of their choices ([{}] when none is searched)."""
        searched = {key: d.choices for key, d in self.of(feature).distributions.items()
                    if key in config.keys(f"features.{feature}")}
        return [dict(zip(searched, values)) for values in itertools.product(*searched.values())]


def load_space(model: str, directory: Path | None = None) -> SearchSpace:
    """Read and check `<directory>/<model>.yaml` (directory: SPACES_DIR); UserError if bad."""
    models.model_keys(model)  # UserError for an unknown model, before looking for its file
    folder = Path(directory).resolve() if directory is not None else SPACES_DIR
    path = folder / f"{model}.yaml"
    if not path.is_file():
        raise UserError(f"no search space for model {model}: {path} does not exist; "
                        f"create it (see {SPACES_DIR / 'MLP.yaml'} for the format)")
    return parse_space(model, _extended(path), path)


def parse_space(model: str, doc: dict[str, Any], path: Path) -> SearchSpace:
    """The SearchSpace of a file's mapping (`extends` applied), checked; `path` names it
    in errors. A run's saved configuration holds such mappings (config.Config.spaces)."""
    def fail(where: str, problem: str) -> UserError:
        return UserError(f"{path}: {where}: {problem}")

    distributions, first = _section(model, None, doc, "", fail)
    sections = doc.get("features") or {}
    if not isinstance(sections, dict):
        raise fail("features", f"needs a mapping of feature -> {{params, first_point}}, got {sections!r}")
    features = {}
    for feature, section in sections.items():
        if feature not in FEATURES:
            raise fail(f"features.{feature}", f"unknown feature; features: {', '.join(FEATURES)}")
        if not isinstance(section, dict):
            raise fail(f"features.{feature}", f"needs a mapping with keys {' and '.join(_SPACE_KEYS)}")
        unknown = sorted(set(section) - set(_SPACE_KEYS))
        if unknown:
            raise fail(f"features.{feature}.{unknown[0]}", f"unknown key; valid keys: {', '.join(_SPACE_KEYS)}")
        own, point = _section(model, feature, section, f"features.{feature}.", fail)
        twice = sorted(own.keys() & distributions.keys())
        if twice:
            raise fail(f"features.{feature}.params.{twice[0]}", "is searched in params too; "
                                                                "search it in one place")
        features[feature] = SearchSpace(model, path, own, point, section)
    space = SearchSpace(model, path, distributions, first, doc, features)
    for feature in features:
        _check_variants(space, feature, fail)
    return space


def _check_variants(space: SearchSpace, feature: str, fail: Callable[[str, str], UserError]) -> None:
    """A feature's searched front-end keys: choices only, at most MAX_VARIANTS together."""
    front_end = config.keys(f"features.{feature}")
    for key, distribution in space.of(feature).distributions.items():
        if key in front_end and not isinstance(distribution, CategoricalDistribution):
            raise fail(f"features.{feature}.params.{key}",
                       "a front-end key takes choice [...] only: each value's features are "
                       "computed and cached before the run, e.g. {choice: [512, 1024]}")
    count = len(space.variants(feature))
    if count > MAX_VARIANTS:
        raise fail(f"features.{feature}.params", f"its front-end choices make {count} feature "
                   f"variants, each a cached copy of the {feature} features; at most "
                   f"{MAX_VARIANTS}: list fewer values")


def _section(model: str, feature: str | None, doc: dict[str, Any], prefix: str,
             fail: Callable[[str, str], UserError]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """The distributions and first point of one `params` + `first_point` mapping: the
    file's own (feature None) or a feature's section (its keys may also be the feature's)."""
    owners = config.hyper_sections(feature)
    owners["model"] = set(models.model_keys(model))
    section_of = {key: section for section, names in owners.items() for key in names}
    searchable = sorted(set(section_of) - NOT_SEARCHABLE)

    params, point = doc.get("params"), doc.get("first_point")
    if not (isinstance(params, dict) and (params or feature)):
        raise fail(f"{prefix}params", "needs a mapping of one or more searched keys, "
                                      "e.g. learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}")
    if not isinstance(point, dict):
        raise fail(f"{prefix}first_point", "needs a mapping giving every key of params its "
                                           "first value, e.g. {learning_rate: 0.001, ...}")

    distributions = {}
    for key, spec in params.items():
        where = f"{prefix}params.{key}"
        if key in NOT_SEARCHABLE:
            raise fail(where, "does not change results, so it is not searched; set it in "
                              "the training section of defaults.yaml or --config")
        if key not in searchable:
            whose = f"model {model}" + (f" on {feature}" if feature else "")
            hint = "" if feature else "; a feature's front end and augmentation go under features.<feature>"
            raise fail(where, f"{whose} does not take this key; searchable keys: "
                              f"{', '.join(searchable)}{hint}")
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise fail(where, f"needs one distribution, e.g. {{uniform: [0.0, 0.5]}}, "
                              f"got {spec!r}")
        [(name, arg)] = spec.items()
        if name not in DISTRIBUTIONS:
            raise fail(where, f"unknown distribution {name!r}; valid distributions: "
                              f"{', '.join(DISTRIBUTIONS)}")
        try:
            distributions[key] = DISTRIBUTIONS[name](arg)
        except _SpecError as err:
            raise fail(where, f"{name} {err}") from None
        for value in _extremes(distributions[key]):
            problem = config.problem(section_of[key], key, value)
            if problem:
                raise fail(where, f"the range reaches {value!r}, which {model} rejects: "
                                  f"{problem}; change the range")

    for key in point:
        if key not in distributions:
            raise fail(f"{prefix}first_point.{key}", f"is not searched; add it to params or "
                                                     f"remove it (searched: {', '.join(distributions)})")
    for key, distribution in distributions.items():
        if key not in point:
            raise fail(f"{prefix}first_point.{key}", "missing; give every key of params a first value")
        if not _contains(distribution, point[key]):
            raise fail(f"{prefix}first_point.{key}", f"{point[key]!r} is outside params.{key} "
                                                     f"({_describe(distribution)}); fix one of the two")
    return distributions, {key: point[key] for key in distributions}


def first_point(model: str, directory: Path | None = None,
                feature: str | None = None) -> dict[str, Any]:
    """The first configuration to evaluate for `model` (on `feature`, with its section's
    keys): the original notebook's hand-picked one."""
    space = load_space(model, directory)
    return dict((space.of(feature) if feature else space).first_point)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 reads it as a string) and
    refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key: SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _extended(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The search-space file at `path` as a mapping, with what it `extends` filled in: the
    named file's (same folder) params and first_point, under the file's own keys."""
    doc = _read_yaml(path)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise UserError(f"{path}: expected a mapping with keys {' and '.join(_SPACE_KEYS)}, "
                        f"got {got}")
    for key in doc:
        if key not in _TOP_LEVEL:
            raise UserError(f"{path}: {key}: unknown top-level key; valid keys: {', '.join(_TOP_LEVEL)}")
    if "extends" not in doc:
        return doc
    base = path.with_name(f"{doc['extends']}.yaml")
    if not base.is_file() or base in (path, *seen):
        why = "does not exist" if not base.is_file() else "extends this file in turn"
        raise UserError(f"{path}: extends: {base} {why}; name another model's search-space "
                        "file in the same folder")
    return _laid_over(_extended(base, (*seen, path)), doc)


def _laid_over(inherited: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """`doc`'s params and first_point key by key over `inherited`'s, and so each feature's
    section; a value that is not a mapping replaces (parse_space says what is wrong)."""
    def over(a: Any, b: Any) -> Any:
        if b is None:
            return a
        return {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else b

    merged = {key: over(inherited.get(key) or {}, doc.get(key)) for key in _SPACE_KEYS}
    base, own = inherited.get("features") or {}, doc.get("features")
    if isinstance(base, dict) and isinstance(own, dict):
        own = {f: {**s, **_laid_over(base.get(f) or {}, s)} if isinstance(s, dict) else s
               for f, s in own.items()}
    features = over(base, own)
    return {**merged, "features": features} if features else merged


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(read_text(path), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}: invalid YAML{at}: {problem}; fix the file "
                        f"(format: see {SPACES_DIR / 'MLP.yaml'})") from None


def _extremes(distribution: BaseDistribution) -> list[Any]:
    """The values that bound what `distribution` can sample (the model checks are ranges)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (True is not 1, "32" is not 32)."""
    return a == b and (type(a) is type(b) or (_is_number(a) and _is_number(b)))


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return any(_same(value, choice) for choice in distribution.choices)
    if isinstance(distribution, IntDistribution) and not models.is_int(value):
        return False
    return _is_number(value) and distribution.low <= value <= distribution.high


def _describe(distribution: BaseDistribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return f"choice {list(distribution.choices)}"
    if isinstance(distribution, IntDistribution):
        return f"int [{distribution.low}, {distribution.high}]"
    name = "log_uniform" if distribution.log else "uniform"
    return f"{name} [{distribution.low}, {distribution.high}]"
