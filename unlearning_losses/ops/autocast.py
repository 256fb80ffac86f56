"""Autocast stops at the primitives' boundary.

Under ``torch.autocast`` (a Trainer with ``bf16=True`` calls ``compute_loss`` inside it) matmul-like
ops run in the low-precision dtype: ``torch.linalg.vecdot`` in the KL's row sums, the fused-linear
heads' matmuls and their gradients. The primitives promise float32 accumulation whatever the
caller's context, so each runs with autocast off on its inputs' device; the fused-linear matmuls
then run in the dtype of the hidden states and head as given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import Tensor

Method = TypeVar("Method", bound=Callable[..., Any])


def autocast_off(tensor: Tensor) -> AbstractContextManager:
    """A context in which autocast is off on ``tensor``'s device."""
    return torch.autocast(tensor.device.type, enabled=False)


def without_autocast(method: Method) -> Method:
    """An ``autograd.Function``'s ``forward(ctx, tensor, ...)`` or ``backward(ctx, grad, ...)``
    run with autocast off on its first tensor's device."""

    @functools.wraps(method)
    def run(ctx: Any, first: Tensor, *rest: Any) -> Any:
        with autocast_off(first):
            return method(ctx, first, *rest)

    return run  # type: ignore[return-value]
