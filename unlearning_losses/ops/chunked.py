"""The chunked PyTorch backend of the token reductions.

Each function walks the rows of ``logits`` (B, T, V) in chunks of a bounded number of bytes, so the
only temporaries are chunk-sized. The forward keeps float32 per-token results and the log-sum-exp;
the backward recomputes the softmax chunk by chunk and writes the gradient straight into one buffer
in the logits' dtype. With ``shift=True`` the rows read are ``logits[:, :-1]`` (a strided view, never
copied) and the gradient's last position is zero.
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
    """The gradient of the full logits; positions past ``length`` (the shifted-out one) are zero."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if length < logits.shape[1]:
        grad[:, length:].zero_()
    return grad


def _chunk_target(out: Tensor, acc: torch.dtype) -> Tensor:
    """Where a chunk's gradient is computed: in place when the logits already are ``acc``."""
    return out if out.dtype == acc else torch.empty(out.shape, dtype=acc, device=out.device)


class LabelLogprobs(torch.autograd.Function):
    """Per-token log p(label), float32 (float64 for float64 logits), 0 at ignored positions."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        batch, length = targets.shape
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty((batch, length), dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        safe_targets = torch.where(valid, targets, 0)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            x = logits[b, t0:t1].to(acc)
            chunk_lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe_targets[b, t0:t1, None]).squeeze(1)
            lse[b, t0:t1] = chunk_lse
            out[b, t0:t1] = torch.where(valid[b, t0:t1], picked - chunk_lse, 0.0)
        ctx.save_for_backward(logits, safe_targets, valid, lse, out)
        ctx.mark_non_differentiable(safe_targets)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_targets, valid, lse, logprobs = ctx.saved_tensors
        batch, length = safe_targets.shape
        acc = lse.dtype
        grad = _grad_buffer(logits, length)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        # d log p_y / d z_j = 1[j = y] - p_j; the label entry is -expm1(log p_y), exact near p_y = 1.
        label_term = scale * -torch.expm1(logprobs)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            target = _chunk_target(grad[b, t0:t1], acc)
            torch.sub(logits[b, t0:t1].to(acc), lse[b, t0:t1, None], out=target)
            target.exp_().mul_(-scale[b, t0:t1, None])
            target.scatter_(1, safe_targets[b, t0:t1, None], label_term[b, t0:t1, None])
            if target.data_ptr() != grad[b, t0:t1].data_ptr():
                grad[b, t0:t1].copy_(target)
        return grad, None, None


class TokenKL(torch.autograd.Function):
    """Per-token KL between the softmax of ``logits`` (P) and of ``ref_logits`` (Q).

    ``direction="forward"`` is KL(P || Q), ``"reverse"`` is KL(Q || P). Only ``logits`` is
    differentiated; ``ref_logits`` is a constant.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: Tensor, ref_logits: Tensor, valid: Tensor, forward_kl: bool
    ) -> Tensor:
        batch, length = valid.shape
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty((batch, length), dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        ref_lse = torch.empty_like(out)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            logp = logits[b, t0:t1].to(acc)
            logq = ref_logits[b, t0:t1].to(acc)
            chunk_lse = torch.logsumexp(logp, dim=-1, keepdim=True)
            chunk_ref_lse = torch.logsumexp(logq, dim=-1, keepdim=True)
            logp = logp - chunk_lse
            logq = logq - chunk_ref_lse
            first, second = (logp, logq) if forward_kl else (logq, logp)
            weight = first.exp()
            # An entry whose weight is 0 contributes 0, even against -inf; NaN still propagates.
            terms = torch.where(weight == 0, 0.0, weight * (first - second))
            lse[b, t0:t1] = chunk_lse.squeeze(1)
            ref_lse[b, t0:t1] = chunk_ref_lse.squeeze(1)
            out[b, t0:t1] = torch.where(valid[b, t0:t1], terms.sum(-1), 0.0)
        ctx.save_for_backward(logits, ref_logits, valid, lse, ref_lse, out)
        ctx.forward_kl = forward_kl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logits, ref_logits, valid, lse, ref_lse, kl = ctx.saved_tensors
        batch, length = valid.shape
        acc = lse.dtype
        grad = _grad_buffer(logits, length)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        for b, t0, t1 in _row_chunks(batch, length, logits.shape[-1]):
            target = _chunk_target(grad[b, t0:t1], acc)
            logp = torch.sub(logits[b, t0:t1].to(acc), lse[b, t0:t1, None], out=target)
            logq = ref_logits[b, t0:t1].to(acc) - ref_lse[b, t0:t1, None]
            if ctx.forward_kl:
                # d KL(P||Q) / d z_j = p_j (log p_j - log q_j - KL)
                p = logp.exp()
                inner = torch.where(p == 0, 0.0, logp - logq - kl[b, t0:t1, None])
                torch.mul(p, inner, out=target)
            else:
                # d KL(Q||P) / d z_j = p_j - q_j
                target.exp_().sub_(logq.exp_())
            target.mul_(scale[b, t0:t1, None])
            if target.data_ptr() != grad[b, t0:t1].data_ptr():
                grad[b, t0:t1].copy_(target)
        return grad, None, None, None
