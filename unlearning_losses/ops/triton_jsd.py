"""Triton kernels for the generalised Jensen-Shannon divergence of the model's next-token
distribution P and a reference's Q: ``beta KL(P || M) + (1 - beta) KL(Q || M)``,
``M = beta P + (1 - beta) Q``.

One program per row of ``logits[:, :L]`` and ``ref_logits[:, :L]`` (strided, int64 offsets). The
forward makes two passes over the vocabulary: the first the online log-sum-exps of both rows (two
exponentials per logit pair), the second, once both are known, the two sums
``sum_v p_v log(m_v / p_v)`` and ``sum_v q_v log(m_v / q_v)``. The mixture's logarithm is never
taken (its probability may underflow to 0 where the model's and the reference's do not: the NaN
of Liger-Kernel's issue 769): with ``d = log q - log p`` of log-probabilities floored at the
lowest finite float32 and ``w`` the weight of the smaller side,
``L = log1p(w expm1(-|d|))``, ``log(m / p) = L + max(d, 0)`` and ``log(m / q) = L - min(d, 0)``
(``vocab_numerics.jsd_log_ratios``): finite for any ``d``, exactly 0 where P = Q. The backward,
``beta p_j (log(p_j / m_j) - KL(P || M))`` times the upstream gradient, is one pass from the
saved log-sum-exps and ``KL(P || M)`` (exactly 0 where P = Q).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import LOWEST, block_size, expm1, launch_rows, log1p, online_lse_step
from .vocab_numerics import JSD_STATS, jsd_value


@triton.jit
def _log_ratio_to_mixture(z, z_ref, lse, ref_lse, beta):
    """Per element ``log p``, ``log q`` (floored) and ``log(m / p)``, ``log(m / q)``."""
    logp = tl.maximum(z - lse, LOWEST)
    logq = tl.maximum(z_ref - ref_lse, LOWEST)
    d = logq - logp
    shared = log1p(tl.where(d > 0, beta, 1.0 - beta) * expm1(-tl.abs(d)))
    return logp, logq, shared + tl.maximum(d, 0.0), shared - tl.minimum(d, 0.0)


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
    # stats (JSD_STATS, rows): both log-sum-exps and the two sums of the mode.
    if tl.load(valid_ptr + row) == 0:
        for k in tl.static_range(4):
            tl.store(stats_ptr + k * rows + row, 0.0)
        return
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    ref_base = ref_ptr + b * stride_ref_b + t * stride_ref_t
    offsets = tl.arange(0, BLOCK_V)
    m = tl.full([], LOWEST, tl.float32)
    m_ref = tl.full([], LOWEST, tl.float32)
    s, s_ref = 0.0, 0.0
    for start in range(0, vocab, BLOCK_V):
        z, z_ref = _load_rows(base, ref_base, start + offsets, vocab, stride_logits_v, stride_ref_v)
        m, rescale, e = online_lse_step(m, z)
        m_ref, rescale_ref, e_ref = online_lse_step(m_ref, z_ref)
        s = s * rescale + tl.sum(e, axis=0)
        s_ref = s_ref * rescale_ref + tl.sum(e_ref, axis=0)
    lse = m + tl.log(s)
    ref_lse = m_ref + tl.log(s_ref)
    over_p_sum, over_q_sum = 0.0, 0.0
    for start in range(0, vocab, BLOCK_V):
        z, z_ref = _load_rows(base, ref_base, start + offsets, vocab, stride_logits_v, stride_ref_v)
        logp, logq, over_p, over_q = _log_ratio_to_mixture(z, z_ref, lse, ref_lse, beta)
        over_p_sum += tl.sum(tl.exp(logp) * over_p, axis=0)
        over_q_sum += tl.sum(tl.exp(logq) * over_q, axis=0)
    tl.store(stats_ptr + row, lse)
    tl.store(stats_ptr + rows + row, ref_lse)
    tl.store(stats_ptr + 2 * rows + row, over_p_sum)
    tl.store(stats_ptr + 3 * rows + row, over_q_sum)


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
    lse, ref_lse = tl.load(stats_ptr + row), tl.load(stats_ptr + rows + row)
    over_p_sum = tl.load(stats_ptr + 2 * rows + row)  # -KL(P || M)
    scale = tl.load(scale_ptr + row)  # beta times the upstream gradient
    for start in range(0, vocab, BLOCK_V):
        columns = start + offsets
        if valid:
            z, z_ref = _load_rows(base, ref_base, columns, vocab, stride_logits_v, stride_ref_v)
            logp, _, over_p, _ = _log_ratio_to_mixture(z, z_ref, lse, ref_lse, beta)
            grad = tl.exp(logp) * (over_p_sum - over_p) * scale
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
    return torch.where(valid, jsd_value(stats[2], stats[3], beta), 0.0), stats


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
