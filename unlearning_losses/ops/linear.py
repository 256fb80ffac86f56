"""The token reductions computed from hidden states and an output head, never materialising the
logits.

Each chunk computes its logits ``h W^T + b`` (at most ``budget`` bytes of float32), reduces them
and drops them. Token sums (GA, NLL, KL) and frozen heads chunk the rows, since each row's
softmax is needed whole; the per-token log-probabilities of a trained head (NPO, SimNPO) chunk
the vocabulary instead: every valid token at once against a slice of the head, the log-sum-exp
joined across slices, and in the backward each slice's head gradient written once. The backward
forms ``dL/dz`` in float32 from the per-token coefficient that autograd hands it (for NPO and
SimNPO the closed form of the sequence-level math, computed on ``(B, L)`` tensors) and
accumulates the hidden, weight and bias gradients (weight and bias in float32). A head that does
not require grad is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .chunked import CHUNK_BYTES, Scratch, row_chunks, row_groups, zero_outside
from .logit_map import LogitMap
from .numerics import (
    PairMode,
    accumulation_dtype,
    floored_logprob,
    kl_gradient,
    label_gradient_,
    pair_scores,
    pair_value,
)

#: Bytes of float32 logits that one chunk may hold; results do not depend on it. A chunk of rows
#: re-reads (and re-packs) the whole head, so fewer, larger chunks are faster: on the CPU
#: benchmark (V = 128256) frozen-head GA took 15.5 s with 64 MiB chunks, 13.1 s with 128 MiB.
LINEAR_CHUNK_BYTES = 128 * 1024 * 1024
#: Bytes of one block of a chunk's logits for the elementwise passes (cache-sized).
CACHE_BLOCK_BYTES = CHUNK_BYTES


def _budget(chunk_rows: int | None, vocab: int) -> int:
    return chunk_rows * 4 * vocab if chunk_rows else LINEAR_CHUNK_BYTES


def _cache_blocks(z: Tensor) -> Iterator[tuple[Tensor, slice]]:
    """The rows of a chunk's logits ``(nb, nt, V)`` as ``(rows, V)`` views of at most
    ``CACHE_BLOCK_BYTES`` each, with their slice of the flattened rows.

    A chunk is sized for the matmul (tens of MiB); its elementwise passes (log-sum-exp, softmax,
    scaling) run block by block, so each block stays in cache across them instead of streaming the
    whole chunk through memory once per pass.
    """
    flat = z.view(-1, z.shape[-1])
    step = max(1, CACHE_BLOCK_BYTES // (flat.element_size() * flat.shape[-1]))
    for start in range(0, flat.shape[0], step):
        rows = slice(start, min(start + step, flat.shape[0]))
        yield flat[rows], rows


def _logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, logit_map: LogitMap
) -> Tensor:
    """``hidden (..., H) @ weight.T + bias`` in the inputs' dtype (as a model computes them), as
    ``acc``, then mapped as the model maps them (scaled, softcapped)."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    return logit_map.apply_(z.to(acc))


def _label_gradient_block(
    block: Tensor,
    logp: Tensor,
    label_logp: Tensor,
    index: Tensor,
    coefficient: Tensor | float,
    logit_map: LogitMap,
) -> None:
    """Write into ``block`` (a cache block of mapped logits, its log-softmax ``logp`` in a scratch
    buffer) the gradient of ``coefficient * log p_y`` with respect to the head's raw output: the
    map's slope is read from ``block`` before the gradient replaces it."""
    if logit_map.softcap is None:
        scaled = coefficient * logit_map.scale
        label_gradient_(torch.exp(logp, out=block), label_logp, index, scaled, block)
        return
    probs = logp.exp_()
    label_gradient_(probs, label_logp, index, coefficient, probs)
    logit_map.slope_(block).mul_(probs)


def _chain_(grad_logits: Tensor, mapped: Tensor, logit_map: LogitMap) -> Tensor:
    """``grad_logits`` (with respect to the mapped logits ``mapped``, which this overwrites) made
    the gradient with respect to the head's raw output."""
    if logit_map.softcap is not None:
        return grad_logits.mul_(logit_map.slope_(mapped))
    return grad_logits.mul_(logit_map.scale) if logit_map.scale != 1.0 else grad_logits


class _Gradients:
    """Accumulators for the head (float32; float64 for a float64 head) and per-row hidden
    gradients."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple):
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = (
            torch.zeros(weight.shape, dtype=accumulation_dtype(weight.dtype), device=weight.device)
            if needs[1]
            else None
        )
        self.bias = (
            torch.zeros(
                weight.shape[0], dtype=accumulation_dtype(weight.dtype), device=weight.device
            )
            if bias is not None and needs[2]
            else None
        )

    def add(self, b: slice, t: slice, rows: Tensor, weight: Tensor, grad_logits: Tensor) -> None:
        """Accumulate one chunk: ``rows`` are its hidden states as the logits were formed from
        them (:func:`_scored_rows`), ``grad_logits`` is ``(nb, nt, V)`` in the accumulation
        dtype."""
        flat = grad_logits.reshape(-1, grad_logits.shape[-1])
        if self.hidden is not None:
            # As the materialised path does: the logits' gradient in the head's dtype, then matmul.
            self.hidden[b, t] = (flat.to(weight.dtype) @ weight).view(self.hidden[b, t].shape)
        if self.weight is not None:
            self.weight.addmm_(flat.T, rows.reshape(-1, rows.shape[-1]).to(self.weight.dtype))
        if self.bias is not None:
            self.bias.add_(flat.sum(0))

    def result(self, weight: Tensor, bias: Tensor | None):
        return (
            self.hidden,
            None if self.weight is None else self.weight.to(weight.dtype),
            None if self.bias is None or bias is None else self.bias.to(bias.dtype),
        )


def _scored_rows(hidden: Tensor, valid: Tensor, b: slice, t: slice) -> Tensor:
    """The chunk ``hidden[b, t]`` with the rows that score nothing zeroed: padding's hidden states
    may be NaN, and a coefficient of 0 times a NaN logit is still NaN (see :func:`_token_rows`)."""
    return torch.where(valid[b, t, None], hidden[b, t], 0.0)


def _frozen_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, grad_enabled: bool) -> bool:
    """Only the hidden states need a gradient (a frozen head, as under LoRA)."""
    head_trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    return grad_enabled and hidden.requires_grad and not head_trained


class LinearLogprobs(torch.autograd.Function):
    """Per-token log p(target) from ``hidden[:, :L]`` and the head ``(weight, bias)``.

    With a frozen head the forward pass also keeps, per token, ``d_t = (onehot(y_t) - p_t) W``, the
    hidden-state gradient of ``log p_t`` (hidden-sized, not vocabulary-sized): the backward is then
    ``grad_out * d_t``, with no second pass over the vocabulary. A trained head needs the logits
    again for its own gradient: the backward recomputes them a slice of the vocabulary at a time
    for every valid token (see :func:`_head_backward`), from the log-sum-exps the forward keeps.
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        valid: Tensor,
        chunk_rows: int | None,
        logit_map: LogitMap,
        grad_enabled: bool,
    ) -> Tensor:
        budget = _budget(chunk_rows, weight.shape[0])
        safe_targets = torch.where(valid, targets, 0)
        directions = lse = None
        head = (weight, bias, logit_map)
        if _frozen_head(hidden, weight, bias, grad_enabled):
            out, directions = _frozen_head_forward(hidden, head, safe_targets, valid, budget)
        else:
            out, lse = _head_logprobs(hidden, head, safe_targets, valid, budget)
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, out, lse, directions)
        ctx.budget, ctx.logit_map = budget, logit_map
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        hidden, weight, bias, safe_targets, valid, logprobs, lse, directions = ctx.saved_tensors
        acc = logprobs.dtype
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        if directions is not None:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden[:, : valid.shape[1]] = (directions * scale[..., None]).to(hidden.dtype)
            return grad_hidden, None, None, None, None, None, None, None
        per_token = (safe_targets, lse, logprobs, scale)
        head = (weight, bias, ctx.logit_map)
        grads = _head_backward(hidden, head, valid, per_token, ctx.budget, ctx.needs_input_grad)
        return (*grads, None, None, None, None, None)


Head = tuple[Tensor, Tensor | None, LogitMap]
"""The head: ``weight``, ``bias`` and what the model does to its output."""


def _frozen_head_forward(
    hidden: Tensor, head: Head, targets: Tensor, valid: Tensor, budget: int
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) over ``hidden[:, :L]`` and each token's hidden-state gradient
    direction ``(onehot(y) - p) W``, by chunks of rows (each needs its whole row's softmax)."""
    weight, bias, logit_map = head
    acc = accumulation_dtype(hidden.dtype)
    vocab = weight.shape[0]
    out = torch.zeros(valid.shape, dtype=acc, device=hidden.device)
    directions = torch.zeros((*valid.shape, hidden.shape[-1]), dtype=acc, device=hidden.device)
    scratch = Scratch(hidden, acc, CACHE_BLOCK_BYTES, vocab)
    for b, t in row_chunks(row_groups(valid, vocab, budget), vocab, budget):
        z = _logits(_scored_rows(hidden, valid, b, t), weight, bias, acc, logit_map)
        picked = torch.empty(z.shape[:-1], dtype=acc, device=z.device)
        targets_flat = targets[b, t].reshape(-1, 1)
        for block, rows in _cache_blocks(z):
            logp = torch.log_softmax(block, -1, out=scratch(block.shape))
            index = targets_flat[rows]
            label_logp = logp.gather(-1, index)
            picked.view(-1)[rows] = label_logp.squeeze(-1)
            _label_gradient_block(block, logp, label_logp, index, 1.0, logit_map)
        out[b, t] = torch.where(valid[b, t], floored_logprob(picked), 0.0)
        flat = z.view(-1, vocab).to(weight.dtype)
        directions[b, t] = (flat @ weight).view(directions[b, t].shape).to(acc)
        del z  # before the next chunk's logits exist
    return out, directions


def _token_rows(
    hidden: Tensor, valid: Tensor, select: bool | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The rows of ``hidden[:, :L]`` a vocabulary-sliced pass visits, ``(N, H)``, and their
    ``(batch, time)`` index.

    ``select`` (default: on the CPU, where reading the mask costs no device sync, unless
    ``torch.compile`` traces, to which their number is a data-dependent shape): the valid rows
    only. Otherwise every row, the invalid ones zeroed so that padding's hidden states (even
    NaN) reach no gradient: their coefficient is 0 and their logits are the bias.
    """
    window = hidden[:, : valid.shape[1]]
    if select is None:
        select = valid.device.type == "cpu" and not torch.compiler.is_compiling()
    if select:
        rows = valid.nonzero(as_tuple=True)
        return window[rows], rows
    batch, time = (torch.arange(n, device=valid.device) for n in valid.shape)
    rows = (batch.repeat_interleave(valid.shape[1]), time.repeat(valid.shape[0]))
    return torch.where(valid[rows][:, None], window[rows], 0.0), rows


def _vocabulary_slices(
    tokens: Tensor, head: Head, acc: torch.dtype, budget: int
) -> Iterator[tuple[int, int, Tensor]]:
    """``(v0, v1, logits)``: the logits of every row of ``tokens (N, H)`` for the vocabulary
    slice ``[v0, v1)``, slices of at most ``budget`` bytes of float32.

    Slicing the vocabulary instead of the rows keeps every matmul well shaped (all N tokens at
    once) and reads each part of the head once per pass."""
    weight, bias, logit_map = head
    vocab = weight.shape[0]
    width = max(1, budget // (4 * max(1, tokens.shape[0])))
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        part = None if bias is None else bias[v0:v1]
        yield v0, v1, _logits(tokens, weight[v0:v1], part, acc, logit_map)


def _head_logprobs(
    hidden: Tensor, head: Head, targets: Tensor, valid: Tensor, budget: int
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) and log-sum-exp over the ``valid`` rows of ``hidden[:, :L]``, both
    ``(B, L)`` (0 elsewhere), the vocabulary a slice at a time: each slice's log-sum-exp joins
    the running one through ``logaddexp``."""
    acc = accumulation_dtype(hidden.dtype)
    tokens, rows = _token_rows(hidden, valid)
    labels = targets[rows][:, None]
    running = torch.full((tokens.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
    label_logit = torch.zeros((tokens.shape[0], 1), dtype=acc, device=hidden.device)
    for v0, v1, z in _vocabulary_slices(tokens, head, acc, budget):
        for block, span in _cache_blocks(z):
            running[span] = torch.logaddexp(running[span], torch.logsumexp(block, -1))
        has_label = (labels >= v0) & (labels < v1)
        local = torch.where(has_label, labels - v0, 0)
        label_logit = torch.where(has_label, z.gather(-1, local), label_logit)
        del z
    out = torch.zeros(valid.shape, dtype=acc, device=hidden.device)
    lse = torch.zeros_like(out)
    logprob = floored_logprob(label_logit.squeeze(-1) - running, running)
    out[rows] = torch.where(valid[rows], logprob, 0.0)
    lse[rows] = running
    return out, lse


def _head_backward(
    hidden: Tensor,
    head: Head,
    valid: Tensor,
    per_token: tuple[Tensor, ...],
    budget: int,
    needs: tuple,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_t c_t log p_t(y_t)`` over the ``valid`` rows of ``hidden[:, :L]`` for a
    trained head, the vocabulary a slice at a time.

    ``per_token``: ``(B, L)`` targets, log-sum-exps, label log-probabilities and coefficients
    ``c``. Each slice's logits for all N valid tokens give ``(onehot - p) c`` there; the slice's
    head gradient is then one well-shaped matmul written once (row chunks would add a partial
    product into the whole head gradient per chunk), and the hidden gradient, ``(N, H)``,
    accumulates over the slices. Invalid rows contribute nothing (see :func:`_token_rows`).
    """
    weight, bias, logit_map = head
    tokens, rows = _token_rows(hidden, valid)
    targets, lse, logp, coefficient = (x[rows][:, None] for x in per_token)
    if logit_map.softcap is None:  # a scale's slope is a constant: into the coefficients
        coefficient = coefficient * logit_map.scale
    acc = lse.dtype
    tokens_acc = tokens.to(acc)
    grad_tokens = torch.zeros(tokens.shape, dtype=acc, device=hidden.device) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
    for v0, v1, z in _vocabulary_slices(tokens, head, acc, budget):
        has_label = (targets >= v0) & (targets < v1)
        local = torch.where(has_label, targets - v0, 0)
        slopes = Scratch(z, acc, CACHE_BLOCK_BYTES) if logit_map.softcap is not None else None
        for block, span in _cache_blocks(z):
            slope = None if slopes is None else logit_map.slope_(slopes(block.shape).copy_(block))
            probs = block.sub_(lse[span]).exp_()
            label_gradient_(
                probs, logp[span], local[span], coefficient[span], block, has_label[span]
            )
            if slope is not None:
                block.mul_(slope)
        if grad_tokens is not None:
            grad_tokens += (z.to(weight.dtype) @ weight[v0:v1]).to(acc)
        if grad_weight is not None:
            grad_weight[v0:v1] = (z.T @ tokens_acc).to(weight.dtype)
        if grad_bias is not None:
            grad_bias[v0:v1] = z.sum(0).to(grad_bias.dtype)
        del z
    grad_hidden = None
    if grad_tokens is not None:
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[:, : valid.shape[1]][rows] = grad_tokens.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


class LinearTokenKL(torch.autograd.Function):
    """Per-token KL between the heads' distributions on ``hidden[:, :L]`` and ``ref_hidden[:, :L]``.

    Only the model side (``hidden``, ``weight``, ``bias``) is differentiated.
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        valid: Tensor,
        mode: PairMode,
        chunk_rows: int | None,
        logit_map: LogitMap,
    ) -> Tensor:
        acc = accumulation_dtype(hidden.dtype)
        vocab = weight.shape[0]
        budget = _budget(chunk_rows, vocab)
        out = torch.zeros(valid.shape, dtype=acc, device=hidden.device)
        groups = row_groups(valid, vocab, budget)
        for b, t in row_chunks(groups, vocab, budget):
            scored = _scored_rows(hidden, valid, b, t)
            logp = _logits(scored, weight, bias, acc, logit_map).log_softmax(-1)
            ref_rows = _scored_rows(ref_hidden, valid, b, t)
            logq = _logits(ref_rows, ref_weight, ref_bias, acc, logit_map).log_softmax(-1)
            value = pair_value(*pair_scores(logp, logq, mode, 0.0))
            out[b, t] = torch.where(valid[b, t], value, 0.0)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, out)
        ctx.groups, ctx.budget, ctx.mode = groups, budget, mode
        ctx.logit_map = logit_map
        return out

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl = ctx.saved_tensors
        acc = kl.dtype
        grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad)
        if grads.hidden is not None:
            zero_outside(grads.hidden, ctx.groups)
        scale = torch.where(valid, grad_out.to(acc), 0.0)
        for b, t in row_chunks(ctx.groups, weight.shape[0], ctx.budget):
            scored = _scored_rows(hidden, valid, b, t)
            z = _logits(scored, weight, bias, acc, ctx.logit_map)
            logp = z.log_softmax(-1)
            ref_rows = _scored_rows(ref_hidden, valid, b, t)
            ref_z = _logits(ref_rows, ref_weight, ref_bias, acc, ctx.logit_map)
            logq = ref_z.log_softmax(-1)
            weights, scores = pair_scores(logp, logq, ctx.mode, 0.0)
            grad_logits = kl_gradient(logp, weights, scores, kl[b, t], ctx.mode, z, ref_z)
            grad_logits = _chain_(grad_logits, z, ctx.logit_map)
            grads.add(b, t, scored, weight, grad_logits.mul_(scale[b, t, None]))
        return (*grads.result(weight, bias), None, None, None, None, None, None, None)


def _forward_pass_gradients(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, groups: list, grad_enabled: bool
) -> _Gradients | None:
    """Accumulators for gradients formed in the forward pass; None when nothing needs one
    (``grad_enabled`` is the caller's grad mode: inside ``forward`` it is always off)."""
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not (grad_enabled and any(needs)):
        return None
    grads = _Gradients(hidden, weight, bias, needs)
    if grads.hidden is not None:
        zero_outside(grads.hidden, groups)
    return grads


class SumPass(NamedTuple):
    """What a scalar fused-linear pass (gradients formed in the forward) walks and fills: the
    accumulation dtype, the chunk budget and row groups, the gradient accumulators (None when
    nothing needs one), each token's coefficient (0 where not valid) and the running total."""

    acc: torch.dtype
    budget: int
    groups: list
    grads: _Gradients | None
    coefficient: Tensor
    total: Tensor

    @staticmethod
    def start(
        hidden: Tensor,
        head: tuple[Tensor, Tensor | None],
        valid: Tensor,
        scale: Tensor,
        chunk_rows: int | None,
        grad_enabled: bool,
    ) -> SumPass:
        weight, bias = head
        acc = accumulation_dtype(hidden.dtype)
        budget = _budget(chunk_rows, weight.shape[0])
        groups = row_groups(valid, weight.shape[0], budget)
        return SumPass(
            acc,
            budget,
            groups,
            _forward_pass_gradients(hidden, weight, bias, groups, grad_enabled),
            torch.where(valid, scale.to(acc), 0.0),
            torch.zeros((), dtype=acc, device=hidden.device),
        )

    def chunks(self, vocab: int) -> Iterator[tuple[slice, slice]]:
        return row_chunks(self.groups, vocab, self.budget)

    def finish(self, ctx: Any, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Hand the gradients to ``ctx`` for the backward; the total."""
        ctx.grads = None if self.grads is None else self.grads.result(weight, bias)
        return self.total


class LinearTokenSum(torch.autograd.Function):
    """``sum over valid rows of log p(target) * scale``, a scalar, from hidden states and a head.

    For token means the coefficient of every token is known in the forward pass (``scale``, e.g.
    1 / |M|), so the gradients are formed there, chunk by chunk, while each chunk's logits are at
    hand; the backward only multiplies them by the upstream scalar. One pass over the vocabulary
    and no recomputed matmul: the cost of the materialised path, without its memory.
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        valid: Tensor,
        scale: Tensor,
        chunk_rows: int | None,
        logit_map: LogitMap,
        grad_enabled: bool,
    ) -> Tensor:
        run = SumPass.start(hidden, (weight, bias), valid, scale, chunk_rows, grad_enabled)
        vocab = weight.shape[0]
        safe_targets = torch.where(valid, targets, 0)
        scratch = Scratch(hidden, run.acc, CACHE_BLOCK_BYTES, vocab)
        for b, t in run.chunks(vocab):
            scored = _scored_rows(hidden, valid, b, t)
            z = _logits(scored, weight, bias, run.acc, logit_map)
            chunk_targets = safe_targets[b, t].reshape(-1, 1)
            chunk_coefficient = run.coefficient[b, t].reshape(-1, 1)
            for block, rows in _cache_blocks(z):
                logp = torch.log_softmax(block, -1, out=scratch(block.shape))
                index, c = chunk_targets[rows], chunk_coefficient[rows]
                label_logp = logp.gather(-1, index)
                run.total.add_((label_logp * c).sum())
                if run.grads is not None:
                    _label_gradient_block(block, logp, label_logp, index, c, logit_map)
            if run.grads is not None:
                run.grads.add(b, t, scored, weight, z)
            del z  # before the next chunk's logits exist
        return run.finish(ctx, weight, bias)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        return (*_scaled_once(ctx, grad_out), None, None, None, None, None, None)


class LinearKLSum(torch.autograd.Function):
    """``sum over valid rows of KL_t * scale``, a scalar; gradients formed in the forward pass as
    in :class:`LinearTokenSum`. Only the model side is differentiated."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        valid: Tensor,
        scale: Tensor,
        mode: PairMode,
        chunk_rows: int | None,
        logit_map: LogitMap,
        grad_enabled: bool,
    ) -> Tensor:
        run = SumPass.start(hidden, (weight, bias), valid, scale, chunk_rows, grad_enabled)
        grads = run.grads
        for b, t in run.chunks(weight.shape[0]):
            scored = _scored_rows(hidden, valid, b, t)
            z = _logits(scored, weight, bias, run.acc, logit_map)
            ref_rows = _scored_rows(ref_hidden, valid, b, t)
            ref_z = _logits(ref_rows, ref_weight, ref_bias, run.acc, logit_map)
            chunk_coefficient = run.coefficient[b, t].reshape(-1, 1)
            for (block, rows), (ref_block, _) in zip(
                _cache_blocks(z), _cache_blocks(ref_z), strict=True
            ):
                logp, logq = block.log_softmax(-1), ref_block.log_softmax(-1)
                weights, scores = pair_scores(logp, logq, mode, 0.0)
                kl = pair_value(weights, scores)
                grad_logits = kl_gradient(logp, weights, scores, kl, mode, block, ref_block)
                run.total.add_((kl[:, None] * chunk_coefficient[rows]).sum())
                if grads is not None:
                    grad_logits = _chain_(grad_logits, block, logit_map)
                    torch.mul(grad_logits, chunk_coefficient[rows], out=block)
            if grads is not None:
                grads.add(b, t, scored, weight, z)
            del z, ref_z
        return run.finish(ctx, weight, bias)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor):
        return (*_scaled_once(ctx, grad_out), None, None, None, None, None, None, None, None, None)


def _scaled_once(ctx: Any, grad_out: Tensor) -> tuple:
    """The gradients formed in the forward pass, scaled in place by the upstream scalar: no second
    copy of the weight gradient. They are handed over, so a second backward is refused."""
    if ctx.grads is None:
        raise RuntimeError(
            "this fused-linear loss was differentiated already (its gradients are formed in the "
            'forward pass and handed over once); use reduction="none" for a retained graph'
        )
    grads, ctx.grads = ctx.grads, None
    return tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
