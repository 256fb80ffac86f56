"""What the Triton kernels and launchers share: the online log-sum-exp step, tile size, the row
grid, per-row targets."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: The widest vocabulary tile a program loads at once; V larger than this is walked in tiles.
MAX_BLOCK_V = 4096


#: Where a running maximum starts: the lowest finite float32, never -inf, so that no
#: ``-inf - -inf`` arises; masked (-inf) entries then weigh exactly 0, and a row of nothing else
#: ends with a sum of 0 and a log-sum-exp of -inf.
LOWEST = tl.constexpr(-3.4028234663852886e38)
#: Below this magnitude ``expm1`` sums its series instead of subtracting 1 from an exponential.
EXPM1_SERIES = tl.constexpr(0.5)


@triton.jit
def online_lse_step(running_max, x):
    """One tile of an online log-sum-exp over a row, the state a scalar maximum (from
    ``LOWEST``): the new maximum, the factor that rescales the running sum to it, and
    ``exp(x - maximum)``. One exponential per element and one per tile; NaN propagates."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    return new_max, tl.exp(running_max - new_max), tl.exp(x - new_max)


def block_size(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def row_targets(targets: Tensor, valid: Tensor) -> Tensor:
    """Flat int64 targets per row: -1 for rows that do not count, ``V``-or-more stays out of range.

    A negative label other than ``ignore_index`` is sent out of range too, so it yields NaN rather
    than passing for an ignored position.
    """
    out_of_range = torch.iinfo(torch.int64).max
    return torch.where(valid, targets.masked_fill(targets < 0, out_of_range), -1).reshape(-1)


def launch_rows(kernel, valid: Tensor, *args, inputs: int = 1, **meta) -> None:
    """Launch ``kernel`` with one program per row of ``valid`` (none for an empty selection);
    ``inputs``: the logit tensors it reads per element."""
    rows = valid.numel()
    if rows == 0:
        return
    kernel[(rows,)](*args, num_warps=num_warps(meta["BLOCK_V"], inputs), **meta)


def num_warps(block_v: int, inputs: int = 1) -> int:
    """Warps per program for a tile of ``block_v`` logits. A kernel that reads ``inputs`` logit
    tensors per element (KL: the model's and the reference's) spreads a wide tile over that many
    times the warps, so that each thread's live values stay within the registers that let two
    programs share an SM."""
    return 8 * inputs if block_v >= 2048 else 4


@triton.jit
def expm1_series(x):
    """``exp(x) - 1`` for ``|x| < 1/2`` by its Taylor series to degree 9 (truncation below 3e-10
    relative): no exponential, and no cancellation near 0."""
    poly = 1.0 / 40320.0 + x / 362880.0
    poly = 1.0 / 5040.0 + x * poly
    poly = 1.0 / 720.0 + x * poly
    poly = 1.0 / 120.0 + x * poly
    poly = 1.0 / 24.0 + x * poly
    poly = 1.0 / 6.0 + x * poly
    poly = 0.5 + x * poly
    return x * (1.0 + x * poly)


@triton.jit
def expm1(x):
    """``exp(x) - 1`` without cancellation near 0: :func:`expm1_series` for ``|x| < 1/2``,
    ``exp(x) - 1`` elsewhere."""
    return tl.where(tl.abs(x) < EXPM1_SERIES, expm1_series(x), tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """``log(1 + x)`` without cancellation near 0: the series to degree 10 for ``|x| < 1/8``
    (truncation below 1e-10 relative), ``log(1 + x)`` elsewhere (within 8 float32 units)."""
    poly = 1.0 / 9.0 - x / 10.0
    poly = -1.0 / 8.0 + x * poly
    poly = 1.0 / 7.0 + x * poly
    poly = -1.0 / 6.0 + x * poly
    poly = 1.0 / 5.0 + x * poly
    poly = -1.0 / 4.0 + x * poly
    poly = 1.0 / 3.0 + x * poly
    poly = -1.0 / 2.0 + x * poly
    return tl.where(tl.abs(x) < 0.125, x * (1.0 + x * poly), tl.log(1.0 + x))
