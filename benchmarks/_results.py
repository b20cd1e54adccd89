"""Shared by the benchmark scripts: one section of RESULTS.md per script, and the machine line."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def update_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section starting with ``heading`` (up to the next ``## ``) in ``path``, or append it."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip() + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    path.write_text(new.rstrip() + "\n")


def machine_line(device: str = "cpu") -> str:
    """Machine, thread count and versions, for the head of a section."""
    import numpy
    import peft
    import torch
    import transformers

    where = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    if device.startswith("cuda") and torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()}"
    return (f"Machine: {where}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, numpy {numpy.__version__}.")


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def publish(heading: str, text: str, *, quick: bool = False, raw: dict | None = None, raw_path: Path | None = None,
            indent: int = 1) -> None:
    """Print a script's section; unless ``quick``, save ``raw`` to ``raw_path`` and replace its RESULTS.md section."""
    print(text)
    if quick:
        return
    if raw_path is not None:
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, indent=indent))
    update_section(heading, text)


def timed_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None],
                      prepare: Callable[[], None] = lambda: None, shuffle: bool = False) -> dict[str, dict]:
    """Wall seconds of each fn, interleaved: warmup rounds untimed, then ``repeats`` timed rounds; medians.
    ``prepare`` runs untimed before each fn. ``shuffle``: after the warmup rounds, each round runs the fns in a
    new (seeded) order, so that no fn always follows the same one (what one leaves behind, e.g. memory the
    kernel must find again, can slow the next)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for i in range(warmup + repeats):
        if shuffle and i >= warmup:
            rng.shuffle(order)
        for name in order:
            fn = fns[name]
            prepare()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        print(f"  round {i + 1}/{warmup + repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v),
              flush=True)
    return {k: {"median_s": statistics.median(v), "times_s": v} for k, v in times.items()}
