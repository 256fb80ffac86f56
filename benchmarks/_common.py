"""Shared by the benchmark scripts: machine description, peak memory, timing, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp


def machine() -> str:
    """CPU model, core count, torch version and threads, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    import os

    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Run ``script --worker ARGS`` in a fresh interpreter and parse the JSON line it prints."""
    done = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` to two decimals; "n/a" when the baseline measured nothing (tiny runs,
    where the resident-set high-water mark does not move)."""
    return f"{value / baseline:.2f}" if baseline else "n/a"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_on_ranks(worker: Callable, args: object, paths: tuple[str, ...], world: int) -> dict:
    """``worker(rank, args, paths, rendezvous_file, result_file)`` in ``world`` fresh processes;
    the JSON that rank 0 writes to ``result_file``."""
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        rendezvous = os.path.join(folder, "rendezvous")
        mp.spawn(worker, args=(args, paths, rendezvous, result), nprocs=world, join=True)
        return json.loads(Path(result).read_text())
