"""Zarr stores that say whether they are complete (``complete`` written false first, true last), and how
their float64 matrices are laid out and read back.

Shared by the covariance and spectrum artifacts, so an interrupted write is refused on load by both.
Matrices are stored whole (DESIGN §2: one ``[d_in, d_in]`` float64 array per shared-input group), chunked by
blocks of whole rows (≤ 32 MiB each), every chunk written even when it is all zeros, and by default uncompressed
(:data:`CODEC`). A plain ``zarr.open_group`` reads every store; :func:`read_float64` reads the uncompressed chunks
of a local store straight into the result (one copy, as ``numpy.load`` does) instead of through zarr's codec
pipeline, which reads each chunk into a buffer of its own and then copies it into the output. Writing an
uncompressed array to a local store is likewise direct (:func:`_write_raw`: the ``zarr.json`` zarr makes, then the
chunk files, the same bytes as zarr's own write); zarr's per-array metadata round trips and codec pipeline cost
more than the bytes' own write. Compressed or remote arrays go through zarr both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import LocalStore, MemoryStore


@contextmanager
def writing(path: str | Path) -> Iterator[zarr.Group]:
    """A fresh group at ``path``, marked complete only when the ``with`` body returns."""
    root = zarr.open_group(str(path), mode="w")
    root.attrs["complete"] = False
    yield root
    root.attrs["complete"] = True


def open_complete(path: str | Path, what: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The group at ``path`` and its attributes, refusing a missing or incomplete store.

    Raises:
        ValueError: no store at ``path``, or one whose write was interrupted.
    """
    try:
        root = zarr.open_group(str(path), mode="r")
    except FileNotFoundError as err:
        raise ValueError(f"no {what} store at {path}") from err
    attrs = root.attrs.asdict()
    if attrs.get("complete") is not True:
        raise ValueError(f"{what} store {path} is incomplete (complete={attrs.get('complete')!r}): "
                         "its write was interrupted; recompute it")
    return root, attrs


def read_float64(array: zarr.Array) -> torch.Tensor:
    """A stored array as a float64 tensor: uncompressed local chunks read straight into it, anything else
    (compressed, remote, sharded, a chunk left unwritten) through zarr."""
    values = _read_raw_chunks(array)
    if values is None:
        values = np.asarray(array[...], dtype=np.float64)
    return torch.from_numpy(values)


def write_matrix(root: zarr.Group, name: str, matrix: torch.Tensor, *, compressors: Any = "default") -> None:
    """Store a float64 matrix under ``name`` whole, in chunks of whole rows (≤ 32 MiB each, in equal blocks).

    ``compressors``: ``"default"`` (:data:`CODEC`), ``"compact"`` (:data:`COMPACT_CODEC`), or zarr codecs.
    """
    values = np.ascontiguousarray(matrix.detach().cpu().numpy(), dtype=np.float64)
    width = values.shape[1] if values.ndim == 2 else 1
    n_chunks = max(1, -(-values.shape[0] * width // _CHUNK_VALUES))  # ceil
    rows = max(1, -(-values.shape[0] // n_chunks))  # equal blocks of rows: the last is padded by < n_chunks rows
    codecs = _NAMED.get(compressors, compressors) if isinstance(compressors, str) else compressors
    if codecs is None and isinstance(root.store, LocalStore) and values.ndim <= 2:
        folder = Path(root.store.root) / root.path
        for part in name.split("/")[:-1]:  # parent groups, as zarr makes them for a nested name
            folder = folder / part
            if not folder.is_dir():
                folder.mkdir()
                (folder / "zarr.json").write_bytes(_group_json())
        _write_raw(folder / name.split("/")[-1], values, rows)
        return
    # write_empty_chunks: every chunk lands on disk (an all-zero one too), and zarr skips its scan for them.
    arr = root.create_array(name=name, shape=values.shape, dtype="float64", chunks=(rows, *values.shape[1:]),
                            compressors=codecs, config={"write_empty_chunks": True})
    arr[...] = values


def _write_raw(folder: Path, values: np.ndarray, rows: int) -> None:
    """Write an uncompressed array as zarr would (the same ``zarr.json`` and chunk files, byte for byte: tested),
    without zarr's per-array overhead (its metadata round trips and codec pipeline cost more than the bytes'
    own write): the metadata zarr makes for the shape, then each chunk's C-order bytes at the key that metadata
    names, the last padded with the fill value 0."""
    meta, meta_json = _array_metadata(values.shape, rows)
    folder.mkdir()
    (folder / "zarr.json").write_bytes(meta_json)
    row_bytes = values.itemsize * (values.shape[1] if values.ndim == 2 else 1)
    for i in range(-(-values.shape[0] // rows)):
        path = folder / meta.encode_chunk_key((i,) + (0,) * (values.ndim - 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        chunk = memoryview(values[i * rows: (i + 1) * rows].reshape(-1)).cast("B")
        with open(path, "wb") as fh:  # buffered: its write() writes all of a piece (larger ones bypass the buffer)
            for j in range(0, len(chunk), _WRITE_BYTES):
                fh.write(chunk[j: j + _WRITE_BYTES])
            fh.write(bytes(rows * row_bytes - len(chunk)))


@functools.lru_cache(maxsize=256)
def _array_metadata(shape: tuple[int, ...], rows: int) -> tuple[ArrayV3Metadata, bytes]:
    """The metadata zarr makes for an uncompressed float64 array of this shape and chunk rows, and its
    ``zarr.json`` bytes."""
    meta = zarr.create_array(store=MemoryStore(), shape=shape, chunks=(rows, *shape[1:]), dtype="float64",
                             compressors=None).metadata
    return meta, meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


@functools.cache
def _group_json() -> bytes:
    """The ``zarr.json`` zarr writes for an empty group."""
    meta = zarr.create_group(store=MemoryStore()).metadata
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _raw_chunk_files(array: zarr.Array) -> list[Path] | None:
    """The chunk files, in row order, of a float64 array kept in a local store as uncompressed little-endian
    chunks of whole rows (each file the chunk's C-order bytes, the last one padded); ``None`` for anything else."""
    meta = array.metadata
    store = array.store_path.store
    if not (isinstance(store, LocalStore) and isinstance(meta, ArrayV3Metadata) and array.ndim >= 1
            and array.dtype == np.dtype("<f8") and meta.codecs == (BytesCodec(endian="little"),)
            and isinstance(meta.chunk_grid, RegularChunkGrid) and not meta.storage_transformers
            and tuple(meta.chunk_grid.chunk_shape[1:]) == array.shape[1:] and array.size > 0):
        return None
    rows = meta.chunk_grid.chunk_shape[0]
    folder = Path(store.root) / array.path
    return [folder / meta.encode_chunk_key((i,) + (0,) * (array.ndim - 1)) for i in range(-(-array.shape[0] // rows))]


def _read_raw_chunks(array: zarr.Array) -> np.ndarray | None:
    """The array read chunk file by chunk file into one C-order float64 array, or ``None`` where
    :func:`_raw_chunk_files` does not apply or a chunk file is missing or of the wrong size."""
    files = _raw_chunk_files(array)
    if files is None:
        return None
    rows = array.metadata.chunk_grid.chunk_shape[0]
    row_bytes = 8 * int(np.prod(array.shape[1:]))
    if not all(f.is_file() and f.stat().st_size == rows * row_bytes for f in files):
        return None  # an unwritten (fill-value) chunk or a damaged one: zarr's own path decides
    out = np.empty(array.shape, dtype="<f8")
    flat = memoryview(out.reshape(array.shape[0], -1)).cast("B")
    for i, f in enumerate(files):
        view = flat[i * rows * row_bytes: min((i + 1) * rows, array.shape[0]) * row_bytes]  # the last: no padding
        with open(f, "rb", buffering=0) as fh:
            if fh.readinto(view) != len(view):
                return None
    return out


CODEC: Any = None
"""The default compressors of :func:`write_matrix`: none. Measured on SmolLM2's covariance (120 float64 matrices,
768 MiB; ``benchmarks/perf_stats.py`` ``bench_store``, 1 thread, 2 shared cores), no single-threaded lossless codec
keeps up with the page cache: Blosc LZ4 level 1 with bit shuffle (:data:`COMPACT_CODEC`) stores 0.58× numpy's bytes
but compresses at about 0.9 GB/s and decompresses at about 1.0 GB/s (byte shuffle: 0.60×, 1.3 / 1.6 GB/s; blosclz:
0.64×, 1.2 / 2.7 GB/s; zstd level 1: 0.57-0.60×, 0.3-0.5 / 0.8-1.1 GB/s), while ``numpy.save`` / ``numpy.load`` move
the raw bytes at 2-5 GB/s: it writes 5-7× and reads 3-4× of numpy's time. Uncompressed, the chunk files are the
matrices' bytes (1.0001× numpy's size: the JSON metadata), written and read directly (:func:`_write_raw`,
:func:`_read_raw_chunks`) at about numpy's speed."""

COMPACT_CODEC = (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),)
"""Half the bytes at several times the time (see :data:`CODEC`): ``save_covariance(..., compressors=COMPACT_CODEC)``
for a store that travels over a network or fills a disk."""

_NAMED = {"default": CODEC, "compact": COMPACT_CODEC}  # what write_matrix's ``compressors`` may name
_CHUNK_VALUES = 1 << 22  # 32 MiB of float64 per chunk at most
_WRITE_BYTES = 1 << 18
"""Bytes per ``write`` call of :func:`_write_raw`. One call per 18 MiB chunk measured 2-4× numpy.save's time in
this project's VMs (the kernel then fills the page cache with large folios, which the host backs again slowly),
while 64-256 KiB calls kept within 1.3× of it."""
