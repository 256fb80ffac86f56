"""Triton kernels for the generalised Jensen-Shannon divergence of the model's next-token
distribution P and a reference's Q: ``beta KL(P || M) + (1 - beta) KL(Q || M)``,
``M = beta P + (1 - beta) Q``.

One program per row of ``logits[:, :L]`` and ``ref_logits[:, :L]`` (strided, int64 offsets); the
formulas are ``vocab_numerics``'s. The forward makes two passes over the vocabulary. The first
takes the online log-sum-exps of both rows (two exponentials per logit pair), the reference's
logit at the largest logit, and, for the log-ratio ``log q - log p`` without cancellation
(``vocab_numerics.jsd_row_shift``), the sum ``R = sum_v e'_v expm1(a_v)`` with
``e' = e^(z' - m')`` and ``a = (z - z') - (m - m')`` centred on the running maxima ``m``, ``m'``:
each term by expm1's series where ``|a| < 1/2``, else ``e_v - e'_v`` from the exponentials
already taken, and the sum carried over to new maxima as ``R e^(m_old - m) + s' e^(m'_old - m')
expm1(D_old - D)``, ``D = m - m'`` (no exponential per logit). Every term lies within
``[-1, 1]``, so no row is too far apart for it. Its shift, ``log1p(R / s') + (m - m') - (lse -
lse')``, makes ``d = log q - log p = shift - ((z - z') - (lse - lse'))`` in the second pass,
which sums ``sum_v p_v log(m_v / p_v)``, the same centred on ``log(m / p)`` at the largest logit
(``vocab_numerics.jsd_row_sum``), and the divergence's terms (``vocab_numerics
.jsd_mixture_terms``; ``log1p(x) - x`` by the series of ``atanh``): three exponentials per logit
pair, ``p``, ``q`` and ``expm1(d)``, Q's ``expm1(-d)`` formed from the last. The mixture's
logarithm is never taken (its probability may underflow to 0 where the model's and the
reference's do not: the NaN of Liger-Kernel's issue 769). The backward, ``beta p_j (log(p_j /
m_j) - KL(P || M))`` times the upstream gradient, is one pass from the saved log-sum-exps,
shift, row sum and centre, forming ``log(m / p)`` bit for bit as the forward did (exactly 0
where P = Q).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    EXPM1_SERIES,
    LOWEST,
    block_size,
    expm1,
    expm1_series,
    launch_rows,
    log1p,
    online_lse_step,
)
from .vocab_numerics import ATANH_REACH, ATANH_SERIES, JSD_CANCELLATION, JSD_FAR, JSD_STATS

STATS_ROWS = tl.constexpr(JSD_STATS)
FAR = tl.constexpr(JSD_FAR)
EXPM1_FAR = tl.constexpr(math.expm1(JSD_FAR))
#: Below this ``d = log q - log p`` the forward takes ``expm1(-d)`` from the probabilities,
#: ``(p - q) / q``: ``-expm1(d) / e^d`` there would carry ``e^-d`` times the rounding of
#: ``e^d = 1 + expm1(d)``.
FROM_PROBS = tl.constexpr(-2.0)
CANCELLATION = tl.constexpr(JSD_CANCELLATION)
REACH = tl.constexpr(ATANH_REACH[torch.float32])
SERIES_0, SERIES_1, SERIES_2, SERIES_3, SERIES_4, SERIES_5 = (tl.constexpr(c) for c in ATANH_SERIES)


@triton.jit
def _floored(x):
    """``-inf`` (a masked entry) raised to the lowest finite float32."""
    return tl.where(x == float("-inf"), LOWEST, x)


@triton.jit
def _log_ratio(z, z_ref, offset, shift):
    """``d = log q - log p = shift - ((z - z') - (lse - lse'))`` (``vocab_numerics
    .jsd_row_shift``), the logits floored at the lowest finite float32."""
    return shift - (_floored(z) - _floored(z_ref) - offset)


@triton.jit
def _log1p_less_identity(x):
    """``log1p(x) - x`` and where it holds (``vocab_numerics._log1p_less_identity``): with
    ``u = x / (2 + x)``, ``u (2 u^2 S(u^2) - x)`` where ``|u| <= REACH``."""
    u = x / (x + 2.0)
    square = u * u
    series = SERIES_4 + square * SERIES_5
    series = SERIES_3 + square * series
    series = SERIES_2 + square * series
    series = SERIES_1 + square * series
    series = SERIES_0 + square * series
    return u * (2.0 * square * series - x), tl.abs(u) <= REACH


@triton.jit
def _mixture_side(log_ratio, weight):
    """``expm1(d)`` (``d`` clamped at ``FAR``), ``x = weight expm1(d)`` and ``log1p(x)``
    (``vocab_numerics._mixture_side``): ``log(m / p)`` for ``d = log q - log p`` and Q's
    weight. The forward and the backward form it alike, bit for bit."""
    expm1_d = expm1(tl.minimum(log_ratio, FAR, propagate_nan=tl.PropagateNan.ALL))
    ratio = weight * expm1_d
    return expm1_d, ratio, log1p(ratio)


@triton.jit
def _divergence_term(less, near, log_ratio, weight, other, other_weight):
    """One side's ``w log(m / w) - (m - w)`` (``vocab_numerics.jsd_mixture_terms``) from
    :func:`_log1p_less_identity` of ``x = m / w - 1`` and ``log(m / w)``: ``w (log1p(x) - x)`` near
    ``x = 0``, ``w log(m / w) - other_weight (other - w)`` elsewhere."""
    return tl.where(near, weight * less, weight * log_ratio - other_weight * (other - weight))


@triton.jit
def _load_rows(base, ref_base, columns, vocab, stride_v, stride_ref_v):
    """Both rows' tiles in float32, ``-inf`` past the vocabulary."""
    in_vocab = columns < vocab
    z = tl.load(base + columns.to(tl.int64) * stride_v, mask=in_vocab, other=float("-inf"))
    z_ref = tl.load(
        ref_base + columns.to(tl.int64) * stride_ref_v, mask=in_vocab, other=float("-inf")
    )
    return z.to(tl.float32), z_ref.to(tl.float32)


@triton.jit
def _jsd_forward_kernel(
    logits_ptr,
    ref_ptr,
    valid_ptr,
    beta,
    stats_ptr,
    rows,
    length,
    vocab,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    stride_ref_b,
    stride_ref_t,
    stride_ref_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    # stats (JSD_STATS, rows): both log-sum-exps, the row sum, the divergence, shift, centre.
    if tl.load(valid_ptr + row) == 0:
        for k in tl.static_range(STATS_ROWS):
            tl.store(stats_ptr + k * rows + row, 0.0)
        return
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    offsets = tl.arange(0, BLOCK_V)
    m = tl.full([], LOWEST, tl.float32)
    m_ref = tl.full([], LOWEST, tl.float32)
    s, s_ref, ratio = 0.0, 0.0, 0.0
    top_ref = tl.full([], LOWEST, tl.float32)  # z' at the largest logit
    for start in range(0, vocab, BLOCK_V):
        z, z_ref = _load_rows(base, ref_base, start + offsets, vocab, stride_logits_v, stride_ref_v)
        tile_max = tl.max(z, axis=0)
        tile_top_ref = tl.max(tl.where(z == tile_max, z_ref, LOWEST), axis=0)
        top_ref = tl.where(tile_max > m, tile_top_ref, top_ref)
        m_new, rescale, e = online_lse_step(m, z)
        m_ref_new, rescale_ref, e_ref = online_lse_step(m_ref, z_ref)
        # The sum's centre D = m - m' moves with the maxima: rescale_ref expm1(D_old - D) is
        # rescale - rescale_ref, by the series where the move is small.
        frame = m_new - m_ref_new
        moved = (m - m_ref) - frame
        carry = tl.where(
            tl.abs(moved) < EXPM1_SERIES,
            rescale_ref * expm1_series(moved),
            rescale - rescale_ref,
        )
        a = _floored(z) - _floored(z_ref) - frame
        # e' expm1(a) by the series near 0; elsewhere e' e^a - e' = e - e'.
        term = tl.where(tl.abs(a) < EXPM1_SERIES, e_ref * expm1_series(a), e - e_ref)
        ratio = ratio * rescale + carry * s_ref + tl.sum(term, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        s_ref = s_ref * rescale_ref + tl.sum(e_ref, axis=0)
        m, m_ref = m_new, m_ref_new
    lse = m + tl.log(s)
    ref_lse = m_ref + tl.log(s_ref)
    offset = lse - ref_lse
    shift = log1p(ratio / s_ref) + ((m - m_ref) - offset)
    # log(m / p) at the largest logit, as pass 2 forms it there: the centre of the row sum.
    centre = _mixture_side(_log_ratio(m, top_ref, offset, shift), 1.0 - beta)[2]
    plain, centred, divergence = 0.0, 0.0, 0.0
    for start in range(0, vocab, BLOCK_V):
        z, z_ref = _load_rows(base, ref_base, start + offsets, vocab, stride_logits_v, stride_ref_v)
        p = tl.exp(tl.maximum(z - lse, LOWEST, propagate_nan=tl.PropagateNan.ALL))
        q = tl.exp(tl.maximum(z_ref - ref_lse, LOWEST, propagate_nan=tl.PropagateNan.ALL))
        d = _log_ratio(z, z_ref, offset, shift)  # log q - log p
        expm1_d, ratio_p, over_p = _mixture_side(d, 1.0 - beta)
        # expm1(-d) = -expm1(d) / e^d where d is not far below 0; beyond, p / q - 1 from the
        # probabilities (no cancellation there), held at expm1(FAR) where q is 0. (The
        # gradient reads Q's side only through the divergence: P's is expm1(d) itself.)
        expm1_neg = tl.where(
            d > FROM_PROBS,
            -expm1_d / (1.0 + expm1_d),
            tl.where(
                q > 0,
                tl.minimum(
                    (p - q) / tl.where(q > 0, q, 1.0), EXPM1_FAR, propagate_nan=tl.PropagateNan.ALL
                ),
                EXPM1_FAR,
            ),
        )
        ratio_q = beta * expm1_neg
        over_q = log1p(ratio_q)
        less_p, near_p = _log1p_less_identity(ratio_p)
        less_q, near_q = _log1p_less_identity(ratio_q)
        term_p = _divergence_term(less_p, near_p, over_p, p, q, 1.0 - beta)
        term_q = _divergence_term(less_q, near_q, over_q, q, p, beta)
        plain += tl.sum(p * over_p, axis=0)
        centred += tl.sum(p * (over_p - centre), axis=0)
        divergence += tl.sum(-beta * term_p - (1.0 - beta) * term_q, axis=0)
    # vocab_numerics.jsd_row_sum: centred where the plain sum would cancel.
    centring = tl.abs(centred) * CANCELLATION < tl.abs(centre)
    tl.store(stats_ptr + row, lse)
    tl.store(stats_ptr + rows + row, ref_lse)
    tl.store(stats_ptr + 2 * rows + row, tl.where(centring, centred, plain))
    tl.store(stats_ptr + 3 * rows + row, divergence)
    tl.store(stats_ptr + 4 * rows + row, shift)
    tl.store(stats_ptr + 5 * rows + row, tl.where(centring, centre, 0.0))


@triton.jit
def _jsd_backward_kernel(
    grad_ptr,
    logits_ptr,
    ref_ptr,
    valid_ptr,
    beta,
    stats_ptr,
    scale_ptr,
    rows,
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
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // length, row % length
    valid = tl.load(valid_ptr + row) != 0
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    grad_base = grad_ptr + b * stride_grad_b + t * stride_grad_t
    offsets = tl.arange(0, BLOCK_V)
    lse = tl.load(stats_ptr + row)
    offset = lse - tl.load(stats_ptr + rows + row)
    row_sum = tl.load(stats_ptr + 2 * rows + row)  # sum_v p_v (log(m_v / p_v) - centre)
    shift = tl.load(stats_ptr + 4 * rows + row)
    centre = tl.load(stats_ptr + 5 * rows + row)
    scale = tl.load(scale_ptr + row)  # beta times the upstream gradient
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        if valid:
            z, z_ref = _load_rows(base, ref_base, columns, vocab, stride_logits_v, stride_ref_v)
            over_p = _mixture_side(_log_ratio(z, z_ref, offset, shift), 1.0 - beta)[2]
            grad = (
                tl.exp(tl.maximum(z - lse, LOWEST, propagate_nan=tl.PropagateNan.ALL))
                * (row_sum - (over_p - centre))
                * scale
            )
        else:
            grad = tl.zeros([BLOCK_V], tl.float32)
        tl.store(
            grad_base + columns.to(tl.int64) * stride_grad_v,
            grad.to(grad_ptr.dtype.element_ty),
            mask=columns < vocab,
        )


def jsd_forward(
    logits: Tensor, ref_logits: Tensor, valid: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Triton counterpart of ``chunked_stats.jsd_forward``."""
    stats = logits.new_empty((JSD_STATS, *valid.shape), dtype=torch.float32)
    launch_rows(
        _jsd_forward_kernel,
        valid,
        logits,
        ref_logits,
        valid.contiguous(),
        float(beta),
        stats,
        valid.numel(),
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
    return torch.where(valid, stats[3], 0.0), stats


def jsd_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    stats: Tensor,
    beta: float,
    grad: Tensor,
) -> None:
    """Triton counterpart of ``chunked_stats.jsd_backward``."""
    scale = (grad_out.to(torch.float32) * beta).masked_fill(~valid, 0.0).contiguous()
    grad[:, valid.shape[1] :].zero_()
    launch_rows(
        _jsd_backward_kernel,
        valid,
        grad,
        logits,
        ref_logits,
        valid.contiguous(),
        float(beta),
        stats,
        scale,
        valid.numel(),
        valid.shape[1],
        logits.shape[-1],
        *logits.stride(),
        *ref_logits.stride(),
        *grad.stride(),
        BLOCK_V=block_size(logits.shape[-1]),
        inputs=2,
    )
