"""The fused token reductions and the choice of backend.

Two primitives carry every loss: the per-token log-probability of the label, and a per-token
quantity of two next-token distributions (KL in either direction, the soft-target cross-entropy,
SOUL's cross-entropy to the reference: ``custom_ops.two_distributions``). Both take the full logits ``(B, T, V)`` and read only the rows
``[:, :L]`` where ``L`` is the length of ``valid`` (``L = T - 1`` under the causal-LM shift), so a
shifted view is never materialised. Backends: ``"torch"`` (chunked PyTorch, any device) and
``"triton"`` (fused kernels, CUDA, or the CPU under ``TRITON_INTERPRET=1``); ``"auto"`` picks
Triton for CUDA tensors when it is installed. float64 always runs on the chunked path, since the
kernels accumulate in float32.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
from torch import Tensor

from ..sharding import VocabShard
from . import custom_ops
from .numerics import PairMode

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# Looked up once, without importing Triton: ``import unlearning_losses`` never needs it.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, logits: Tensor) -> str:
    """The backend that will run: ``"torch"`` or ``"triton"``."""
    if backend == "triton":
        _require_triton(logits)
    if logits.dtype == torch.float64:
        return "torch"
    if backend == "auto":
        return "triton" if logits.is_cuda and TRITON_INSTALLED else "torch"
    return backend


def label_logprobs(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """log p(target) per row of ``logits[:, :L]``: float32 (float64 for float64), 0 where not valid.

    ``targets`` and ``valid`` are ``(B, L)``. Differentiable in ``logits``. With ``vocab`` the
    logits hold this rank's slice of the vocabulary.
    """
    if vocab is not None:
        from . import vocab_parallel

        _refuse_with_vocab_shards(backend, inplace_backward)
        return vocab_parallel.VocabParallelLogprobs.apply(logits, targets, valid, vocab)
    which = resolve_backend(backend, logits)
    out, _ = custom_ops.logprobs(logits, targets, valid, which, inplace_backward)
    return out


def token_kl(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    *,
    mode: PairMode,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """KL(P || Q) (``PairMode.KL_FORWARD``) or KL(Q || P) (``KL_REVERSE``) per row of
    ``[:, :L]``, P from ``logits``.

    Differentiable in ``logits`` only (``ref_logits`` is a constant); 0 where not valid. With
    ``vocab`` both hold this rank's slice of the vocabulary.
    """
    if vocab is not None:
        from . import vocab_parallel

        _refuse_with_vocab_shards(backend, inplace_backward)
        return vocab_parallel.VocabParallelTokenKL.apply(
            logits, ref_logits, valid, mode, vocab.group
        )
    which = resolve_backend(backend, logits)
    args = (logits, ref_logits, _unread(valid), valid, mode.value, 0.0, which, inplace_backward)
    return custom_ops.two_distributions(*args)[0]


def soft_target_cross_entropy(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    *,
    label_shift: float,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab: VocabShard | None = None,
) -> Tensor:
    """-sum_v q_v log p_v per row of ``[:, :L]``, Q = softmax(ref_logits - label_shift * onehot).

    The target distribution Q is a constant; the gradient w.r.t. the logits is ``p - q`` (UNDIAL,
    CE-U); 0 where not valid. With ``vocab`` both hold this rank's slice of the vocabulary.
    """
    if vocab is not None:
        from . import vocab_parallel

        _refuse_with_vocab_shards(backend, inplace_backward)
        return vocab_parallel.VocabParallelSoftTarget.apply(
            logits, ref_logits, targets, valid, float(label_shift), vocab
        )
    which = resolve_backend(backend, logits)
    mode = PairMode.SOFT_TARGET.value
    args = (logits, ref_logits, targets, valid, mode, float(label_shift), which, inplace_backward)
    return custom_ops.two_distributions(*args)[0]


def reference_cross_entropy(
    logits: Tensor, ref_logits: Tensor, valid: Tensor, *, eps: float, backend: str = "auto"
) -> Tensor:
    """-sum_v p_v log(q_v + eps) per row of ``[:, :L]``, P from ``logits``, Q from ``ref_logits``.

    SOUL's "KL" term with its additive epsilon (a cross-entropy, not a KL divergence).
    Differentiable in ``logits`` only: ``d / d z_j = p_j (a_j - value)``, ``a = -log(q + eps)``;
    0 where not valid.
    """
    which = resolve_backend(backend, logits)
    mode = PairMode.REFERENCE_CE.value
    args = (logits, ref_logits, _unread(valid), valid, mode, float(eps), which, False)
    return custom_ops.two_distributions(*args)[0]


def _unread(valid: Tensor) -> Tensor:
    """The targets of a mode that reads none: zeros of the mask's shape (cheap ``(B, L)``)."""
    return torch.zeros(valid.shape, dtype=torch.long, device=valid.device)


def _refuse_with_vocab_shards(backend: str, inplace_backward: bool) -> None:
    """The vocabulary-parallel path is chunked PyTorch with its own gradient buffer."""
    if backend == "triton":
        raise ValueError(
            'backend="triton" has no vocabulary-parallel path: with vocab_group (or logits '
            'sharded on the vocabulary) use backend="auto" or "torch"'
        )
    if inplace_backward:
        raise ValueError(
            "inplace_backward=True is not available with vocab_group (or logits sharded on the "
            "vocabulary): that path writes its own gradient buffer"
        )


def _require_triton(logits: Tensor) -> None:
    if not TRITON_INSTALLED:
        raise ValueError(
            'backend="triton" needs the triton package: pip install "unlearning_losses[triton]", '
            'or use backend="torch"'
        )
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f'backend="triton" needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the '
            f'CPU); got logits on {logits.device}. Use backend="torch" or "auto"'
        )
