"""Peak memory of one measured call: on CPU the growth of the kernel's peak-RSS mark in a process, on CUDA
``torch.cuda.max_memory_allocated``; plus the glibc settings that make RSS track live tensor memory.

Linux only: the peak-RSS mark (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

Run = Callable[[], dict[str, Any]]  # the measured call; returns figures that are not time or memory


def status_kib(field: str) -> int:
    """One ``/proc/self/status`` counter (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Set the peak-RSS mark (``VmHWM``) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def trim_heap() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so RSS starts from live memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def mmap_large_allocations() -> None:
    """glibc: serve allocations above 64 KiB with mmap (returned to the OS on free) and trim the heap eagerly."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 128 * 1024)):
        raise RuntimeError("mallopt failed: peak RSS would not track live tensor memory")


def measure_forked(model: nn.Module, build: Callable[[nn.Module], Run]) -> dict[str, Any]:
    """Build and run in a forked child (its own copy of ``model``); peak RSS growth over the built state."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            run = build(model)
            _touch(model)
            reset_peak()
            base = status_kib("VmRSS")
            t0, c0 = time.perf_counter(), time.process_time()
            extra = run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            send.send({"peak_bytes": (status_kib("VmHWM") - base) * 1024, "time_s": wall, "cpu_s": cpu, **extra})
        except BaseException as e:  # reported to the parent, which raises
            send.send({"error": f"{type(e).__name__}: {e}"})

    proc = ctx.Process(target=child)
    proc.start()
    result = recv.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"measurement failed in the child: {result['error']}")
    return result


def measure_cuda(model: nn.Module, build: Callable[[nn.Module], Run]) -> dict[str, Any]:
    """Build on a fresh GPU copy of ``model``; peak of ``torch.cuda.max_memory_allocated`` over the built state."""
    import torch

    fresh = copy.deepcopy(model).to("cuda")
    run = build(fresh)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    extra = run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    result = {"peak_bytes": torch.cuda.max_memory_allocated() - base, "time_s": wall, "cpu_s": wall, **extra}
    del fresh, run
    torch.cuda.empty_cache()
    return result


def _touch(model: nn.Module) -> None:
    """Read every weight once: they are mmapped from safetensors, and a forked child faults file pages into
    its RSS lazily on first use, which would count the whole model (~0.5 GiB) as growth of the measured call."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
