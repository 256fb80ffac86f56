"""The fused-linear token reductions with a head split by vocabulary rows over ranks (tensor
parallel: Megatron's ``ColumnParallelLinear``, a DTensor ``Shard(0)`` weight).

Each rank multiplies the hidden states by its rows of the head only, a chunk of tokens at a
time, and hands the chunk's local logits to the vocabulary-parallel primitives, which join the
log-sum-exp, the label's logit and the KL terms across the group. Each chunk runs under
activation checkpointing: its logits are dropped after the forward and formed again in the
backward (with the same collectives, in the same order on every rank), so no rank holds more
than one chunk of its slice of the logits, and the head is never gathered. The hidden states'
gradient is summed over the group, as a column-parallel layer's input gradient is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..sharding import VocabShard
from . import label_logprobs, token_kl
from .autocast import autocast_off
from .linear import LINEAR_CHUNK_BYTES
from .logit_map import LogitMap
from .numerics import PairMode, accumulation_dtype
from .vocab_stats import uniform_kl

Head = tuple[Tensor, Tensor | None]


class _SharedInput(torch.autograd.Function):
    """The hidden states every rank of the group holds alike: the identity forward; backward, the
    sum over the group of the ranks' gradients, each of which comes through its rows of the head
    only (Megatron's ``copy_to_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _mapped_logits(hidden: Tensor, valid: Tensor, head: Head, logit_map: LogitMap) -> Tensor:
    """The local logits ``(1, n, V_local)`` of a chunk of tokens, in the accumulation dtype and
    mapped as the model maps them; rows that score nothing are zeroed first (padding's hidden
    states may be NaN, and 0 times NaN is NaN in the head's gradient)."""
    rows = torch.where(valid[:, None], hidden, 0.0)
    with autocast_off(hidden):  # the head's matmul in the inputs' dtype, as on the other paths
        z = torch.nn.functional.linear(rows, *head).to(accumulation_dtype(hidden.dtype))
    if logit_map.scale != 1.0:
        z = z * logit_map.scale
    if logit_map.softcap is not None:
        z = torch.tanh(z / logit_map.softcap) * logit_map.softcap
    return z[None]


def _in_chunks(
    per_chunk: Callable[..., Tensor],
    hidden: Tensor,
    valid: Tensor,
    vocab: VocabShard,
    chunk_rows: int | None,
    *per_row: Tensor,
) -> Tensor:
    """``per_chunk(hidden rows, valid rows, *per_row rows)`` over chunks of the ``(B, L)`` tokens,
    each checkpointed when a gradient will be needed, joined back as ``(B, L)``; the hidden
    states' gradient is summed over the group.

    Every rank must take the same chunks (each chunk's collectives pair up across the group), so
    they are sized by the widest rank's slice, the same number on every rank; on an accelerator
    reading it waits once for the collective that found it."""
    tracked = torch.is_grad_enabled()
    if tracked and hidden.requires_grad:
        hidden = _SharedInput.apply(hidden, vocab.group)
    flat_hidden = hidden[:, : valid.shape[1]].reshape(-1, hidden.shape[-1])
    flat = [valid.reshape(-1), *(t.reshape(-1, *t.shape[2:]) for t in per_row)]
    step = chunk_rows or max(1, LINEAR_CHUNK_BYTES // (4 * max(1, int(vocab.widest))))
    parts = []
    for start in range(0, flat_hidden.shape[0], step):
        rows = slice(start, start + step)
        args = (flat_hidden[rows], *(t[rows] for t in flat))
        if tracked:
            parts.append(checkpoint(per_chunk, *args, use_reentrant=False))
        else:
            parts.append(per_chunk(*args))
    if not parts:
        return torch.zeros(
            valid.shape, dtype=accumulation_dtype(hidden.dtype), device=hidden.device
        )
    return torch.cat(parts).view(valid.shape)


def vocab_parallel_logprobs(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    valid: Tensor,
    vocab: VocabShard,
    logit_map: LogitMap,
    chunk_rows: int | None,
) -> Tensor:
    """Per-token log p(target) ``(B, L)`` of ``hidden[:, :L]`` through this rank's rows of the
    head; differentiable in ``hidden`` and the head."""

    def chunk(rows: Tensor, valid_rows: Tensor, target_rows: Tensor) -> Tensor:
        z = _mapped_logits(rows, valid_rows, head, logit_map)
        return label_logprobs(z, target_rows[None], valid_rows[None], vocab=vocab)[0]

    return _in_chunks(chunk, hidden, valid, vocab, chunk_rows, targets)


def vocab_parallel_kl(
    hidden: Tensor,
    head: Head,
    ref_hidden: Tensor,
    ref_head: Head,
    valid: Tensor,
    mode: PairMode,
    vocab: VocabShard,
    logit_map: LogitMap,
    chunk_rows: int | None,
) -> Tensor:
    """Per-token KL ``(B, L)`` between the heads' distributions on ``hidden[:, :L]`` and
    ``ref_hidden[:, :L]`` (a constant), both through this rank's rows of their heads."""

    def chunk(rows: Tensor, valid_rows: Tensor, ref_rows: Tensor) -> Tensor:
        with torch.no_grad():
            ref_z = _mapped_logits(ref_rows, valid_rows, ref_head, logit_map)
        z = _mapped_logits(rows, valid_rows, head, logit_map)
        return token_kl(z, ref_z, valid_rows[None], mode=mode, vocab=vocab)[0]

    ref_rows = ref_hidden[:, : valid.shape[1]]
    return _in_chunks(chunk, hidden, valid, vocab, chunk_rows, ref_rows)


def vocab_parallel_uniform_kl(
    hidden: Tensor,
    head: Head,
    valid: Tensor,
    vocab: VocabShard,
    logit_map: LogitMap,
    chunk_rows: int | None,
) -> Tensor:
    """Per-token KL(U || P) ``(B, L)`` of ``hidden[:, :L]`` through this rank's rows of the head,
    U uniform over the whole vocabulary's finite logits; differentiable in ``hidden`` and the
    head."""

    def chunk(rows: Tensor, valid_rows: Tensor) -> Tensor:
        z = _mapped_logits(rows, valid_rows, head, logit_map)
        return uniform_kl(z, valid_rows[None], vocab=vocab)[0]

    return _in_chunks(chunk, hidden, valid, vocab, chunk_rows)
