"""Stage training: the plain loop, by property (no Ray)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from genre_ray import config, training
from genre_ray.errors import UserError
from genre_ray.features import build_features
from genre_ray.models import build_model
from genre_ray.training import Diverged, Trainer, evaluate
from genre_ray.transforms import batch_augmentation
from tests.helpers import make_tree, run_main, trial_config

CONFIG = {"learning_rate": 0.001, "batch_size": 8, "nodes": 16, "hidden_layers": 2,
          "dropout_prob": 0.1, "dense_layers": 1}


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Spectrograms of three genres of distinct tones: an easy, learnable task."""
    root = make_tree(tmp_path_factory.mktemp("tones"), tracks=3, seconds=11.0)
    return build_features(root, "spectrogram", config.load(), cache=tmp_path_factory.mktemp("cache"))


def _trainer(fs, model="CEL", epochs=4, seed=0, **hyper) -> Trainer:
    training.seed_everything(seed)
    cfg = trial_config(model, **{**CONFIG, **hyper})
    net = build_model(model, fs.input_shape, len(fs.classes), dataclasses.asdict(cfg.model))
    split = {n: (s.x, s.labels) for n, s in fs.splits.items()}
    return Trainer(net, split["train"], split["val"], cfg.training, n_classes=len(fs.classes),
                   epochs=epochs, seed=seed,
                   transform=batch_augmentation(fs.feature, cfg.batch_augment.of(fs.feature)))


def test_batches_cover_every_index_once():
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat(list(training.batches(23, 5, gen)))
    assert sorted(idx.tolist()) == list(range(23)) and idx.tolist() != list(range(23))
    assert [len(b) for b in training.batches(23, 5)] == [5, 5, 5, 5, 3]


def test_evaluate_is_batch_size_invariant_and_consistent(tones):
    trainer = _trainer(tones)
    x, y = tones.splits["val"].x, tones.splits["val"].labels
    small, big = evaluate(trainer.model, x, y, 3, batch_size=1), evaluate(trainer.model, x, y, 3)
    assert small.loss == pytest.approx(big.loss, rel=1e-5)
    assert torch.allclose(small.probs, big.probs, atol=1e-5)
    assert big.confusion.sum() == len(y)
    assert big.confusion.trace().item() / len(y) == pytest.approx(big.accuracy)
    assert torch.equal(big.confusion.sum(dim=1), torch.bincount(y, minlength=3))  # rows = truth
    assert torch.allclose(big.probs.sum(dim=1), torch.ones(len(y)))


@pytest.mark.parametrize("model", ["MLP", "CEL"])
def test_a_learnable_task_is_learned(tones, model):
    trainer = _trainer(tones, model=model, epochs=8, learning_rate=0.003)
    history = trainer.fit(8)
    assert [m["epoch"] for m in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] == 1.0  # three pure tones a whole octave apart


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_and_bf16_still_learns(tones, precision, dtype):
    trainer = _trainer(tones, epochs=8, learning_rate=0.003, precision=precision)
    seen = set()  # (training mode, logits dtype) of every forward pass
    trainer.model.register_forward_hook(lambda net, args, out: seen.add((net.training, out.dtype)))
    history = trainer.fit(8)
    assert seen == {(True, dtype), (False, dtype)}  # training and evaluation alike
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] == 1.0
    assert trainer.evaluate().probs.dtype == torch.float32


@pytest.mark.parametrize("key, value, says", [
    ("precision", "fp16", "'fp32' or 'bf16'"), ("optimizer", "rmsprop", "'adam', 'adamw' or 'sgd'"),
    ("scheduler", "step", "'none', 'plateau' or 'cosine'")])
def test_unknown_precision_optimizer_or_scheduler_is_a_user_error(tones, key, value, says):
    """The training section's types refuse them, before any Trainer is built."""
    with pytest.raises(UserError, match=rf"^training\.{key}: input should be {says}, got '{value}'$"):
        _trainer(tones, **{key: value})


def test_same_seed_same_run_and_resume_continues_exactly(tones):
    # MLP2: dropout and batch norm, so RNG and running statistics must be restored too
    straight = _trainer(tones, model="MLP2", seed=3).fit(4)
    assert _trainer(tones, model="MLP2", seed=3).fit(4) == straight
    first = _trainer(tones, model="MLP2", seed=3)
    first.fit(2)
    state = first.state_dict()
    resumed = _trainer(tones, model="MLP2", seed=99)  # other init: all must come from state
    resumed.load_state_dict(state)
    assert resumed.fit(4) == straight[2:]


def test_track_accuracy_averages_probabilities_not_votes():
    # track 0, truth 0: two segments lean weakly to class 1, one is sure of class 0.
    # Voting says 1; the mean probability says 0. Track 1, truth 1: plainly right.
    probs = torch.tensor([[0.45, 0.55], [0.45, 0.55], [0.99, 0.01], [0.2, 0.8]])
    track, labels = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 1])
    assert training.track_accuracy(probs, track, labels) == 1.0
    assert training.track_accuracy(probs, track, torch.tensor([1, 1, 1, 1])) == 0.5


def test_on_epoch_can_stop_and_sees_the_evaluation(tones):
    seen = []
    history = _trainer(tones, model="MLP").fit(5, lambda m, ev: seen.append(ev.confusion.sum()) or m["epoch"] == 2)
    assert len(history) == 2 and seen == [len(tones.splits["val"].labels)] * 2


def test_diverging_loss_raises(tones):
    trainer = _trainer(tones, model="MLP", learning_rate=1e12, optimizer="sgd")
    with pytest.raises(Diverged, match="lower the learning rate"):
        trainer.fit(3)


def test_cosine_schedule_decays_the_learning_rate(tones):
    history = _trainer(tones, model="MLP2", epochs=4, scheduler="cosine",
                       learning_rate=0.01).fit(4)
    lrs = [m["lr"] for m in history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


def test_plateau_schedule_halves_the_rate_when_val_loss_stalls(tones):
    # MLP (no dropout, no batch norm) at a negligible rate: the val loss cannot improve
    history = _trainer(tones, model="MLP", epochs=5, scheduler="plateau", optimizer="sgd",
                       learning_rate=1e-7).fit(5)
    assert history[0]["lr"] == 1e-7 and history[-1]["lr"] == pytest.approx(5e-8)


def test_label_smoothing_reaches_the_training_loss_only(tones):
    """MLP has no dropout: with the rate at zero the two runs see the same model, so the
    training losses differ by the smoothing alone and the validation losses not at all."""
    plain, smoothed = (_trainer(tones, model="MLP", epochs=1, learning_rate=1e-12,
                                label_smoothing=s).fit(1)[0] for s in (0.0, 0.2))
    assert smoothed["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-3)
    assert smoothed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_mixup_blends_pairs_of_the_batch_and_weights_their_labels():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, 5), torch.arange(6)
    same, [(weight, labels)] = training.mixed(x, y, 0.0)
    assert same is x and weight == 1.0 and labels is y
    out, [(lam, first), (rest, second)] = training.mixed(x, y, 0.4)
    assert torch.equal(first, y) and sorted(second.tolist()) == y.tolist() and 0 < lam < 1
    assert lam + rest == pytest.approx(1.0) and not torch.equal(second, y)
    assert torch.allclose(out, lam * x + rest * x[second])  # the label says which item was mixed in


def test_mixup_reaches_the_training_loss_only(tones):
    """As label smoothing: at a zero rate MLP's model stays put, so only the training loss moves."""
    plain, mixed = (_trainer(tones, model="MLP", epochs=1, learning_rate=1e-12,
                             mixup=alpha).fit(1)[0] for alpha in (0.0, 0.4))
    assert mixed["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-3)
    assert mixed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_adamw_decays_weights_apart_from_the_gradient(tones):
    trainer = _trainer(tones, model="MLP", optimizer="adamw", weight_decay=0.1)
    assert type(trainer.optimizer) is torch.optim.AdamW
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(1)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_data_is_resident_on_the_gpu(tones):
    trainer = _trainer(tones)
    assert trainer.train_xy[0].is_cuda and trainer.val_xy[0].is_cuda
    assert trainer.fit(1)[0]["epoch"] == 1


def test_cli_trains_one_model_and_reports_user_errors(tmp_path):
    root = make_tree(tmp_path / "tree", tracks=3, seconds=6.0)
    ok = run_main("genre_ray.training", "--data-dir", root, "--model", "MLP",
                  "--feature", "waveform", "--epochs", "1")
    assert ok.returncode == 0, ok.stderr
    assert "epoch   1" in ok.stdout and "val_acc" in ok.stdout
    bad = run_main("genre_ray.training", "--data-dir", root, "--model", "RNN")
    assert bad.returncode == 2 and "unknown model 'RNN'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_trainers_state_round_trips_every_rng_it_uses(tones):
    """Shuffling (the trainer's generator), dropout/masks/noise (torch's global RNG on the
    CPU, and the trainer's GPU's when it trains on one): each restored draws what it drew
    before."""
    trainer = _trainer(tones)
    state = trainer.state_dict()
    assert set(state) >= {"generator", "torch_rng", "cuda_rng"}
    assert (state["cuda_rng"] is None) == (trainer.device.type == "cpu")  # no CUDA context for a CPU trial

    def draws():
        cuda = torch.rand(3, device=trainer.device).tolist() if trainer.device.type == "cuda" else []
        return torch.rand(3, generator=trainer.generator).tolist(), torch.rand(3).tolist(), cuda

    before = draws()
    assert draws() != before  # the RNGs moved on
    trainer.load_state_dict(state)
    assert draws() == before


def test_a_trial_runs_on_the_cpu_unless_ray_assigned_it_a_gpu(monkeypatch):
    """The pinned Ray leaves CUDA_VISIBLE_DEVICES alone for a worker given no GPU, so CUDA
    being visible must not decide: the assignment does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as a CPU trial sees it
    assert training.pick_device([]) == torch.device("cpu")
    assert training.pick_device(["3"]) == torch.device("cuda", 0)  # Ray made GPU 3 the only one visible
    assert training.pick_device(None) == torch.device("cuda")  # outside Ray: CUDA when present


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_gpu_assignment_torch_cannot_use_is_a_user_error():
    with pytest.raises(UserError, match=r"GPU 0 but PyTorch sees no CUDA device.*--gpus-per-trial 0"):
        training.pick_device([0])
