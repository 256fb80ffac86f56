"""Triton kernels for the per-token log-probability of the label: forward, backward, launchers.

One program per row ``(b, t)`` of ``logits[:, :L]``, read through its batch, time and vocabulary
strides (so the causal-LM shift is a view, never a copy) with int64 offsets. The forward makes one
pass over the vocabulary in tiles with an online log-sum-exp in float32 (a scalar running maximum
per row: one exponential per logit); the backward recomputes
the softmax from the saved log-sum-exp in one more pass and stores the gradient in the logits'
dtype. Rows whose target is negative (ignored) get 0 and a zero gradient; a target >= V is never
read and gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import LOWEST, block_size, launch_rows, online_lse_step, row_targets
from .numerics import accumulation_dtype, floored_logprob


@triton.jit
def _logprobs_forward_kernel(
    logits_ptr,
    targets_ptr,
    out_ptr,
    lse_ptr,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = tl.load(targets_ptr + row)
    if target < 0:
        tl.store(out_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    offsets = tl.arange(0, BLOCK_V)
    running_max = tl.full([], LOWEST, tl.float32)
    running_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        x = tl.load(
            base + columns.to(tl.int64) * stride_logits_v, mask=columns < vocab, other=float("-inf")
        ).to(tl.float32)
        running_max, rescale, e = online_lse_step(running_max, x)
        running_sum = running_sum * rescale + tl.sum(e, axis=0)
    lse = running_max + tl.log(running_sum)
    in_range = target < vocab
    label_logit = tl.load(
        base + target.to(tl.int64) * stride_logits_v, mask=in_range, other=float("nan")
    ).to(tl.float32)
    tl.store(out_ptr + row, label_logit - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_backward_kernel(
    grad_ptr,
    logits_ptr,
    targets_ptr,
    lse_ptr,
    neg_scale_ptr,
    label_term_ptr,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_grad_b,
    stride_grad_t,
    stride_grad_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = tl.load(targets_ptr + row)
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    grad_base = grad_ptr + b * stride_grad_b + t * stride_grad_t
    offsets = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    neg_scale = tl.load(neg_scale_ptr + row)
    label_term = tl.load(label_term_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        in_vocab = columns < vocab
        if target < 0:
            grad = tl.zeros([BLOCK_V], tl.float32)
        else:
            x = tl.load(
                base + columns.to(tl.int64) * stride_logits_v, mask=in_vocab, other=float("-inf")
            ).to(tl.float32)
            # d log p_y / d z_j = 1[j = y] - p_j; the label entry comes precomputed in float32.
            grad = tl.where(columns == target, label_term, tl.exp(x - lse) * neg_scale)
        tl.store(
            grad_base + columns.to(tl.int64) * stride_grad_v,
            grad.to(grad_ptr.dtype.element_ty),
            mask=in_vocab,
        )


def logprobs_forward(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Triton counterpart of ``chunked.logprobs_forward``."""
    rows = row_targets(targets, valid)
    out = logits.new_empty(valid.shape, dtype=accumulation_dtype(logits.dtype))
    lse = logits.new_empty(valid.shape, dtype=accumulation_dtype(logits.dtype))
    launch_rows(
        _logprobs_forward_kernel,
        valid,
        logits,
        rows,
        out,
        lse,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        BLOCK_V=block_size(logits.shape[-1]),
    )
    return torch.where(valid, floored_logprob(out, lse), out), lse


def logprobs_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    grad: Tensor,
) -> None:
    """Triton counterpart of ``chunked.logprobs_backward``."""
    rows = row_targets(targets, valid)
    neg_scale = (-grad_out.to(lse.dtype)).masked_fill(~valid, 0.0).contiguous()
    label_term = (neg_scale * logprobs.expm1()).contiguous()
    grad[:, valid.shape[1] :].zero_()
    launch_rows(
        _logprobs_backward_kernel,
        valid,
        grad,
        logits,
        rows,
        lse.contiguous(),
        neg_scale,
        label_term,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *grad.stride(),
        BLOCK_V=block_size(logits.shape[-1]),
    )
