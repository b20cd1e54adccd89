"""Zarr stores that say whether they are complete: ``complete`` is written false first and true last.

Shared by the covariance and spectrum artifacts, so an interrupted write is refused on load by both.
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
    """A stored array as a float64 tensor."""
    return torch.from_numpy(np.asarray(array[...], dtype=np.float64))
