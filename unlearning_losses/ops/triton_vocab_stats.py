"""Triton kernels for ME's KL from the uniform distribution and for the inverted hinge
(``vocab_numerics.VocabMode``): forward, backward, launchers.

One program per row ``(b, t)`` of ``logits[:, :L]`` (strided, int64 offsets, so the causal-LM
shift is a view). The forward is the log-prob forward's single pass over the vocabulary with its
online log-sum-exp (one exponential per logit), carrying one more reduction per row in the same
pass: ``UNIFORM_KL`` the count of the finite logits and the sum of their differences from the
running maximum, moved with it as the sum of exponentials is (the partials of
``vocab_numerics.uniform_kl_recentred``), ``INVERTED_HINGE`` the largest logit other than the
label's with its column (the first on ties: a tile's leftmost maximum, replaced only by a
strictly larger one); the label's logit is read once at the end. The per-row values and gradient
coefficients are formed by the launchers with ``vocab_numerics``. The backward recomputes
``p = exp(z - lse)`` in one pass and stores the gradient in the logits' dtype (tile by tile after
reading it: the buffer may be the logits'). Rows that do not count get 0 and a zero gradient; a
label >= V is never read and gives NaN (the inverted hinge).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import LOWEST, block_size, launch_rows, online_lse_step, row_targets
from .chunked_stats import vocab_coefficients
from .numerics import accumulation_dtype, floored_logprob
from .vocab_numerics import KERNEL_VOCAB_MODES, STATS, VocabMode, hinge_value, uniform_kl_stats

# The kernels' ``MODE`` values by name.
UNIFORM_KL = tl.constexpr(KERNEL_VOCAB_MODES[VocabMode.UNIFORM_KL])
INVERTED_HINGE = tl.constexpr(KERNEL_VOCAB_MODES[VocabMode.INVERTED_HINGE])


@triton.jit
def _vocab_stats_forward_kernel(
    logits_ptr,
    targets_ptr,
    stats_ptr,
    index_ptr,
    rows,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = tl.load(targets_ptr + row)
    # stats (STATS, rows): the log-sum-exp, then the inverted hinge's label logit and largest
    # other logit; or ME's partials (4, rows): the largest logit, and about it the sum of
    # exponentials, the count of finite logits and the sum of their differences from it.
    if target < 0:
        tl.store(stats_ptr + row, 0.0)
        tl.store(stats_ptr + rows + row, 0.0)
        tl.store(stats_ptr + 2 * rows + row, 0.0)
        if MODE == UNIFORM_KL:
            tl.store(stats_ptr + 3 * rows + row, 0.0)
        tl.store(index_ptr + row, -1)
        return
    label_column = tl.minimum(target, vocab).to(tl.int32)  # int32 compares; V is no column
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    offsets = tl.arange(0, BLOCK_V)
    running_max = tl.full([], LOWEST, tl.float32)
    running_sum = 0.0
    count, total = 0.0, 0.0
    other = tl.full([], float("-inf"), tl.float32)
    other_column = tl.full([], -1, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        x = tl.load(
            base + columns.to(tl.int64) * stride_logits_v, mask=columns < vocab, other=float("-inf")
        ).to(tl.float32)
        previous_max = running_max
        running_max, rescale, e = online_lse_step(running_max, x)
        running_sum = running_sum * rescale + tl.sum(e, axis=0)
        if MODE == UNIFORM_KL:
            # -inf entries (a masked vocabulary, lanes past V) lie outside the support. The sum
            # of differences moves to the new maximum (vocab_numerics.uniform_kl_recentred),
            # a row without a finite logit so far staying 0.
            finite = x != float("-inf")
            total += tl.where(count > 0, count * (previous_max - running_max), 0.0)
            count += tl.sum(finite.to(tl.float32), axis=0)
            total += tl.sum(tl.where(finite, x - running_max, 0.0), axis=0)
        else:
            others = tl.where(columns == label_column, float("-inf"), x)
            tile_max, tile_column = tl.max(others, axis=0, return_indices=True)
            better = tile_max > other
            other = tl.where(better, tile_max, other)
            other_column = tl.where(better, start + tile_column, other_column)
    if MODE == UNIFORM_KL:
        tl.store(stats_ptr + row, running_max)
        tl.store(stats_ptr + rows + row, running_sum)
        tl.store(stats_ptr + 2 * rows + row, count)
        tl.store(stats_ptr + 3 * rows + row, total)
        tl.store(index_ptr + row, -1)
    else:
        tl.store(stats_ptr + row, running_max + tl.log(running_sum))
        label = tl.load(
            base + target.to(tl.int64) * stride_logits_v, mask=target < vocab, other=float("nan")
        ).to(tl.float32)
        tl.store(stats_ptr + rows + row, label)
        tl.store(stats_ptr + 2 * rows + row, other)
        tl.store(index_ptr + row, other_column.to(tl.int64))


@triton.jit
def _vocab_stats_backward_kernel(
    grad_ptr,
    logits_ptr,
    targets_ptr,
    index_ptr,
    lse_ptr,
    coefficients_ptr,
    rows,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_grad_b,
    stride_grad_t,
    stride_grad_v,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = tl.load(targets_ptr + row)
    # Columns compared as int32 (half the registers of int64): a target past the vocabulary
    # becomes V, no column's; -1 (no runner-up) stays -1.
    label_column = tl.minimum(target, vocab).to(tl.int32)
    other_column = tl.load(index_ptr + row).to(tl.int32)
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    grad_base = grad_ptr + b * stride_grad_b + t * stride_grad_t
    offsets = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    # coefficients (3, rows): of p, then ME's of the finite columns, or the inverted hinge's
    # label and runner-up entries.
    on_probs = tl.load(coefficients_ptr + row)
    second = tl.load(coefficients_ptr + rows + row)
    third = tl.load(coefficients_ptr + 2 * rows + row)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        in_vocab = columns < vocab
        if target < 0:
            grad = tl.zeros([BLOCK_V], tl.float32)
        else:
            x = tl.load(
                base + columns.to(tl.int64) * stride_logits_v, mask=in_vocab, other=float("-inf")
            ).to(tl.float32)
            p_term = tl.exp(x - lse) * on_probs
            if MODE == UNIFORM_KL:
                grad = p_term - tl.where(x == float("-inf"), 0.0, second)
            else:
                grad = tl.where(
                    columns == label_column,
                    second,
                    tl.where(columns == other_column, third, p_term),
                )
        tl.store(
            grad_base + columns.to(tl.int64) * stride_grad_v,
            grad.to(grad_ptr.dtype.element_ty),
            mask=in_vocab,
        )


def vocab_forward(
    logits: Tensor, targets: Tensor, valid: Tensor, mode: VocabMode
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton counterpart of ``chunked_stats.vocab_forward``."""
    acc = accumulation_dtype(logits.dtype)
    # ME's kernel leaves its row partials; the statistics are formed from them below.
    rows = 4 if mode == VocabMode.UNIFORM_KL else STATS
    stats = logits.new_empty((rows, *valid.shape), dtype=acc)
    index = logits.new_empty(valid.shape, dtype=torch.long)
    launch_rows(
        _vocab_stats_forward_kernel,
        valid,
        logits,
        row_targets(targets, valid),
        stats,
        index,
        valid.numel(),
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        MODE=KERNEL_VOCAB_MODES[mode],
        BLOCK_V=block_size(logits.shape[-1]),
    )
    if mode == VocabMode.UNIFORM_KL:
        stats = torch.stack(uniform_kl_stats(*stats))
        value = stats[2]
    else:
        lse = stats[0]
        stats[1] = floored_logprob(stats[1] - lse, lse)
        stats[2] = stats[2] - lse
        value = hinge_value(stats[1], stats[2])
    return torch.where(valid, value, 0.0), stats, index


def vocab_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    stats: Tensor,
    index: Tensor,
    mode: VocabMode,
    grad: Tensor,
) -> None:
    """Triton counterpart of ``chunked_stats.vocab_backward``."""
    coefficients = torch.zeros((3, *valid.shape), dtype=stats.dtype, device=stats.device)
    for row, value in enumerate(vocab_coefficients(grad_out, valid, stats, mode)):
        coefficients[row] = value
    grad[:, valid.shape[1] :].zero_()
    launch_rows(
        _vocab_stats_backward_kernel,
        valid,
        grad,
        logits,
        row_targets(targets, valid),
        index.contiguous(),
        stats[0].contiguous(),
        coefficients,
        valid.numel(),
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *grad.stride(),
        MODE=KERNEL_VOCAB_MODES[mode],
        BLOCK_V=block_size(logits.shape[-1]),
    )
