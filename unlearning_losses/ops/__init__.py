"""The fused token reductions and the choice of backend.

Two primitives carry every loss: the per-token log-probability of the label and the per-token KL
between two next-token distributions. Both take the full logits ``(B, T, V)`` and read only the rows
``[:, :L]`` where ``L`` is the length of ``valid`` (``L = T - 1`` under the causal-LM shift), so a
shifted view is never materialised. Backends: ``"torch"`` (chunked PyTorch, any device) and
``"triton"`` (fused kernels); ``"auto"`` picks Triton for CUDA tensors when it is importable.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from . import chunked

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def resolve_backend(backend: str, logits: Tensor) -> str:
    """The backend that will run: ``"torch"`` or ``"triton"``."""
    if backend == "auto":
        return "triton" if logits.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        _require_triton(logits)
    return backend


def label_logprobs(
    logits: Tensor, targets: Tensor, valid: Tensor, *, backend: str = "auto"
) -> Tensor:
    """log p(target) per row of ``logits[:, :L]``: float32 (float64 for float64), 0 where not valid.

    ``targets`` and ``valid`` are ``(B, L)``; targets must lie in ``[0, V)`` where valid.
    """
    if resolve_backend(backend, logits) == "triton":
        from . import triton_ops

        return triton_ops.label_logprobs(logits, targets, valid)
    return chunked.LabelLogprobs.apply(logits, targets, valid)


def token_kl(
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    *,
    forward_kl: bool,
    backend: str = "auto",
) -> Tensor:
    """KL(P || Q) (``forward_kl``) or KL(Q || P) per row of ``[:, :L]``, P from ``logits``.

    Differentiable in ``logits`` only; 0 where not valid.
    """
    if resolve_backend(backend, logits) == "triton":
        from . import triton_ops

        return triton_ops.token_kl(logits, ref_logits, valid, forward_kl=forward_kl)
    return chunked.TokenKL.apply(logits, ref_logits, valid, forward_kl)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require_triton(logits: Tensor) -> None:
    import os

    if not _triton_available():
        raise ValueError(
            'backend="triton" needs the triton package: pip install "unlearning_losses[triton]", '
            'or use backend="torch"'
        )
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f'backend="triton" needs CUDA tensors (or TRITON_INTERPRET=1); got logits on '
            f'{logits.device}. Use backend="torch" or "auto"'
        )
