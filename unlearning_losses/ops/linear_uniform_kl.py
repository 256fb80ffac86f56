"""Maximum-entropy unlearning's KL(U || P) per token from hidden states and the output head, the
logits never materialised (the fused-linear ME loss).

Rows are chunked as for the KL of ``linear``: each row's value needs its whole softmax (its
log-sum-exp, its count of finite logits and their differences from its largest logit,
``chunked_stats.uniform_kl_partials``), and its gradient with respect to the logits is
``p - 1/V'`` at the finite columns. The per-token function recomputes each chunk in the
backward; the scalar one knows every token's coefficient in the forward pass and forms the
gradients there, as ``LinearTokenSum`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .chunked import row_chunks, row_groups, zero_outside
from .chunked_stats import uniform_kl_gradient, uniform_kl_partials
from .linear import (
    SumPass,
    _budget,
    _cache_blocks,
    _chain_,
    _Gradients,
    _logits,
    _scaled_once,
    _scored_rows,
)
from .logit_map import LogitMap
from .numerics import accumulation_dtype
from .vocab_numerics import STATS, uniform_kl_coefficients, uniform_kl_stats

Head = tuple[Tensor, Tensor | None]


def _chunk_values(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """KL(U || P) of each row of a chunk's mapped logits ``(nb, nt, V)``, with the row's
    log-sum-exp and count of finite logits (what its gradient needs), block by block: the
    partials' temporaries (the centred logits, their exponentials) stay block-sized. A block
    holds whole rows, so its partials make the rows' statistics at once."""
    stats = torch.empty((STATS, z.numel() // z.shape[-1]), dtype=z.dtype, device=z.device)
    for block, rows in _cache_blocks(z):
        for row, value in enumerate(uniform_kl_stats(*uniform_kl_partials(block))):
            stats[row, rows] = value
    lse, count, value = stats.view(STATS, *z.shape[:-1])
    return value, lse, count


def _chunk_gradient_(
    z: Tensor, lse: Tensor, count: Tensor, coefficient: Tensor, logit_map: LogitMap
) -> Tensor:
    """Overwrite the chunk's mapped logits ``z`` with the gradient of ``sum coefficient * KL``
    with respect to the head's raw output, block by block (each block stays in cache)."""
    flat_lse, flat_count = lse.reshape(-1), count.reshape(-1)
    flat_coefficient = coefficient.reshape(-1)
    for block, rows in _cache_blocks(z):
        on_probs, on_finite = uniform_kl_coefficients(flat_count[rows], flat_coefficient[rows])
        grad = uniform_kl_gradient(block, flat_lse[rows], on_probs, on_finite)
        block.copy_(_chain_(grad, block, logit_map))
    return z


class LinearUniformKL(torch.autograd.Function):
    """Per-token KL(U || P) ``(B, L)`` of the head's distribution on ``hidden[:, :L]``; 0 where
    not valid. The backward recomputes each chunk's logits."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        valid: Tensor,
        chunk_rows: int | None,
        logit_map: LogitMap,
    ) -> Tensor:
        acc = accumulation_dtype(hidden.dtype)
        vocab = weight.shape[0]
        budget = _budget(chunk_rows, vocab)
        out = torch.zeros(valid.shape, dtype=acc, device=hidden.device)
        lse, count = torch.zeros_like(out), torch.ones_like(out)
        groups = row_groups(valid, vocab, budget)
        for b, t in row_chunks(groups, vocab, budget):
            z = _logits(_scored_rows(hidden, valid, b, t), weight, bias, acc, logit_map)
            value, lse[b, t], count[b, t] = _chunk_values(z)
            out[b, t] = torch.where(valid[b, t], value, 0.0)
            del z  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, valid, lse, count)
        ctx.groups, ctx.budget, ctx.logit_map = groups, budget, logit_map
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        hidden, weight, bias, valid, lse, count = ctx.saved_tensors
        grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad)
        if grads.hidden is not None:
            zero_outside(grads.hidden, ctx.groups)
        coefficient = torch.where(valid, grad_out.to(lse.dtype), 0.0)
        for b, t in row_chunks(ctx.groups, weight.shape[0], ctx.budget):
            scored = _scored_rows(hidden, valid, b, t)
            z = _logits(scored, weight, bias, lse.dtype, ctx.logit_map)
            _chunk_gradient_(z, lse[b, t], count[b, t], coefficient[b, t], ctx.logit_map)
            grads.add(b, t, scored, weight, z)
            del z
        return (*grads.result(weight, bias), None, None, None)


class LinearUniformKLSum(torch.autograd.Function):
    """``sum over valid rows of KL(U || P_t) * scale``, a scalar; the gradients are formed in the
    forward pass, one pass over the vocabulary."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        valid: Tensor,
        scale: Tensor,
        chunk_rows: int | None,
        logit_map: LogitMap,
        grad_enabled: bool,
    ) -> Tensor:
        run = SumPass.start(hidden, (weight, bias), valid, scale, chunk_rows, grad_enabled)
        for b, t in run.chunks(weight.shape[0]):
            scored = _scored_rows(hidden, valid, b, t)
            z = _logits(scored, weight, bias, run.acc, logit_map)
            value, lse, count = _chunk_values(z)
            coefficient = run.coefficient[b, t]
            run.total.add_(torch.where(valid[b, t], value * coefficient, 0.0).sum())
            if run.grads is not None:
                _chunk_gradient_(z, lse, count, coefficient, logit_map)
                run.grads.add(b, t, scored, weight, z)
            del z
        return run.finish(ctx, weight, bias)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        return (*_scaled_once(ctx, grad_out), None, None, None, None, None)
