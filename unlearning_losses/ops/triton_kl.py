"""Triton kernels for the per-token KL between two next-token distributions.

One program per row of ``logits[:, :L]`` and ``ref_logits[:, :L]`` (strided, int64 offsets). With
``log p = z - lse`` and ``sum p = 1``,

    KL(P || Q) = sum_v p_v (z_v - z_ref_v) - lse + lse_ref,

so the forward needs one pass over the vocabulary keeping, per row, scalar online maxima and sums
for both log-sum-exps and the weighted sum of logit differences (rescaled as a maximum grows):
two exponentials per logit pair.
``-inf`` entries (masked vocabulary) are floored at the lowest finite float32 so that a zero weight
times their difference is 0; NaN stays NaN. The backward recomputes both softmaxes from the saved
log-sum-exps in one pass:

    d KL(P || Q) / d z_j = p_j (z_j - z_ref_j - lse + lse_ref - KL),   d KL(Q || P) / d z_j = p_j - q_j.

With ``SOFT_TARGET`` the same pass gives the cross-entropy from Q to P, ``lse - sum_v q_v z_v``,
where Q's logit at the row's target is first lowered by ``label_shift`` (UNDIAL; ``inf`` removes
it, CE-U); its gradient is the reverse direction's ``p_j - q_j``. A target outside the vocabulary
gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import LOWEST, block_size, launch_rows, online_lse_step, row_targets


@triton.jit
def _floored(x):
    return tl.where(x == float("-inf"), LOWEST, x)


@triton.jit
def _soft_target(z_ref, columns, target, label_shift):
    return tl.where(columns == target, z_ref - label_shift, z_ref)


@triton.jit
def _kl_forward_kernel(
    logits_ptr,
    ref_ptr,
    valid_ptr,
    targets_ptr,
    label_shift,
    out_ptr,
    lse_ptr,
    ref_lse_ptr,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_ref_b,
    stride_ref_t,
    stride_ref_v,
    FORWARD_KL: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = -1
    if SOFT_TARGET:
        target = tl.load(targets_ptr + row)
    if tl.load(valid_ptr + row) == 0:
        tl.store(out_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(ref_lse_ptr + row, 0.0)
        return
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    offsets = tl.arange(0, BLOCK_V)
    # Running maxima m, sums s of exp(z - m), and the weighted difference sum w, taken under the
    # distribution that weights the KL (P for forward, Q for reverse, Q for the soft target).
    m = tl.full([], LOWEST, tl.float32)
    m_ref = tl.full([], LOWEST, tl.float32)
    s, s_ref, w = 0.0, 0.0, 0.0
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        in_vocab = columns < vocab
        z = tl.load(
            base + columns.to(tl.int64) * stride_logits_v, mask=in_vocab, other=float("-inf")
        ).to(tl.float32)
        z_ref = tl.load(
            ref_base + columns.to(tl.int64) * stride_ref_v, mask=in_vocab, other=float("-inf")
        ).to(tl.float32)
        if SOFT_TARGET:
            z_ref = _soft_target(z_ref, columns, target, label_shift)
        # exp of the raw logits: -inf entries and lanes past V weigh exactly 0.
        m, rescale, e = online_lse_step(m, z)
        m_ref, rescale_ref, e_ref = online_lse_step(m_ref, z_ref)
        if SOFT_TARGET:
            w = w * rescale_ref - tl.sum(e_ref * _floored(z), axis=0)
        elif FORWARD_KL:
            w = w * rescale + tl.sum(e * (_floored(z) - _floored(z_ref)), axis=0)
        else:
            w = w * rescale_ref - tl.sum(e_ref * (_floored(z) - _floored(z_ref)), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        s_ref = s_ref * rescale_ref + tl.sum(e_ref, axis=0)
    lse = m + tl.log(s)
    lse_ref = m_ref + tl.log(s_ref)
    if SOFT_TARGET:
        kl = w / s_ref + lse
        kl = tl.where(target < vocab, kl, float("nan"))
    elif FORWARD_KL:
        kl = w / s - lse + lse_ref
    else:
        kl = w / s_ref - lse_ref + lse
    tl.store(out_ptr + row, kl)
    tl.store(lse_ptr + row, lse)
    tl.store(ref_lse_ptr + row, lse_ref)


@triton.jit
def _kl_backward_kernel(
    grad_ptr,
    logits_ptr,
    ref_ptr,
    valid_ptr,
    targets_ptr,
    label_shift,
    lse_ptr,
    ref_lse_ptr,
    kl_ptr,
    scale_ptr,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_ref_b,
    stride_ref_t,
    stride_ref_v,
    stride_grad_b,
    stride_grad_t,
    stride_grad_v,
    FORWARD_KL: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    valid = tl.load(valid_ptr + row) != 0
    target = -1
    if SOFT_TARGET:
        target = tl.load(targets_ptr + row)
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    grad_base = grad_ptr + b * stride_grad_b + t * stride_grad_t
    offsets = tl.arange(0, BLOCK_V)
    lse, lse_ref = tl.load(lse_ptr + row), tl.load(ref_lse_ptr + row)
    offset = lse - lse_ref + tl.load(kl_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        in_vocab = columns < vocab
        if valid:
            z = _floored(
                tl.load(
                    base + columns.to(tl.int64) * stride_logits_v,
                    mask=in_vocab,
                    other=float("-inf"),
                ).to(tl.float32)
            )
            z_ref = tl.load(
                ref_base + columns.to(tl.int64) * stride_ref_v,
                mask=in_vocab,
                other=float("-inf"),
            ).to(tl.float32)
            if SOFT_TARGET:
                z_ref = _soft_target(z_ref, columns, target, label_shift)
            z_ref = _floored(z_ref)
            p = tl.exp(z - lse)
            if FORWARD_KL:
                grad = p * (z - z_ref - offset) * scale
            else:
                grad = (p - tl.exp(z_ref - lse_ref)) * scale
        else:
            grad = tl.zeros([BLOCK_V], tl.float32)
        tl.store(
            grad_base + columns.to(tl.int64) * stride_grad_v,
            grad.to(grad_ptr.dtype.element_ty),
            mask=in_vocab,
        )


def _soft_target_args(
    valid: Tensor, targets: Tensor | None, label_shift: float
) -> tuple[Tensor, float]:
    """Per-row targets for the soft-target mode (the mask stands in, unread, otherwise)."""
    if targets is None:
        return valid.contiguous(), 0.0
    return row_targets(targets, valid), float(label_shift)


def kl_forward(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    forward_kl: bool,
    targets: Tensor | None = None,
    label_shift: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token KL (or, given ``targets``, the soft-target cross-entropy) and both log-sum-exps,
    float32 ``(B, L)``; 0 where not valid."""
    out = logits.new_empty(valid.shape, dtype=torch.float32)
    lse, ref_lse = torch.empty_like(out), torch.empty_like(out)
    row_target, shift = _soft_target_args(valid, targets, label_shift)
    launch_rows(
        _kl_forward_kernel,
        valid,
        logits,
        ref_logits,
        valid.contiguous(),
        row_target,
        shift,
        out,
        lse,
        ref_lse,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        FORWARD_KL=forward_kl,
        SOFT_TARGET=targets is not None,
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
    return out, lse, ref_lse


def kl_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    lse: Tensor,
    ref_lse: Tensor,
    kl: Tensor,
    forward_kl: bool,
    grad: Tensor,
    targets: Tensor | None = None,
    label_shift: float = 0.0,
) -> None:
    """Write d(sum grad_out * KL) / d logits into ``grad`` (which may be ``logits`` itself); with
    ``targets``, the soft-target cross-entropy's gradient."""
    scale = grad_out.to(torch.float32).masked_fill(~valid, 0.0).contiguous()
    grad[:, valid.shape[1] :].zero_()
    row_target, shift = _soft_target_args(valid, targets, label_shift)
    launch_rows(
        _kl_backward_kernel,
        valid,
        grad,
        logits,
        ref_logits,
        valid.contiguous(),
        row_target,
        shift,
        lse,
        ref_lse,
        kl,
        scale,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        *grad.stride(),
        FORWARD_KL=forward_kl and targets is None,
        SOFT_TARGET=targets is not None,
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
