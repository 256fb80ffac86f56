"""Aligning logits with labels: validation, the causal-LM shift, the valid-position mask, and how
the inputs are spread over ranks (plain tensors with groups, or DTensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checks, ops, sharding
from .sharding import LOCAL, Sharding


@dataclass(frozen=True)
class Tokens:
    """Logits as ``(B, T, V)`` with the ``(B, L)`` targets and mask of the rows they score.

    Under the shift ``L = T - 1`` and row ``t`` scores ``labels[:, t + 1]``; otherwise ``L = T``.
    ``flat`` records 2-D input, whose per-token results are returned as ``(N,)``. Every tensor
    is this rank's piece; ``sharding`` says how the pieces make the whole batch.
    """

    logits: Tensor
    targets: Tensor
    valid: Tensor
    flat: bool
    sharding: Sharding = LOCAL
    global_shape: tuple[int, ...] = ()
    """The caller's per-token shape over all ranks (DTensor logits; else unused)."""
    name: str = "logits"
    """The caller's name of the logits, for messages."""

    @property
    def hidden(self) -> Tensor:
        """``logits`` by the name of what the fused-linear losses align: hidden states
        ``(B, T, H)``, whose logits are formed chunk by chunk later."""
        return self.logits

    def batched(self, like: Tensor) -> Tensor:
        """A tensor shaped like the caller's logits, in the ``(B, T, V)`` layout of ``self.logits``."""
        return like.unsqueeze(0) if self.flat else like

    def unflatten(self, per_token: Tensor) -> Tensor:
        """Per-token ``(B, L)`` values in the caller's layout: ``(N,)`` for 2-D input, a DTensor
        for DTensor logits; scalars pass through."""
        if per_token.dim() == 0:
            return per_token
        out = per_token.squeeze(0) if self.flat else per_token
        return sharding.as_output(out, self.sharding, self.global_shape)

    def per_sequence(self, values: Tensor) -> Tensor:
        """Per-sequence ``(B,)`` values in the caller's layout (a DTensor for DTensor logits)."""
        if values.dim() == 0 or self.flat:
            return values
        return sharding.as_output(values, self.sharding, self.global_shape[:1])

    def local(self, value: Any, name: str, *, per_token: bool = False) -> Any:
        """This rank's piece of another input (``ref_logits``; ``per_token``: reference
        log-probs), checked against the logits' placements when it is a DTensor."""
        return sharding.local_like(value, self.sharding, name, per_token=per_token)

    def like_logits(self, value: object, name: str) -> Tensor:
        """``value`` (e.g. reference logits) local, checked to match the logits, batched."""
        caller = self.logits.squeeze(0) if self.flat else self.logits
        return self.batched(_checks.check_like(self.local(value, name), caller, name, self.name))

    def label_logprobs(
        self, backend: str, *, inplace_backward: bool = False, logits: Tensor | None = None
    ) -> Tensor:
        """log p(target) ``(B, L)`` of these logits (or of ``logits`` laid out like them, e.g.
        the reference's from :meth:`like_logits`), 0 where not valid; over the vocabulary shard
        when the logits hold one. Differentiable in the logits read."""
        return ops.label_logprobs(
            self.logits if logits is None else logits,
            self.targets,
            self.valid,
            backend=backend,
            inplace_backward=inplace_backward,
            vocab=self.sharding.vocab,
        )


def align(
    logits: Any,
    labels: Any,
    *,
    ignore_index: int,
    shift: bool,
    backend: str,
    validate: bool = False,
    name: str = "logits",
    labels_name: str = "labels",
    vocab_size: int | None = None,
    vocab_group: object = None,
    sequence_group: object = None,
    vocab_parallel: bool = True,
    hidden: bool = False,
) -> Tokens:
    """Validate ``logits``/``labels`` and align them by the shift convention
    (docs/conventions.md §1).

    For the fused-linear losses ``logits`` is the hidden states (``hidden=True``) and
    ``vocab_size`` comes from the head. With ``vocab_group`` the logits are this rank's shard of
    the vocabulary, and labels index the whole of it; with ``sequence_group`` every sequence's
    positions are split over that group. DTensor logits bring their groups in their placements
    (docs/conventions.md §7); ``vocab_parallel=False`` refuses a sharded vocabulary (losses
    without that path).
    """
    _checks.check_bool(shift, "shift")
    _checks.check_bool(validate, "validate")
    logits, split, global_shape = _local_logits(
        logits, name, vocab_group, sequence_group, vocab_parallel, hidden
    )
    flat = logits.dim() == 2
    if split.sequence_group is not None and shift and not flat:
        raise ValueError(
            f"{name} split over a sequence group (context parallel) need labels already shifted "
            "(labels[:, t] scored by logits[:, t]) and shift=False: the shift cannot cross the "
            "ranks' slices"
        )
    labels = _checks.check_labels(
        sharding.local_like(labels, split, labels_name, per_token=True),
        logits,
        labels_name,
        ref_name=name,
    )
    _checks.check_int(ignore_index, "ignore_index")
    _checks.check_choice(backend, ops.BACKENDS, "backend")
    vocab: int | Tensor = logits.shape[-1] if vocab_size is None else vocab_size
    if split.vocab is not None:
        vocab = split.vocab.size
    _checks.check_label_range(labels, vocab, ignore_index, validate, labels_name)
    if flat:
        logits, labels, shift = logits.unsqueeze(0), labels.unsqueeze(0), False
    targets = labels[:, 1:] if shift else labels
    if shift and global_shape:
        global_shape = (global_shape[0], global_shape[1] - 1)
    return Tokens(logits, targets, targets != ignore_index, flat, split, global_shape, name)


def align_all_positions(
    logits: Any,
    *,
    name: str = "logits",
    vocab_group: object = None,
    vocab_parallel: bool = True,
    hidden: bool = False,
) -> Tokens:
    """Every position of ``logits`` counts (no labels, no shift)."""
    logits, split, global_shape = _local_logits(
        logits, name, vocab_group, None, vocab_parallel, hidden
    )
    flat = logits.dim() == 2
    if flat:
        logits = logits.unsqueeze(0)
    shape = logits.shape[:-1]
    return Tokens(
        logits,
        torch.zeros(shape, dtype=torch.long, device=logits.device),
        torch.ones(shape, dtype=torch.bool, device=logits.device),
        flat,
        split,
        global_shape,
        name,
    )


def _local_logits(
    logits: Any,
    name: str,
    vocab_group: Any,
    sequence_group: Any,
    vocab_parallel: bool,
    hidden: bool,
) -> tuple[Tensor, Sharding, tuple[int, ...]]:
    """Checked logits (hidden states with ``hidden``) as this rank's local tensor, how they are
    spread over ranks, and the caller's per-token shape over all of them (DTensor input; else
    empty)."""
    if not sharding.is_dtensor(logits):
        if hidden:
            logits = _checks.check_hidden(logits, name)
        else:
            logits = _checks.check_logits(logits, name, vocab_slice=vocab_group is not None)
        split = sharding.from_groups(logits, vocab_group, sequence_group)
        if split.vocab is not None and isinstance(split.vocab.size, int) and split.vocab.size < 1:
            raise ValueError(
                f"{name} must have a vocabulary of at least 1 column over vocab_group; every "
                f"rank holds none ({tuple(logits.shape)} here)"
            )
        return logits, split, ()
    check = _checks.check_hidden if hidden else _checks.check_logits
    check(logits, name)
    if vocab_group is not None or sequence_group is not None:
        raise ValueError(
            f"{name} is a DTensor, whose placements give its groups; pass vocab_group and "
            f"sequence_group only with plain tensors (got {name} with placements "
            f"{tuple(logits.placements)})"
        )
    split = sharding.from_dtensor(logits, name, vocab_parallel=vocab_parallel)
    return logits.to_local(), split, tuple(logits.shape[:-1])
