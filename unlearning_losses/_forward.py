"""Run a computation as a module's forward, so that what an engine hooked onto the module runs
around it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def as_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module``'s forward replaced by ``forward``: whatever an engine hooked onto the module
    (ZeRO-3's gathers and releases, FSDP2's unshard and reduce-scatter) runs around ``forward``
    when it is called. An instance-level forward (accelerate's hooks set one) is restored
    afterwards."""
    own = module.__dict__.get("forward")
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        if own is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = own
