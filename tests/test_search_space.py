"""genre_ray.search_space: the five shipped spaces, their first points, and bad files."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from genre_ray import config, training, transforms
from genre_ray.errors import UserError
from genre_ray.models import MODELS, build_model, model_keys
from genre_ray.search_space import (NOT_SEARCHABLE, SPACES_DIR, SearchSpace, first_point, load_space,
                                    parse_space)
from tests.helpers import arch

# The original notebook's hand-picked configurations, as the issue states them: the spec.
_CEL = {"learning_rate": 0.001, "batch_size": 32, "nodes": 64, "hidden_layers": 3,
        "dropout_prob": 0.3, "dense_layers": 2, "optimizer": "adam", "weight_decay": 0.0,  # the notebook's Adam: no decay
        "mixup": 0.0}
NOTEBOOK = {"MLP": {"learning_rate": 0.001, "batch_size": 32, "nodes": 64},
        "MLP2": {"learning_rate": 0.001, "batch_size": 32, "nodes": 64, "hidden_layers": 3},
        "CEL": _CEL, "CEL2": _CEL, "CEL3": _CEL}
SHAPES = {"waveform": (1000,), "spectrogram": (16, 32)}
# What kind of distribution each key must be, whatever its range.
KINDS = {"learning_rate": (FloatDistribution, True), "dropout_prob": (FloatDistribution, False),
         "mixup": (FloatDistribution, False), "hidden_layers": (IntDistribution, False),
         "dense_layers": (IntDistribution, False), "freq_mask": (IntDistribution, False),
         "time_mask": (IntDistribution, False)}


def test_every_model_has_a_space():
    assert sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) == sorted(MODELS)
    assert SPACES_DIR.is_absolute()


@pytest.mark.parametrize("model", MODELS)
def test_first_point_is_the_notebooks_configuration(model):
    space = load_space(model)
    assert isinstance(space, SearchSpace) and space.model == model
    assert space.path == SPACES_DIR / f"{model}.yaml"
    searched = {key: value for key, value in NOTEBOOK[model].items() if key in space.distributions}
    assert space.first_point == first_point(model) == searched
    assert list(space.distributions) == list(space.first_point)
    for feature in SHAPES:  # a key not searched, or a feature's section, takes defaults.yaml's: the notebook's
        notebook = config.tuned(config.load(), NOTEBOOK[model], feature)
        assert config.tuned(config.load(), first_point(model, feature=feature), feature) == notebook


@pytest.mark.parametrize("model", MODELS)
def test_first_point_lies_inside_each_distribution(model):
    space = load_space(model)
    for key, distribution in space.distributions.items():
        internal = distribution.to_internal_repr(space.first_point[key])
        assert distribution._contains(internal), key


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("feature", SHAPES)
def test_distribution_kinds(model, feature):
    for key, distribution in load_space(model).of(feature).distributions.items():
        if key in KINDS:
            kind, log = KINDS[key]
            assert type(distribution) is kind, key
            assert distribution.log is log, key
        elif key in ("batch_size", "nodes", "n_mels"):
            assert isinstance(distribution, CategoricalDistribution), key
            assert all(isinstance(c, int) and c >= 1 for c in distribution.choices), key
        elif key in ("optimizer", "weight_decay"):  # the CEL family's
            assert isinstance(distribution, CategoricalDistribution) and len(distribution.choices) > 1, key
        else:
            pytest.fail(f"unexpected searched key {key}")
        if isinstance(distribution, IntDistribution):
            assert distribution.step == 1


@pytest.mark.parametrize("feature", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_models_build_and_run_at_the_first_point(model, feature):
    net = build_model(model, SHAPES[feature], 10, arch(model))  # defaults, first point in place
    assert net.eval()(torch.randn(2, *SHAPES[feature])).shape == (2, 10)


@pytest.mark.parametrize("model", MODELS)
def test_models_build_at_every_corner_of_the_space(model):
    """Each range's low and high ends (all choices) build: no trial fails on its config."""
    space = load_space(model)
    for key, distribution in space.distributions.items():
        ends = (distribution.choices if isinstance(distribution, CategoricalDistribution)
                else (distribution.low, distribution.high))
        for value in ends:
            net = build_model(model, SHAPES["spectrogram"], 10, arch(model, **{key: value})).eval()
            assert net(torch.zeros(1, *SHAPES["spectrogram"])).shape == (1, 10), (key, value)


def test_relative_directory_and_scientific_notation(tmp_path, monkeypatch):
    (tmp_path / "MLP.yaml").write_text(
        "params:\n  learning_rate: {log_uniform: [1e-4, 1e-2]}\n"
        "first_point: {learning_rate: 1e-3}\n")
    monkeypatch.chdir(tmp_path.parent)
    space = load_space("MLP", directory=tmp_path.name)
    assert space.path.is_absolute()
    assert space.distributions["learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space.first_point == {"learning_rate": 1e-3}


GOOD_PARAMS = "  learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}\n  nodes: {choice: [32, 64]}\n"
GOOD_POINT = "first_point: {learning_rate: 0.001, nodes: 64}\n"


def _section(feature: str, params: str, point: str) -> str:
    """A good MLP file with a `features.<feature>` section of these params and first point."""
    return ("params:\n" + GOOD_PARAMS + GOOD_POINT
            + f"features: {{{feature}: {{params: {{{params}}}, first_point: {{{point}}}}}}}\n")
# name -> (model, file text, a word the message must name besides the file)
BAD = {
    "yaml syntax": ("MLP", "params:\n  nodes: {choice: [32, 64}\n" + GOOD_POINT, "line 2"),
    "key twice": ("MLP", "params:\n" + GOOD_PARAMS + "  nodes: {choice: [16]}\n" + GOOD_POINT,
                  "'nodes' given twice"),
    "not a mapping": ("MLP", "- nodes\n", "params"),
    "empty file": ("MLP", "# nothing yet\n", "empty file"),
    "unknown top-level": ("MLP", "params:\n" + GOOD_PARAMS + GOOD_POINT + "fixed: {seed: 1}\n",
                          "fixed"),
    "no params": ("MLP", GOOD_POINT, "params"),
    "no first_point": ("MLP", "params:\n" + GOOD_PARAMS, "first_point"),
    "spec not a mapping": ("MLP", "params:\n  nodes: [32, 64]\n" + GOOD_POINT, "nodes"),
    "spec with two keys": ("MLP", "params:\n  nodes: {choice: [32], int: [1, 2]}\n" + GOOD_POINT,
                           "nodes"),
    "unknown distribution": ("MLP", "params:\n  nodes: {normal: [32, 64]}\n" + GOOD_POINT,
                             "normal"),
    "one bound": ("MLP", "params:\n  learning_rate: {uniform: [0.1]}\n" + GOOD_POINT,
                  "learning_rate"),
    "bound not a number": ("MLP", "params:\n  learning_rate: {uniform: [0.1, high]}\n" + GOOD_POINT,
                           "learning_rate"),
    "low equals high": ("MLP", "params:\n  learning_rate: {uniform: [0.1, 0.1]}\n" + GOOD_POINT,
                        "learning_rate"),
    "low above high": ("MLP", "params:\n  learning_rate: {log_uniform: [0.1, 0.01]}\n" + GOOD_POINT,
                       "learning_rate"),
    "log from zero": ("MLP", "params:\n  learning_rate: {log_uniform: [0.0, 0.01]}\n" + GOOD_POINT,
                      "learning_rate"),
    "int bounds not integers": ("MLP2", "params:\n  hidden_layers: {int: [1.0, 4.0]}\n"
                                "first_point: {hidden_layers: 3}\n", "hidden_layers"),
    "empty choice": ("MLP", "params:\n  nodes: {choice: []}\n" + GOOD_POINT, "nodes"),
    "choice twice": ("MLP", "params:\n  nodes: {choice: [32, 32]}\n" + GOOD_POINT, "nodes"),
    "key the model does not take": ("MLP", "params:\n" + GOOD_PARAMS
                                    + "  dropout_prob: {uniform: [0.0, 0.5]}\n" + GOOD_POINT,
                                    "dropout_prob"),
    "key nobody takes": ("CEL", "params:\n  dropout_p: {uniform: [0.0, 0.5]}\n"
                         "first_point: {dropout_p: 0.3}\n", "dropout_p"),
    "key not searchable": ("MLP", "params:\n  eval_batch_size: {choice: [64, 256]}\n"
                           "first_point: {eval_batch_size: 256}\n", "eval_batch_size"),
    # the run's budget and seed (search.max_epochs, run.seed) are no training keys
    "epochs": ("MLP", "params:\n  epochs: {int: [1, 10]}\nfirst_point: {epochs: 5}\n",
               "epochs"),
    "seed": ("MLP", "params:\n  seed: {int: [0, 10]}\nfirst_point: {seed: 5}\n", "seed"),
    "range the model rejects": ("CEL", "params:\n  dropout_prob: {uniform: [0.0, 1.0]}\n"
                                "first_point: {dropout_prob: 0.3}\n", "dropout_prob"),
    "float range for an integer key": ("MLP", "params:\n  nodes: {uniform: [16, 128]}\n"
                                       "first_point: {nodes: 64}\n", "nodes"),
    "unknown optimizer": ("MLP", "params:\n  optimizer: {choice: [adam, rmsprop]}\n"
                          "first_point: {optimizer: adam}\n", "optimizer"),
    "first point missing a key": ("MLP", "params:\n" + GOOD_PARAMS
                                  + "first_point: {learning_rate: 0.001}\n", "nodes"),
    "first point with an extra key": ("MLP", "params:\n" + GOOD_PARAMS
                                      + "first_point: {learning_rate: 0.001, nodes: 64, "
                                        "batch_size: 32}\n", "batch_size"),
    "first point outside a range": ("MLP", "params:\n" + GOOD_PARAMS
                                    + "first_point: {learning_rate: 0.1, nodes: 64}\n",
                                    "learning_rate"),
    "first point not a choice": ("MLP", "params:\n" + GOOD_PARAMS
                                 + "first_point: {learning_rate: 0.001, nodes: 48}\n", "nodes"),
    "first point float for an int": ("MLP2", "params:\n  hidden_layers: {int: [1, 4]}\n"
                                     "first_point: {hidden_layers: 3.0}\n", "hidden_layers"),
    # a feature's section (features: {<feature>: {params, first_point}})
    "unknown feature": ("MLP", "params:\n" + GOOD_PARAMS + GOOD_POINT
                        + "features: {mfcc: {params: {}, first_point: {}}}\n", "features.mfcc"),
    "feature section not a mapping": ("MLP", "params:\n" + GOOD_PARAMS + GOOD_POINT
                                      + "features: [spectrogram]\n", "features"),
    "feature section with an unknown key": ("MLP", "params:\n" + GOOD_PARAMS + GOOD_POINT
                                            + "features: {spectrogram: {parms: {}}}\n",
                                            "features.spectrogram.parms"),
    "front end of another feature": ("MLP", _section("waveform", "hop_length: {choice: [512]}",
                                                     "hop_length: 512"), "hop_length"),
    "front end at the top": ("MLP", "params:\n" + GOOD_PARAMS + "  hop_length: {choice: [512]}\n"
                             "first_point: {learning_rate: 0.001, nodes: 64, hop_length: 512}\n",
                             "features.<feature>"),
    "front end as a range": ("MLP", _section("spectrogram", "hop_length: {int: [256, 1024]}",
                                             "hop_length: 512"), "choice"),
    "too many front ends": ("MLP", _section("spectrogram", "hop_length: {choice: [256, 512, 1024]}, "
                                            "n_mels: {choice: [32, 64]}", "hop_length: 512, n_mels: 64"),
                            "6 feature variants"),
    "front end the feature rejects": ("MLP", _section("spectrogram", "n_mels: {choice: [0, 64]}",
                                                      "n_mels: 64"), "n_mels"),
    "feature key also at the top": ("MLP", _section("spectrogram", "nodes: {choice: [16]}", "nodes: 16"),
                                    "searched in params too"),
    "feature first point missing a key": ("MLP", _section("spectrogram", "freq_mask: {int: [0, 9]}", ""),
                                          "features.spectrogram.first_point.freq_mask"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_file_is_one_clear_error(tmp_path, case):
    model, text, named = BAD[case]
    (tmp_path / f"{model}.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        load_space(model, directory=tmp_path)
    message = str(info.value)
    assert f"{model}.yaml" in message and named in message, message
    assert "\n" not in message


@pytest.mark.parametrize("model", MODELS)
def test_a_space_parses_again_from_the_mapping_it_keeps(model):
    """A run keeps each space's mapping (`doc`, extends applied); it reads back the same."""
    space = load_space(model)
    assert "extends" not in space.doc and set(space.doc["first_point"]) == set(space.first_point)
    again = parse_space(model, space.doc, space.path)
    assert again.distributions == space.distributions and again.first_point == space.first_point


def test_missing_file_names_the_model_and_the_folder(tmp_path):
    with pytest.raises(UserError, match=rf"CEL2.*{tmp_path}"):
        load_space("CEL2", directory=tmp_path)


def test_unknown_model_is_the_registry_error(tmp_path):
    with pytest.raises(UserError, match=r"unknown model 'VGG'.*MLP, MLP2, CEL"):
        load_space("VGG", directory=tmp_path)


def test_a_space_can_extend_another_and_override_keys(tmp_path):
    (tmp_path / "CEL.yaml").write_text("params:\n" + GOOD_PARAMS + GOOD_POINT)
    (tmp_path / "CEL2.yaml").write_text("extends: CEL\nparams:\n  nodes: {choice: [16, 32]}\n"
                                        "first_point: {nodes: 16}\n")
    base, child = load_space("CEL", tmp_path), load_space("CEL2", tmp_path)
    assert child.distributions["learning_rate"] == base.distributions["learning_rate"]
    assert child.distributions["nodes"].choices == (16, 32)
    assert child.first_point == {"learning_rate": 0.001, "nodes": 16}


def test_the_shipped_cel_variants_share_cels_space():
    assert load_space("CEL2").distributions == load_space("CEL3").distributions == \
        load_space("CEL").distributions


@pytest.mark.parametrize("text,says", [
    ("extends: CEL9\n", r"CEL2\.yaml: extends: \S+CEL9\.yaml does not exist"),
    ("extends: CEL2\n", r"CEL2\.yaml: extends: \S+CEL2\.yaml extends this file in turn"),
])
def test_a_bad_extends_is_one_clear_error(tmp_path, text, says):
    (tmp_path / "CEL2.yaml").write_text(text)
    with pytest.raises(UserError, match=says):
        load_space("CEL2", tmp_path)


FEATURE_SPACE = ("params:\n" + GOOD_PARAMS + GOOD_POINT
                 + "features:\n"
                   "  spectrogram:\n"
                   "    params:\n"
                   "      hop_length: {choice: [512, 1024]}\n"
                   "      n_mels: {choice: [32, 64]}\n"
                   "      freq_mask: {int: [0, 16]}\n"
                   "      mixup: {uniform: [0.0, 0.4]}\n"
                   "    first_point: {hop_length: 1024, n_mels: 64, freq_mask: 8, mixup: 0.0}\n"
                   "  waveform:\n"
                   "    params: {noise_std: {uniform: [0.0, 0.05]}}\n"
                   "    first_point: {noise_std: 0.01}\n")


def test_a_features_section_adds_its_keys_to_that_features_pairs_only(tmp_path):
    (tmp_path / "MLP.yaml").write_text(FEATURE_SPACE)
    space = load_space("MLP", tmp_path)
    spectrogram, waveform = space.of("spectrogram"), space.of("waveform")
    assert list(spectrogram.distributions) == ["learning_rate", "nodes", "hop_length", "n_mels",
                                               "freq_mask", "mixup"]
    assert spectrogram.first_point == {"learning_rate": 0.001, "nodes": 64, "hop_length": 1024,
                                       "n_mels": 64, "freq_mask": 8, "mixup": 0.0}
    assert list(waveform.distributions) == ["learning_rate", "nodes", "noise_std"]
    assert first_point("MLP", tmp_path, "waveform") == {"learning_rate": 0.001, "nodes": 64,
                                                        "noise_std": 0.01}
    assert first_point("MLP", tmp_path) == {"learning_rate": 0.001, "nodes": 64}
    # the front end's choices, every combination once; batch augmentation and training keys are no variant
    assert sorted(map(str, space.variants("spectrogram"))) == sorted(map(str, [
        {"hop_length": h, "n_mels": m} for h in (512, 1024) for m in (32, 64)]))
    assert space.variants("waveform") == [{}]
    again = parse_space("MLP", space.doc, space.path)
    assert again.of("spectrogram").distributions == spectrogram.distributions


def test_a_features_section_extends_key_by_key(tmp_path):
    (tmp_path / "CEL.yaml").write_text(FEATURE_SPACE)
    (tmp_path / "CEL2.yaml").write_text(
        "extends: CEL\nfeatures:\n  spectrogram:\n    params: {n_mels: {choice: [64, 128]}}\n"
        "    first_point: {n_mels: 128}\n")
    child = load_space("CEL2", tmp_path).of("spectrogram")
    assert child.distributions["n_mels"].choices == (64, 128)
    assert child.distributions["hop_length"].choices == (512, 1024)
    assert child.first_point["n_mels"] == 128 and child.first_point["freq_mask"] == 8
    assert list(load_space("CEL2", tmp_path).of("waveform").distributions)[-1] == "noise_std"


# A value of every key a search space may search, other than the shipped first points' and
# defaults.yaml's: each must change what a trial trains (a key that changes nothing is a bug).
OTHER_VALUE = {
    "learning_rate": 0.01, "batch_size": 16, "optimizer": "sgd", "weight_decay": 0.05,
    "label_smoothing": 0.1, "mixup": 0.4, "scheduler": "cosine", "precision": "bf16",
    "nodes": 32, "hidden_layers": 2, "dropout_prob": 0.1, "dense_layers": 1, "pooling": "meanmax",
    "stem_kernel": 256, "stem_stride": 128,
    "n_fft": 1024, "hop_length": 512, "n_mels": 32, "f_min": 30.0, "top_db": 40.0,
    "freq_mask": 0, "time_mask": 0, "noise_std": 0.0,
}
IGNORED = {("spectrogram", "stem_kernel"), ("spectrogram", "stem_stride")}  # the waveform stem's
RATE, N = 22050, 32  # 32 one-second clips: batch sizes 16 and 32 differ


def _searchable(model: str, feature: str) -> list[str]:
    owners = config.hyper_sections(feature)
    owners["model"] = model_keys(model)
    return sorted(set().union(*owners.values()) - NOT_SEARCHABLE
                  - {key for f, key in IGNORED if f == feature})


@functools.lru_cache(maxsize=None)
def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    """Noise whose second half is near silence (so a top_db clamp bites), and labels."""
    noise = torch.randn(N, RATE, generator=torch.Generator().manual_seed(0))
    noise[:, RATE // 2:] *= 1e-5
    return noise, torch.arange(N) % 10


def _trial(model: str, feature: str, hyper: dict) -> list[torch.Tensor]:
    """What a trial of `hyper` computes, as trainable._train does it: its features (the
    front end `config.tuned` gives it), then two epochs of the shared loop with the batch
    augmentation; returns the features, the losses and the trained weights."""
    cfg = config.tuned(config.load(), hyper, feature)
    waves, labels = _clips()
    x = transforms.compute_feature(waves, feature, RATE, cfg.features.of(feature),
                                 transforms.unit_stats(feature))
    training.seed_everything(0)
    net = build_model(model, tuple(x.shape[1:]), 10, dataclasses.asdict(cfg.model))
    trainer = training.Trainer(net, (x, labels), (x, labels), cfg.training, n_classes=10, epochs=2,
                               transform=transforms.batch_augmentation(feature, cfg.batch_augment.of(feature)))
    losses = torch.tensor([m["train_loss"] for m in trainer.fit(2)])
    return [x, losses, *net.state_dict().values()]


def _differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) != len(b) or any(p.shape != q.shape or not torch.equal(p, q) for p, q in zip(a, b))


@functools.lru_cache(maxsize=None)
def _at_first_point(model: str, feature: str) -> tuple[dict, list[torch.Tensor]]:
    point = first_point(model, feature=feature)
    return point, _trial(model, feature, point)


def _value(cfg: config.Config, feature: str, key: str):
    """`key`'s value in the section of `cfg` that owns it for `feature`."""
    section = next(s for s, keys in config.hyper_sections(feature).items() if key in keys)
    return getattr(functools.reduce(getattr, section.split("."), cfg), key)


@pytest.mark.parametrize("model,feature,key", [
    (model, feature, key) for model in ("MLP", "MLP2", "CEL")  # CEL2, CEL3: CEL's class and space
    for feature in SHAPES for key in _searchable(model, feature)])
def test_every_key_a_space_may_search_changes_what_the_trial_trains(model, feature, key):
    point, base = _at_first_point(model, feature)
    was = _value(config.tuned(config.load(), point, feature), feature, key)
    assert OTHER_VALUE[key] != was, f"pick another OTHER_VALUE for {key}"
    assert _differ(base, _trial(model, feature, {**point, key: OTHER_VALUE[key]})), \
        f"{key}: {OTHER_VALUE[key]!r} trains the same as {was!r}"
