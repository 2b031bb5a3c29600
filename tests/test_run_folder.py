"""A run's own files kept in its storage (genre_ray/storage.py's RunFolder), on a real S3
server and on file://: what a sync puts there, the Optuna journal in parts, and what a
machine with an empty cache pulls back."""
from __future__ import annotations

import time

import pytest

from genre_ray import storage as storing
from genre_ray.storage import JOURNAL, PARTS, RECORD


@pytest.fixture(params=["s3", "file"])
def store(request, s3, tmp_path, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    if request.param == "s3":
        return storing.storage(s3.bucket(f"folder-{time.time_ns()}") + "/runs")
    return storing.storage((tmp_path / "bucket").as_uri())


def fresh_machine(store: storing.Storage, tmp_path, monkeypatch) -> storing.RunFolder:
    """The run's folder as another machine opens it: another cache, no folder object shared."""
    monkeypatch.setenv("GENRE_RAY_CACHE", str(tmp_path / f"cache-{time.time_ns()}"))
    storing._FOLDERS.clear()
    return storing.storage(store.uri).folder("r")


def test_sync_puts_what_changed_and_pull_brings_back_the_record_and_journal(store, tmp_path, monkeypatch):
    folder = store.folder("r")
    folder.dir.mkdir(parents=True)
    (folder.dir / RECORD).write_text('{"status": "running"}')
    (folder.dir / "plots").mkdir()
    (folder.dir / "plots" / "search.png").write_bytes(b"png")
    (folder.dir / JOURNAL).write_text('{"op": 1}\n{"op": 2}\n{"op": 3, "unfini')  # mid-append
    folder.sync()
    assert store.read(f"r/{RECORD}") == b'{"status": "running"}'
    assert store.read("r/plots/search.png") == b"png"
    assert store.read(f"r/{JOURNAL}") is None  # in parts, whole lines only
    assert [i.base_name for i in store.listing(f"r/{JOURNAL}{PARTS}")] == ["0" * 16]
    early = fresh_machine(store, tmp_path, monkeypatch)
    early.pull()  # what a machine taking over now would read: whole lines only
    assert (early.dir / JOURNAL).read_text() == '{"op": 1}\n{"op": 2}\n'
    written = store.modified("r/plots/search.png")
    time.sleep(1.1)
    folder.sync()  # nothing changed: nothing written again
    assert store.modified("r/plots/search.png") == written
    with open(folder.dir / JOURNAL, "a") as f:
        f.write('"}\n{"op": 4}\n')
    folder.push_appended()
    again = fresh_machine(store, tmp_path, monkeypatch)
    assert again.dir != folder.dir
    again.pull()
    assert (again.dir / JOURNAL).read_text() == '{"op": 1}\n{"op": 2}\n{"op": 3, "unfini"}\n{"op": 4}\n'
    assert (again.dir / RECORD).read_text() == '{"status": "running"}'
    assert not (again.dir / "plots").exists()  # reports are rebuilt, not pulled


def test_the_journal_comes_back_whole_after_its_parts_are_joined_and_compacted(store, tmp_path, monkeypatch):
    folder = store.folder("r")
    folder.dir.mkdir(parents=True)
    lines = []
    for i in range(storing.MAX_PARTS + 5):
        lines.append(f'{{"op": {i}}}\n')
        with open(folder.dir / JOURNAL, "a") as f:
            f.write(lines[-1])
        folder.push_appended()
    assert store.read(f"r/{JOURNAL}") is not None  # compacted once past MAX_PARTS
    assert len(store.listing(f"r/{JOURNAL}{PARTS}")) < storing.MAX_PARTS
    again = fresh_machine(store, tmp_path, monkeypatch)
    again.pull()
    assert (again.dir / JOURNAL).read_text() == "".join(lines)
    again.reset_journal()
    assert store.read(f"r/{JOURNAL}") is None and not store.listing(f"r/{JOURNAL}{PARTS}")


def test_a_folder_is_pickled_as_its_run_and_opens_this_machines_copy(store, tmp_path, monkeypatch):
    import pickle

    folder = store.folder("r")
    assert pickle.loads(pickle.dumps(folder)) is folder  # one per run in a process
    moved = fresh_machine(store, tmp_path, monkeypatch)
    elsewhere = pickle.loads(pickle.dumps(folder))
    assert elsewhere is moved and elsewhere.dir != folder.dir


def test_a_stopping_driver_writes_nothing_once_its_lease_may_have_passed_on(store):
    folder = store.folder("r")
    folder.dir.mkdir(parents=True)
    (folder.dir / RECORD).write_text("{}")
    folder.close_at(time.time() - 1)  # its lease ended: another driver may hold the run
    (folder.dir / JOURNAL).write_text('{"op": 1}\n')
    folder.sync()
    folder.push(RECORD)
    folder.push_appended()
    assert store.read(f"r/{RECORD}") is None and not store.listing(f"r/{JOURNAL}{PARTS}")
    folder.reset()  # a run claimed anew writes again
    (folder.dir / RECORD).write_text("{}")
    folder.push(RECORD)
    assert store.read(f"r/{RECORD}") == b"{}"
