"""bench/gpu_check.py: its dry run on the CPU, and that its checks can fail."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from genre_ray import config
from genre_ray.features import build_features
from tests.helpers import REPO, make_tree

DRY = {"cluster tune": "PASS", "exports load without a GPU": "PASS", "trials on the GPU": "SKIP",
       "resume on cpu": "PASS", "resume on cuda": "SKIP", "throughput on the GPU": "SKIP",
       "per-batch sync": "SKIP"}
RAY_WORKER = re.compile(r"\([\w:.]* ?pid=\d+")  # the prefix of a line Ray forwards from a worker


@pytest.mark.slow
def test_dry_run_passes_or_skips_every_check_and_says_what_needs_cuda(tmp_path):
    data = make_tree(tmp_path / "data", tracks=3, seconds=6.0)
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--data-dir",
                          str(data), "--epochs", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    both = out.stdout + out.stderr
    assert out.returncode == 0, both[-6000:]
    # gpu_check's own output: not what Ray forwards from its workers, such as the traceback
    # a trial actor may log when Tune ends it with SIGTERM after its last epoch
    own = "\n".join(line for line in both.splitlines() if not RAY_WORKER.search(line))
    assert "Traceback" not in own, own[own.index("Traceback"):][:6000]
    lines = re.findall(r"^(PASS|FAIL|SKIP) ([^:]+): (.*)$", out.stdout, re.MULTILINE)
    assert {check: status for status, check, _ in lines} == DRY
    assert len(lines) == len(DRY)
    assert all("needs CUDA" in detail for status, _, detail in lines if status == "SKIP")
    assert "cores" in out.stdout.splitlines()[0]  # the context comes first


def _saved_from(device: str, path: Path) -> Path:
    """A torch file whose tensors say they were saved from `device`: saved from the CPU,
    its pickled storage location rewritten (no GPU needed to make a GPU-saved file)."""
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    location = device.encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members.items():
            if name.endswith("data.pkl"):
                body = body.replace(b"X\x03\x00\x00\x00cpu",
                                    b"X" + len(location).to_bytes(4, "little") + location)
            z.writestr(name, body)
    return path


@pytest.mark.slow  # a process per export, which sees no GPU
@pytest.mark.parametrize("device, error", [("cuda:0", "CUDA"), ("meta", "tensors on meta")])
def test_an_export_that_holds_non_cpu_tensors_fails(tmp_path, device, error):
    status, _, detail = gpu_check.exports_on_cpu([_saved_from(device, tmp_path / "m.pth")])
    assert status == "FAIL" and error in detail
    assert gpu_check.exports_on_cpu([tmp_path / "none.pth"])[0] == "FAIL"


@pytest.mark.parametrize("devices, verdict", [
    (["cpu", "cpu"], "FAIL"),      # the trials were given no GPU, or did not use it
    (["cuda:0", "cpu"], "FAIL"),
    (["cuda:0"], "FAIL"),          # one trial of two left a checkpoint
    (["cuda:0", "cuda:0"], "PASS")])
def test_trials_pass_the_gpu_check_only_if_their_checkpoints_say_cuda(tmp_path, devices, verdict):
    for trial, device in enumerate(devices):
        folder = tmp_path / str(trial) / "checkpoint_000000"
        folder.mkdir(parents=True)
        torch.save({"trainer": {}, "device": device}, folder / gpu_check.STATE_FILE)
    assert gpu_check.trials_device(tmp_path, cuda=True)[0] == verdict


def test_a_resume_that_loses_the_rng_state_fails(tmp_path, monkeypatch):
    fs = build_features(make_tree(tmp_path / "data", tracks=3, seconds=6.0), "spectrogram",
                        config.load())
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # dropout's RNG not restored
    status, check, detail = gpu_check.resume_on(fs, torch.device("cpu"), tmp_path)
    assert (status, check) == ("FAIL", "resume on cpu") and "differ by" in detail
