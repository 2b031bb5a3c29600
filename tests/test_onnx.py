"""ONNX exports: one graph from raw segments to probabilities, run by onnxruntime alone,
matching the PyTorch path on real segments; `predict --runtime onnx` without torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from genre_ray import config, export, onnx_export
from genre_ray.features import build_feature_sets, probe_segments
from genre_ray.models import build_model
from genre_ray.onnx_runtime import OnnxModel
from genre_ray.training import Trainer, seed_everything
from tests.helpers import GENRES, REPO, arch, exported, make_tree, run_main, trial_config, write_tone

pytestmark = pytest.mark.slow  # trains three networks, and runs predict in two interpreters

# every layer kind the architectures use: conv 1-D and 2-D, batch norm, pooling, each
# activation, dropout, linear; both front ends. (An MLP on the raw samples of tones never
# generalises, a phase shift moves every sample; its graph is MLP2's behind CEL3's front end.)
PAIRS = [("CEL2", "spectrogram"), ("CEL3", "waveform"), ("MLP2", "spectrogram")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Each pair trained on tones until it tells them apart (confident predictions: a near
    tie would make "the same genre" a coin toss), exported as tune_main.py does."""
    root = tmp_path_factory.mktemp("onnx")
    tree = make_tree(root / "data", tracks=3, seconds=11.0)
    cfg = config.load()
    sets = build_feature_sets(tree, ["spectrogram", "waveform"], cfg, cache=root / "cache")
    probe = probe_segments(tree, cfg)
    paths = {}
    for model, feature in PAIRS:
        fs = sets[feature]
        seed_everything(0)
        net = build_model(model, fs.input_shape, len(fs.classes), arch(model))
        split = {name: (s.x, s.labels) for name, s in fs.splits.items()}
        trainer = Trainer(net, split["train"], split["val"], trial_config(model).training,
                          n_classes=len(fs.classes), epochs=40, device=torch.device("cpu"))
        history = trainer.fit(40, lambda m, _: m["val_acc"] == 1.0 and m["val_loss"] < 0.5)
        assert history[-1]["val_acc"] == 1.0, (model, feature, history[-1])
        saved = exported(fs, model, net.state_dict(), history[-1])
        pth = root / "models" / export.export_name(model, feature)
        saved.save([pth])
        onnx_path = pth.with_suffix(".onnx")
        assert onnx_export.export_onnx(saved, probe, [onnx_path]) is None
        paths[model, feature] = pth
    return {"root": root, "tree": tree, "probe": probe, "paths": paths}


def per_segment(model: OnnxModel, segments: torch.Tensor) -> np.ndarray:
    return model.session.run(["probabilities"], {"segments": segments.numpy()})[0]


def test_each_graph_matches_pytorch_on_real_segments_and_predicts_the_same_genres(exports):
    segments = exports["probe"]
    assert len(segments) >= 4 and segments.abs().max() > 0.1  # real audio, several tracks
    for pair, pth in exports["paths"].items():
        saved, graph = export.Exported.load(pth), OnnxModel.load(pth.with_suffix(".onnx"))
        with torch.no_grad():
            expected = onnx_export.served(saved)(segments).numpy()
        got = per_segment(graph, segments)
        assert got.shape == (len(segments), len(GENRES)), pair
        assert np.abs(got - expected).max() <= onnx_export.TOLERANCE, pair
        assert (got.argmax(1) == expected.argmax(1)).all(), pair
        # the torch runtime of predict (transforms.compute_feature, the training path) too
        mean = saved.probabilities(segments.numpy())
        assert np.abs(graph.probabilities(segments.numpy()) - mean).max() <= onnx_export.TOLERANCE


def test_a_graph_carries_what_serving_needs_in_its_metadata(exports):
    for (model, feature), pth in exports["paths"].items():
        saved, graph = export.Exported.load(pth), OnnxModel.load(pth.with_suffix(".onnx"))
        assert (graph.model, graph.feature, graph.classes) == (model, feature, saved.classes)
        assert (graph.sample_rate, graph.segment_seconds) == (saved.sample_rate, saved.segment_seconds)
        assert graph.val == saved.val
        meta = json.loads(graph.session.get_modelmeta().custom_metadata_map["genre_ray"])
        assert meta["feature_params"] == saved.feature_params and meta["hyper"] == saved.hyper
        assert meta["check"]["segments"] == len(exports["probe"])
        assert 0 <= meta["check"]["max_abs_diff"] <= onnx_export.TOLERANCE


def test_the_batch_dimension_is_dynamic(exports):
    graph = OnnxModel.load(exports["paths"]["CEL2", "spectrogram"].with_suffix(".onnx"))
    for n in (1, 3, 70):
        segments = exports["probe"].repeat(n, 1)[:n]
        assert per_segment(graph, segments).shape == (n, len(GENRES))


def test_a_graph_that_fails_its_check_is_not_written_and_says_why(exports, monkeypatch):
    pth = exports["paths"]["MLP2", "spectrogram"]
    target = exports["root"] / "kept" / "MLP2_spectrogram_best_model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"an earlier file")
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # no difference can pass
    why = onnx_export.export_onnx(export.Exported.load(pth), exports["probe"], [target])
    assert why and "differ from PyTorch's" in why and "tolerance -1" in why
    assert target.read_bytes() == b"an earlier file"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left


def predict(*args, runtime: str) -> tuple[subprocess.CompletedProcess, bool]:
    """`genre_ray.predict` with `--runtime`, and whether torch was imported by its end."""
    code = ("import sys\nfrom genre_ray import predict\ntry:\n    predict.main(sys.argv[1:])\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args), "--runtime", runtime],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    return out, "torch imported: True" in out.stderr


def test_predict_on_onnx_never_imports_torch_and_says_what_the_torch_path_says(exports):
    root = exports["root"]
    clips = [write_tone(root / "clips" / f"{g}.wav", 220.0 * (i + 1), 7.0) for i, g in enumerate(GENRES)]
    answers = {}
    for runtime in ("torch", "onnx"):
        out, torch_imported = predict(*clips, "--models-dir", root / "models", "--json", runtime=runtime)
        assert out.returncode == 0, out.stderr[-2000:]
        assert torch_imported == (runtime == "torch")
        answers[runtime] = json.loads(out.stdout)
    for a, b in zip(answers["torch"], answers["onnx"]):
        assert a["file"] == b["file"] and a["segments"] == b["segments"]
        assert [t["genre"] for t in a["top"]] == [t["genre"] for t in b["top"]]
        assert np.allclose([t["probability"] for t in a["top"]],
                           [t["probability"] for t in b["top"]], atol=onnx_export.TOLERANCE)
        assert b["model"].endswith(".onnx") and a["model"] == str(Path(b["model"]).with_suffix(".pth"))


def test_a_file_at_another_rate_is_resampled_to_the_same_answer(exports):
    clip = write_tone(exports["root"] / "clips" / "jazz44k.wav", 660.0, 7.0, rate=44100)
    model = exports["paths"]["CEL2", "spectrogram"]
    tops = {}
    for runtime, path in (("torch", model), ("onnx", model.with_suffix(".onnx"))):
        out = run_main("genre_ray.predict", clip, "--model", path, "--json", "--runtime", runtime)
        assert out.returncode == 0, out.stderr[-2000:]
        tops[runtime] = json.loads(out.stdout)[0]["top"]
    assert tops["torch"][0]["genre"] == tops["onnx"][0]["genre"]
    assert abs(tops["torch"][0]["probability"] - tops["onnx"][0]["probability"]) < 0.01


def test_a_foreign_or_broken_onnx_file_is_refused_with_the_fix(exports):
    root = exports["root"]
    node = onnx.helper.make_node("Identity", ["segments"], ["probabilities"])
    value = onnx.helper.make_tensor_value_info("segments", onnx.TensorProto.FLOAT, [None, 4])
    result = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 4])
    foreign = root / "foreign.onnx"
    graph = onnx.helper.make_graph([node], "g", [value], [result])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), foreign)
    broken = root / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    clip = write_tone(root / "clips" / "any.wav", 440.0, 6.0)
    for path, says in ((foreign, "is not a genre-ray model"), (broken, "is not an ONNX model"),
                       (exports["paths"]["MLP2", "spectrogram"], "is not a .onnx file")):
        out = run_main("genre_ray.predict", clip, "--model", path, "--runtime", "onnx")
        assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
        assert says in out.stderr and str(path) in out.stderr
