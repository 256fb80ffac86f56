"""What the benchmark compares: the library's losses and the ways users compute them today.

Each provider maps a :class:`Batch` to a scalar loss. Logits losses take ``(B, T, V)`` logits
aligned with their labels; the fused-linear ones take hidden states and a head. Ours is the
loss's entry in the registry of public losses (:mod:`unlearning_losses.testing.registry`), and
so is the float64 value each row is checked against (the registry is imported when a benchmark
runs: its package needs Hypothesis, which the other commands do not). The baselines are the patterns of research
code: a float32 upcast of the logits and ``F.cross_entropy`` / ``log_softmax`` tensors,
``torch.compile`` of that, and Liger-Kernel's and Apple's Cut Cross-Entropy kernels where they
are installed (GA only: they compute the cross-entropy).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ..testing import registry

BETA = 0.1
SIMNPO_BETA = 4.5
UNDIAL_BETA = 10.0
LOGIT_LOSSES = ("ga", "npo", "kl", "simnpo", "undial")
LINEAR_LOSSES = ("linear_ga", "linear_npo", "linear_kl")
#: Each loss's entry in the registry, and the options the benchmark sets (the registry's call
#: fills in the rest: NPO's sequence granularity, KL's forward direction).
ENTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "ga": ("ga_loss", {}),
    "npo": ("npo_loss", {"beta": BETA}),
    "kl": ("kl_divergence", {}),
    "simnpo": ("simnpo_loss", {"beta": SIMNPO_BETA}),
    "undial": ("undial_loss", {"beta": UNDIAL_BETA}),
    "linear_ga": ("linear_ga_loss", {}),
    "linear_npo": ("linear_npo_loss", {"beta": BETA}),
    "linear_kl": ("linear_kl_divergence", {}),
}
#: Reads and writes of the logits (in their dtype) per element that each pass must make.
TRAFFIC = {
    "logprobs": {"fwd": 1, "bwd": 2, "fwd+bwd": 3},
    "two inputs": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
}


@dataclass
class Batch:
    """Inputs of one measurement; ``inputs`` are the tensors the gradient is taken of."""

    labels: Tensor
    ref_logprobs: Tensor
    # Any: a logits batch leaves the head's fields None, a fused-linear batch the logits'.
    logits: Any = None
    ref_logits: Any = None
    hidden: Any = None
    weight: Any = None
    ref_hidden: Any = None

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        if self.logits is not None:
            return (self.logits,)
        assert self.hidden is not None and self.weight is not None
        return (self.hidden, self.weight)

    @property
    def model_output(self) -> Tensor:
        """The tensor a registry entry's loss is of: the logits, or the hidden states."""
        return self.logits if self.logits is not None else self.hidden

    def for_registry(self) -> registry.Batch:
        from ..testing import registry

        return registry.Batch(
            self.labels,
            ref_logits=self.ref_logits,
            ref_logprobs=self.ref_logprobs,
            weight=self.weight,
            ref_hidden=self.ref_hidden,
        )


Loss = Callable[[Batch], Tensor]


def traffic(loss: str) -> dict[str, int] | None:
    """Logit traffic per element by pass, or None where the work is a matmul (fused linear)."""
    if loss in LINEAR_LOSSES:
        return None
    return TRAFFIC["two inputs" if loss in ("kl", "undial") else "logprobs"]


def providers(loss: str, device: torch.device, compiled: bool) -> dict[str, Loss]:
    """Every implementation of ``loss`` that can run here, ``"ours"`` first."""
    found = {"ours": _ours(loss)}
    if loss in ("ga", "npo", "kl", "simnpo"):
        found["ours, in-place backward"] = _ours(loss, inplace_backward=True)
    found["eager"] = _EAGER[loss]
    if compiled:
        found["torch.compile(eager)"] = torch.compile(_EAGER[loss])
    found.update(_external(loss, device))
    return found


def _ours(loss: str, **options: bool) -> Loss:
    from ..testing import registry

    name, fixed = ENTRIES[loss]
    entry = registry.entry(name)
    kw: dict[str, Any] = {"shift": False, **fixed, **options}
    return lambda b: entry(b.model_output, b.for_registry(), **kw)


def float64_value(loss: str, batch: Batch) -> float:
    """The registry's float64 reference of ``loss`` on ``batch`` (as :func:`providers`' rows
    call it)."""
    from ..testing import registry

    name, fixed = ENTRIES[loss]
    reference = registry.entry(name).reference
    return reference(batch.model_output, batch.for_registry(), shift=False, **fixed).item()


def _float_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    return -F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def _eager_npo(b: Batch) -> Tensor:
    delta = (_float_logprobs(b.logits, b.labels) - b.ref_logprobs).sum(-1)
    return (-F.logsigmoid(-BETA * delta) * 2 / BETA).mean()


def _eager_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits.float(), -1)
    logq = F.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _eager_simnpo(b: Batch) -> Tensor:
    mean_nll = -_float_logprobs(b.logits, b.labels).mean(-1)
    return (-F.logsigmoid(SIMNPO_BETA * mean_nll) * 2 / SIMNPO_BETA).mean()


def _eager_undial(b: Batch) -> Tensor:
    lowered = F.one_hot(b.labels, b.logits.shape[-1]).float() * UNDIAL_BETA
    target = F.softmax(b.ref_logits.float() - lowered, -1)
    flat = b.logits.float().reshape(-1, b.logits.shape[-1])
    return F.cross_entropy(flat, target.reshape(flat.shape))


def _logits_of(b: Batch) -> Tensor:
    return F.linear(b.hidden, b.weight)


_EAGER: dict[str, Loss] = {
    "ga": lambda b: _float_logprobs(b.logits, b.labels).mean(),
    "npo": _eager_npo,
    "kl": lambda b: _eager_kl(b.logits, b.ref_logits),
    "simnpo": _eager_simnpo,
    "undial": _eager_undial,
    "linear_ga": lambda b: _float_logprobs(_logits_of(b), b.labels).mean(),
    "linear_npo": lambda b: _eager_npo(Batch(b.labels, b.ref_logprobs, logits=_logits_of(b))),
    "linear_kl": lambda b: _eager_kl(_logits_of(b), F.linear(b.ref_hidden, b.weight).detach()),
}


def _external(loss: str, device: torch.device) -> dict[str, Loss]:
    """PyTorch's fused linear cross-entropy where the release has it, and Liger-Kernel's and Cut
    Cross-Entropy's GA where installed (their kernels need CUDA)."""
    found: dict[str, Loss] = {}
    if loss == "linear_ga" and hasattr(F, "linear_cross_entropy"):
        found["F.linear_cross_entropy"] = lambda b: (
            -F.linear_cross_entropy(
                b.hidden.reshape(-1, b.hidden.shape[-1]), b.weight, b.labels.reshape(-1)
            )
        )
    if device.type != "cuda":
        return found
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss,
            LigerFusedLinearCrossEntropyLoss,
        )

        if loss == "ga":
            ce = LigerCrossEntropyLoss()
            found["Liger-Kernel"] = lambda b: (
                -ce(b.logits.reshape(-1, b.logits.shape[-1]), b.labels.reshape(-1))
            )
        if loss == "linear_ga":
            fused = LigerFusedLinearCrossEntropyLoss()
            found["Liger-Kernel"] = lambda b: (
                -fused(b.weight, b.hidden.reshape(-1, b.hidden.shape[-1]), b.labels.reshape(-1))
            )
    if loss == "linear_ga" and importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy

        found["Cut Cross-Entropy"] = lambda b: -linear_cross_entropy(b.hidden, b.weight, b.labels)
    return found
