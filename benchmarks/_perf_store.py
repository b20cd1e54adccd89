"""The covariance store against ``numpy.save``/``numpy.load`` (``benchmarks/perf_stats.py``'s store figures)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from _peak_memory import trim_heap
from _results import timed_round_robin

from tlora.covariance import Covariance, load_covariance, save_covariance

STORE_REPEATS = 9  # a round of the store's six fns takes seconds, and disk write-back makes single ones noisy


def bench_store(cov: Covariance, repeats: int) -> dict:
    """``save_covariance``/``load_covariance`` with the pipeline's defaults, and with the compact codec, vs one
    ``numpy.save`` file per matrix / ``numpy.load``. Every write goes to a fresh folder, as the pipeline's staging
    folder is fresh, and the previous one is deleted untimed; every fn starts from the same allocator state."""
    arrays = {g: s.numpy() for g, s in cov.sums.items()}
    tmp = Path(tempfile.mkdtemp(prefix="perf_stats_"))
    latest: dict[str, Path] = {}
    count = iter(range(1 << 30))

    def fresh(kind: str) -> Path:
        latest[kind] = tmp / f"{kind}-{next(count)}"
        return latest[kind]

    def npy_write() -> None:
        folder = fresh("npy")
        folder.mkdir()
        for i, a in enumerate(arrays.values()):
            np.save(folder / f"{i}.npy", a)

    def npy_read() -> None:
        [np.load(latest["npy"] / f"{i}.npy") for i in range(len(arrays))]

    def settle() -> None:  # untimed: drop all but the latest output of each kind, flush, settle the heap
        for old in set(tmp.iterdir()) - set(latest.values()):
            shutil.rmtree(old)
        os.sync()  # no write-back of the previous fn's files runs during the next one
        trim_heap()  # each fn allocates its 768 MiB from the same heap state

    try:
        fns = {"npy_write": npy_write, "npy_read": npy_read,
               "zarr_write": lambda: save_covariance(fresh("default"), cov),
               "zarr_read": lambda: load_covariance(latest["default"]),
               "zarr_compact_write": lambda: save_covariance(fresh("compact"), cov, compressors="compact"),
               "zarr_compact_read": lambda: load_covariance(latest["compact"])}
        print("store:", flush=True)
        times = timed_round_robin(fns, repeats, warmup=1, sync=lambda: None, prepare=settle, shuffle=True)
        back = {k: load_covariance(latest[k]).sums for k in ("default", "compact")}
        exact = all(torch.equal(back[k][g], s) for k in back for g, s in cov.sums.items())
        size = {k: sum(f.stat().st_size for f in latest[d].rglob("*") if f.is_file())
                for k, d in (("npy", "npy"), ("zarr", "default"), ("zarr_compact", "compact"))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: v["median_s"] for k, v in times.items()}
    return {"times": times, "bytes": size, "round_trip_exact": exact,
            "write_ratio": med["zarr_write"] / med["npy_write"], "read_ratio": med["zarr_read"] / med["npy_read"],
            "size_ratio": size["zarr"] / size["npy"],
            "compact_write_ratio": med["zarr_compact_write"] / med["npy_write"],
            "compact_read_ratio": med["zarr_compact_read"] / med["npy_read"],
            "compact_size_ratio": size["zarr_compact"] / size["npy"]}
