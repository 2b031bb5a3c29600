"""Stage check: every input of a run checked before anything of it is written.

Which run (runs.choose, read-only), the flags and files, the search spaces, W&B's mode,
the data (its headers) and the memory the features and each trial need; a UserError
names the first problem. The configuration a run keeps is `resolved`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genre_ray import capacity, config, runs, storage
from genre_ray.config import Config
from genre_ray.features import Variant, estimated_bytes, variant_of
from genre_ray.files import writable_folder
from genre_ray.search_space import SearchSpace, load_space, parse_space
from genre_ray.transforms import canonical_feature


@dataclass
class Checked:
    """What a run needs, checked before anything of the run is written."""

    spaces: dict[str, SearchSpace]
    output_dir: Path
    mode: str | None  # W&B: online | offline | None (off)
    data_dir: Path
    need: capacity.Need  # what each node must hold (estimated from the audio files' headers)
    variants: list[Variant]  # every feature front end a trial can sample (feature_variants)


def prepared(cfg: Config, name: str | None, resume: bool,
             more_samples: int) -> tuple[storage.Storage, runs.Run, Config, Checked]:
    """The run this command works on (runs.choose: `name`, or the newest interrupted run
    with this configuration; `resume` and `more_samples` keep the run's own), its
    configuration (saved, when it continues one) and what it needs, every input checked;
    nothing written."""
    store = storage.storage(cfg.run.storage_path)
    if store.remote:  # first: every other check reads the storage
        store.check_writable()
    cfg = resolved(cfg)
    keeps_own = resume or bool(more_samples)  # the run's saved configuration and spaces
    spaces = {} if keeps_own else {m: load_space(m, cfg.run.search_spaces).doc for m in cfg.run.models}
    chosen = runs.choose(store, name, config.as_json(cfg), spaces, resume, more_samples)
    cfg = config.from_json(chosen.config)
    config.cache_dir()  # UserError if the cache folder cannot be written
    if not store.remote:
        writable_folder(store.local, "--storage-path")
    return store, chosen, cfg, _checked(cfg, chosen.spaces)


def resolved(cfg: Config) -> Config:
    """`cfg` as a run keeps it: paths absolute, feature names canonical, lists without
    repeats."""
    def absolute(path: str | None) -> str | None:
        return path and (path if "://" in path else str(Path(path).expanduser().resolve()))

    run_ = cfg.run
    return config.replaced(cfg, {  # a list given twice (or an alias beside its name): once
        "run.models": list(dict.fromkeys(run_.models)),
        "run.features": list(dict.fromkeys(canonical_feature(f) for f in run_.features)),
        **{f"run.{key}": absolute(getattr(run_, key))
           for key in ("data_dir", "output_dir", "storage_path", "search_spaces")}})


def _checked(cfg: Config, docs: dict[str, dict]) -> Checked:
    """What the run needs, for `cfg` and its search spaces' documents `docs`."""
    from genre_ray.tracking import resolve_mode

    spaces = {m: parse_space(m, docs[m], Path(f"run.json spaces.{m}")) for m in cfg.run.models}
    output_dir = writable_folder(Path(cfg.run.output_dir), "--output-dir")
    mode = resolve_mode(cfg.tracking.wandb, Path(cfg.run.env_file))
    data_dir = Path(cfg.run.data_dir) if cfg.run.data_dir else _embedded()
    variants = feature_variants([(m, f) for m in cfg.run.models for f in cfg.run.features], spaces, cfg)
    sizes = estimated_bytes(data_dir, variants, cfg)
    need = capacity.need(sizes, cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial,
                         cfg.memory)
    return Checked(spaces, output_dir, mode, data_dir, need, variants)


def feature_variants(pairs: list[tuple[str, str]], spaces: dict[str, SearchSpace],
                     cfg: Config) -> list[Variant]:
    """Every (feature, front end) a trial of `pairs` (model, feature) can sample, once each:
    the front ends their search spaces choose among (search_space.SearchSpace.variants)."""
    found = {}
    for model, feature in pairs:
        for searched in spaces[model].variants(feature):
            front = config.tuned(cfg, searched, feature)
            found[variant_of(front, feature)] = (feature, front.features.of(feature))
    return list(found.values())


def _embedded() -> Path:
    from genre_ray.synthetic import embedded_dataset

    return embedded_dataset()
