"""Artifact folders: atomic publication, checksum manifests, and never trusting a broken or partial artifact."""

import shutil
import threading
import uuid
from pathlib import Path

import pytest

from flows.store import MANIFEST, Manifest, Store, verify_folder

KEY = "ab" * 32


def manifest(stage: str = "covariance", key: str = KEY, run_id: str = "run-1") -> Manifest:
    return Manifest(stage=stage, key=key, stage_version=1, run_id=run_id, parent_run_id=None, code_version="test",
                    config={"r": 1}, inputs={}, files={})


def build(store: Store, payload: bytes = b"sums", key: str = KEY, run_id: str = "run-1") -> Manifest:
    with store.lock("covariance", key), store.staging("covariance", key) as tmp:
        (tmp / "covariance.zarr").mkdir()
        (tmp / "covariance.zarr" / "c0").write_bytes(payload)
        (tmp / "meta.json").write_text("{}")
        return store.publish(tmp, manifest(key=key, run_id=run_id))


def test_published_artifact_lists_every_file_and_verifies(tmp_path):
    store = Store(str(tmp_path / "stages"), tmp_path)
    published = build(store)
    folder = Path(store.uri("covariance", KEY))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "covariance.zarr/c0", MANIFEST, "meta.json"]
    assert set(published.files) == {"covariance.zarr/c0", "meta.json"}
    assert store.verify("covariance", KEY) == published
    assert store.verify("covariance", "cd" * 32) is None
    assert not list(folder.parent.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra", "manifest"])
def test_a_damaged_artifact_does_not_verify(tmp_path, damage):
    store = Store(str(tmp_path / "stages"), tmp_path)
    build(store)
    folder = Path(store.uri("covariance", KEY))
    chunk = folder / "covariance.zarr" / "c0"
    if damage == "flip":
        chunk.write_bytes(b"SUMS")  # same size, other bytes
    elif damage == "truncate":
        chunk.write_bytes(b"su")
    elif damage == "delete":
        chunk.unlink()
    elif damage == "extra":
        (folder / "covariance.zarr" / "c1").write_bytes(b"x")
    else:
        (folder / MANIFEST).write_text("{not json")
    assert store.verify("covariance", KEY) is None
    with pytest.raises(FileNotFoundError, match="no verified covariance artifact"):
        store.path("covariance", KEY)


def test_a_killed_writer_leaves_nothing_that_is_trusted(tmp_path):
    store = Store(str(tmp_path / "stages"), tmp_path)
    with pytest.raises(KeyboardInterrupt), store.lock("covariance", KEY), store.staging("covariance", KEY) as tmp:
        (tmp / "covariance.zarr").mkdir()
        raise KeyboardInterrupt  # interrupted mid-write: never published
    assert not Path(store.uri("covariance", KEY)).exists()
    # A process killed outright leaves its staging folder; the next writer of that key clears it.
    stale = tmp_path / "stages" / "covariance" / f".tmp-{KEY[:16]}-dead0000"
    stale.mkdir(parents=True)
    (stale / "half").write_bytes(b"x")
    assert store.verify("covariance", KEY) is None
    build(store)
    assert not stale.exists()
    assert store.verify("covariance", KEY) is not None


def test_republishing_replaces_a_broken_artifact_and_keeps_a_good_one(tmp_path):
    store = Store(str(tmp_path / "stages"), tmp_path)
    first = build(store, run_id="run-1")
    assert build(store, b"other", run_id="run-2") == first  # a verified artifact in place wins
    (Path(store.uri("covariance", KEY)) / "meta.json").write_text("changed")
    replaced = build(store, b"other", run_id="run-2")
    assert replaced.run_id == "run-2" and store.verify("covariance", KEY) == replaced


def test_concurrent_writers_leave_one_consistent_artifact(tmp_path):
    results, errors = [], []

    def write(i: int) -> None:
        try:  # each thread its own Store, as separate processes would have
            results.append(build(Store(str(tmp_path / "stages"), tmp_path), f"p{i}".encode(), run_id=f"run-{i}"))
        except Exception as err:  # collected, asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = Store(str(tmp_path / "stages"), tmp_path)
    final = store.verify("covariance", KEY)
    assert final is not None and all(r == final for r in results)
    assert [p.name for p in (tmp_path / "stages" / "covariance").iterdir()] == [KEY]


def test_remote_store_uploads_manifest_last_and_verifies_a_local_copy(tmp_path):
    uri = f"memory://tlora-{uuid.uuid4().hex[:8]}/stages"
    store = Store(uri, tmp_path)
    published = build(store)
    assert store.uri("covariance", KEY).startswith("memory://")
    assert store.verify("covariance", KEY) == published
    local = store.path("covariance", KEY)
    assert local.is_relative_to(tmp_path / "cache") and verify_folder(local) == published
    # Bytes changed on the remote side are not trusted once the stale local copy is gone.
    store.fs.pipe(f"{store.base}/covariance/{KEY}/meta.json", b"changed")
    shutil.rmtree(local)
    assert store.verify("covariance", KEY) is None
