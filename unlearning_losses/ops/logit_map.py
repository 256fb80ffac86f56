"""What a model does to its output head's values before the softmax, applied chunk by chunk.

Cohere's heads multiply the logits by ``logit_scale``; Gemma 2 and 3 cap them softly with
``final_logit_softcapping``, ``c · tanh(z / c)``. A fused-linear loss that skipped either would
optimise another model's distribution, silently. The map is applied to every chunk of logits as it
is formed, and its derivative is chained into every chunk of the logits' gradient before it meets
the head.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LogitMap(NamedTuple):
    """``z -> s · z``, then ``c · tanh(z / c)`` when ``softcap`` is set (scale first, as a head
    with both would apply them: scale the projection, then cap what comes out)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply_(self, logits: Tensor) -> Tensor:
        """Map ``logits`` in place; returns them."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def slope_(self, mapped: Tensor) -> Tensor:
        """Overwrite ``mapped`` (the map's outputs) with the map's derivative there:
        ``s · (1 - (m / c)^2)``, since ``d/dz c · tanh(z / c) = 1 - tanh(z / c)^2``."""
        assert self.softcap is not None
        return mapped.div_(self.softcap).square_().neg_().add_(1.0).mul_(self.scale)


IDENTITY = LogitMap()
