"""The chunked PyTorch backend of the token reductions.

Each function walks the rows of ``logits`` (B, T, V) in chunks of a bounded number of bytes, so the
only temporaries are chunk-sized and stay in cache. The forward keeps per-token results in float32
(float64 for float64 logits); the backward recomputes the softmax chunk by chunk and writes the
gradient, scaled and rounded in one step, into a single buffer in the logits' dtype. Only the rows
``[:, :L]`` are read, so the causal-LM shift needs no copy of the logits; the gradient of the rows
past ``L`` is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

#: Upper bound on the bytes of one float32 chunk of logits; results do not depend on it.
CHUNK_BYTES = 2 * 1024 * 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(batch: int, length: int, vocab: int):
    """Yield (b, t0, t1): the rows of one batch element, ``CHUNK_BYTES`` of float32 at a time."""
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    for b in range(batch):
        for t0 in range(0, length, rows):
            yield b, t0, min(t0 + rows, length)


def _grad_buffer(logits: Tensor, length: int) -> Tensor:
    """The gradient of the full logits; rows past ``length`` (the shifted-out one) are zero."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if length < logits.shape[1]:
        grad[:, length:].zero_()
    return grad


def _weighted_difference(weight: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``first - second`` where ``weight > 0``, else 0: zero-weight entries never meet -inf - -inf.

    NaN weights keep their NaN, so non-finite logits propagate.
    """
    return (first - second).masked_fill_(weight == 0, 0.0)


class LabelLogprobs(torch.autograd.Function):
    """Per-token log p(label), float32 (float64 for float64 logits), 0 at ignored positions."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        batch, length = targets.shape
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty((batch, length), dtype=acc, device=logits.device)
        safe_targets = torch.where(valid, targets, 0)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            logp = torch.log_softmax(logits[b, t0:t1], dim=-1, dtype=acc)
            picked = logp.gather(1, safe_targets[b, t0:t1, None]).squeeze(1)
            out[b, t0:t1] = torch.where(valid[b, t0:t1], picked, 0.0)
        ctx.save_for_backward(logits, safe_targets, valid, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_targets, valid, logprobs = ctx.saved_tensors
        batch, length = safe_targets.shape
        grad = _grad_buffer(logits, length)
        neg_scale = torch.where(valid, -grad_out.to(logprobs.dtype), 0.0)
        # d log p_y / d z_j = 1[j = y] - p_j. The label entry, 1 - p_y = -expm1(log p_y), is formed
        # in float32 (exact near p_y = 1) and rounded once.
        label_term = (neg_scale * torch.expm1(logprobs)).to(logits.dtype)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            probs = torch.softmax(logits[b, t0:t1], dim=-1, dtype=logprobs.dtype)
            torch.mul(probs, neg_scale[b, t0:t1, None], out=grad[b, t0:t1])
            grad[b, t0:t1].scatter_(1, safe_targets[b, t0:t1, None], label_term[b, t0:t1, None])
        return grad, None, None


class TokenKL(torch.autograd.Function):
    """Per-token KL between the softmax of ``logits`` (P) and of ``ref_logits`` (Q).

    ``forward_kl`` selects KL(P || Q), else KL(Q || P). Only ``logits`` is differentiated;
    ``ref_logits`` is a constant.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: Tensor, ref_logits: Tensor, valid: Tensor, forward_kl: bool
    ) -> Tensor:
        batch, length = valid.shape
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty((batch, length), dtype=acc, device=logits.device)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            logp = torch.log_softmax(logits[b, t0:t1], dim=-1, dtype=acc)
            logq = torch.log_softmax(ref_logits[b, t0:t1], dim=-1, dtype=acc)
            first, second = (logp, logq) if forward_kl else (logq, logp)
            weight = first.exp()
            kl = torch.linalg.vecdot(weight, _weighted_difference(weight, first, second))
            out[b, t0:t1] = torch.where(valid[b, t0:t1], kl, 0.0)
        ctx.save_for_backward(logits, ref_logits, valid, out)
        ctx.forward_kl = forward_kl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logits, ref_logits, valid, kl = ctx.saved_tensors
        batch, length = valid.shape
        acc = kl.dtype
        grad = _grad_buffer(logits, length)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            if ctx.forward_kl:
                # d KL(P||Q) / d z_j = p_j (log p_j - log q_j - KL)
                logp = torch.log_softmax(logits[b, t0:t1], dim=-1, dtype=acc)
                logq = torch.log_softmax(ref_logits[b, t0:t1], dim=-1, dtype=acc)
                probs = logp.exp()
                inner = _weighted_difference(probs, logp, logq).sub_(kl[b, t0:t1, None])
                inner.mul_(probs)
            else:
                # d KL(Q||P) / d z_j = p_j - q_j
                inner = torch.softmax(logits[b, t0:t1], dim=-1, dtype=acc)
                inner.sub_(torch.softmax(ref_logits[b, t0:t1], dim=-1, dtype=acc))
            torch.mul(inner, scale[b, t0:t1, None], out=grad[b, t0:t1])
        return grad, None, None, None
