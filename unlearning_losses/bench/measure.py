"""Timing, memory and bandwidth on the device at hand: CUDA events on a GPU, the clock and the
resident-set peak elsewhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self(fn) for _ in range(repeats))


class Clock:
    """Marks inside one piece of work, read after it: CUDA events on a GPU (recorded in stream
    order, no sync between marks), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds from ``start`` to ``end`` (on a GPU, after both have happened)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def copy_bandwidth(device: torch.device, timer: Timer, megabytes: int = 256) -> float:
    """GB/s of a copy on ``device`` (bytes read plus written), median of 10."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer.median(lambda: dst.copy_(src), repeats=10, warmup=2)
    return 2 * src.nbytes / ms / 1e6


def first_write_ms(device: torch.device, timer: Timer, megabytes: int = 256) -> tuple[float, float]:
    """Milliseconds to fill ``megabytes`` of freshly allocated memory, and of memory written
    before (median of 5): on a CPU the difference is the page faults of a new buffer, which every
    backward that returns a new gradient pays."""
    numel = megabytes * 2**20 // 4
    reused = torch.empty(numel, dtype=torch.float32, device=device)
    fresh = timer.median(
        lambda: torch.empty(numel, dtype=torch.float32, device=device).fill_(0.0), 5, warmup=1
    )
    return fresh, timer.median(lambda: reused.fill_(0.0), 5, warmup=1)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Memory ``fn`` takes beyond what was allocated before it: the allocator's peak on CUDA,
    the resident-set peak on Linux (reset first through ``/proc/self/clear_refs``); NaN where
    neither can be read."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    if not sys.platform.startswith("linux"):
        return float("nan")
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the resident-set peak restarts from the current size
    except OSError:
        return float("nan")
    before = _status_bytes("VmRSS")
    fn()
    return float(_status_bytes("VmHWM") - before)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def _release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``), so that
    memory freed by an earlier measurement is not reused unseen by the next: the resident-set
    peak then counts every byte ``fn`` touches."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
