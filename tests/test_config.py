"""The typed configuration: one loader, one check of every value, what a run saves and
compares, and a trial's configuration as the run's plus its hyperparameters."""
from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pytest
import torch

from genre_ray import config, export
from genre_ray.errors import UserError
from genre_ray.models import POOLINGS
from genre_ray.optim import OPTIMIZERS, SCHEDULERS
from genre_ray.training import PRECISIONS
from genre_ray.trials import TrialKeys

PACKAGE = Path(config.__file__).parent


def test_only_the_loader_reads_defaults_yaml():
    readers = [(path.name, line) for path in sorted(PACKAGE.glob("*.py"))
               for line in path.read_text().splitlines()
               if re.search(r"\bdefaults\(|DEFAULTS_FILE\.open|_defaults\(", line)]
    assert readers and {name for name, _ in readers} == {"config.py"}, readers


@pytest.mark.parametrize("section,field,registry", [
    (config.Training, "optimizer", OPTIMIZERS), (config.Training, "scheduler", SCHEDULERS),
    (config.Training, "precision", PRECISIONS), (config.Model, "pooling", POOLINGS)])
def test_the_choices_are_the_registries_keys(section, field, registry):
    hint = typing.get_type_hints(section, include_extras=True)[field]
    assert set(typing.get_args(hint)) == set(registry)


@pytest.mark.parametrize("file,values,says", [
    (None, {"search.num_samples": 0}, r"--num-samples must be >= 1, got 0"),
    (None, {"resources.gpus_per_trial": float("inf")}, r"--gpus-per-trial: input should be a finite number"),
    (None, {"run.seed": 1.5}, r"--seed: input should be a valid integer"),
    ({"training": {"learning_rate": -1}}, None, r"training\.learning_rate: input should be greater than 0, got -1"),
    ({"training": {"optimizer": "adamax"}}, None, r"training\.optimizer: input should be 'adam', 'adamw' or 'sgd'"),
    ({"model": {"nodes": True}}, None, r"model\.nodes: input should be a valid integer, got True"),
    ({"model": {"dropout_p": 0.5}}, None, r"model\.dropout_p: unknown setting"),
    ({"modle": {}}, None, r"unknown section\(s\) modle"),
])
def test_every_value_is_checked_in_one_place_with_one_line(file, values, says):
    with pytest.raises(UserError) as err:
        config.load(file, values)
    assert re.search(says, str(err.value)) and "\n" not in str(err.value), str(err.value)


def test_a_saved_configuration_reads_back_equal_and_names_each_change():
    cfg = config.load(values={"run.models": ["CEL"], "search.num_samples": 5})
    saved = config.as_json(cfg)
    assert config.from_json(saved) == cfg and config.digest(saved) == config.digest(config.as_json(cfg))
    now = config.as_json(config.replaced(cfg, {"search.num_samples": 6, "training.weight_decay": 0.1}))
    assert config.changes(config.identity(saved, {"CEL": {}}), config.identity(now, {"CEL": {"params": {}}})) == [
        "--num-samples 5 (now 6)", "search space CEL", "training.weight_decay 0.0 (now 0.1)"]
    assert config.command(saved) != config.command(now)
    assert config.command(saved) == config.command(config.as_json(
        config.replaced(cfg, {"training.weight_decay": 0.1})))  # a file's change: the same command


def test_a_trials_configuration_is_the_runs_with_its_hyperparameters_in_place():
    cfg = config.load()
    keys = TrialKeys("CEL_spectrogram", "CEL", "spectrogram", 8, 0, [2, 4, 8])
    tune_config = {**vars(keys), "learning_rate": 0.01, "nodes": 16}
    split_keys, hyper = TrialKeys.split(tune_config)
    assert split_keys == keys and hyper == {"learning_rate": 0.01, "nodes": 16}
    tuned = config.tuned(cfg, hyper)
    assert (tuned.training.learning_rate, tuned.model.nodes) == (0.01, 16)
    assert tuned.training.batch_size == cfg.training.batch_size  # unsearched: the run's
    with pytest.raises(UserError, match="unknown hyperparameter 'dropout_p'"):
        config.tuned(cfg, {"dropout_p": 0.1})
    with pytest.raises(UserError, match=r"model\.nodes: input should be greater than or equal to 1"):
        config.tuned(cfg, {"nodes": 0})


def test_an_export_of_another_format_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"format": "genre-ray-model/1", "state_dict": {}}, path)
    with pytest.raises(UserError, match=r"another version of genre-ray .*export it again"):
        export.Exported.load(path)


def test_a_cache_folder_that_cannot_be_written_is_one_error_before_anything_is_computed(
        tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GENRE_RAY_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match=r"cannot write to the cache folder \S+a-file/cache \(\S+a-file "
                                        r"is a file, not a folder\); set GENRE_RAY_CACHE to a folder"):
        config.cache_dir()
    monkeypatch.setenv("GENRE_RAY_CACHE", str(tmp_path / "new"))
    assert config.cache_dir() == tmp_path / "new" and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode")
def test_a_read_only_cache_folder_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir(mode=0o555)
    monkeypatch.setenv("GENRE_RAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"cannot write to the cache folder \S+cache \(Permission denied\); "
                                        r"set GENRE_RAY_CACHE to a folder"):
        config.cache_dir()
