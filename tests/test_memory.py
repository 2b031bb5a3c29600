"""Memory: trials share the node's one copy of the features and never see the test split;
the preflight refuses what cannot fit before anything is written; a trial that Ray's memory
monitor kills is a failed trial, and the run exports the others."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from genre_ray import capacity, cluster, config, export
from genre_ray.errors import UserError
from genre_ray.features import FeatureSet, FeatureSplit, as_configured, estimated_bytes
from genre_ray.search_space import SPACES_DIR
from genre_ray.trainable import share, tensors
from tests.helpers import REPO, make_tree

MB = 1 << 20
GB = capacity.GB
MEMORY = config.load().memory


def _need(data: dict[str, int], trial: int, cpus: float, gpus: float) -> capacity.Need:
    """A Need whose object store holds `data` with defaults.yaml's headroom, as need() sizes it."""
    return capacity.Need(data, trial, cpus, gpus, int(sum(data.values()) * MEMORY.store_headroom))


def _rss_anon() -> int:
    """This process's private resident memory (bytes): what a copy of the data would grow."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@ray.remote
def _touch_all(ref_list: list) -> dict:
    """In a Ray worker, as a trial does: fetch the data, view it as tensors, read every byte."""
    before = _rss_anon()
    data = ray.get(ref_list[0])
    x, y = tensors(data.train)
    total = float(x.double().sum())  # reads every page
    arrays = [a for part in (data.train, data.val) for a in part]
    return {"growth": _rss_anon() - before, "sum": total, "bytes": sum(a.nbytes for a in arrays),
            "writable": any(a.flags.writeable for a in arrays)}


@ray.remote
def _touch_tensor(ref_list: list) -> int:
    """The same read of a torch tensor put as it is: Ray copies it into the reader."""
    before = _rss_anon()
    x = ray.get(ref_list[0])
    float(x.double().sum())
    return _rss_anon() - before


def _feature_set(train_mb: int, test_mb: int) -> FeatureSet:
    def split(mb: int, fill: float) -> FeatureSplit:
        x = torch.full((mb * MB // (1024 * 4), 1024), fill)
        n = len(x)
        return FeatureSplit(x, torch.zeros(n, dtype=torch.long), torch.arange(n), [f"t{i}" for i in range(n)])

    return FeatureSet("waveform", ["a", "b"], {"train": split(train_mb, 1.0), "val": split(8, 2.0),
                                               "test": split(test_mb, 3.0)}, {}, {})


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=1 * GB)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_trial_reads_the_nodes_copy_of_its_data_without_copying_it(local_ray):
    fs = _feature_set(train_mb=300, test_mb=100)
    seen = ray.get(_touch_all.remote([share(fs)]))
    assert seen["sum"] == fs.splits["train"].x.numel()  # every value read, all 1.0
    assert seen["growth"] < 30 * MB, seen  # 300 MB read: a copy would grow it by >= 300 MB
    assert not seen["writable"]  # views of the shared object store, not private copies
    # the test split never reaches a trial: only train + val bytes are in the trial's data
    assert seen["bytes"] == sum(fs.splits[n].x.nbytes + fs.splits[n].labels.nbytes
                                for n in ("train", "val"))
    copied = ray.get(_touch_tensor.remote([ray.put(fs.splits["train"].x)]))
    assert copied > 250 * MB  # the measure sees a copy where there is one (docs/design.md#pitfall-object-store-zero-copy)


NODE = {"Alive": True, "Resources": {"CPU": 8, "memory": 32 * GB, "object_store_memory": 16 * GB}}


def _node(**resources: float) -> dict:
    return {"Alive": True, "Resources": {**NODE["Resources"], **resources}}


@pytest.mark.parametrize("nodes,cpus,gpus,trial_gb,expected", [
    ([NODE], 1, 0, 2, 8),                                   # CPUs bound
    ([NODE], 1, 0, 8, 4),                                   # memory bound: 32 GB / 8
    ([_node(CPU=4, GPU=0), _node(GPU=8, CPU=32)], 1, 0.25, 1, 32),  # a CPU-only head runs none
    ([_node(GPU=8, CPU=32), _node(GPU=8, CPU=32)], 1, 0.3, 1, 52),  # 26 per node (8 // 0.3)
    ([_node(CPU=2), {"Alive": False, "Resources": NODE["Resources"]}], 1, 0, 1, 2),  # dead nodes
    ([_node(GPU=1, CPU=32)], 1, 0.1, 1, 10),                # Ray's 1/10,000ths: not float 1 // 0.1 = 9
    ([_node(CPU=16, GPU=0), _node(GPU=8, CPU=16)], 2, 0, 1, 16),  # CPU trials: every node's CPUs
    ([_node(CPU=64, GPU=0), _node(GPU=8, CPU=8), _node(GPU=8, CPU=8)], 2, 0.5, 1, 8),  # GPU nodes' CPUs bound
])
def test_slots_are_counted_node_by_node(nodes, cpus, gpus, trial_gb, expected):
    need = _need({"spectrogram": 1 * GB}, int(trial_gb * GB), cpus, gpus)
    assert capacity.slots(need, nodes) == expected


@pytest.mark.parametrize("nodes,cpus,gpus,flag", [
    ([_node(CPU=16, GPU=0), _node(CPU=2, GPU=1)], 4, 1, "--cpus-per-trial"),  # CPUs here, GPU there
    ([_node(CPU=16, GPU=0), _node(CPU=8, GPU=1)], 1, 2, "--gpus-per-trial"),
    ([_node(CPU=16, GPU=0)], 1, 0.5, "--gpus-per-trial"),                  # a cluster without GPUs
])
def test_a_trial_no_single_node_can_hold_is_refused(nodes, cpus, gpus, flag):
    """CPUs of one node and GPUs of another do not make a trial: Tune would wait forever."""
    with pytest.raises(UserError, match=rf"^{flag}: no node .* {cpus:g} CPU\(s\) and {gpus:g} GPU\(s\) "
                                        rf"together.*lower {flag}"):
        capacity.slots(_need({"spectrogram": GB}, GB, cpus, gpus), nodes)


def test_a_node_whose_object_store_cannot_hold_the_data_is_refused():
    need = _need({"waveform": 20 * GB, "spectrogram": 1 * GB}, 2 * GB, 1, 0)
    with pytest.raises(UserError, match=r"need 27\.3 GB of shared memory.*waveform 20\.0 GB.*"
                                        r"--features spectrogram.*--object-store-memory"):
        capacity.slots(need, [NODE])
    with pytest.raises(UserError, match="no node of the Ray cluster has 40.0 GB"):
        capacity.slots(_need({"spectrogram": GB}, 40 * GB, 1, 0), [NODE])


def test_sizes_are_estimated_from_headers_and_match_what_is_built(tmp_path):
    from genre_ray.features import build_features

    tree = make_tree(tmp_path / "data", tracks=3, seconds=11.0)
    cfg = config.load()
    sizes = estimated_bytes(tree, as_configured(["waveform", "spectrogram"], cfg), cfg)
    for feature, estimate in sizes.items():
        fs = build_features(tree, feature, cfg, cache=tmp_path / "cache")
        assert estimate == {name: part.x.nbytes for name, part in fs.splits.items()}, feature


def test_a_runs_need_is_its_train_and_val_bytes_with_the_memory_sections_headroom():
    sizes = {"waveform": {"train": 6 * GB, "val": 2 * GB, "test": 2 * GB},
             "spectrogram": {"train": 3 * GB, "val": GB, "test": GB}}
    memory = config.replaced(config.load(), {
        "memory.store_headroom": 1.5, "memory.trial_gb": {"waveform": 3.0, "spectrogram": 1.0},
        "memory.store_extra_gb": 0.5, "memory.store_min_gb": 1.0, "memory.driver_gb": 0.0}).memory
    want = capacity.need(sizes, 2, 0.5, memory)
    assert want == capacity.Need({"waveform": 8 * GB, "spectrogram": 4 * GB}, 3 * GB, 2, 0.5, 18 * GB)
    assert capacity.need({"spectrogram": sizes["spectrogram"]}, 1, 0, memory).trial == GB
    # a new local Ray's store: the data's plus the extra, or the minimum when that is more
    assert capacity.local_store_bytes(_need({"spectrogram": 0}, 0, 1, 0), memory) == GB
    small = capacity.need({"spectrogram": {"train": GB // 4, "val": GB // 4, "test": 0}}, 1, 0, memory)
    assert small.store == 3 * GB // 4 and capacity.local_store_bytes(small, memory) == 5 * GB // 4


def _sparse_wav(path: Path, seconds: float, rate: int = 22050) -> None:
    """A 16-bit WAV whose header says `seconds` long, its data a hole on disk (no space)."""
    data = int(seconds * rate) * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " +
              struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)


@pytest.mark.slow
def test_the_preflight_refuses_features_no_node_can_hold_before_anything_is_written(tmp_path):
    for genre in ("blues", "jazz", "rock"):
        for i in range(3):  # 9 tracks of 24 h: waveform features would take ~300 GB
            _sparse_wav(tmp_path / "data" / genre / f"{genre}.{i:05d}.wav", 24 * 3600)
    env = {**os.environ, "GENRE_RAY_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(tmp_path / "data"),
         "--features", "waveform", "spectrogram", "--storage-path", str(tmp_path / "runs"),
         "--output-dir", str(tmp_path / "best"), "--wandb", "off"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "GB of shared memory" in errors[0] and "--features spectrogram" in errors[0]
    assert not any(p.exists() for p in (tmp_path / "runs", tmp_path / "best", tmp_path / "cache"))


HOG = 300_000  # MLP2 hidden nodes over 64 x 108 spectrogram inputs: an 8.3 GB first layer


def _meminfo(key: str) -> int:
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


@pytest.mark.slow
def test_a_trial_the_memory_monitor_kills_fails_alone_and_the_run_exports(tmp_path):
    make_tree(tmp_path / "data", tracks=3, seconds=11.0)
    spaces = shutil.copytree(SPACES_DIR, tmp_path / "spaces")
    (spaces / "MLP2.yaml").write_text(json.dumps(
        {"params": {"nodes": {"choice": [32, HOG]}, "hidden_layers": {"choice": [1]}},
         "first_point": {"nodes": HOG, "hidden_layers": 1}}))
    total = _meminfo("MemTotal")
    # the monitor kills a worker once the node uses 4 GB more than now: the hog, never the rest
    threshold = (total - _meminfo("MemAvailable") + 4 * GB) / total
    env = {**os.environ, "RAY_memory_usage_threshold": f"{threshold:.3f}",
           "RAY_memory_monitor_refresh_ms": "100"}
    out = subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "--data-dir", str(tmp_path / "data"),
         "--models", "MLP2", "--features", "spectrogram", "--num-samples", "2", "--max-epochs", "1",
         "--seed", "2",  # TPE's second trial, seeded: 32 nodes
         "--cpus-per-trial", str(os.cpu_count()),  # one trial at a time: the hog alone is killed
         "--search-spaces", str(spaces), "--storage-path", str(tmp_path / "runs"), "--name", "r",
         "--output-dir", str(tmp_path / "best"), "--wandb", "off"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    trials = {json.loads((p / "params.json").read_text())["nodes"]: p
              for p in (tmp_path / "runs" / "r").glob("MLP2_*")}
    assert sorted(trials) == [32, HOG]
    error = (trials[HOG] / "error.txt").read_text()
    assert "killed by Ray's memory monitor" in error and error.count("Failure # ") == 3
    assert not (trials[32] / "error.txt").exists()
    exported = export.Exported.load(tmp_path / "best" / export.export_name("MLP2", "spectrogram"))
    assert exported.hyper["nodes"] == exported.arch["nodes"] == 32
    assert "1 trial(s) failed" in out.stdout


def test_the_report_names_the_clusters_gpus_not_the_drivers():
    """A GPU-less head (the driver) with two 8-GPU workers: the GPUs are the workers'."""
    worker = _node(CPU=32, GPU=8, **{"accelerator_type:H100": 1})
    text = cluster.hardware([_node(CPU=4), worker, worker, {"Alive": False, "Resources": worker["Resources"]}])
    assert text.endswith("Ray cluster: 3 node(s), 68 CPUs, 16 GPUs (16 x H100)")
