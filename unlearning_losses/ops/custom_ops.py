"""The primitives with their autograd, runnable eagerly and under ``torch.compile``.

Each primitive is a forward, a backward that writes the logits' gradient into a buffer, and the
``setup``/``grad`` pair that wires them. Eager calls run them as a plain ``autograd.Function``;
under ``torch.compile`` they run as custom ops registered through ``torch.library`` (with fake
implementations), which a compiled loss calls without graph breaks. Eager calls never touch the
custom ops: calling one imports the compiler stack (``torch._dynamo``, inductor, sympy: about a
second and 160 MB per process) even in a loop that never compiles.

``backend`` is ``"torch"`` (chunked) or ``"triton"``; ``inplace_backward`` makes the backward write
the gradient into the logits' own buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import chunked
from .autocast import autocast_off
from .numerics import PairMode, accumulation_dtype


def _kernels(backend: str, primitive: str) -> Any:
    if backend == "triton":
        if primitive == "logprobs":
            from . import triton_logprobs

            return triton_logprobs
        from . import triton_kl

        return triton_kl
    return chunked


def _per_token(logits: Tensor, valid: Tensor) -> Tensor:
    return logits.new_empty(valid.shape, dtype=accumulation_dtype(logits.dtype))


def _gradient_buffer(logits: Tensor, inplace: bool) -> Tensor:
    return logits if inplace else torch.empty_like(logits)


def _eager_function(name: str, forward: Callable, setup: Callable, grad: Callable) -> Any:
    """An ``autograd.Function`` over a primitive's pieces; outputs after the first carry no
    gradient."""

    def function_forward(ctx: Any, *inputs: Any) -> Any:
        output = forward(*inputs)
        setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    body = {"forward": staticmethod(function_forward), "backward": staticmethod(grad)}
    return type(name, (torch.autograd.Function,), body)


def _dispatch(op: Any, function: Any) -> Callable:
    """Call ``function`` eagerly and the custom ``op`` while ``torch.compile`` traces."""

    def call(*inputs: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*inputs)
        return function.apply(*inputs)

    return call


# --- log p(label) ------------------------------------------------------------------------------


def _logprobs_forward(
    logits: Tensor, targets: Tensor, valid: Tensor, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) of rows ``[:, :L]`` and their log-sum-exp."""
    with autocast_off(logits):
        return _kernels(backend, "logprobs").logprobs_forward(logits, targets, valid)


def _logprobs_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    grad: Tensor,
    backend: str,
) -> None:
    with autocast_off(logits):
        _kernels(backend, "logprobs").logprobs_backward(
            grad_out, logits, targets, valid, lse, logprobs, grad
        )


def _logprobs_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, valid, backend, inplace_backward = inputs
    out, lse = output
    ctx.save_for_backward(logits, targets, valid, lse, out)
    ctx.backend, ctx.inplace_backward = backend, inplace_backward


def _logprobs_grad(backward: Callable) -> Callable:
    def grad_fn(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
        logits, targets, valid, lse, out = ctx.saved_tensors
        grad = _gradient_buffer(logits, ctx.inplace_backward)
        backward(grad_out, logits, targets, valid, lse, out, grad, ctx.backend)
        return grad, None, None, None, None

    return grad_fn


_logprobs_op = torch.library.custom_op("unlearning_losses::logprobs", mutates_args=())(
    _logprobs_forward
)
_logprobs_backward_op = torch.library.custom_op(
    "unlearning_losses::logprobs_backward", mutates_args=("grad",)
)(_logprobs_backward)


@_logprobs_op.register_fake
def _(logits, targets, valid, backend, inplace_backward):
    return _per_token(logits, valid), _per_token(logits, valid)


@_logprobs_backward_op.register_fake
def _(grad_out, logits, targets, valid, lse, logprobs, grad, backend):
    return None


_logprobs_op.register_autograd(_logprobs_grad(_logprobs_backward_op), setup_context=_logprobs_setup)
logprobs = _dispatch(
    _logprobs_op,
    _eager_function(
        "Logprobs", _logprobs_forward, _logprobs_setup, _logprobs_grad(_logprobs_backward)
    ),
)


# --- per-token expectations under one distribution of a function of two ------------------------
#
# KL (either direction), the soft-target cross-entropy (UNDIAL, CE-U) and the cross-entropy to a
# reference with SOUL's additive epsilon share one signature: the model's logits, the reference's,
# the mask, the ``pair_mode`` naming the per-token value (a ``numerics.PairMode`` value; the schema
# takes a string, and not named ``mode``, which ``auto_functionalized`` keeps for itself) and the
# mode's ``constant`` (the label shift of the soft target, SOUL's epsilon; 0 for the KL). The
# Triton backward needs the log-sum-exp and a per-row constant (lse - lse_ref for the KL, lse_ref
# otherwise) from the forward; the chunked one recomputes what it needs and gets empty
# placeholders.


def _pair_forward(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    pair_mode: str,
    constant: float,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with autocast_off(logits):
        if backend == "triton":
            return _kernels(backend, "pair").pair_forward(
                logits, ref_logits, targets, valid, PairMode(pair_mode), constant
            )
        out = chunked.pair_forward(
            logits, ref_logits, targets, valid, PairMode(pair_mode), constant
        )
    return out, out.new_empty(0), out.new_empty(0)


def _pair_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    row_constant: Tensor,
    out: Tensor,
    pair_mode: str,
    constant: float,
    grad: Tensor,
    backend: str,
) -> None:
    with autocast_off(logits):
        if backend == "triton":
            _kernels(backend, "pair").pair_backward(
                grad_out,
                logits,
                ref_logits,
                targets,
                valid,
                lse,
                row_constant,
                out,
                PairMode(pair_mode),
                constant,
                grad,
            )
        else:
            chunked.pair_backward(
                grad_out,
                logits,
                ref_logits,
                targets,
                valid,
                out,
                PairMode(pair_mode),
                constant,
                grad,
            )


def _pair_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, ref_logits, targets, valid, pair_mode, constant, backend, inplace_backward = inputs
    out, lse, row_constant = output
    ctx.save_for_backward(logits, ref_logits, targets, valid, lse, row_constant, out)
    ctx.mode, ctx.constant, ctx.backend, ctx.inplace_backward = (
        pair_mode,
        constant,
        backend,
        inplace_backward,
    )


def _pair_grad(backward: Callable) -> Callable:
    def grad_fn(ctx: Any, grad_out: Tensor, *_grad_row_stats: Tensor | None) -> tuple:
        logits, ref_logits, targets, valid, lse, row_constant, out = ctx.saved_tensors
        grad = _gradient_buffer(logits, ctx.inplace_backward)
        backward(
            grad_out,
            logits,
            ref_logits,
            targets,
            valid,
            lse,
            row_constant,
            out,
            ctx.mode,
            ctx.constant,
            grad,
            ctx.backend,
        )
        return grad, None, None, None, None, None, None, None

    return grad_fn


_pair_op = torch.library.custom_op("unlearning_losses::two_distributions", mutates_args=())(
    _pair_forward
)
_pair_backward_op = torch.library.custom_op(
    "unlearning_losses::two_distributions_backward", mutates_args=("grad",)
)(_pair_backward)


@_pair_op.register_fake
def _(logits, ref_logits, targets, valid, pair_mode, constant, backend, inplace_backward):
    aux = _per_token(logits, valid) if backend == "triton" else logits.new_empty(0)
    return _per_token(logits, valid), aux, aux.clone()


@_pair_backward_op.register_fake
def _(
    grad_out,
    logits,
    ref_logits,
    targets,
    valid,
    lse,
    row_constant,
    out,
    pair_mode,
    constant,
    grad,
    backend,
):
    return None


_pair_op.register_autograd(_pair_grad(_pair_backward_op), setup_context=_pair_setup)
two_distributions = _dispatch(
    _pair_op,
    _eager_function("TwoDistributions", _pair_forward, _pair_setup, _pair_grad(_pair_backward)),
)
