"""Token -> sequence -> batch reductions over a mask of valid positions.

Empty selections contribute 0 (never NaN): means divide by ``max(count, 1)``, and a sequence
without a valid token is left out of sequence means. With a :class:`~.sharding.Sharding` whose
groups split the batch or the sequences over ranks, sums and counts are reduced over those groups
first, so every rank returns the whole batch's value (docs/conventions.md §7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .sharding import LOCAL, Sharding

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def masked_sum(values: Tensor, valid: Tensor) -> Tensor:
    return values.masked_fill(~valid, 0.0).sum()


def divide_by_count(total: Tensor, count: int | Tensor) -> Tensor:
    """``total / max(count, 1)``: an empty selection gives 0."""
    if isinstance(count, Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


def token_reduce(
    values: Tensor,
    valid: Tensor,
    reduction: str,
    num_items_in_batch: int | Tensor | None = None,
    sharding: Sharding = LOCAL,
) -> Tensor:
    """Reduce per-token values: ``mean`` over valid tokens (or ``sum / num_items_in_batch``),
    ``sum``, or ``none`` (the values, 0 at invalid positions)."""
    return _reduce(values, valid, reduction, num_items_in_batch, sharding.sum_over_tokens)


def sequence_sums(
    values: Tensor, valid: Tensor, sharding: Sharding = LOCAL
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of valid values and per-sequence valid counts, both ``(B,)``, over the
    whole of each sequence (its slices on every rank of the sequence group).

    A sum beyond the dtype's range (log-probs of logits spanning more than it) is held at its
    finite extreme, so differences of sums (DPO) stay finite; NaN stays NaN.
    """
    sums = sharding.sequence_parts(values.masked_fill(~valid, 0.0).sum(-1))
    limit = torch.finfo(sums.dtype).max
    return sums.clamp(-limit, limit), sharding.sequence_parts(valid.sum(-1))


def sequence_reduce(
    values: Tensor,
    nonempty: Tensor,
    reduction: str,
    num_sequences: int | Tensor | None = None,
    sharding: Sharding = LOCAL,
) -> Tensor:
    """Reduce per-sequence values over the sequences that have at least one valid token; with
    ``num_sequences`` (a global count, data parallel) the mean divides the sum by it."""
    return _reduce(values, nonempty, reduction, num_sequences, sharding.sum_over_sequences)


def _reduce(
    values: Tensor,
    counted: Tensor,
    reduction: str,
    count: int | Tensor | None,
    over_ranks: Callable[[Tensor], Tensor],
) -> Tensor:
    """``none``, ``sum`` or ``mean`` of the ``counted`` values, sums taken ``over_ranks``."""
    if reduction == "none":
        return values.masked_fill(~counted, 0.0)
    total = over_ranks(masked_sum(values, counted))
    if reduction == "sum":
        return total
    return divide_by_count(total, over_ranks(counted.sum()) if count is None else count)
