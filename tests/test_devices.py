"""Checkpoints and exports are device-neutral: a GPU trial's state, read by a driver that
has no GPU (the usual cluster head), loads on the CPU, and so does the export made of it.
Real files through the real loaders; the GPU is imitated by tagging the saved storages
`cuda:0`, which is what torch.save writes for a CUDA tensor."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.serialization
from ray import tune

from genre_ray import config, export, trainable
from genre_ray.features import build_features
from genre_ray.models import build_model
from genre_ray.training import Trainer
from tests.helpers import arch, exported, make_tree, trial_config


@contextlib.contextmanager
def saved_as_cuda():
    """torch.save inside tags every storage `cuda:0`, as a GPU trial's save does."""
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization._package_registry.insert(0, entry)  # first: before the CPU tagger
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("data"), tracks=3, seconds=6.0)
    return build_features(root, "spectrogram", config.load(), cache=tmp_path_factory.mktemp("cache"))


def test_a_gpu_trials_checkpoint_exports_to_a_file_a_cpu_machine_loads(fs, tmp_path):
    model = build_model("CEL", fs.input_shape, len(fs.classes), arch("CEL"))
    trainer = Trainer(model, (fs.splits["train"].x, fs.splits["train"].labels),
                      (fs.splits["val"].x, fs.splits["val"].labels), trial_config("CEL").training,
                      n_classes=len(fs.classes), epochs=1)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    with saved_as_cuda():
        torch.save({"trainer": trainer.state_dict(), "val_loss": 1.0}, folder / trainable.STATE_FILE)
    if not torch.cuda.is_available():  # the file really is a CUDA one: a plain load refuses it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(folder / trainable.STATE_FILE, weights_only=True)

    state = trainable.load_trial_state(tune.Checkpoint.from_directory(folder))
    tensors = [t for t in state["trainer"]["model"].values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)

    path = tmp_path / export.export_name("CEL", "spectrogram")
    exported(fs, "CEL", state["trainer"]["model"]).save([path])
    loaded = torch.load(path, weights_only=True)  # README's load, on a machine without CUDA
    assert all(t.device.type == "cpu" for t in loaded["state_dict"].values())
    rebuilt = export.Exported.load(path).rebuild()
    assert math.isfinite(rebuilt(fs.splits["test"].x[:2]).sum().item())
