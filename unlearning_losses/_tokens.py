"""Aligning logits with labels: validation, the causal-LM shift, and the valid-position mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks
from .ops import BACKENDS


@dataclass(frozen=True)
class Tokens:
    """Logits as ``(B, T, V)`` with the ``(B, L)`` targets and mask of the rows they score.

    Under the shift ``L = T - 1`` and row ``t`` scores ``labels[:, t + 1]``; otherwise ``L = T``.
    ``flat`` records 2-D input, whose per-token results are returned as ``(N,)``.
    """

    logits: Tensor
    targets: Tensor
    valid: Tensor
    flat: bool

    def batched(self, like: Tensor) -> Tensor:
        """A tensor shaped like the caller's logits, in the ``(B, T, V)`` layout of ``self.logits``."""
        return like.unsqueeze(0) if self.flat else like

    def unflatten(self, per_token: Tensor) -> Tensor:
        """Per-token ``(B, L)`` values in the caller's layout: ``(N,)`` for 2-D input."""
        return per_token.squeeze(0) if self.flat else per_token


def align(
    logits: object,
    labels: object,
    *,
    ignore_index: int,
    shift: bool,
    backend: str,
    validate: bool = False,
    name: str = "logits",
    labels_name: str = "labels",
    vocab_size: int | None = None,
    vocab_group: object = None,
) -> Tokens:
    """Validate ``logits``/``labels`` and align them per the shift convention (SPEC §1).

    For the fused-linear losses ``logits`` is the hidden states (``name="hidden"``) and
    ``vocab_size`` comes from the head. With ``vocab_group`` the logits are this rank's shard of
    the vocabulary, and labels index the whole of it.
    """
    logits = _checks.check_logits(logits, name)
    labels = _checks.check_labels(labels, logits, labels_name, ref_name=name)
    _checks.check_int(ignore_index, "ignore_index")
    _checks.check_choice(backend, BACKENDS, "backend")
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    if vocab_group is not None:
        from .ops.vocab_parallel import global_vocab_size

        vocab = global_vocab_size(logits, vocab_group)
    _checks.check_label_range(labels, vocab, ignore_index, validate, labels_name)
    flat = logits.dim() == 2
    if flat:
        logits, labels, shift = logits.unsqueeze(0), labels.unsqueeze(0), False
    targets = labels[:, 1:] if shift else labels
    return Tokens(logits, targets.long(), targets != ignore_index, flat)


def align_all_positions(logits: Tensor) -> Tokens:
    """Every position of ``logits`` counts (no labels, no shift)."""
    flat = logits.dim() == 2
    if flat:
        logits = logits.unsqueeze(0)
    shape = logits.shape[:-1]
    return Tokens(
        logits,
        torch.zeros(shape, dtype=torch.long, device=logits.device),
        torch.ones(shape, dtype=torch.bool, device=logits.device),
        flat,
    )
