"""Search spaces: `search_spaces/<MODEL>.yaml` read into Optuna distributions and a first point.

A file is data, not code (format documented at the top of `search_spaces/MLP.yaml`):

    params:                                   # searched config key -> one distribution
      learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}
      batch_size: {choice: [16, 32, 64]}
      hidden_layers: {int: [2, 4]}            # both ends included
      dropout_prob: {uniform: [0.0, 0.5]}
    first_point: {learning_rate: 0.001, ...}  # the seed's configuration, evaluated first

Every mistake a user can make in such a file (YAML syntax, an unknown distribution, an
empty or reversed range, a key the model does not take, a range the model cannot build,
a first point outside its range) is one UserError naming the file and the key, raised
when the file is loaded rather than as failing trials later. No Ray here: `tuning` turns
a SearchSpace into OptunaSearch's `space` and `points_to_evaluate`.
"""
from __future__ import annotations

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
TRAINING_KEYS = frozenset(config.keys("training"))
_SPACE_KEYS = ("params", "first_point")
_TOP_LEVEL = (*_SPACE_KEYS, "extends")  # extends: another model's file, whose keys it takes


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
    searchable = sorted((models.model_keys(model) | TRAINING_KEYS) - NOT_SEARCHABLE)

    def fail(where: str, problem: str) -> UserError:
        return UserError(f"{path}: {where}: {problem}")

    params, point = doc.get("params"), doc.get("first_point")
    if not (isinstance(params, dict) and params):
        raise fail("params", "needs a mapping of one or more searched keys, "
                             "e.g. learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}")
    if not isinstance(point, dict):
        raise fail("first_point", "needs a mapping giving every key of params its first value, "
                                  "e.g. {learning_rate: 0.001, ...}")

    distributions = {}
    for key, spec in params.items():
        where = f"params.{key}"
        if key in NOT_SEARCHABLE:
            raise fail(where, "does not change results, so it is not searched; set it in "
                              "the training section of defaults.yaml or --config")
        if key not in searchable:
            raise fail(where, f"model {model} does not take this key; searchable keys: "
                              f"{', '.join(searchable)}")
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
            problem = _check_value(model, key, value)
            if problem:
                raise fail(where, f"the range reaches {value!r}, which {model} rejects: "
                                  f"{problem}; change the range")

    for key in point:
        if key not in distributions:
            raise fail(f"first_point.{key}", f"is not searched; add it to params or remove it "
                                             f"(searched: {', '.join(distributions)})")
    for key, distribution in distributions.items():
        if key not in point:
            raise fail(f"first_point.{key}", "missing; give every key of params a first value")
        if not _contains(distribution, point[key]):
            raise fail(f"first_point.{key}", f"{point[key]!r} is outside params.{key} "
                                             f"({_describe(distribution)}); fix one of the two")
    first = {key: point[key] for key in distributions}
    return SearchSpace(model, path, distributions, first, doc)


def first_point(model: str, directory: Path | None = None) -> dict[str, Any]:
    """The first configuration to evaluate for `model`: the seed notebook's hand-picked one."""
    return dict(load_space(model, directory).first_point)


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
    inherited = _extended(base, (*seen, path))
    return {key: {**(inherited.get(key) or {}), **(doc.get(key) or {})} for key in _SPACE_KEYS}


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


def _check_value(model: str, key: str, value: Any) -> str | None:
    """Why `model` rejects `key: value`, or None: the check its config section makes."""
    return config.problem("model" if key in models.model_keys(model) else "training", key, value)


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
