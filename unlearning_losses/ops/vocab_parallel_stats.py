"""The vocabulary statistics (``vocab_numerics``) over vocabulary-parallel (tensor-parallel) logits.

Each rank of the group holds a contiguous slice of the columns, of any width (see
``vocab_parallel``). A row's statistics are joined with two ``all_reduce`` calls: a ``MAX`` of the
local log-sum-exps, with the inverted hinge's largest other logit, and a ``SUM`` of the rescaled
partial sums of exponentials and the label's logit; ME's partials join the same way about the
largest logit (``_joined_uniform_kl``). The
inverted hinge takes its runner-up's column (the first on ties) with a ``MIN``; the JSD joins its
shift's terms and the reference's logit at the largest logit in those two (``_joined_shift``), and
needs one more ``SUM`` for its row sums once the shift is known. Each backward is local, from
the global per-row statistics the forward saves. The per-chunk computations are
``chunked_stats``'s.
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
from .chunked_stats import (
    JSD_GRADIENT_ROWS,
    hinge_partials,
    hinge_probs_term,
    jsd_centred,
    jsd_difference,
    jsd_model_gradient,
    jsd_partials,
    jsd_probs,
    jsd_shift_terms,
    uniform_kl_gradient,
    uniform_kl_partials,
    vocab_coefficients,
)
from .numerics import accumulation_dtype, floored_logprob
from .vocab_numerics import (
    JSD_FAR,
    JSD_STATS,
    STATS,
    VocabMode,
    hinge_value,
    jsd_model_log_ratio,
    jsd_row_sum,
    uniform_kl_recentred,
    uniform_kl_stats,
)


def _joined(
    local_lse: Tensor, group: object, maxima: Tensor | None = None, sums: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Global log-sum-exps of per-rank ones ``(k, B, L)`` in two ``all_reduce`` calls, the first
    also taking the maximum of ``maxima`` over the ranks, the second the sum of ``sums``."""
    count = len(local_lse)
    top = local_lse.clone() if maxima is None else torch.cat([local_lse, maxima])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # A row that is -inf everywhere keeps its -inf log-sum-exp instead of turning NaN.
    centre = torch.where(torch.isfinite(top[:count]), top[:count], 0.0)
    partial = torch.exp(local_lse - centre)
    if sums is not None:
        partial = torch.cat([partial, sums])
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    lse = centre + torch.log(partial[:count])
    return (
        lse,
        top[count:] if maxima is not None else None,
        partial[count:] if sums is not None else None,
    )


def _joined_uniform_kl(partials: Tensor, group: object) -> tuple[Tensor, Tensor, Tensor]:
    """ME's per-row statistics (``vocab_numerics.uniform_kl_stats``) from each rank's partials
    ``(4, B, L)`` (``chunked_stats.uniform_kl_partials``) in two ``all_reduce`` calls: a ``MAX``
    of the largest logits, then a ``SUM`` of the partials moved to the row's centre."""
    largest = partials[0].clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    top, exp_sum, count, centred_sum = partials.unbind()
    moved = uniform_kl_recentred(top, exp_sum, count, centred_sum, largest)
    sums = torch.stack([moved[0], count, moved[1]])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return uniform_kl_stats(largest, *sums)


class VocabParallelStats(torch.autograd.Function):
    """ME's KL from the uniform distribution or the inverted hinge (``mode``) per row of
    ``logits[:, :L]``, the vocabulary sharded over ``vocab.group``."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        valid: Tensor,
        mode: VocabMode,
        vocab: VocabShard,
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local_vocab = logits.shape[-1]
        groups = row_groups(valid, local_vocab)
        # ME: largest logit, and about it the sum of exponentials, count and sum of finite
        # logits; IHL: log-sum-exp, label logit (0 off this rank), largest other logit. A rank
        # that holds no column adds nothing to them.
        rows = 4 if mode == VocabMode.UNIFORM_KL else 3
        partials = torch.zeros((rows, *valid.shape), dtype=acc, device=logits.device)
        partials[0] = float("-inf")
        if mode == VocabMode.INVERTED_HINGE:
            partials[2] = float("-inf")
        local_targets = targets - vocab.offset
        has_label = valid & (local_targets >= 0) & (local_targets < local_vocab)
        local_targets = torch.where(has_label, local_targets, 0)
        columns = torch.zeros(valid.shape, dtype=torch.long, device=logits.device)
        for b, t in row_chunks(groups, local_vocab) if local_vocab else ():
            x = logits[b, t].to(acc)
            if mode == VocabMode.UNIFORM_KL:
                for row, value in enumerate(uniform_kl_partials(x)):
                    partials[row, b, t] = value
            else:
                lse, label, other, column = hinge_partials(
                    x, local_targets[b, t, None], has_label[b, t]
                )
                partials[0, b, t], partials[1, b, t], partials[2, b, t] = lse, label, other
                columns[b, t] = column
        stats = torch.zeros((STATS, *valid.shape), dtype=acc, device=logits.device)
        index = torch.full(valid.shape, -1, dtype=torch.long, device=logits.device)
        if mode == VocabMode.UNIFORM_KL:
            for row, value in enumerate(_joined_uniform_kl(partials, vocab.group)):
                stats[row] = value
            value = stats[2]
        else:
            lse, maxima, sums = _joined(
                partials[:1], vocab.group, maxima=partials[2:], sums=partials[1:2]
            )
            assert maxima is not None and sums is not None
            lse, other, label = lse[0], maxima[0], sums[0]
            # The runner-up's global column: the first among the ranks that hold its logit.
            local_other = partials[2]
            holds = (local_other == other) & (local_other > float("-inf"))
            none = torch.iinfo(torch.long).max
            index = torch.where(holds, columns + vocab.offset, none)
            dist.all_reduce(index, op=dist.ReduceOp.MIN, group=vocab.group)
            index = torch.where(index == none, -1, index)
            stats[0] = lse
            stats[1] = floored_logprob(label - lse, lse)
            stats[2] = other - lse
            value = hinge_value(stats[1], stats[2])
        out = torch.where(valid, value, 0.0)
        ctx.save_for_backward(logits, local_targets, has_label, valid, stats, index)
        ctx.groups, ctx.mode, ctx.offset = groups, mode, vocab.offset
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        logits, local_targets, has_label, valid, stats, index = ctx.saved_tensors
        grad = torch.empty_like(logits)
        zero_outside(grad, ctx.groups)
        local_vocab = logits.shape[-1]
        coefficients = vocab_coefficients(grad_out, valid, stats, ctx.mode)
        local_index = index - ctx.offset
        has_other = valid & (local_index >= 0) & (local_index < local_vocab) & (index >= 0)
        local_index = torch.where(has_other, local_index, 0)
        for b, t in row_chunks(ctx.groups, local_vocab) if local_vocab else ():
            x = logits[b, t].to(stats.dtype)
            if ctx.mode == VocabMode.UNIFORM_KL:
                inner = uniform_kl_gradient(
                    x, stats[0, b, t], coefficients[0][b, t], coefficients[1][b, t]
                )
            else:
                on_probs, label_term, other_term = (c[b, t, None] for c in coefficients)
                inner = hinge_probs_term(x, stats[0, b, t], on_probs.squeeze(-1))
                # The label's and the runner-up's columns each live on one rank only.
                for column, held, term in (
                    (local_index[b, t, None], has_other[b, t, None], other_term),
                    (local_targets[b, t, None], has_label[b, t, None], label_term),
                ):
                    inner.scatter_(-1, column, torch.where(held, term, inner.gather(-1, column)))
            zero_ignored_rows_(inner, valid[b, t])
            grad[b, t] = inner
        return grad, None, None, None, None


class VocabParallelJSD(torch.autograd.Function):
    """The generalised JSD per row of ``[:, :L]`` between the model's and the reference's
    distributions, both sharded on the vocabulary over ``group``."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any, logits: Tensor, ref_logits: Tensor, valid: Tensor, beta: float, group: object
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        local_vocab = logits.shape[-1]
        groups = row_groups(valid, local_vocab)
        # Per rank: both log-sum-exps, the shift's ratio and largest centred difference in the
        # rank's own frame, the largest logit and the reference's logit at it.
        local = torch.zeros((6, *valid.shape), dtype=acc, device=logits.device)
        local[[0, 1, 3, 4]] = float("-inf")
        for b, t in row_chunks(groups, local_vocab) if local_vocab else ():
            x, ref = logits[b, t].to(acc), ref_logits[b, t].to(acc)
            lse, ref_lse = torch.logsumexp(x, -1), torch.logsumexp(ref, -1)
            ratio, largest = jsd_shift_terms(
                jsd_centred(x, ref, lse, ref_lse), jsd_probs(ref, ref_lse)
            )
            top, column = x.max(-1, keepdim=True)
            local[:, b, t] = torch.stack(
                [lse, ref_lse, ratio, largest, top.squeeze(-1), ref.gather(-1, column).squeeze(-1)]
            )
        joined = _joined_shift(local, group)
        lse, ref_lse, shift, top, top_ref, held = joined
        offset = lse - ref_lse
        # log(m / p) at the largest logit, as its rank forms it there (one rank must hold it).
        top_log_ratio = shift - (jsd_difference(top, top_ref) - offset)
        centre = torch.where(held, jsd_model_log_ratio(top_log_ratio, beta), 0.0)
        sums = torch.zeros((3, *valid.shape), dtype=acc, device=logits.device)
        for b, t in row_chunks(groups, local_vocab) if local_vocab else ():
            x, ref = logits[b, t].to(acc), ref_logits[b, t].to(acc)
            row = lse[b, t], ref_lse[b, t]
            plain, centred, divergence, _ = jsd_partials(
                jsd_centred(x, ref, *row),
                jsd_probs(x, row[0]),
                jsd_probs(ref, row[1]),
                shift[b, t],
                beta,
                centre[b, t],
            )
            sums[:, b, t] = torch.stack([plain, centred, divergence])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        stats = torch.zeros((JSD_STATS, *valid.shape), dtype=acc, device=logits.device)
        stats[0], stats[1], stats[3], stats[4] = lse, ref_lse, sums[2], shift
        stats[2], stats[5] = jsd_row_sum(sums[0], sums[1], centre)
        out = torch.where(valid, stats[3], 0.0)
        ctx.save_for_backward(logits, ref_logits, valid, stats)
        ctx.groups, ctx.beta = groups, beta
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        logits, ref_logits, valid, stats = ctx.saved_tensors
        grad = torch.empty_like(logits)
        zero_outside(grad, ctx.groups)
        scale = torch.where(valid, grad_out.to(stats.dtype), 0.0) * ctx.beta
        for b, t in row_chunks(ctx.groups, logits.shape[-1]) if logits.shape[-1] else ():
            x, ref = logits[b, t].to(stats.dtype), ref_logits[b, t].to(stats.dtype)
            row_stats = tuple(stats[k, b, t] for k in JSD_GRADIENT_ROWS)
            inner = jsd_model_gradient(x, ref, row_stats, ctx.beta)
            zero_ignored_rows_(inner, valid[b, t])
            grad[b, t] = inner.mul_(scale[b, t, None])
        return grad, None, None, None, None


def _joined_shift(local: Tensor, group: object) -> tuple[Tensor, ...]:
    """The global log-sum-exps, shift (``vocab_numerics.jsd_row_shift``), largest logit, the
    reference's logit at it and whether a single rank holds that logit (else no centre: ties
    across ranks), from each rank's ``local`` rows (``VocabParallelJSD.forward``), in two
    ``all_reduce`` calls.

    Each rank's ratio ``r = sum_v q_v expm1(a_v)`` is centred on its own log-sum-exps, ``D_r =
    lse_r - lse'_r``; it joins the others' centred on ``D = max_r lse_r - max_r lse'_r`` as
    ``w_r (e^(D_r - D)(1 + r) - 1) = P_r r + w_r expm1(D_r - D)`` with the rescaled sums of
    exponentials ``P_r = e^(lse_r - max lse)``, ``w_r = e^(lse'_r - max lse')`` (``P_r (1 + r) -
    w_r`` where ``D_r`` is far from ``D``: no cancellation there). The shift in that frame,
    ``log1p(sum / sum_r w_r)``, moves to the global log-sum-exps' frame by adding ``D - (lse -
    lse')``. A rank that clamped its ``expm1`` makes the row far (shift 0).
    """
    lse, ref_lse, ratio, largest, top, top_ref = local
    both = torch.isfinite(lse) & torch.isfinite(ref_lse)
    # A rank without both distributions' mass in a row adds nothing to its shift.
    ratio = torch.where(both, ratio, 0.0)
    maxima = torch.stack([lse, ref_lse, torch.where(both, largest, float("-inf")), top])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    highest = torch.where(torch.isfinite(maxima[:2]), maxima[:2], 0.0)
    weight, ref_weight = torch.exp(lse - highest[0]), torch.exp(ref_lse - highest[1])
    gap = torch.where(both, (lse - ref_lse) - (highest[0] - highest[1]), 0.0)
    close = both & (gap.abs() < 0.5)
    term = torch.where(
        close,
        weight * ratio + ref_weight * torch.expm1(gap),
        weight * (1.0 + ratio) - ref_weight,
    )
    holds = (top == maxima[3]) & (top > float("-inf"))
    sums = torch.stack(
        [weight, ref_weight, term, torch.where(holds, top_ref, 0.0), holds.to(lse.dtype)]
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    global_lse = highest[0] + torch.log(sums[0])
    global_ref_lse = highest[1] + torch.log(sums[1])
    frame_shift = torch.log1p(sums[2] / sums[1])
    shift = frame_shift + ((highest[0] - highest[1]) - (global_lse - global_ref_lse))
    shift = torch.where(maxima[2] > JSD_FAR, 0.0, shift)
    held = sums[4] == 1
    return global_lse, global_ref_lse, shift, maxima[3], sums[3], held
