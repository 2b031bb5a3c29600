"""The plain pipeline end to end on a small embedded dataset: synthetic -> data ->
features -> model -> training, through the same loader as real GTZAN."""
from __future__ import annotations

import pytest
from torchaudio.datasets.gtzan import gtzan_genres

from genre_ray import data, synthetic
from genre_ray.config import defaults
from genre_ray.features import batch_augmentation, build_features
from genre_ray.models import build_model
from genre_ray.training import Trainer, seed_everything
from tests.helpers import run_module

TRACKS, SECONDS = 6, 15.0  # per genre: 4 train / 1 val / 1 test tracks of 3 segments


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "gtzan", TRACKS, seed=0,
                              seconds=SECONDS)


def test_embedded_dataset_goes_through_the_gtzan_loader(small):
    found = data.scan(small)
    assert found.root.name == "genres_original" and found.genres == list(gtzan_genres)
    assert len(found.tracks) == 10 * TRACKS and not found.ignored
    segs = data.load_segments(small, "random", seed=0)
    assert not segs.skipped
    assert [len(segs.splits[n].track_ids) for n in data.SPLITS] == [40, 10, 10]
    assert [len(segs.splits[n].labels) for n in data.SPLITS] == [120, 30, 30]


def test_a_short_cnn_run_beats_chance_by_a_wide_margin(small):
    """Val: 10 tracks x 3 segments. Chance is 0.10; segments of one track are correlated,
    so count tracks: with 10 independent guesses the chance of 4 or more right is
    P(Binomial(10, 0.1) >= 4) = 1.3 %, so 0.40 is a margin chance rarely reaches."""
    fs = build_features(small, "spectrogram")
    config = defaults("seed_configs")["CEL"]
    seed_everything(0)
    model = build_model("CEL", fs.input_shape, len(fs.classes), config)
    split = {n: (s.x, s.labels) for n, s in fs.splits.items()}
    trainer = Trainer(model, split["train"], split["val"], config, n_classes=10, epochs=8,
                      transform=batch_augmentation("spectrogram"))
    history = trainer.fit(8)
    assert max(m["val_acc"] for m in history) >= 0.40, history


def test_data_cli_on_the_embedded_dataset(small):
    out = run_module("genre_ray.data", str(small))
    assert out.returncode == 0, out.stderr
    assert "skipped 0 file(s)" in out.stdout
    assert all(genre in out.stdout for genre in gtzan_genres)
