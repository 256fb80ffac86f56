"""Triton kernels for per-token quantities of two next-token distributions (``numerics.PairMode``):
KL in either direction, the soft-target cross-entropy (UNDIAL, CE-U) and SOUL's cross-entropy to
the reference with an additive epsilon.

One program per row of ``logits[:, :L]`` and ``ref_logits[:, :L]`` (strided, int64 offsets). The
forward makes one pass over the vocabulary keeping, per row, scalar online maxima and sums for both
log-sum-exps (two exponentials per logit pair; SOUL's mode makes a second pass, once both are
known). ``-inf`` entries (masked vocabulary) are floored at the lowest finite float32, so that a
zero weight times their difference is 0; NaN stays NaN. Where only one side masks an entry, its
score is near the largest float32 (as on the chunked path, a huge finite value): the weighted sums
accumulate scaled by ``2^-32`` and are divided by the scaled normaliser, so that unnormalised
weights (each up to 1) times such scores do not overflow before the division.

KL without cancellation. With ``delta = z - z_ref`` (exact when the inputs are close) the
log-ratio is ``d = log p - log q = delta - c`` with the row constant ``c = lse - lse_ref``. When
the distributions are close, ``lse - lse_ref`` loses the digits that matter, so the forward also
accumulates ``sum_v e^(z_ref_v - m_ref) expm1(delta_v)``, which is ``s_ref (e^c - 1)`` (each term
by expm1's series where ``|delta| < 1/2``, else as ``e^(z_v - m_ref) - e^(z_ref_v - m_ref)`` from
the exponentials already taken: two per logit pair in all), and takes
``c = log1p(that / s_ref)`` when that ratio is within 1/2 and no ``delta`` exceeds 60 (otherwise
the log-sum-exps, whose difference is then well-conditioned enough). Then

    KL(P || Q) = sum_v p_v delta_v - c,            d / d z_j = p_j (d_j - KL),
    KL(Q || P) = c - sum_v q_v delta_v,            d / d z_j = p_j - q_j = q_j expm1(d_j),

the reverse gradient formed as ``q expm1(d)`` where ``|d| < 1/2``: exactly 0 at ``p = q``, and
within the output dtype's rounding of float64 math when they are close. The forward stores ``c``
beside ``lse`` for the backward.

``SOFT_TARGET``: ``lse - sum_v q_v z_v`` with Q's logit at the row's target lowered by the mode's
constant (the label shift; ``inf`` removes it) first; gradient ``p - q``; a target outside the
vocabulary gives NaN. ``REFERENCE_CE``: ``-sum_v p_v log(q_v + eps)``, eps the mode's constant,
gradient ``p_j (a_j - value)`` with ``a = -log(q + eps)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    EXPM1_SERIES,
    LOWEST,
    block_size,
    expm1_series,
    launch_rows,
    log1p,
    online_lse_step,
    row_targets,
)
from .numerics import KERNEL_MODES, PairMode

# The kernels' ``MODE`` values by name (the two KL modes first: ``MODE <= KL_REVERSE`` is a KL).
KL_FORWARD = tl.constexpr(KERNEL_MODES[PairMode.KL_FORWARD])
KL_REVERSE = tl.constexpr(KERNEL_MODES[PairMode.KL_REVERSE])
SOFT_TARGET = tl.constexpr(KERNEL_MODES[PairMode.SOFT_TARGET])
REFERENCE_CE = tl.constexpr(KERNEL_MODES[PairMode.REFERENCE_CE])
#: Beyond this log-ratio the forward takes ``c`` from the log-sum-exps (its sum of
#: ``e_ref expm1(delta)`` could overflow).
_NEAR = tl.constexpr(60.0)
#: The weighted sums' scale, an exact power of two: with scores below 2^129 in magnitude, the
#: sums of up to 2^32 unnormalised weights times them stay finite, and only terms below 2^-94
#: (subnormal once scaled) round differently than unscaled.
_SUM_SCALE = tl.constexpr(2.0**-32)


@triton.jit
def _floored(x):
    return tl.where(x == float("-inf"), LOWEST, x)


@triton.jit
def _load_pair(
    base, ref_base, columns, vocab, stride_v, stride_ref_v, target, constant, MODE: tl.constexpr
):
    """Both rows' tiles in float32 (``-inf`` past the vocabulary); the soft target lowered."""
    in_vocab = columns < vocab
    z = tl.load(base + columns.to(tl.int64) * stride_v, mask=in_vocab, other=float("-inf"))
    z_ref = tl.load(
        ref_base + columns.to(tl.int64) * stride_ref_v, mask=in_vocab, other=float("-inf")
    )
    z_ref = z_ref.to(tl.float32)
    if MODE == SOFT_TARGET:
        z_ref = tl.where(columns == target, z_ref - constant, z_ref)
    return z.to(tl.float32), z_ref


@triton.jit
def _reference_score(z_ref, lse_ref, eps):
    """SOUL's ``-log(q + eps)``."""
    return -tl.log(tl.exp(z_ref - lse_ref) + eps)


@triton.jit
def _pair_forward_kernel(
    logits_ptr,
    ref_ptr,
    valid_ptr,
    targets_ptr,
    constant,
    out_ptr,
    lse_ptr,
    aux_ptr,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_ref_b,
    stride_ref_t,
    stride_ref_v,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    target = -1
    if MODE == SOFT_TARGET:
        target = tl.load(targets_ptr + row)
    if tl.load(valid_ptr + row) == 0:
        tl.store(out_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(aux_ptr + row, 0.0)
        return
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    offsets = tl.arange(0, BLOCK_V)
    # Running maxima m, sums s of exp(z - m); w: the weighted sum of the mode's scores, times
    # _SUM_SCALE; near: sum of e_ref expm1(delta) and the largest delta (KL modes).
    m = tl.full([], LOWEST, tl.float32)
    m_ref = tl.full([], LOWEST, tl.float32)
    s, s_ref, w, near = 0.0, 0.0, 0.0, 0.0
    delta_max = tl.full([], LOWEST, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        z, z_ref = _load_pair(
            base, ref_base, columns, vocab, stride_logits_v, stride_ref_v, target, constant, MODE
        )
        # exp of the raw logits: -inf entries and lanes past V weigh exactly 0.
        m, rescale, e = online_lse_step(m, z)
        m_ref, rescale_ref, e_ref = online_lse_step(m_ref, z_ref)
        s = s * rescale + tl.sum(e, axis=0)
        s_ref = s_ref * rescale_ref + tl.sum(e_ref, axis=0)
        if MODE == SOFT_TARGET:
            w = w * rescale_ref - tl.sum(e_ref * (_floored(z) * _SUM_SCALE), axis=0)
        elif MODE <= KL_REVERSE:
            delta = _floored(z) - _floored(z_ref)
            delta_max = tl.maximum(delta_max, tl.max(delta, axis=0))
            # e_ref expm1(delta) with no exponential of its own: the series near 0, elsewhere
            # e_ref e^delta - e_ref = e e^(m - m_ref) - e_ref (one exponential per tile).
            far = e * tl.exp(m - m_ref) - e_ref
            term = tl.where(tl.abs(delta) < EXPM1_SERIES, e_ref * expm1_series(delta), far)
            near = near * rescale_ref + tl.sum(term, axis=0)
            if MODE == KL_FORWARD:
                w = w * rescale + tl.sum(e * (delta * _SUM_SCALE), axis=0)
            else:
                w = w * rescale_ref + tl.sum(e_ref * (delta * _SUM_SCALE), axis=0)
    lse = m + tl.log(s)
    lse_ref = m_ref + tl.log(s_ref)
    aux = lse_ref
    if MODE <= KL_REVERSE:
        # Close distributions: e^c - 1 = near / s_ref is small and exact; else the log-sum-exps.
        ratio = near / s_ref
        is_near = (delta_max <= _NEAR) & (tl.abs(ratio) <= 0.5)
        aux = tl.where(is_near, log1p(ratio), lse - lse_ref)
    if MODE == KL_FORWARD:
        value = w / (s * _SUM_SCALE) - aux
    elif MODE == KL_REVERSE:
        value = aux - w / (s_ref * _SUM_SCALE)
    elif MODE == SOFT_TARGET:
        value = tl.where(target < vocab, w / (s_ref * _SUM_SCALE) + lse, float("nan"))
    else:
        value = 0.0
        for start in range(0, vocab, BLOCK_V):
            columns = start + offsets
            z, z_ref = _load_pair(
                base,
                ref_base,
                columns,
                vocab,
                stride_logits_v,
                stride_ref_v,
                target,
                constant,
                MODE,
            )
            score = _reference_score(z_ref, lse_ref, constant)
            value += tl.sum(tl.exp(z - lse) * score, axis=0)
    tl.store(out_ptr + row, value)
    tl.store(lse_ptr + row, lse)
    tl.store(aux_ptr + row, aux)


@triton.jit
def _pair_backward_kernel(
    grad_ptr,
    logits_ptr,
    ref_ptr,
    valid_ptr,
    targets_ptr,
    constant,
    lse_ptr,
    aux_ptr,
    value_ptr,
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
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    valid = tl.load(valid_ptr + row) != 0
    target = -1
    if MODE == SOFT_TARGET:
        target = tl.load(targets_ptr + row)
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    grad_base = grad_ptr + b * stride_grad_b + t * stride_grad_t
    offsets = tl.arange(0, BLOCK_V)
    # aux: c = lse - lse_ref for the KL modes, lse_ref otherwise.
    lse, aux = tl.load(lse_ptr + row), tl.load(aux_ptr + row)
    value, scale = tl.load(value_ptr + row), tl.load(scale_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        if valid:
            z, z_ref = _load_pair(
                base,
                ref_base,
                columns,
                vocab,
                stride_logits_v,
                stride_ref_v,
                target,
                constant,
                MODE,
            )
            z, z_ref = _floored(z), _floored(z_ref)
            p = tl.exp(z - lse)
            if MODE == KL_FORWARD:
                grad = p * (z - z_ref - aux - value)
            elif MODE == KL_REVERSE:
                d = z - z_ref - aux
                q = tl.exp(z_ref - lse + aux)
                # q expm1(d) by its series near 0 (no cancellation); p - q is exact enough
                # beyond, where |p - q| >= 0.39 q.
                grad = tl.where(tl.abs(d) < EXPM1_SERIES, q * expm1_series(d), p - q)
            elif MODE == SOFT_TARGET:
                grad = p - tl.exp(z_ref - aux)
            else:
                grad = p * (_reference_score(z_ref, aux, constant) - value)
            grad = grad * scale
        else:
            grad = tl.zeros([BLOCK_V], tl.float32)
        tl.store(
            grad_base + columns.to(tl.int64) * stride_grad_v,
            grad.to(grad_ptr.dtype.element_ty),
            mask=columns < vocab,
        )


def _row_targets(targets: Tensor, valid: Tensor, mode: PairMode) -> Tensor:
    """Per-row targets for the soft-target mode; the other modes read none (the mask, already
    contiguous, fills the argument)."""
    return row_targets(targets, valid) if mode == PairMode.SOFT_TARGET else valid.contiguous()


def pair_forward(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    mode: PairMode,
    constant: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token value of ``mode``, the log-sum-exp and the backward's row constant (``c`` for
    KL, the reference's log-sum-exp otherwise), float32 ``(B, L)``; 0 where not valid."""
    out = logits.new_empty(valid.shape, dtype=torch.float32)
    lse, aux = torch.empty_like(out), torch.empty_like(out)
    launch_rows(
        _pair_forward_kernel,
        valid,
        logits,
        ref_logits,
        valid.contiguous(),
        _row_targets(targets, valid, mode),
        float(constant),
        out,
        lse,
        aux,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        MODE=KERNEL_MODES[PairMode(mode)],
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
    return out, lse, aux


def pair_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    aux: Tensor,
    value: Tensor,
    mode: PairMode,
    constant: float,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * value) / d logits into ``grad`` (which may be ``logits`` itself)."""
    scale = grad_out.to(torch.float32).masked_fill(~valid, 0.0).contiguous()
    grad[:, valid.shape[1] :].zero_()
    launch_rows(
        _pair_backward_kernel,
        valid,
        grad,
        logits,
        ref_logits,
        valid.contiguous(),
        _row_targets(targets, valid, mode),
        float(constant),
        lse,
        aux,
        value,
        scale,
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        *grad.stride(),
        MODE=KERNEL_MODES[PairMode(mode)],
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
