"""Global counts for exact data-parallel losses.

A token mean computed per rank and averaged over ranks weights every rank equally, however many
valid tokens it holds; with ``num_items_in_batch`` (tokens) or ``num_sequences`` (sequences) set to
the count over all ranks, each rank's loss is its share of the global sum, and the sum of the
per-rank gradients (what DDP/FSDP all-reduce) is the single-process full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks
from .sharding import check_group


class GlobalCounts(NamedTuple):
    """Counts over every rank of the group, as 0-d int64 tensors on the labels' device.

    Attributes:
        tokens: valid (non-ignored) label positions: pass as ``num_items_in_batch``.
        sequences: sequences with at least one valid position: pass as ``num_sequences``.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[-100, 5, 6], [-100, -100, -100]])
        >>> global_counts(labels)  # one process: the local counts (shifted labels 5 and 6)
        GlobalCounts(tokens=tensor(2), sequences=tensor(1))
    """

    tokens: Tensor
    sequences: Tensor


def global_counts(
    labels: Tensor | Sequence[Tensor],
    *,
    ignore_index: int = -100,
    shift: bool = True,
    group: object = None,
) -> GlobalCounts:
    """Count the valid tokens and non-empty sequences of ``labels`` over all ranks.

    One ``all_reduce`` of two integers over ``group`` (the default group when ``None``), when
    ``torch.distributed`` is initialised; the local counts otherwise. Under gradient accumulation,
    pass the labels of every micro-batch of the step (a list), as Hugging Face Trainer counts
    ``num_items_in_batch``: still one ``all_reduce``.

    Args:
        labels: this rank's ``(B, T)`` or ``(N,)`` labels (``(N,)``: one sequence), or a list of
            them (micro-batches, of any lengths).
        ignore_index: the label value of ignored positions.
        shift: for ``(B, T)`` labels, drop each sequence's first label as the causal-LM losses
            do; ``False`` for already-aligned labels (and for :func:`rmu_loss`'s positions).
        group: the data-parallel process group.

    Example:
        >>> import math, torch
        >>> from unlearning_losses import ga_loss
        >>> labels = torch.tensor([[-100, 5, 6], [-100, 7, -100]])
        >>> counts = global_counts(labels)  # one process: the local counts, after the shift
        >>> counts
        GlobalCounts(tokens=tensor(3), sequences=tensor(2))
        >>> logits = torch.zeros(2, 3, 8)  # every token 1/8
        >>> ga_loss(logits, labels, num_items_in_batch=counts.tokens), math.log(1 / 8)
        (tensor(-2.0794), -2.0794415416798357)
    """
    _checks.check_int(ignore_index, "ignore_index")
    check_group(group, "group")
    batches = [labels] if isinstance(labels, Tensor) else list(labels)
    if not batches:
        raise ValueError(
            "labels must be a tensor or a non-empty list of tensors; got an empty list"
        )
    counts = torch.stack(
        [_local_counts(_checks.check_tensor(b, "labels"), ignore_index, shift) for b in batches]
    ).sum(0)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return GlobalCounts(counts[0], counts[1])


def _local_counts(labels: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """``[valid tokens, non-empty sequences]`` of one rank's labels, int64."""
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must have shape (B, T) or (N,); got {tuple(labels.shape)}")
    labels = labels.to(torch.int64)  # -100 must not wrap in narrow or unsigned types
    if labels.dim() == 1:  # aligned, as the losses treat 2-D logits
        labels = labels.unsqueeze(0)
    elif shift:
        labels = labels[:, 1:]
    valid = labels != ignore_index
    return torch.stack([valid.sum(), valid.any(-1).sum()]).to(torch.int64)
