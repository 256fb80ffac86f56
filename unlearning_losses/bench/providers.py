"""What the benchmark compares: the library's losses and the ways users compute them today.

Each provider maps a :class:`Batch` to a scalar loss. Logits losses take ``(B, T, V)`` logits
aligned with their labels, and the frozen helper models' logits of the same shape where the loss
reads them; the fused-linear ones take hidden states and a head. Ours is the loss's entry in the
registry of public losses (:mod:`unlearning_losses.testing.registry`), and so is the float64
value each row is checked against (the registry is imported when a benchmark runs: its package
needs Hypothesis, which the other commands do not). The baselines are the patterns of research
code: a float32 upcast of the logits and ``F.cross_entropy`` / ``log_softmax`` / ``softmax``
tensors of the whole batch, ``torch.compile`` of that, and Liger-Kernel's and Apple's Cut
Cross-Entropy kernels where they are installed (GA only: they compute the cross-entropy).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ..testing import registry

BETA = 0.1
SIMNPO_BETA = 4.5
UNDIAL_BETA = 10.0
#: The options that the registry's entries fix (so ours, called directly, matches their float64
#: reference): WHP's and RKLD's ``alpha``, ELM's ``eta``, KTO's ``reference_point``.
HELPER_ALPHA = 2.0
ELM_ETA = 2.0
KTO_REFERENCE_POINT = 0.5
JSD_BETA = 0.5  # jsd_loss's default: the symmetric JSD
LOGIT_LOSSES = (
    "ga",
    "npo",
    "kl",
    "simnpo",
    "undial",
    "me",
    "ihl",
    "jsd",
    "whp",
    "rkld",
    "elm",
    "kto",
    "flat",
)
LINEAR_LOSSES = ("linear_ga", "linear_npo", "linear_kl", "linear_me")
#: Each loss's entry in the registry, and the options the benchmark sets (the registry's call
#: fills in the rest: NPO's sequence granularity, KL's forward direction, KTO's reference point,
#: FLAT's total-variation divergence).
ENTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "ga": ("ga_loss", {}),
    "npo": ("npo_loss", {"beta": BETA}),
    "kl": ("kl_divergence", {}),
    "simnpo": ("simnpo_loss", {"beta": SIMNPO_BETA}),
    "undial": ("undial_loss", {"beta": UNDIAL_BETA}),
    "me": ("me_loss", {}),
    "ihl": ("ihl_loss", {}),
    "jsd": ("jsd_loss[ref_logits]", {}),
    "whp": ("whp_loss", {}),
    "rkld": ("rkld_loss", {}),
    "elm": ("elm_loss", {}),
    "kto": ("kto_loss", {"beta": BETA}),
    "flat": ("flat_loss", {}),
    "linear_ga": ("linear_ga_loss", {}),
    "linear_npo": ("linear_npo_loss", {"beta": BETA}),
    "linear_kl": ("linear_kl_divergence", {}),
    "linear_me": ("linear_me_loss", {}),
}
#: The frozen models' logits, each of the logits' shape, that a loss reads besides the model's.
HELPER_LOGITS: dict[str, tuple[str, ...]] = {
    "kl": ("ref_logits",),
    "undial": ("ref_logits",),
    "jsd": ("ref_logits",),
    "whp": ("ref_logits", "reinforced_logits"),
    "rkld": ("ref_logits", "reinforced_logits"),
    "elm": ("ref_logits", "positive_logits", "negative_logits"),
}
#: Reads and writes of logits-shaped tensors (in the logits' dtype) per logit that each pass must
#: make: the forward reads every input; the backward reads the logits, writes their gradient and
#: reads the helpers again where the gradient needs the target distribution (WHP keeps its
#: argmax labels instead). FLAT's template answers are a second model output of that shape.
TRAFFIC = {
    "logprobs": {"fwd": 1, "bwd": 2, "fwd+bwd": 3},
    "two inputs": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
    "argmax of two helpers": {"fwd": 3, "bwd": 2, "fwd+bwd": 5},
    "three inputs": {"fwd": 3, "bwd": 4, "fwd+bwd": 7},
    "four inputs": {"fwd": 4, "bwd": 5, "fwd+bwd": 9},
    "two outputs' logprobs": {"fwd": 2, "bwd": 4, "fwd+bwd": 6},
}
_TRAFFIC_KIND = {
    "kl": "two inputs",
    "undial": "two inputs",
    "jsd": "two inputs",
    "whp": "argmax of two helpers",
    "rkld": "three inputs",
    "elm": "four inputs",
    "flat": "two outputs' logprobs",
}


@dataclass
class Batch:
    """Inputs of one measurement; ``inputs`` are the tensors the gradient is taken of."""

    labels: Tensor
    ref_logprobs: Tensor
    # Any: a logits batch leaves the head's fields None, a fused-linear batch the logits'; a
    # field a loss does not read stays None.
    logits: Any = None
    ref_logits: Any = None
    hidden: Any = None
    weight: Any = None
    ref_hidden: Any = None
    reinforced_logits: Any = None  # WHP's and RKLD's reinforced model
    positive_logits: Any = None  # ELM's original model under its two prompts
    negative_logits: Any = None
    template_logits: Any = None  # FLAT: the model on the template answers (trained too)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        if self.template_logits is not None:
            return (self.logits, self.template_logits)
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
    return TRAFFIC[_TRAFFIC_KIND.get(loss, "logprobs")]


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
    if loss in _OWN_CALLS:
        # The registry's call derives these helpers from the model's logits; the benchmark's
        # batch holds their own tensors, read as a user passes them.
        given = _OWN_CALLS[loss]
        return lambda b: entry.function(b.logits, b.labels, **given(b), **kw)
    return lambda b: entry(b.model_output, b.for_registry(), **kw)


def _excess_inputs(b: Batch) -> dict[str, Any]:
    return {
        "ref_logits": b.ref_logits,
        "reinforced_logits": b.reinforced_logits,
        "alpha": HELPER_ALPHA,
    }


def _elm_inputs(b: Batch) -> dict[str, Any]:
    return {
        "ref_logits": b.ref_logits,
        "positive_logits": b.positive_logits,
        "negative_logits": b.negative_logits,
        "eta": ELM_ETA,
    }


#: The keyword arguments, read from the batch, of the losses that ours calls directly.
_OWN_CALLS: dict[str, Callable[[Batch], dict[str, Any]]] = {
    "whp": _excess_inputs,
    "rkld": _excess_inputs,
    "elm": _elm_inputs,
    "flat": lambda b: {"template_logits": b.template_logits, "template_labels": b.labels},
}


def with_registry_helpers(batch: Batch) -> Batch:
    """``batch`` with the helper logits that the registry's entries derive from the model's own
    logits (as constants): WHP's and RKLD's reinforced model and ELM's positive run are the
    logits, ELM's negative run and FLAT's template answers half of them. The float64 reference
    of an entry is then that of the very call every implementation makes on this batch."""
    if batch.logits is None:
        return batch
    own = batch.logits.detach()
    derived = {
        "reinforced_logits": own,
        "positive_logits": own,
        "negative_logits": 0.5 * own,
        "template_logits": 0.5 * own,
    }
    return replace(
        batch, **{name: t for name, t in derived.items() if getattr(batch, name) is not None}
    )


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


def _gathered_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """The labels' log-probs gathered from a float32 ``log_softmax`` of the whole batch."""
    logprobs = F.log_softmax(logits.float(), -1)
    return logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


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


def _eager_me(b: Batch) -> Tensor:
    """KL(U || p) = -log V - mean_v log p_v, from the whole log_softmax."""
    logprobs = F.log_softmax(b.logits.float(), -1)
    return (-logprobs.mean(-1) - math.log(logprobs.shape[-1])).mean()


def _eager_ihl(b: Batch) -> Tensor:
    """1 + p_y - max_{v != y} p_v, the rival from the top two probabilities of the softmax."""
    probs = F.softmax(b.logits.float(), -1)
    label = probs.gather(-1, b.labels.unsqueeze(-1)).squeeze(-1)
    top = probs.topk(2, dim=-1)
    rival = torch.where(top.indices[..., 0] == b.labels, top.values[..., 1], top.values[..., 0])
    return (1 + label - rival).mean()


def _eager_jsd(b: Batch) -> Tensor:
    """beta KL(P || M) + (1 - beta) KL(Q || M) with log M the log of the mixture's probabilities."""
    logp = F.log_softmax(b.logits.float(), -1).flatten(0, -2)
    logq = F.log_softmax(b.ref_logits.float(), -1).flatten(0, -2)
    log_mixture = torch.log(JSD_BETA * logp.exp() + (1 - JSD_BETA) * logq.exp())
    to_model = F.kl_div(log_mixture, logp, reduction="batchmean", log_target=True)
    to_reference = F.kl_div(log_mixture, logq, reduction="batchmean", log_target=True)
    return JSD_BETA * to_model + (1 - JSD_BETA) * to_reference


def _whp_target_logits(b: Batch) -> Tensor:
    """z* = z_ref - alpha ReLU(z_reinf - z_ref), in float32 for the whole batch."""
    ref = b.ref_logits.float()
    return ref - HELPER_ALPHA * F.relu(b.reinforced_logits.float() - ref)


def _eager_whp(b: Batch) -> Tensor:
    """Cross-entropy to the argmax of z*."""
    with torch.no_grad():
        targets = _whp_target_logits(b).argmax(-1)
    flat = b.logits.float().flatten(0, -2)
    return F.cross_entropy(flat, targets.flatten())


def _eager_rkld(b: Batch) -> Tensor:
    """KL(p || softmax(z*)), the teacher's probabilities materialised."""
    teacher = F.softmax(_whp_target_logits(b), -1)
    logp = F.log_softmax(b.logits.float(), -1)
    return (logp.exp() * (logp - teacher.log())).sum(-1).mean()


def _eager_elm(b: Batch) -> Tensor:
    """Cross-entropy to q = softmax(log p + eta (log p+ - log p-)), q materialised."""
    steered = F.log_softmax(b.ref_logits.float(), -1) + ELM_ETA * (
        F.log_softmax(b.positive_logits.float(), -1) - F.log_softmax(b.negative_logits.float(), -1)
    )
    target = F.softmax(steered, -1).flatten(0, -2)
    return F.cross_entropy(b.logits.float().flatten(0, -2), target)


def _eager_kto(b: Batch) -> Tensor:
    """KTO's undesirable-answer loss sigma(beta (Delta - z0)), Delta the summed log-ratio."""
    delta = (_gathered_logprobs(b.logits, b.labels) - b.ref_logprobs).sum(-1)
    return torch.sigmoid(BETA * (delta - KTO_REFERENCE_POINT)).mean()


def _eager_flat(b: Batch) -> Tensor:
    """FLAT with the total-variation divergence: -tanh(P_e)/2 + tanh(P_f)/2 per pair, P the
    mean token probability of each answer."""
    forget = _gathered_logprobs(b.logits, b.labels).exp().mean(-1)
    template = _gathered_logprobs(b.template_logits, b.labels).exp().mean(-1)
    return (torch.tanh(forget) / 2 - torch.tanh(template) / 2).mean()


def _logits_of(b: Batch) -> Tensor:
    return F.linear(b.hidden, b.weight)


_EAGER: dict[str, Loss] = {
    "ga": lambda b: _float_logprobs(b.logits, b.labels).mean(),
    "npo": _eager_npo,
    "kl": lambda b: _eager_kl(b.logits, b.ref_logits),
    "simnpo": _eager_simnpo,
    "undial": _eager_undial,
    "me": _eager_me,
    "ihl": _eager_ihl,
    "jsd": _eager_jsd,
    "whp": _eager_whp,
    "rkld": _eager_rkld,
    "elm": _eager_elm,
    "kto": _eager_kto,
    "flat": _eager_flat,
    "linear_ga": lambda b: _float_logprobs(_logits_of(b), b.labels).mean(),
    "linear_npo": lambda b: _eager_npo(Batch(b.labels, b.ref_logprobs, logits=_logits_of(b))),
    "linear_kl": lambda b: _eager_kl(_logits_of(b), F.linear(b.ref_hidden, b.weight).detach()),
    "linear_me": lambda b: _eager_me(Batch(b.labels, b.ref_logprobs, logits=_logits_of(b))),
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
