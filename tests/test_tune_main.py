"""The main job as a user runs it: `python tune_main.py ...` on tiny data, real Ray,
real Optuna, real W&B offline; then what it leaves behind."""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import matplotlib.image
import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from genre_ray import config, export, onnx_export, report
from genre_ray.features import build_variants
from genre_ray.search_space import load_space
from genre_ray.training import evaluate, track_accuracy
from tests.helpers import ONE_SLOT, REPO, make_tree, closed_port, read_runs, record_of

pytestmark = pytest.mark.slow  # a whole tune_main run

PAIRS = [("MLP", "spectrogram"), ("CEL", "spectrogram")]
# Tune's ERROR line and traceback when its background sync of the experiment folder loses a
# file it is renaming (a tmp-search_gen_state-*.json): Tune's, and it syncs again.
TUNE_SYNC_RACE = re.compile(r"Saving experiment state to storage at '[^']*' failed with exception: ?\n"
                            r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*")


def tune_main(*args: str, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tune_main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One real run: 2 pairs x 3 trials x up to 3 epochs on three genres of tones, from a
    folder with a W&B key in its .env, on a laptop with no network (`--wandb auto`, the
    default): it logs offline."""
    base = tmp_path_factory.mktemp("job")
    data = make_tree(base / "data", tracks=3, seconds=11.0)
    (base / ".env").write_text("WANDB_API_KEY=" + "k" * 40 + "\n")
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"},
           "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    args = ["--data-dir", str(data), "--models", "MLP", "CEL", "--features", "spectrogram",
            "--num-samples", "3", "--max-epochs", "3", "--storage-path", str(base / "runs"),
            "--name", "job", "--output-dir", str(base / "best"), "--wandb", "auto",
            *ONE_SLOT]
    out = tune_main(*args, cwd=base, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return base, data, out


def test_a_key_in_env_and_no_network_logs_offline_and_finishes(job):
    """Its summary run cannot fail the run with CommError (exit 1, the record left `running`).
    No traceback either, but the one Tune logs when a state file it is renaming vanishes
    under its own background sync (it syncs again)."""
    base, _, out = job
    own = TUNE_SYNC_RACE.sub("", out.stderr)
    assert "logging offline instead" in out.stdout and "Traceback" not in own and "CommError" not in own
    assert record_of(base / "runs" / "job")["status"] == "finished"
    assert list((base / "runs" / "job" / "wandb").glob("offline-run-*"))


def features_of(data, saved: export.Exported):
    """The feature set `saved` was trained on: its own front end (a searched key may change it)."""
    [fs] = build_variants(data, [(saved.feature, saved.feature_params)], config.load()).values()
    return fs


def test_exports_load_safely_and_reproduce_the_reported_val_accuracy(job):
    base, data, _ = job
    for model, feature in PAIRS:
        path = base / "best" / export.export_name(model, feature)
        assert torch.load(path, weights_only=True)["model"] == model  # plain data, no code
        saved = export.Exported.load(path)
        fs = features_of(data, saved)
        assert saved.model == model and saved.classes == fs.classes
        result = evaluate(saved.rebuild(), fs.splits["val"].x, fs.splits["val"].labels, len(fs.classes))
        assert result.accuracy == pytest.approx(saved.val["val_acc"], abs=1e-6)
        assert result.loss == pytest.approx(saved.val["val_loss"], rel=1e-4)
        assert (base / "runs" / "job" / "best_models" / path.name).is_file()  # the run's copy


def test_each_pair_has_a_study_with_the_first_point_first(job):
    base, _, _ = job
    storage = JournalStorage(JournalFileBackend(str(base / "runs" / "job" / "optuna.journal")))
    for model, feature in PAIRS:
        study = optuna.load_study(study_name=f"job/{model}_{feature}", storage=storage)
        assert len(study.trials) == 3
        assert study.trials[0].params == load_space(model).of(feature).first_point
        for t in study.trials:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            assert (t.state == TrialState.PRUNED) == (max(t.intermediate_values) < 3)


def test_summary_names_every_pair_and_export(job):
    base, _, out = job
    for model, feature in PAIRS:
        line = next(l for l in out.stdout.splitlines() if l.startswith(f"{model}_{feature} "))
        assert f"{base / 'best' / export.export_name(model, feature)} + .onnx" in line
        onnx_name = onnx_export.onnx_name(model, feature)
        assert (base / "best" / onnx_name).read_bytes() == \
            (base / "runs" / "job" / "best_models" / onnx_name).read_bytes()
    assert "wandb sync" in out.stdout


def test_summary_reports_slot_utilisation_from_the_trials_own_times(job):
    base, _, out = job
    found = re.search(r"tuning took (\d+) s on (\d+) trial slots, busy (\d+)% of the time", out.stdout)
    assert found, out.stdout[-2000:]
    wall, slots, busy_pct = map(int, found.groups())
    busy = sum(json.loads(f.read_text().splitlines()[-1])["time_total_s"]
               for f in (base / "runs" / "job").glob("*/result.json"))
    assert busy > 0 and 0 < busy_pct <= 100
    assert busy_pct == pytest.approx(100 * busy / (wall * slots), rel=0.15)  # wall printed rounded


def test_exports_carry_scores_on_a_test_split_no_trial_saw(job):
    base, data, _ = job
    for model, feature in PAIRS:
        saved = export.Exported.load(base / "best" / export.export_name(model, feature))
        fs = features_of(data, saved)
        ids = {name: set(part.track_ids) for name, part in fs.splits.items()}
        assert ids["test"] and not ids["test"] & (ids["train"] | ids["val"])
        test = fs.splits["test"]
        result = evaluate(saved.rebuild(), test.x, test.labels, len(fs.classes))
        assert saved.test["accuracy"] == pytest.approx(result.accuracy)
        assert saved.test["track_accuracy"] == pytest.approx(
            track_accuracy(result.probs, test.track, test.labels))
        assert 0 <= saved.test["macro_f1"] <= 1


def test_leaderboard_has_a_row_per_pair_ranked_by_test_track_accuracy(job):
    base, _, out = job
    run = base / "runs" / "job"
    with open(run / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.COLUMNS
    assert sorted(r["pair"] for r in rows) == sorted(f"{m}_{f}" for m, f in PAIRS)
    track = [float(r["test_track_acc"]) for r in rows]
    assert track == sorted(track, reverse=True)
    for r in rows:
        saved = export.Exported.load(base / "best" / f"{r['pair']}_best_model.pth")
        assert float(r["test_track_acc"]) == pytest.approx(saved.test["track_accuracy"])
        assert json.loads(r["config"]) == saved.hyper and int(r["params"]) > 0
        assert r["pareto"] in ("yes", "no") and float(r["latency_ms"]) > 0  # its measured cost
        assert int(r["finished"]) + int(r["pruned"]) == 3
    md = (run / "leaderboard.md").read_text()
    for key in ("dataset", "split", "seed", "hardware", "libraries", "wall time"):
        assert f"- {key}: " in md
    assert report.table([]).splitlines()[0] in md and report.table([]).splitlines()[0] in out.stdout


def test_leaderboard_sets_each_pairs_winner_beside_its_first_point_with_importances(job):
    """The first point is the trial run at the search space's first_point: its best val loss,
    from the trial's own results, and whether it is the exported winner."""
    base, _, _ = job
    run = base / "runs" / "job"
    with open(run / "leaderboard.csv", newline="") as f:
        rows = {r["pair"]: r for r in csv.DictReader(f)}
    for model, feature in PAIRS:
        row, space = rows[f"{model}_{feature}"], load_space(model).of(feature)
        trials = {p.parent: json.loads(p.read_text()) for p in run.glob(f"{model}_{feature}_*/params.json")}
        [folder] = [d for d, c in trials.items() if {k: c[k] for k in space.first_point} == space.first_point]
        losses = [json.loads(line)["val_loss"] for line in (folder / "result.json").read_text().splitlines()]
        assert float(row["first_point_val_loss"]) == pytest.approx(min(losses))
        assert row["winner"] == ("first point" if folder.name.endswith(row["trial_id"]) else "searched")
        importance = json.loads(row["importance"])
        assert set(importance) == set(space.distributions) and sum(importance.values()) == pytest.approx(1, abs=0.01)


def test_plots_are_valid_images_of_sensible_size(job):
    base, _, _ = job
    plots = base / "runs" / "job" / "plots"
    expected = {f"{m}_{f}_{kind}.png" for m, f in PAIRS for kind in ("confusion", "curves")}
    assert {p.name for p in plots.glob("*.png")} == expected | {"comparison.png", "search.png", "importance.png", "pareto.png"}
    for png in plots.glob("*.png"):
        height, width = matplotlib.image.imread(png).shape[:2]
        assert 300 <= width <= 5000 and 300 <= height <= 5000, png.name


def test_wandb_summary_run_holds_the_leaderboard_and_plots(job):
    base, _, _ = job
    runs = read_runs(base / "runs" / "job")
    (folder, summary), = [(f, r) for f, r in runs.values() if r["group"] == "summary"]
    assert summary["exit"]["exit_code"] == 0
    table = json.loads((folder / "files" / summary["summary"]["leaderboard.path"]).read_text())
    assert table["columns"] == report.COLUMNS and len(table["data"]) == len(PAIRS)
    images = {k for k in summary["summary"] if k.startswith("plots/") and k.endswith(".path")}
    assert len(images) == len(PAIRS) * 2 + 4  # + comparison, search, importance, pareto
    pareto = json.loads((folder / "files" / summary["summary"]["pareto.path"]).read_text())
    with open(base / "runs" / "job" / "pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    assert pareto["columns"] == report.PARETO_COLUMNS and len(pareto["data"]) == len(front) >= 1


def test_each_pairs_export_is_a_wandb_model_artifact_of_the_summary_run(job):
    base, _, _ = job
    (summary,) = [r for _, r in read_runs(base / "runs" / "job").values() if r["group"] == "summary"]
    models = {a["name"]: a for a in summary["artifacts"] if a["type"] == "model"}
    with open(base / "runs" / "job" / "leaderboard.csv", newline="") as f:
        rows = {row["pair"]: row for row in csv.DictReader(f)}
    assert set(models) == {f"{m}_{f}" for m, f in PAIRS}
    for pair, artifact in models.items():
        assert {"best", "job"} <= set(artifact["aliases"])
        metadata = json.loads(artifact["metadata"])
        assert metadata["trial_id"] == rows[pair]["trial_id"] and metadata["pair"] == pair
        entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
        assert set(entries) == {f"{pair}_best_model.pth", f"{pair}_best_model.onnx"}
        for name, entry in entries.items():
            data = (base / "best" / name).read_bytes()
            assert entry["digest"] == base64.b64encode(hashlib.md5(data).digest()).decode()
            assert int(entry["size"]) == len(data)
