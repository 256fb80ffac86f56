"""Run a check on several CPU ranks (gloo, a rendezvous file: loopback only) and fail with the
first rank's error."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, check: Callable[[int], None], world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        check(rank)
        # Every rank done with its collectives before any tears its group down: a rank leaving
        # while gloo still serves the other once aborted a process ("terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished rank skips the interpreter's teardown, where gloo's threads have aborted a rank
    # ("terminate called without an active exception") after its check had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(check: Callable[[int], None], world: int, tmp_path: Path) -> None:
    """``check(rank)`` in ``world`` fresh processes; ``check`` must be a module-level function."""
    mp.spawn(_worker, args=(check, world, str(tmp_path / "rendezvous")), nprocs=world, join=True)
