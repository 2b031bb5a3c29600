"""genre_ray.files: writes that leave no temporary file behind, even after a killed
writer, and a user's text files in the encodings editors and shells write."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from genre_ray.cache import Writer
from genre_ray.errors import UserError
from genre_ray.files import STALE_S, atomic_path, read_text
from genre_ray.search_space import load_space

SPACE = "params:\n  nodes: {choice: [32, 64]}  # nœuds\nfirst_point: {nodes: 64}\n"


def leftover(folder, name: str, age_s: float, tag: str):
    """A temporary file of `name` as a killed writer leaves it, `age_s` old."""
    path = folder / f".{name}.{tag}.tmp"
    path.write_bytes(b"half a model")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_next_write_removes_what_a_killed_writer_left_and_keeps_live_ones(tmp_path):
    old, young = leftover(tmp_path, "m.pth", 2 * STALE_S, "old"), leftover(tmp_path, "m.pth", 0, "new")
    held = leftover(tmp_path, "m.pth", 2 * STALE_S, "held")
    holder = subprocess.Popen(  # a live writer: holds its file's lock, as atomic_path does
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(held)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = leftover(tmp_path, "other.pth", 2 * STALE_S, "old")
        with atomic_path(tmp_path / "m.pth") as tmp:
            tmp.write_bytes(b"model")
        assert (tmp_path / "m.pth").read_bytes() == b"model"
        assert not old.exists() and young.exists() and held.exists() and other.exists()
    finally:
        holder.kill()
        holder.wait()


BUILDER = """import os, sys, time, numpy as np
from genre_ray.cache import Writer
writer = Writer(sys.argv[1])
writer.append("x", np.ones((1000, 100), dtype=np.float32))
print(writer.tmp.name, flush=True)
time.sleep(60) if sys.argv[2] == "live" else os._exit(9)  # os._exit: as SIGKILL, no cleanup
"""


def test_the_next_cache_build_removes_what_killed_builds_left_and_keeps_a_live_one(tmp_path):
    entry = tmp_path / "features" / "spectrogram-abc"

    def builder(how: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(entry), how], stdout=subprocess.PIPE, text=True)
        folder = entry.parent / proc.stdout.readline().strip()
        stamp = time.time() - 2 * STALE_S  # both as old as a long build
        os.utime(folder, (stamp, stamp))
        return proc, folder

    killed, killed_folder = builder("killed")
    assert killed.wait() == 9 and (killed_folder / "x.npy").is_file()  # what a killed build leaves
    live, live_folder = builder("live")
    try:
        other = leftover(entry.parent, "waveform-abc", 2 * STALE_S, "old")
        with Writer(entry) as writer:
            writer.put("x", np.zeros(3))
            writer.commit({})
        assert not killed_folder.exists() and not other.exists() and live_folder.is_dir()
        assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "x.npy"]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_text_in_utf8_with_or_without_bom_or_utf16_reads_the_same(tmp_path, encoding):
    (tmp_path / "MLP.yaml").write_bytes(SPACE.encode(encoding))
    assert read_text(tmp_path / "MLP.yaml") == SPACE
    assert load_space("MLP", tmp_path).first_point == {"nodes": 64}


def test_a_search_space_in_latin1_is_one_error_naming_the_file_and_the_encoding(tmp_path):
    (tmp_path / "MLP.yaml").write_bytes(SPACE.replace("nœuds", "clé").encode("latin-1"))
    with pytest.raises(UserError, match=r"MLP\.yaml is not UTF-8 text \(byte \d+: b'\\xe9'\); save it as UTF-8"):
        load_space("MLP", tmp_path)
