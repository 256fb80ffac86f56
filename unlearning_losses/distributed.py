"""Global counts for exact data-parallel losses.

A token mean computed per rank and averaged over ranks weights every rank equally, however many
valid tokens it holds; with ``num_items_in_batch`` (tokens) or ``num_sequences`` (sequences) set to
the count over all ranks, each rank's loss is its share of the global sum, and the sum of the
per-rank gradients (what DDP/FSDP all-reduce) is the single-process full-batch gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks


class GlobalCounts(NamedTuple):
    """Counts over every rank of the group, as 0-d int64 tensors on the labels' device."""

    tokens: Tensor
    """Valid (non-ignored) label positions: pass as ``num_items_in_batch``."""
    sequences: Tensor
    """Sequences with at least one valid position: pass as ``num_sequences``."""


def global_counts(
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    group: object = None,
) -> GlobalCounts:
    """Count the valid tokens and non-empty sequences of ``labels`` over all ranks.

    One ``all_reduce`` of two integers over ``group`` (the default group when ``None``), when
    ``torch.distributed`` is initialised; the local counts otherwise. Under gradient accumulation,
    count over every micro-batch of the step instead, as Hugging Face Trainer does.

    Args:
        labels: this rank's ``(B, T)`` or ``(N,)`` labels (``(N,)``: one sequence).
        ignore_index: the label value of ignored positions.
        shift: for ``(B, T)`` labels, drop each sequence's first label as the causal-LM losses
            do; ``False`` for already-aligned labels (and for :func:`rmu_loss`'s positions).
        group: the data-parallel process group.

    Example:
        >>> counts = global_counts(labels)  # doctest: +SKIP
        >>> loss = ga_loss(logits, labels, num_items_in_batch=counts.tokens)  # doctest: +SKIP
        >>> loss = npo_loss(logits, labels, ref_logprobs=ref, num_sequences=counts.sequences)  # doctest: +SKIP
    """
    labels = _checks.check_tensor(labels, "labels")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must have shape (B, T) or (N,); got {tuple(labels.shape)}")
    _checks.check_int(ignore_index, "ignore_index")
    if labels.dim() == 1:  # aligned, as the losses treat 2-D logits
        labels = labels.unsqueeze(0)
    elif shift:
        labels = labels[:, 1:]
    valid = labels != ignore_index
    counts = torch.stack([valid.sum(), valid.any(-1).sum()]).to(torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return GlobalCounts(counts[0], counts[1])
