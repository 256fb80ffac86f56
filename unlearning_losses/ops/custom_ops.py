"""The primitives as PyTorch custom ops with fake implementations and autograd.

Registering them through ``torch.library`` makes them opaque to ``torch.compile``: a compiled loss
calls them without graph breaks, whichever backend runs underneath. ``backend`` is ``"torch"``
(chunked) or ``"triton"``; ``inplace_backward`` makes the backward write the gradient into the
logits' own buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import chunked


def _backend_module(backend: str, primitive: str):
    if backend == "triton":
        if primitive == "logprobs":
            from . import triton_logprobs

            return triton_logprobs
        from . import triton_kl

        return triton_kl
    return chunked


def _per_token(logits: Tensor, valid: Tensor) -> Tensor:
    return logits.new_empty(valid.shape, dtype=chunked.accumulation_dtype(logits.dtype))


def _gradient_buffer(logits: Tensor, inplace: bool) -> Tensor:
    return logits if inplace else torch.empty_like(logits)


# --- log p(label) ------------------------------------------------------------------------------


@torch.library.custom_op("unlearning_losses::logprobs", mutates_args=())
def logprobs(
    logits: Tensor, targets: Tensor, valid: Tensor, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) of rows ``[:, :L]`` and their log-sum-exp."""
    return _backend_module(backend, "logprobs").logprobs_forward(logits, targets, valid)


@logprobs.register_fake
def _(logits, targets, valid, backend, inplace_backward):
    return _per_token(logits, valid), _per_token(logits, valid)


@torch.library.custom_op("unlearning_losses::logprobs_backward", mutates_args=("grad",))
def logprobs_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    grad: Tensor,
    backend: str,
) -> None:
    _backend_module(backend, "logprobs").logprobs_backward(
        grad_out, logits, targets, valid, lse, logprobs, grad
    )


@logprobs_backward.register_fake
def _(grad_out, logits, targets, valid, lse, logprobs, grad, backend):
    return None


def _logprobs_setup(ctx, inputs, output) -> None:
    logits, targets, valid, backend, inplace_backward = inputs
    out, lse = output
    ctx.save_for_backward(logits, targets, valid, lse, out)
    ctx.backend, ctx.inplace_backward = backend, inplace_backward


def _logprobs_grad(ctx, grad_out, _grad_lse):
    logits, targets, valid, lse, out = ctx.saved_tensors
    grad = _gradient_buffer(logits, ctx.inplace_backward)
    logprobs_backward(grad_out, logits, targets, valid, lse, out, grad, ctx.backend)
    return grad, None, None, None, None


logprobs.register_autograd(_logprobs_grad, setup_context=_logprobs_setup)


# --- KL between two next-token distributions ---------------------------------------------------


@torch.library.custom_op("unlearning_losses::token_kl", mutates_args=())
def token_kl(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    forward_kl: bool,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token KL of rows ``[:, :L]``, with what the backward of ``backend`` needs.

    The Triton backward needs both log-sum-exps; the chunked one recomputes them and gets empty
    placeholders.
    """
    if backend == "triton":
        return _backend_module(backend, "kl").kl_forward(logits, ref_logits, valid, forward_kl)
    kl = chunked.kl_forward(logits, ref_logits, valid, forward_kl)
    return kl, kl.new_empty(0), kl.new_empty(0)


@token_kl.register_fake
def _(logits, ref_logits, valid, forward_kl, backend, inplace_backward):
    aux = _per_token(logits, valid) if backend == "triton" else logits.new_empty(0)
    return _per_token(logits, valid), aux, aux.clone()


@torch.library.custom_op("unlearning_losses::token_kl_backward", mutates_args=("grad",))
def token_kl_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    lse: Tensor,
    ref_lse: Tensor,
    kl: Tensor,
    forward_kl: bool,
    grad: Tensor,
    backend: str,
) -> None:
    if backend == "triton":
        _backend_module(backend, "kl").kl_backward(
            grad_out, logits, ref_logits, valid, lse, ref_lse, kl, forward_kl, grad
        )
    else:
        chunked.kl_backward(grad_out, logits, ref_logits, valid, kl, forward_kl, grad)


@token_kl_backward.register_fake
def _(grad_out, logits, ref_logits, valid, lse, ref_lse, kl, forward_kl, grad, backend):
    return None


def _kl_setup(ctx, inputs, output) -> None:
    logits, ref_logits, valid, forward_kl, backend, inplace_backward = inputs
    kl, lse, ref_lse = output
    ctx.save_for_backward(logits, ref_logits, valid, lse, ref_lse, kl)
    ctx.forward_kl, ctx.backend, ctx.inplace_backward = forward_kl, backend, inplace_backward


def _kl_grad(ctx, grad_out, _grad_lse, _grad_ref_lse):
    logits, ref_logits, valid, lse, ref_lse, kl = ctx.saved_tensors
    grad = _gradient_buffer(logits, ctx.inplace_backward)
    token_kl_backward(
        grad_out, logits, ref_logits, valid, lse, ref_lse, kl, ctx.forward_kl, grad, ctx.backend
    )
    return grad, None, None, None, None, None


token_kl.register_autograd(_kl_grad, setup_context=_kl_setup)


# --- cross-entropy to a soft target built from reference logits ----------------------------------


@torch.library.custom_op("unlearning_losses::soft_target_ce", mutates_args=())
def soft_target_ce(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    label_shift: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token cross-entropy from ``softmax(ref_logits - label_shift * onehot)`` to the model,
    with the log-sum-exps the Triton backward needs (empty placeholders for the chunked one)."""
    if backend == "triton":
        return _backend_module(backend, "kl").kl_forward(
            logits, ref_logits, valid, False, targets, label_shift
        )
    ce = chunked.soft_target_forward(logits, ref_logits, targets, valid, label_shift)
    return ce, ce.new_empty(0), ce.new_empty(0)


@soft_target_ce.register_fake
def _(logits, ref_logits, targets, valid, label_shift, backend):
    aux = _per_token(logits, valid) if backend == "triton" else logits.new_empty(0)
    return _per_token(logits, valid), aux, aux.clone()


@torch.library.custom_op("unlearning_losses::soft_target_ce_backward", mutates_args=("grad",))
def soft_target_ce_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    ref_lse: Tensor,
    ce: Tensor,
    label_shift: float,
    grad: Tensor,
    backend: str,
) -> None:
    if backend == "triton":
        _backend_module(backend, "kl").kl_backward(
            grad_out, logits, ref_logits, valid, lse, ref_lse, ce, False, grad, targets, label_shift
        )
    else:
        chunked.soft_target_backward(
            grad_out, logits, ref_logits, targets, valid, label_shift, grad
        )


@soft_target_ce_backward.register_fake
def _(grad_out, logits, ref_logits, targets, valid, lse, ref_lse, ce, label_shift, grad, backend):
    return None


def _soft_target_setup(ctx, inputs, output) -> None:
    logits, ref_logits, targets, valid, label_shift, backend = inputs
    ce, lse, ref_lse = output
    ctx.save_for_backward(logits, ref_logits, targets, valid, lse, ref_lse, ce)
    ctx.label_shift, ctx.backend = label_shift, backend


def _soft_target_grad(ctx, grad_out, _grad_lse, _grad_ref_lse):
    logits, ref_logits, targets, valid, lse, ref_lse, ce = ctx.saved_tensors
    grad = torch.empty_like(logits)
    soft_target_ce_backward(
        grad_out,
        logits,
        ref_logits,
        targets,
        valid,
        lse,
        ref_lse,
        ce,
        ctx.label_shift,
        grad,
        ctx.backend,
    )
    return grad, None, None, None, None, None


soft_target_ce.register_autograd(_soft_target_grad, setup_context=_soft_target_setup)
