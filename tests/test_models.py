"""Properties of genre_ray.models: shapes, gradients, sizes, registry and config checks."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from genre_ray import config
from genre_ray.errors import UserError
from genre_ray.models import MODELS, ConvNet, build_model, count_parameters, model_keys
from tests.helpers import arch

# Every architecture key at the original notebook's settings (the waveform stem's: defaults.yaml's);
# what a trial of each model builds at its first point (held equal below).
SEED_CONFIG = {"nodes": 64, "hidden_layers": 3, "dropout_prob": 0.3, "dense_layers": 2,
               "stem_kernel": 512, "stem_stride": 256, "pooling": "mean"}
SHAPES = {"waveform": (110250,), "spectrogram": (64, 216)}
CNNS = ["CEL", "CEL2", "CEL3"]
# MLP on waveforms is 110250*64 + 64*64 + 64*10 (+ biases) ~ 7.06M parameters by design;
# MLP2 adds BatchNorm and two 64x64 blocks. Everything else must stay far smaller: the
# CNNs pool globally, so their size does not grow with the input (the notebook's heads had 100M).
MAX_PARAMS = {"MLP": 10_000_000, "MLP2": 10_000_000,
              "CEL": 200_000, "CEL2": 200_000, "CEL3": 200_000}


def batch(shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("feature", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_size_at_seed_settings(name, feature):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[feature], 10, SEED_CONFIG)
    out = model(batch(SHAPES[feature]))
    assert out.shape == (4, 10)
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert count_parameters(model) < MAX_PARAMS[name]


def test_seed_settings_are_each_models_first_point():
    assert all(arch(name) == SEED_CONFIG for name in MODELS)


def test_mlp_matches_the_seed():
    model = build_model("MLP", (110250,), 10, SEED_CONFIG)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(110250, 64), (64, 64), (64, 10)]


def test_cel_family_is_one_class_differing_only_by_activation():
    torch.manual_seed(0)
    models = {n: build_model(n, (64, 216), 10, SEED_CONFIG) for n in CNNS}
    assert all(type(m) is ConvNet for m in models.values())
    skeletons = {n: [type(x) for x in m.modules() if not _is_activation(x)]
                 for n, m in models.items()}
    assert skeletons["CEL"] == skeletons["CEL2"] == skeletons["CEL3"]
    acts = {n: {type(x) for x in m.modules() if _is_activation(x)} for n, m in models.items()}
    assert acts == {"CEL": {nn.ReLU}, "CEL2": {nn.LeakyReLU}, "CEL3": {nn.ELU}}
    slopes = {x.negative_slope for x in models["CEL2"].modules() if isinstance(x, nn.LeakyReLU)}
    assert slopes == {0.1}


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.ELU))


@pytest.mark.parametrize("name", ["MLP2", *CNNS])
def test_dropout_prob_reaches_every_dropout(name):
    model = build_model(name, (32, 40), 10, arch(name, dropout_prob=0.42))
    probs = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert probs and all(p == 0.42 for p in probs)


@pytest.mark.parametrize("shape, conv", [((2000,), nn.Conv1d), ((32, 40), nn.Conv2d)])
def test_layer_counts_follow_config(shape, conv):
    def count(name, kind, **cfg):
        model = build_model(name, shape, 10, arch(name, **cfg))
        return sum(isinstance(m, kind) for m in model.modules())

    stem = 1 if conv is nn.Conv1d else 0
    assert [count("CEL", conv, hidden_layers=h) for h in (1, 2, 5)] == [h + stem for h in (1, 2, 5)]
    assert [count("CEL", nn.Linear, dense_layers=d) for d in (0, 1, 3)] == [1, 2, 4]
    assert [count("MLP2", nn.BatchNorm1d, hidden_layers=h) for h in (1, 4)] == [1, 4]


def test_conv_widths_double_up_to_nodes():
    model = build_model("CEL", (32, 40), 10, arch("CEL", nodes=128, hidden_layers=4))
    assert _conv_widths(model) == [16, 32, 64, 128]
    assert _conv_widths(build_model("CEL", (32, 40), 10, arch("CEL", nodes=4))) == [4, 4, 4]


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("shape", [(1,), (2, 3), (1, 1)])
def test_tiny_inputs_never_pool_below_one(shape):
    model = build_model("CEL", shape, 10, arch("CEL", hidden_layers=6, stem_kernel=1,
                                                stem_stride=1)).eval()
    assert model(batch(shape)).shape == (4, 10)


@pytest.mark.parametrize("feature", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_eval_batch_equals_per_item_and_seed_determines_output(name, feature):
    shape = (4000,) if feature == "waveform" else (32, 40)
    x = batch(shape)
    torch.manual_seed(3)
    model = build_model(name, shape, 10, SEED_CONFIG).eval()
    torch.manual_seed(3)
    twin = build_model(name, shape, 10, SEED_CONFIG).eval()
    with torch.no_grad():
        whole = model(x)
        items = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        assert torch.allclose(whole, items, atol=1e-5)
        assert torch.equal(whole, twin(x))


def test_other_keys_are_ignored_and_model_keys_are_listed():
    others = {"optimizer": "sgd", "weight_decay": 1e-4, "scheduler": "cosine",
              "learning_rate": 0.001, "batch_size": 32, "dropout_p": 0.5}
    assert isinstance(build_model("MLP", (8,), 3, {**SEED_CONFIG, **others}), nn.Module)
    assert model_keys("MLP") == {"nodes"}
    assert model_keys("MLP2") == {"nodes", "hidden_layers", "dropout_prob"}
    assert model_keys("CEL3") == model_keys("CEL") >= {"dense_layers", "stem_kernel", "stem_stride"}


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown model 'CNN'.*MLP, MLP2, CEL, CEL2, CEL3"):
        build_model("CNN", (8,), 10, {})
    with pytest.raises(UserError, match="CNN"):
        model_keys("CNN")


def test_missing_model_keys_are_named():
    with pytest.raises(UserError, match=r"^model MLP2 needs config key\(s\) dropout_prob, hidden_layers$"):
        build_model("MLP2", (8,), 10, {"nodes": 64, "dropout_p": 0.5})


def test_unknown_model_key_is_named_by_the_configuration():
    """build_model ignores keys it does not take; a misspelt key is the config's error."""
    with pytest.raises(UserError, match=r"unknown hyperparameter 'dropout_p'.*\bdropout_prob\b"):
        config.tuned(config.load(), {"dropout_p": 0.5})
    with pytest.raises(UserError, match=r"^model\.dropout_p: unknown setting"):
        config.replaced(config.load(), {"model.dropout_p": 0.5})


@pytest.mark.parametrize("key, value", [
    ("nodes", 0), ("nodes", 64.0), ("hidden_layers", 0), ("dense_layers", -1),
    ("dropout_prob", 1.0), ("dropout_prob", -0.1), ("dropout_prob", True),
    ("stem_stride", 0), ("stem_kernel", "64")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(UserError, match=rf"^model\.{key}: input should be .*, got {re.escape(repr(value))}$"):
        build_model("CEL", (64, 216), 10, {**SEED_CONFIG, key: value})


def test_bad_shapes_raise_user_error():
    with pytest.raises(UserError, match="stem_kernel=512"):
        build_model("CEL", (10,), 10, SEED_CONFIG)
    with pytest.raises(UserError, match=r"\(2, 3, 4\)"):
        build_model("CEL2", (2, 3, 4), 10, SEED_CONFIG)


@pytest.mark.parametrize("feature", SHAPES)
def test_meanmax_pooling_feeds_the_head_the_maps_peak_too(feature):
    """pooling: meanmax doubles what the head reads per channel, and the max reaches it: two
    inputs whose maps have the same mean and different peaks give different logits."""
    torch.manual_seed(0)
    mean, meanmax = (build_model("CEL", SHAPES[feature], 10, {**SEED_CONFIG, "pooling": p}).eval()
                     for p in ("mean", "meanmax"))
    first = lambda m: next(l for l in m.head.modules() if isinstance(l, torch.nn.Linear))
    assert first(meanmax).in_features == 2 * first(mean).in_features
    maps = torch.zeros(2, 8, 5)
    maps[0, :, 2] = 5.0  # one peak
    maps[1] = 1.0  # the same mean, spread out
    pooled = meanmax.pool(maps)
    assert torch.equal(pooled[0, :8], pooled[1, :8]) and not torch.equal(pooled[0, 8:], pooled[1, 8:])


def test_an_export_from_before_pooling_rebuilds_as_it_was_trained():
    older = {k: v for k, v in SEED_CONFIG.items() if k != "pooling"}
    torch.manual_seed(0)
    before = build_model("CEL", SHAPES["spectrogram"], 10, older)
    torch.manual_seed(0)
    now = build_model("CEL", SHAPES["spectrogram"], 10, SEED_CONFIG)
    x = batch(SHAPES["spectrogram"])
    assert torch.equal(before.eval()(x), now.eval()(x))

