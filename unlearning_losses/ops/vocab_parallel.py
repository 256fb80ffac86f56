"""The token reductions over vocabulary-parallel (tensor-parallel) logits.

Each rank of the group holds a contiguous slice of the columns of the logits, as Megatron-style
vocab-parallel output heads and DTensor ``Shard`` placements produce them (uneven slices too). A row's global log-sum-exp combines the
ranks' local ones with two all-reduces (``max``, then ``sum`` of the rescaled partial sums); the
label logit travels in the same ``sum``. The KL needs one more ``sum`` for its weighted terms, and
so do the soft targets (UNDIAL, CE-U), whose target's log-sum-exp joins the model's. Each
backward is local: ``d/dz_j`` of the per-token value depends only on column ``j`` and the global
per-row statistics saved by the forward. Rows are walked in chunks as in ``chunked``; the float32
temporaries are chunk-sized, the communication is ``(B, L)`` per-token values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..sharding import VocabShard
from .autocast import without_autocast
from .chunked import row_chunks, row_groups, zero_ignored_rows_, zero_outside
from .numerics import (
    PairMode,
    accumulation_dtype,
    floored_logprob,
    label_gradient_,
    pair_gradient,
    pair_scores,
    pair_value,
)


def _global_lse(local_lse: Tensor, group: object, extra: Tensor | None = None):
    """Combine per-rank log-sum-exps ``(..., B, L)`` into the global ones (and sum ``extra``)."""
    top = local_lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # A row that is -inf everywhere keeps its -inf log-sum-exp instead of turning NaN.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    partial = torch.exp(local_lse - top)
    if extra is not None:
        partial = torch.cat([partial, extra[None]])
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    lse = top + torch.log(partial[: len(local_lse)])
    return (lse, partial[-1]) if extra is not None else (lse, None)


def _floored_difference(logits: Tensor, ref_logits: Tensor, b: slice, t: slice) -> Tensor:
    """``z - z_ref`` of a chunk in the accumulation dtype, ``-inf`` floored on both sides (a zero
    probability then meets a finite difference); NaN stays NaN."""
    acc = accumulation_dtype(logits.dtype)
    floor = torch.finfo(acc).min
    return logits[b, t].to(acc).clamp_min(floor).sub_(ref_logits[b, t].to(acc).clamp_min(floor))


def _label_columns(
    targets: Tensor, valid: Tensor, vocab: VocabShard, local_vocab: int
) -> tuple[Tensor, Tensor]:
    """Each row's label as a column of this rank's slice (0 where another rank holds it), and
    the valid rows whose label this rank holds."""
    local_targets = targets - vocab.offset
    in_shard = valid & (local_targets >= 0) & (local_targets < local_vocab)
    return torch.where(in_shard, local_targets, 0), in_shard


class VocabParallelLogprobs(torch.autograd.Function):
    """log p(target) per row of ``logits[:, :L]``, the vocabulary sharded over ``group``."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, valid: Tensor, vocab: VocabShard
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local_vocab = logits.shape[-1]
        local_targets, in_shard = _label_columns(targets, valid, vocab, local_vocab)
        local_lse = torch.zeros(valid.shape, dtype=acc, device=logits.device)
        label_logit = torch.zeros_like(local_lse)
        groups = row_groups(valid, local_vocab)
        for b, t in row_chunks(groups, local_vocab):
            x = logits[b, t].to(acc)
            local_lse[b, t] = torch.logsumexp(x, -1)  # -inf on a rank that holds no column
            if local_vocab:  # fewer columns than ranks: a rank may hold none, hence no label
                picked = x.gather(-1, local_targets[b, t, None]).squeeze(-1)
                label_logit[b, t] = torch.where(in_shard[b, t], picked, 0.0)
        lse, label_logit = _global_lse(local_lse[None], vocab.group, label_logit)
        lse = lse[0]
        out = torch.where(valid, floored_logprob(label_logit - lse, lse), 0.0)
        ctx.save_for_backward(logits, local_targets, in_shard, valid, lse, out)
        ctx.groups = groups
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        logits, local_targets, in_shard, valid, lse, logprobs = ctx.saved_tensors
        acc = lse.dtype
        grad = torch.empty_like(logits)
        zero_outside(grad, ctx.groups)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        # d log p_y / d z_j = 1[j = y] - p_j, the label column living on one rank only.
        for b, t in row_chunks(ctx.groups, logits.shape[-1]) if logits.shape[-1] else ():
            chunk = torch.sub(logits[b, t].to(acc), lse[b, t, None]).exp_()
            zero_ignored_rows_(chunk, valid[b, t])
            row = (b, t, None)
            label_gradient_(
                chunk, logprobs[row], local_targets[row], scale[row], chunk, in_shard[row]
            )
            grad[b, t] = chunk
        return grad, None, None, None


class VocabParallelTokenKL(torch.autograd.Function):
    """KL(P || Q) or KL(Q || P) (``mode``) per row of ``[:, :L]``, vocabulary sharded."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        logits: Tensor,
        ref_logits: Tensor,
        valid: Tensor,
        mode: PairMode,
        group: object,
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local_vocab = logits.shape[-1]
        groups = row_groups(valid, local_vocab)
        local_lse = torch.zeros((2, *valid.shape), dtype=acc, device=logits.device)
        for b, t in row_chunks(groups, local_vocab):
            local_lse[0, b, t] = torch.logsumexp(logits[b, t].to(acc), -1)
            local_lse[1, b, t] = torch.logsumexp(ref_logits[b, t].to(acc), -1)
        (lse, ref_lse), _ = _global_lse(local_lse, group)
        # The KL's partial sums and, for the forward KL's gradient, those of sum_v p_v d_v with
        # d = z - z_ref (see ``numerics.kl_gradient``), joined in one all_reduce.
        partial = torch.zeros((2, *valid.shape), dtype=acc, device=logits.device)
        for b, t in row_chunks(groups, local_vocab):
            logp = logits[b, t].to(acc) - lse[b, t, None]
            logq = ref_logits[b, t].to(acc) - ref_lse[b, t, None]
            weights, scores = pair_scores(logp, logq, mode, 0.0)
            partial[0, b, t] = pair_value(weights, scores)
            if mode == PairMode.KL_FORWARD:
                partial[1, b, t] = pair_value(
                    weights, _floored_difference(logits, ref_logits, b, t)
                )
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        kl = torch.where(valid, partial[0], 0.0)
        ctx.save_for_backward(logits, ref_logits, valid, lse, ref_lse, kl, partial[1])
        ctx.groups, ctx.mode = groups, mode
        return kl

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        logits, ref_logits, valid, lse, ref_lse, kl, centre = ctx.saved_tensors
        acc = kl.dtype
        grad = torch.empty_like(logits)
        zero_outside(grad, ctx.groups)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        for b, t in row_chunks(ctx.groups, logits.shape[-1]):
            logp = logits[b, t].to(acc) - lse[b, t, None]
            if ctx.mode == PairMode.KL_FORWARD:  # p (d - sum_v p_v d_v), the sum over every rank
                delta = _floored_difference(logits, ref_logits, b, t)
                inner = delta.sub_(centre[b, t, None]).mul_(logp.exp_())
            else:
                logq = ref_logits[b, t].to(acc) - ref_lse[b, t, None]
                weights, scores = pair_scores(logp, logq, ctx.mode, 0.0)
                inner = pair_gradient(logp, weights, scores, kl[b, t], ctx.mode)
            zero_ignored_rows_(inner, valid[b, t])
            grad[b, t] = inner.mul_(scale[b, t, None])
        return grad, None, None, None, None


def _target_logits(
    ref_logits: Tensor,
    local_targets: Tensor,
    in_shard: Tensor,
    chunk: tuple[slice, slice],
    label_shift: float,
    acc: Any,
) -> Tensor:
    """The soft target's logits of a chunk in ``acc``: the reference's, with the label's lowered
    by ``label_shift`` on the rank that holds it (``inf`` removes it, CE-U)."""
    target = ref_logits[chunk].to(acc, copy=True)
    if target.shape[-1]:  # a rank may hold no column
        index = local_targets[chunk][..., None]
        picked = target.gather(-1, index)
        lowered = torch.where(in_shard[chunk][..., None], picked - label_shift, picked)
        target.scatter_(-1, index, lowered)
    return target


class VocabParallelSoftTarget(torch.autograd.Function):
    """-sum_v q_v log p_v per row of ``[:, :L]``, Q = softmax(ref_logits - label_shift * onehot)
    (UNDIAL, CE-U), the vocabulary sharded over ``vocab.group``.

    Q needs the global log-sum-exp of the lowered target logits, which joins the model's in the
    same two all-reduces; the value's partial sums take a third. The backward ``p - q`` is local.
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        logits: Tensor,
        ref_logits: Tensor,
        targets: Tensor,
        valid: Tensor,
        label_shift: float,
        vocab: VocabShard,
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local_vocab = logits.shape[-1]
        local_targets, in_shard = _label_columns(targets, valid, vocab, local_vocab)
        groups = row_groups(valid, local_vocab)
        local_lse = torch.zeros((2, *valid.shape), dtype=acc, device=logits.device)
        for b, t in row_chunks(groups, local_vocab):
            target = _target_logits(ref_logits, local_targets, in_shard, (b, t), label_shift, acc)
            local_lse[0, b, t] = torch.logsumexp(logits[b, t].to(acc), -1)
            local_lse[1, b, t] = torch.logsumexp(target, -1)
        (lse, target_lse), _ = _global_lse(local_lse, vocab.group)
        partial = torch.zeros(valid.shape, dtype=acc, device=logits.device)
        for b, t in row_chunks(groups, local_vocab):
            logp = logits[b, t].to(acc) - lse[b, t, None]
            target = _target_logits(ref_logits, local_targets, in_shard, (b, t), label_shift, acc)
            logq = target.sub_(target_lse[b, t, None])
            partial[b, t] = pair_value(*pair_scores(logp, logq, PairMode.SOFT_TARGET, label_shift))
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=vocab.group)
        value = torch.where(valid, partial, 0.0)
        ctx.save_for_backward(logits, ref_logits, local_targets, in_shard, valid, lse, target_lse)
        ctx.groups, ctx.label_shift = groups, label_shift
        return value

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        logits, ref_logits, local_targets, in_shard, valid, lse, target_lse = ctx.saved_tensors
        acc = lse.dtype
        grad = torch.empty_like(logits)
        zero_outside(grad, ctx.groups)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        for b, t in row_chunks(ctx.groups, logits.shape[-1]) if logits.shape[-1] else ():
            target = _target_logits(
                ref_logits, local_targets, in_shard, (b, t), ctx.label_shift, acc
            )
            inner = torch.sub(logits[b, t].to(acc), lse[b, t, None]).exp_()
            inner.sub_(target.sub_(target_lse[b, t, None]).exp_())  # p - q
            zero_ignored_rows_(inner, valid[b, t])
            grad[b, t] = inner.mul_(scale[b, t, None])
        return grad, None, None, None, None, None
