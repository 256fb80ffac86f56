"""What ``bench --step`` compares: the loss of one unlearning step, computed five ways.

A step's loss is a forget term plus a retain term, each a value to minimise:

- ``ga+nll``: gradient ascent on the forget batch (the mean log-probability of its scored tokens)
  plus the NLL of the retain batch (open-unlearning's GradDiff);
- ``npo+nll``: NPO (β = 0.1, log-ratios summed over each sequence) against reference log-probs
  cached before training, plus the retain NLL;
- ``ga+kl``: GA plus the token mean of KL(P_θ ‖ P_ref) on the retain batch, the reference a
  frozen model run on the retain batch in every step;
- ``simnpo+nll``: SimNPO (β = 4.5, δ = 0) plus the retain NLL.

Every implementation starts from the model's last hidden states ``(B, T, H)`` (after the final
norm) and its head; labels follow Hugging Face (``labels[:, t + 1]`` scored by position ``t``,
-100 ignored). The implementations:

- ``model loss``: what the model and research code compute over the materialised logits. The
  head as the model applies it (``lm_head``, and Gemma 2's final-logit softcapping), then for
  the cross-entropy terms the model's own loss function (``model.loss_function``, the
  ``ForCausalLMLoss`` that ``model(..., labels=)`` calls on those logits: a float32 upcast, the
  labels shifted, ``F.cross_entropy``); for the other terms the research code's formulation as
  open-unlearning writes it: each sequence's NLL as ``F.cross_entropy(..., reduction="none")``
  of the shifted logits summed over the sequence (NPO, SimNPO; SimNPO's length is the count of
  scored labels, where open-unlearning counts one more per sequence, so that every
  implementation computes the same loss), and ``F.log_softmax`` of both logits for the KL.
- ``ours, logits``: the same logits into the library's logits losses, with
  ``inplace_backward=True`` (the logits feed only the loss, so the gradient may overwrite them).
- ``ours, fused linear``: the hidden states and the head into the library's fused-linear losses
  (with the model's ``logit_softcap``); the ``(N, V)`` logits are never made.
- ``Liger-Kernel``: its ``LigerFusedLinearCrossEntropyLoss`` on the shifted hidden states, for GA
  and NLL (so GA+NLL only); its Triton kernels need a GPU.
- ``torch.compile(model loss)``: the ``model loss`` formulation of the terms compiled (the head
  stays eager, as in the model).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import unlearning_losses as ul

from .providers import BETA, SIMNPO_BETA

IGNORE = -100
#: Method -> (forget term, retain term).
METHODS: dict[str, tuple[str, str]] = {
    "ga+nll": ("ga", "nll"),
    "npo+nll": ("npo", "nll"),
    "ga+kl": ("ga", "kl"),
    "simnpo+nll": ("simnpo", "nll"),
}
BASELINE = "model loss"
IMPLEMENTATIONS = (
    BASELINE,
    "ours, logits",
    "ours, fused linear",
    "Liger-Kernel",
    "torch.compile(model loss)",
)


@dataclass(frozen=True)
class Head:
    """An output head as the model applies it: ``hidden @ weight.T``, then ``c·tanh(z / c)`` where
    the model softcaps its final logits (Gemma 2)."""

    weight: Tensor
    softcap: float | None = None

    def logits(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden, self.weight)
        if self.softcap is not None:  # the operations of Gemma2ForCausalLM.forward, in order
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


@dataclass(frozen=True)
class Inputs:
    """What the loss of one step reads besides the model's hidden states.

    ``reference`` is the frozen model's retain-batch output for the KL term (its logits for an
    implementation that reads logits, its hidden states for one that reads hidden states, with
    ``ref_head``), else None; ``ref_logprobs`` are the cached reference log-probs ``(B, T - 1)``
    of the forget labels; ``model_loss`` is the model's own loss function
    (``loss_function(logits, labels, vocab_size)``).
    """

    forget_labels: Tensor
    retain_labels: Tensor
    ref_logprobs: Tensor
    head: Head
    ref_head: Head
    model_loss: Callable[..., Tensor]
    reference: Tensor | None = None

    @property
    def vocab(self) -> int:
        return self.head.weight.shape[0]

    @property
    def ref(self) -> Tensor:
        """The reference's output, which the KL term reads."""
        assert self.reference is not None, "the KL term reads the reference's retain output"
        return self.reference


Term = Callable[[Tensor, Inputs], Tensor]


@dataclass(frozen=True)
class Implementation:
    """One way of computing a step's loss from the hidden states.

    ``reads`` says what its terms take (``"logits"``: the head is applied first, eagerly);
    ``available`` is None, or why it cannot run here (the row is reported with that reason).
    """

    name: str
    reads: Literal["logits", "hidden"]
    forget: dict[str, Term]
    retain: dict[str, Term]
    available: str | None = None

    def computes(self, method: str) -> bool:
        forget, retain = METHODS[method]
        return forget in self.forget and retain in self.retain

    def loss(self, method: str, forget: Tensor, retain: Tensor, inputs: Inputs) -> Tensor:
        """The step's loss on the forget and retain batches' hidden states."""
        forget_term, retain_term = METHODS[method]
        if self.reads == "logits":
            forget, retain = inputs.head.logits(forget), inputs.head.logits(retain)
        return self.forget[forget_term](forget, inputs) + self.retain[retain_term](retain, inputs)


# The model's loss and research code, over logits.


def _model_nll(logits: Tensor, labels: Tensor, inputs: Inputs) -> Tensor:
    return inputs.model_loss(logits, labels, vocab_size=inputs.vocab)


def _sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Each sequence's summed NLL, as open-unlearning's ``compute_batch_nll`` (upcast added)."""
    shifted_labels = labels[..., 1:].contiguous()
    shifted = logits[..., :-1, :].contiguous().float()
    nll = F.cross_entropy(
        shifted.transpose(-1, -2), shifted_labels, ignore_index=IGNORE, reduction="none"
    )
    return nll.sum(-1)


def _research_npo(logits: Tensor, inputs: Inputs) -> Tensor:
    nll = _sequence_nll(logits, inputs.forget_labels)
    ref_nll = -inputs.ref_logprobs.sum(-1)
    log_ratio = ref_nll - nll  # log p_θ - log p_ref of each sequence
    return -2 / BETA * F.logsigmoid(-BETA * log_ratio).mean()


def _research_simnpo(logits: Tensor, inputs: Inputs) -> Tensor:
    labels = inputs.forget_labels
    mean_nll = _sequence_nll(logits, labels) / (labels[..., 1:] != IGNORE).sum(-1)
    return -F.logsigmoid(SIMNPO_BETA * mean_nll).mean() * 2 / SIMNPO_BETA


def _research_kl(logits: Tensor, inputs: Inputs) -> Tensor:
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    logq = F.log_softmax(inputs.ref[:, :-1].float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = inputs.retain_labels[:, 1:] != IGNORE
    return (kl * mask).sum() / mask.sum()


_MODEL_FORGET: dict[str, Term] = {
    "ga": lambda x, i: -_model_nll(x, i.forget_labels, i),
    "npo": _research_npo,
    "simnpo": _research_simnpo,
}
_MODEL_RETAIN: dict[str, Term] = {
    "nll": lambda x, i: _model_nll(x, i.retain_labels, i),
    "kl": _research_kl,
}


# The library's losses.

_LOGITS_FORGET: dict[str, Term] = {
    "ga": lambda x, i: ul.ga_loss(x, i.forget_labels, inplace_backward=True),
    "npo": lambda x, i: ul.npo_loss(
        x, i.forget_labels, ref_logprobs=i.ref_logprobs, beta=BETA, inplace_backward=True
    ),
    "simnpo": lambda x, i: ul.simnpo_loss(
        x, i.forget_labels, beta=SIMNPO_BETA, inplace_backward=True
    ),
}
_LOGITS_RETAIN: dict[str, Term] = {
    "nll": lambda x, i: ul.nll_loss(x, i.retain_labels, inplace_backward=True),
    "kl": lambda x, i: ul.kl_divergence(x, i.ref, i.retain_labels, inplace_backward=True),
}
_FUSED_FORGET: dict[str, Term] = {
    "ga": lambda h, i: ul.linear_ga_loss(
        h, i.head.weight, i.forget_labels, logit_softcap=i.head.softcap
    ),
    "npo": lambda h, i: ul.linear_npo_loss(
        h,
        i.head.weight,
        i.forget_labels,
        ref_logprobs=i.ref_logprobs,
        beta=BETA,
        logit_softcap=i.head.softcap,
    ),
    "simnpo": lambda h, i: ul.linear_simnpo_loss(
        h, i.head.weight, i.forget_labels, beta=SIMNPO_BETA, logit_softcap=i.head.softcap
    ),
}
_FUSED_RETAIN: dict[str, Term] = {
    "nll": lambda h, i: ul.linear_nll_loss(
        h, i.head.weight, i.retain_labels, logit_softcap=i.head.softcap
    ),
    "kl": lambda h, i: ul.linear_kl_divergence(
        h,
        i.head.weight,
        i.ref,
        i.ref_head.weight,
        labels=i.retain_labels,
        logit_softcap=i.head.softcap,
    ),
}


def liger_mean_nll(hidden: Tensor, labels: Tensor, head: Head) -> Tensor:
    """The token-mean NLL through Liger-Kernel's fused linear cross-entropy, on the shifted
    hidden states (as Hugging Face's Liger integration shifts them)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, softcap=head.softcap)
    shifted = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return fused(head.weight, shifted, labels[:, 1:].reshape(-1))


def _liger_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "its Triton kernels need a GPU"
    return None


def implementations(
    device: torch.device, compiled: bool, only: tuple[str, ...] | None = None
) -> list[Implementation]:
    """The implementations to measure here, the baseline first; ``only`` keeps those named (and
    the baseline); ``compiled`` adds ``torch.compile`` of the model loss."""
    found = [
        Implementation(BASELINE, "logits", _MODEL_FORGET, _MODEL_RETAIN),
        Implementation("ours, logits", "logits", _LOGITS_FORGET, _LOGITS_RETAIN),
        Implementation("ours, fused linear", "hidden", _FUSED_FORGET, _FUSED_RETAIN),
        Implementation(
            "Liger-Kernel",
            "hidden",
            {"ga": lambda h, i: -liger_mean_nll(h, i.forget_labels, i.head)},
            {"nll": lambda h, i: liger_mean_nll(h, i.retain_labels, i.head)},
            _liger_unavailable(device),
        ),
    ]
    if compiled:
        found.append(_compiled())
    return [i for i in found if only is None or i.name in only or i.name == BASELINE]


def _compiled() -> Implementation:
    """``torch.compile`` of each term of the model loss: one graph per term, compiled at its
    first call (the first step's excess over the others is the compile time)."""
    options: dict[str, Any] = {"dynamic": False}
    return Implementation(
        "torch.compile(model loss)",
        "logits",
        {name: torch.compile(term, **options) for name, term in _MODEL_FORGET.items()},
        {name: torch.compile(term, **options) for name, term in _MODEL_RETAIN.items()},
    )
