"""The vocabulary statistics as primitives: dispatch, autograd and ``torch.compile`` custom ops.

Three per-token quantities that read a whole row of the vocabulary beyond its log-sum-exp
(``vocab_numerics``): ME's KL from the uniform distribution (:func:`uniform_kl`), the inverted
hinge (:func:`inverted_hinge`) and the generalised Jensen-Shannon divergence to a reference
(:func:`token_jsd`). As the primitives of ``ops`` they take the full logits ``(B, T, V)`` and read
only the rows ``[:, :L]``, ``L`` the mask's length; they run on the chunked PyTorch path, in
Triton kernels, or vocabulary-parallel (``vocab``), and are registered as custom ops (with fake
implementations) the way ``custom_ops`` registers the others, so a compiled loss traces them
without graph breaks. Every forward returns its per-row statistics for the backward, which
writes the gradient into one buffer (the logits' own with ``inplace_backward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sharding import VocabShard
from . import chunked_stats, resolve_backend
from .autocast import autocast_off
from .custom_ops import _dispatch, _eager_function, _gradient_buffer, _per_token
from .vocab_numerics import JSD_STATS, STATS, VocabMode


def _vocab_parallel_checks(backend: str, inplace_backward: bool) -> None:
    from . import _refuse_with_vocab_shards

    _refuse_with_vocab_shards(backend, inplace_backward)


def uniform_kl(
    logits: Tensor,
    valid: Tensor,
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """KL(U || P) per row of ``logits[:, :L]``, U uniform over the row's finite logits; 0 where
    not valid. Differentiable in ``logits``."""
    targets = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    return _vocab_stat(
        logits, targets, valid, VocabMode.UNIFORM_KL, backend, inplace_backward, vocab
    )


def inverted_hinge(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """``1 + p(target) - max_{v != target} p_v`` per row of ``logits[:, :L]``; 0 where not
    valid. Differentiable in ``logits``."""
    mode = VocabMode.INVERTED_HINGE
    return _vocab_stat(logits, targets, valid, mode, backend, inplace_backward, vocab)


def _vocab_stat(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    mode: VocabMode,
    backend: str,
    inplace_backward: bool,
    vocab: VocabShard | None,
) -> Tensor:
    if vocab is not None:
        from .vocab_parallel_stats import VocabParallelStats

        _vocab_parallel_checks(backend, inplace_backward)
        return VocabParallelStats.apply(logits, targets, valid, mode, vocab)
    which = resolve_backend(backend, logits)
    return vocab_stats(logits, targets, valid, mode.value, which, inplace_backward)[0]


def token_jsd(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    *,
    beta: float,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``, per row of
    ``[:, :L]``, P from ``logits``, Q from ``ref_logits`` (a constant); 0 where not valid."""
    if vocab is not None:
        from .vocab_parallel_stats import VocabParallelJSD

        _vocab_parallel_checks(backend, inplace_backward)
        return VocabParallelJSD.apply(logits, ref_logits, valid, beta, vocab.group)
    which = resolve_backend(backend, logits)
    return jsd(logits, ref_logits, valid, float(beta), which, inplace_backward)[0]


def _kernels(backend: str, jsd: bool = False) -> Any:
    if backend != "triton":
        return chunked_stats
    if jsd:
        from . import triton_jsd

        return triton_jsd
    from . import triton_vocab_stats

    return triton_vocab_stats


# --- ME's KL from the uniform distribution and the inverted hinge ------------------------------
#
# One signature: the logits, the targets (read by the inverted hinge only), the mask and the
# ``stat_mode`` (a ``VocabMode`` value; the schema takes a string). The forward returns the
# per-token values, the per-row statistics ``(STATS, B, L)`` and the runner-up's column.


def _stats_forward(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    stat_mode: str,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with autocast_off(logits):
        return _kernels(backend).vocab_forward(logits, targets, valid, VocabMode(stat_mode))


def _stats_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    stats: Tensor,
    index: Tensor,
    stat_mode: str,
    grad: Tensor,
    backend: str,
) -> None:
    with autocast_off(logits):
        _kernels(backend).vocab_backward(
            grad_out, logits, targets, valid, stats, index, VocabMode(stat_mode), grad
        )


def _stats_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, valid, stat_mode, backend, inplace_backward = inputs
    _, stats, index = output
    ctx.save_for_backward(logits, targets, valid, stats, index)
    ctx.mode, ctx.backend, ctx.inplace_backward = stat_mode, backend, inplace_backward


def _stats_grad(backward: Callable) -> Callable:
    def grad_fn(ctx: Any, grad_out: Tensor, *_grad_row_stats: Tensor | None) -> tuple:
        logits, targets, valid, stats, index = ctx.saved_tensors
        grad = _gradient_buffer(logits, ctx.inplace_backward)
        backward(grad_out, logits, targets, valid, stats, index, ctx.mode, grad, ctx.backend)
        return grad, None, None, None, None, None

    return grad_fn


_stats_op = torch.library.custom_op("unlearning_losses::vocab_stats", mutates_args=())(
    _stats_forward
)
_stats_backward_op = torch.library.custom_op(
    "unlearning_losses::vocab_stats_backward", mutates_args=("grad",)
)(_stats_backward)


@_stats_op.register_fake
def _(logits, targets, valid, stat_mode, backend, inplace_backward):
    stats = logits.new_empty((STATS, *valid.shape), dtype=_per_token(logits, valid).dtype)
    return _per_token(logits, valid), stats, valid.new_empty(valid.shape, dtype=torch.long)


@_stats_backward_op.register_fake
def _(grad_out, logits, targets, valid, stats, index, stat_mode, grad, backend):
    return None


_stats_op.register_autograd(_stats_grad(_stats_backward_op), setup_context=_stats_setup)
vocab_stats = _dispatch(
    _stats_op,
    _eager_function("VocabStats", _stats_forward, _stats_setup, _stats_grad(_stats_backward)),
)


# --- the generalised Jensen-Shannon divergence to a reference ----------------------------------


def _jsd_forward(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    beta: float,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    with autocast_off(logits):
        return _kernels(backend, jsd=True).jsd_forward(logits, ref_logits, valid, beta)


def _jsd_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    stats: Tensor,
    beta: float,
    grad: Tensor,
    backend: str,
) -> None:
    with autocast_off(logits):
        _kernels(backend, jsd=True).jsd_backward(
            grad_out, logits, ref_logits, valid, stats, beta, grad
        )


def _jsd_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, ref_logits, valid, beta, backend, inplace_backward = inputs
    ctx.save_for_backward(logits, ref_logits, valid, output[1])
    ctx.beta, ctx.backend, ctx.inplace_backward = beta, backend, inplace_backward


def _jsd_grad(backward: Callable) -> Callable:
    def grad_fn(ctx: Any, grad_out: Tensor, _grad_row_stats: Tensor | None) -> tuple:
        logits, ref_logits, valid, stats = ctx.saved_tensors
        grad = _gradient_buffer(logits, ctx.inplace_backward)
        backward(grad_out, logits, ref_logits, valid, stats, ctx.beta, grad, ctx.backend)
        return grad, None, None, None, None, None

    return grad_fn


_jsd_op = torch.library.custom_op("unlearning_losses::jsd", mutates_args=())(_jsd_forward)
_jsd_backward_op = torch.library.custom_op(
    "unlearning_losses::jsd_backward", mutates_args=("grad",)
)(_jsd_backward)


@_jsd_op.register_fake
def _(logits, ref_logits, valid, beta, backend, inplace_backward):
    out = _per_token(logits, valid)
    return out, logits.new_empty((JSD_STATS, *valid.shape), dtype=out.dtype)


@_jsd_backward_op.register_fake
def _(grad_out, logits, ref_logits, valid, stats, beta, grad, backend):
    return None


_jsd_op.register_autograd(_jsd_grad(_jsd_backward_op), setup_context=_jsd_setup)
jsd = _dispatch(_jsd_op, _eager_function("JSD", _jsd_forward, _jsd_setup, _jsd_grad(_jsd_backward)))
