"""What the Triton launchers share: tile size, the row grid, per-row targets."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

#: The widest vocabulary tile a program loads at once; V larger than this is walked in tiles.
MAX_BLOCK_V = 4096


def block_size(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def row_targets(targets: Tensor, valid: Tensor) -> Tensor:
    """Flat int64 targets per row: -1 for rows that do not count, ``V``-or-more stays out of range.

    A negative label other than ``ignore_index`` is sent out of range too, so it yields NaN rather
    than passing for an ignored position.
    """
    out_of_range = torch.iinfo(torch.int64).max
    return torch.where(valid, targets.masked_fill(targets < 0, out_of_range), -1).reshape(-1)


def launch_rows(kernel, valid: Tensor, *args, **meta) -> None:
    """Launch ``kernel`` with one program per row of ``valid`` (none for an empty selection)."""
    rows = valid.numel()
    if rows == 0:
        return
    num_warps = 8 if meta["BLOCK_V"] >= 2048 else 4
    kernel[(rows,)](*args, num_warps=num_warps, **meta)
