"""Zarr stores that say whether they are complete (``complete`` written false first, true last), and the
packed layout of the symmetric matrices they hold.

Shared by the covariance and spectrum artifacts, so an interrupted write is refused on load by both.
A symmetric ``[d, d]`` matrix is stored as its upper triangle, row by row (d·(d+1)/2 values), laid into a
2-D array of ``[d + 1, d/2]`` (d even) or ``[d, (d+1)/2]`` (d odd), with ``layout="packed_upper"`` and ``d``
in the array's attributes: half the bytes of the full matrix, nothing to compress, and read back bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr


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


def read_float64(array: Any) -> torch.Tensor:
    """A stored array as a float64 tensor; a packed symmetric one unpacked to its ``[d, d]``."""
    values = np.asarray(array[...], dtype=np.float64)
    if array.attrs.get("layout") == PACKED:
        values = _unpack_upper(values.reshape(-1), int(array.attrs["d"]))
    return torch.from_numpy(values)


def write_matrix(root: zarr.Group, name: str, matrix: torch.Tensor, *, compressors: Any) -> None:
    """Store a float64 ``[d, d]`` matrix under ``name``: packed if it is exactly symmetric, else in full."""
    a = matrix.detach().cpu().numpy()
    d = a.shape[0]
    if a.ndim == 2 and a.shape == (d, d) and _is_symmetric(a):
        shape = (d + 1, d // 2) if d % 2 == 0 else (d, (d + 1) // 2)
        values = np.concatenate([a[i, i:] for i in range(d)]).reshape(shape)  # row by row: contiguous slices
        attrs = {"layout": PACKED, "d": d}
    else:
        values, attrs = a, {}
    rows = max(1, min(values.shape[0], _CHUNK_VALUES // max(1, values.shape[1])))
    arr = root.create_array(name=name, shape=values.shape, dtype="float64", chunks=(rows, values.shape[1]),
                            compressors=compressors, attributes=attrs)
    arr[...] = values


PACKED = "packed_upper"
_CHUNK_VALUES = 1 << 22  # 32 MiB of float64 per chunk at most
_TILE = 64  # transposes go tile by tile: a 64² float64 tile (32 KiB) stays in L1


def _tiles(d: int) -> list[tuple[int, int]]:
    return [(i, min(i + _TILE, d)) for i in range(0, d, _TILE)]


def _is_symmetric(a: np.ndarray) -> bool:
    tiles = _tiles(a.shape[0])
    return all(np.array_equal(a[i0:i1, j0:j1], a[j0:j1, i0:i1].T) for i0, i1 in tiles for j0, j1 in tiles if j0 >= i0)


def _unpack_upper(packed: np.ndarray, d: int) -> np.ndarray:
    if packed.shape != (d * (d + 1) // 2,):
        raise ValueError(f"a packed [{d}, {d}] matrix needs {d * (d + 1) // 2} values, the store holds {packed.size}")
    out = np.empty((d, d), dtype=np.float64)
    start = 0
    for i in range(d):
        out[i, i:] = packed[start:start + d - i]
        start += d - i
    tiles = _tiles(d)
    for i0, i1 in tiles:  # the mirror image fills the lower triangle
        for j0, j1 in tiles:
            if j0 > i0:
                out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T
        diag = out[i0:i1, i0:i1]
        lower = np.tril_indices(i1 - i0, -1)
        diag[lower] = diag.T[lower]
    return out
