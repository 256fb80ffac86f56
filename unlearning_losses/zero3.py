"""The fused-linear losses under DeepSpeed ZeRO-3, whose parameters exist whole only inside their
module's forward and backward.

ZeRO-3 keeps each rank's partition of every parameter and leaves the parameter itself empty,
shape ``(0,)``, outside its module: hooks on the module gather it before the module's forward and
again before its backward, and release it after each. A fused-linear loss reads the head's weight
without calling the head, so it sees the empty tensor; gathering it for the forward alone is not
enough either, since the losses that recompute the logits in the backward (NPO, SimNPO,
``reduction="none"``) read the weight again there. :func:`head_loss` runs the loss *as the head's
forward*, so ZeRO's own hooks gather the head for the loss's forward and for its backward, and
its gradient reaches ZeRO's partitioned gradient as the head's own would.

The engine also does per-micro-batch bookkeeping in its own forward (the counter that decides
whether a backward accumulates into the partitioned gradients or overwrites them, the
accumulation boundary, the backward's prologue): hidden states taken from a submodule
(``engine.module.model(...)``) skip it, and under gradient accumulation the step is silently
wrong. :func:`engine_forward` runs a function as the engine's forward.

Nothing here imports DeepSpeed unless a ZeRO-3 reference head is gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from torch import Tensor, nn

from ._forward import as_forward

T = TypeVar("T")


def _gathered(module: nn.Module | None) -> AbstractContextManager[Any]:
    """``module``'s ZeRO-3 parameters gathered (not for training: no gradient is returned to
    their partitions); nothing for ordinary parameters or no module."""
    params = [] if module is None else list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def head_loss(
    head: nn.Module,
    loss: Callable[..., Tensor],
    hidden: Tensor,
    *args: Any,
    ref_head: nn.Module | None = None,
    **kwargs: Any,
) -> Tensor:
    """``loss(hidden, head.weight, *args, bias=head.bias, **kwargs)``, computed as ``head``'s
    forward so that an engine holding the head (DeepSpeed ZeRO-3) gathers it for the loss's
    forward and backward and takes its gradient as the head's own.

    ``loss`` is a fused-linear loss (``linear_ga_loss``, ``linear_npo_loss``, ...). Under ZeRO-3,
    call this inside the engine's forward (:func:`engine_forward`). ``ref_head`` is the frozen
    reference's head for :func:`~unlearning_losses.linear_kl_divergence` and
    :func:`~unlearning_losses.linear_kl_loss`, passed as ``ref_weight`` and ``ref_bias``; a
    ZeRO-3 reference's head is gathered for the loss's forward only (the loss keeps what its
    backward needs of it).

    Args:
        head: the output head, a module with ``weight (V, H)`` and optional ``bias (V,)``
            (``model.lm_head``).
        loss: a fused-linear loss: ``loss(hidden, weight, *args, bias=, **kwargs)``.
        hidden: ``(B, T, H)`` or ``(N, H)`` hidden states (``model.model(...).last_hidden_state``).
        *args: the loss's further positional arguments (``labels``; ``ref_hidden`` for the KL
            losses, whose ``labels`` then go by keyword).
        ref_head: the reference model's head, for the KL losses.
        **kwargs: the loss's keyword arguments.

    Returns:
        What ``loss`` returns.

    Example:
        >>> import torch
        >>> import unlearning_losses as ul
        >>> head = torch.nn.Linear(2, 4, bias=False)
        >>> hidden, labels = torch.randn(1, 3, 2), torch.tensor([[-100, 1, 2]])
        >>> got = head_loss(head, ul.linear_ga_loss, hidden, labels)
        >>> torch.equal(got, ul.linear_ga_loss(hidden, head.weight, labels))
        True
    """
    if ref_head is not None:
        kwargs = {
            **kwargs,
            "ref_weight": ref_head.weight,
            "ref_bias": getattr(ref_head, "bias", None),
        }

    def forward(hidden: Tensor, *args: Any) -> Tensor:
        return loss(hidden, head.weight, *args, bias=getattr(head, "bias", None), **kwargs)

    # Positional: ZeRO's hooks release the head after the gradient has reached these inputs.
    with _gathered(ref_head), as_forward(head, forward):
        return head(hidden, *args)


def engine_forward(engine: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run as the forward of ``engine`` (a ``DeepSpeedEngine``, or any
    wrapper with a ``.module``), so that its per-micro-batch bookkeeping runs as for
    ``engine(...)``.

    For computations that do not call the whole model: hidden states from ``engine.module.model``
    and a fused-linear loss through :func:`head_loss`. ZeRO-3 counts micro-batches, sets the
    accumulation boundary and prepares the backward in the engine's forward; skipped, a second
    micro-batch overwrites the first one's gradients instead of adding to them.

    Args:
        engine: the engine (``deepspeed.initialize``'s first result).
        fn: the computation, typically returning the loss.
        *args: ``fn``'s positional arguments.
        **kwargs: ``fn``'s keyword arguments.

    Returns:
        What ``fn`` returns (through the engine, which may hook its tensors for the backward).

    Example:
        >>> import torch
        >>> class Engine(torch.nn.Module):  # an engine's forward calls its module
        ...     def __init__(self, module):
        ...         super().__init__()
        ...         self.module = module
        ...
        ...     def forward(self, *args):
        ...         return self.module(*args)
        >>> engine_forward(Engine(torch.nn.Linear(2, 2)), lambda x: 2 * x, torch.ones(2))
        tensor([2., 2.])
    """
    module = getattr(engine, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"engine must wrap the model as its .module (a DeepSpeedEngine, DDP); got "
            f"{type(engine).__name__}"
        )
    with as_forward(module, fn):
        return engine(*args, **kwargs)
