"""Token -> sequence -> batch reductions over a mask of valid positions.

Empty selections contribute 0 (never NaN): means divide by ``max(count, 1)``, and a sequence
without a valid token is left out of sequence means.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def masked_sum(values: Tensor, valid: Tensor) -> Tensor:
    return values.masked_fill(~valid, 0.0).sum()


def token_reduce(
    values: Tensor,
    valid: Tensor,
    reduction: str,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-token values: ``mean`` over valid tokens (or ``sum / num_items_in_batch``),
    ``sum``, or ``none`` (the values, 0 at invalid positions)."""
    if reduction == "none":
        return values.masked_fill(~valid, 0.0)
    total = masked_sum(values, valid)
    if reduction == "sum":
        return total
    count = valid.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


def sequence_sums(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of valid values and per-sequence valid counts, both ``(B,)``."""
    return values.masked_fill(~valid, 0.0).sum(-1), valid.sum(-1)


def sequence_reduce(
    values: Tensor,
    nonempty: Tensor,
    reduction: str,
    num_sequences: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-sequence values over the sequences that have at least one valid token; with
    ``num_sequences`` (a global count, data parallel) the mean divides the sum by it."""
    return token_reduce(values, nonempty, reduction, num_sequences)
