"""The fused-linear losses under FSDP2, whose sharded parameters exist whole only inside their
module's forward and backward.

``fully_shard`` leaves each parameter as a DTensor holding this rank's shard between forwards:
hooks on the module gather it before the forward and reduce-scatter its gradient after the
backward. A fused-linear loss reads the head's weight without calling the model, so it would see
the shard; with a tensor-parallel head on a 2-D mesh the shard spans both mesh dimensions and is
refused, and a data-parallel shard is refused when the ranks' tokens differ. :func:`root_forward`
runs the loss *as the model's forward*: FSDP2 gathers the parameters its root holds (the
embeddings, the final norm and the head, unless the head has a ``fully_shard`` of its own) for
the loss and its backward, and reduce-scatters their gradients as for ``model(...)``. Under
tensor parallelism the gathered head is this rank's rows, a DTensor ``Shard(0)`` on the
tensor-parallel mesh, which the fused-linear losses take as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ._forward import as_forward

T = TypeVar("T")


def root_forward(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run as ``model``'s forward, so that FSDP2's hooks on ``model``
    gather its parameters for ``fn`` and handle their gradients as for ``model(...)``.

    ``fn`` computes the hidden states from the model's body and the fused-linear loss from them
    and the model's head (``model.lm_head.weight``, read inside ``fn``). Any module works; for
    one without FSDP2 this is ``fn(*args, **kwargs)``.

    Args:
        model: the root module that ``fully_shard`` was applied to (or any module).
        fn: the computation, typically returning the loss.
        *args: ``fn``'s positional arguments.
        **kwargs: ``fn``'s keyword arguments.

    Returns:
        What ``fn`` returns.

    Example:
        >>> import torch
        >>> import unlearning_losses as ul
        >>> model = torch.nn.Linear(2, 4)  # stands in for a fully_shard-ed causal LM
        >>> hidden, labels = torch.randn(1, 3, 2), torch.tensor([[-100, 1, 2]])
        >>> def loss(hidden, labels):
        ...     return ul.linear_ga_loss(hidden, model.weight, labels, bias=model.bias)
        >>> got = root_forward(model, loss, hidden, labels)
        >>> torch.equal(got, ul.linear_ga_loss(hidden, model.weight, labels, bias=model.bias))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    with as_forward(model, fn):
        return model(*args, **kwargs)
