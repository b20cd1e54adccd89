"""Artifact folders of the stages: written atomically, trusted only when their checksum manifest verifies.

An artifact is the folder ``<stages>/<stage>/<key>/`` (DESIGN §2) holding the stage's files and a
``manifest.json`` that lists every other file with its size and sha256, plus the stage, key, producing MLflow
run and upstream keys. Invariants:

- A stage writes into a fresh temporary folder beside the final one; the manifest is written last and the
  folder renamed into place only when complete, so a killed run leaves no folder that a later run trusts.
- An artifact is trusted only if its manifest parses and every file is present with its recorded size and
  hash and no unlisted file exists (:meth:`Store.verify`); anything else is treated as missing and rewritten.
- Two writers of one key leave one consistent artifact: a per-key file lock serialises them on one machine,
  and publishing keeps a verified artifact already in place.

``stages`` may be an fsspec URI (``s3://bucket/tlora``): artifacts are built locally, uploaded with the
manifest last, and downloaded into a local cache to be read and verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_BLOCK = 1 << 22  # hash in 4 MiB reads
_STAGE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_KEY = re.compile(r"[0-9a-f]{64}")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    sha256: str


class Manifest(BaseModel):
    """``manifest.json``: what the artifact is, who made it from what, and the checksum of every file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    key: str
    stage_version: int
    run_id: str | None
    parent_run_id: str | None
    code_version: str
    config: dict[str, Any]
    inputs: dict[str, str]
    """Upstream role -> key."""
    files: dict[str, FileEntry]
    """Relative POSIX path -> size and sha256, every file but the manifest itself."""

    @property
    def digest(self) -> str:
        """sha256 of the file list: changes whenever the artifact is rewritten."""
        body = json.dumps({k: v.model_dump() for k, v in self.files.items()}, sort_keys=True)
        return hashlib.sha256(f"{self.run_id}:{body}".encode()).hexdigest()


class Store:
    """The stage artifacts under one root folder or fsspec URI."""

    def __init__(self, stages: str, local_root: str | Path, *, stamp_margin_s: float = 2.0) -> None:
        self.fs, self.base = fsspec.url_to_fs(stages)
        self.remote = "file" not in _protocols(self.fs)
        self.local_root = Path(local_root)
        self.base = self.base.rstrip("/")
        self.stamp_margin_s = stamp_margin_s

    def uri(self, stage: str, key: str) -> str:
        """Where the artifact of ``stage``/``key`` lives (a path for local stores)."""
        check_names(stage, key)
        path = f"{self.base}/{stage}/{key}"
        return self.fs.unstrip_protocol(path) if self.remote else path

    def verify(self, stage: str, key: str) -> Manifest | None:
        """The artifact's manifest if the artifact is complete and every checksum matches, else None.

        A local artifact that verifies in full gets a stamp under ``<local_root>/cache/verified``: the size, mtime,
        ctime and inode of its manifest and of every file. While they all still match, the checksums are not read
        again (git's index and DVC's state make the same trade), so a cache hit or a downstream read of a 0.5 GB
        model does not hash it each time. Any write, truncation, replacement, deletion or extra file changes the
        signature and forces the full check. Files changed less than ``stamp_margin_s`` before a verification get
        no stamp, as git treats racily clean entries. Remote artifacts are verified in full (in the local cache).
        """
        if self.remote:
            folder = self._fetch(stage, key)
            return verify_folder(folder, stage=stage, key=key) if folder is not None else None
        folder = Path(self.uri(stage, key))
        where = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
        stamp = self.local_root / "cache" / "verified" / f"{stage}-{key}-{where}.json"
        signature = _signature(folder)
        if signature is not None and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == signature:
                    manifest = Manifest.model_validate_json((folder / MANIFEST).read_text())
                    if manifest.stage == stage and manifest.key == key:
                        return manifest
            except (OSError, ValueError):
                pass
        manifest = verify_folder(folder, stage=stage, key=key)
        newest = max((max(e[2], e[3]) for e in signature), default=0) if signature else 0
        settled = time.time_ns() - newest > self.stamp_margin_s * 1e9
        if manifest is not None and signature is not None and settled and signature == _signature(folder):
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(signature))
            os.replace(tmp, stamp)
        return manifest

    def path(self, stage: str, key: str) -> Path:
        """A verified local folder with the artifact's files (downloaded first from a remote store).

        Raises:
            FileNotFoundError: the artifact is missing or does not verify.
        """
        if self.verify(stage, key) is None:
            raise FileNotFoundError(f"no verified {stage} artifact {key} in {self.uri(stage, key)}")
        return self.local_root / "cache" / "stages" / stage / key if self.remote else Path(self.uri(stage, key))

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the per-key lock (one machine; a remote store relies on :meth:`publish` keeping the first)."""
        check_names(stage, key)
        where = (self.local_root / "locks") if self.remote else Path(self.base) / ".locks"
        where.mkdir(parents=True, exist_ok=True)
        with FileLock(str(where / f"{stage}-{key}.lock")):
            yield

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temporary folder to build the artifact in; removed afterwards unless it was published.

        Call it holding :meth:`lock`: leftovers of a killed writer of the same key are removed first.
        """
        check_names(stage, key)
        parent = (self.local_root / "tmp") if self.remote else Path(self.base) / stage
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".tmp-{key[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, tmp: Path, manifest: Manifest) -> Manifest:
        """Write the manifest into ``tmp`` and move it into place; return the manifest now in place.

        A verified artifact already in place (a concurrent writer finished first) is kept and ``tmp``
        dropped; one that does not verify is replaced.
        """
        manifest = manifest.model_copy(update={"files": _scan(tmp)})
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if self.remote:
            return self._upload(tmp, manifest)
        final = Path(self.uri(manifest.stage, manifest.key))
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.rename(tmp, final)  # atomic; fails if final exists and is not empty
                return manifest
            except OSError:
                existing = verify_folder(final, stage=manifest.stage, key=manifest.key)
                if existing is not None:
                    log.info("%s %s was published by another run first; keeping it", manifest.stage, manifest.key)
                    return existing
                trash = final.with_name(f".trash-{final.name[:16]}-{uuid.uuid4().hex[:8]}")
                with suppress(FileNotFoundError):
                    os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
        raise RuntimeError(f"could not publish {manifest.stage} artifact to {final}")

    def _fetch(self, stage: str, key: str) -> Path | None:
        """Download a remote artifact into the local cache (once); None when its manifest is missing."""
        check_names(stage, key)
        remote = f"{self.base}/{stage}/{key}"
        cached = self.local_root / "cache" / "stages" / stage / key
        if verify_folder(cached, stage=stage, key=key) is not None:
            return cached
        if not self.fs.exists(f"{remote}/{MANIFEST}"):
            return None
        tmp = cached.with_name(f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get(remote + "/", str(tmp) + "/", recursive=True)
            shutil.rmtree(cached, ignore_errors=True)
            os.rename(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cached

    def _upload(self, tmp: Path, manifest: Manifest) -> Manifest:
        remote = f"{self.base}/{manifest.stage}/{manifest.key}"
        if self.fs.exists(f"{remote}/{MANIFEST}") and self.verify(manifest.stage, manifest.key) is not None:
            return self.verify(manifest.stage, manifest.key)
        for rel in manifest.files:  # the manifest goes last: without it, readers see no artifact
            self.fs.makedirs(f"{remote}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(tmp / rel), f"{remote}/{rel}")
        self.fs.put_file(str(tmp / MANIFEST), f"{remote}/{MANIFEST}")
        return manifest


def check_names(stage: str, key: str) -> None:
    """Refuse a stage name or key that could leave the store (``../``, ``/``, ``~``): keys are sha256 hex.

    Raises:
        ValueError: ``stage`` is not a lowercase name or ``key`` not 64 hex digits.
    """
    if not isinstance(stage, str) or not _STAGE.fullmatch(stage):
        raise ValueError(f"stage name {stage!r} is not a lowercase name ([a-z][a-z0-9_-]*)")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"artifact key {key!r} of stage {stage!r} is not 64 lowercase hex digits (a sha256)")


def verify_folder(folder: Path, *, stage: str | None = None, key: str | None = None) -> Manifest | None:
    """The folder's manifest if it names ``stage``/``key`` and lists exactly the files there, hashes matching."""
    try:
        manifest = Manifest.model_validate_json((folder / MANIFEST).read_text())
    except (OSError, ValidationError, ValueError):
        return None
    if (stage is not None and manifest.stage != stage) or (key is not None and manifest.key != key):
        return None
    try:
        present = {rel: p for rel, p in _walk(folder)}
    except OSError:
        return None
    if set(present) != set(manifest.files):
        missing = sorted(set(manifest.files) - set(present))
        extra = sorted(set(present) - set(manifest.files))
        log.warning("%s: files differ from its manifest (missing %s, unlisted %s)", folder, missing[:3], extra[:3])
        return None
    for rel, entry in manifest.files.items():
        try:
            intact = present[rel].stat().st_size == entry.size and _sha256(present[rel]) == entry.sha256
        except OSError:  # replaced under us by a writer repairing it
            return None
        if not intact:
            log.warning("%s: %s fails its checksum", folder, rel)
            return None
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an artifact folder, unverified (for lineage look-ups).

    Raises:
        ValueError: the folder holds no readable ``manifest.json`` (it is not a pipeline artifact).
    """
    path = Path(folder) / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text())
    except (OSError, ValidationError) as err:
        raise ValueError(f"{folder} is not a pipeline artifact: no readable {MANIFEST} ({err})") from err


def _scan(folder: Path) -> dict[str, FileEntry]:
    return {rel: FileEntry(size=p.stat().st_size, sha256=_sha256(p)) for rel, p in _walk(folder)}


def _walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """Every file under ``folder`` but the manifest, as (relative POSIX path, path), sorted."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() or p.is_symlink():
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST:
                yield rel, p


def _signature(folder: Path) -> list[list] | None:
    """(relative path, size, mtime, ctime, inode) of every file under ``folder``, sorted; None if unreadable."""
    try:
        out = []
        for p in sorted(folder.rglob("*")):
            if p.is_file() or p.is_symlink():
                st = p.stat()
                out.append([p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        return out if any(entry[0] == MANIFEST for entry in out) else None
    except OSError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
