"""The unlearning methods of the demo, each a forget term (plus a retain term) built only from the
library's public functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import (
    ceu_loss,
    combine_with_retain,
    flat_loss,
    ga_loss,
    ihl_loss,
    jsd_loss,
    kl_divergence,
    kl_loss,
    kto_loss,
    kto_reference_point,
    me_loss,
    nll_loss,
    npo_loss,
    rkld_loss,
    simnpo_loss,
    token_logprobs,
    undial_loss,
    wga_loss,
    whp_loss,
)
from .data import Corpus
from .model import TinyCausalLM


@dataclass(frozen=True)
class Reference:
    """What the frozen trained model (and the reinforced one, where a method needs it)
    contributes, computed once before unlearning."""

    forget_logits: Tensor
    retain_logits: Tensor
    forget_logprobs: Tensor
    mismatched_logprobs: Tensor
    reinforced_forget_logits: Tensor | None

    @staticmethod
    def of(
        model: TinyCausalLM, corpus: Corpus, reinforced: TinyCausalLM | None = None
    ) -> Reference:
        """``reinforced``: the trained model fine-tuned further on the forget set (WHP, RKLD)."""
        with torch.no_grad():
            forget_logits = model(corpus.forget.input_ids)
            retain_logits = model(corpus.retain.input_ids)
            reinforced_logits = None if reinforced is None else reinforced(corpus.forget.input_ids)
        return Reference(
            forget_logits,
            retain_logits,
            token_logprobs(forget_logits, corpus.forget.labels),
            token_logprobs(forget_logits, _mismatched_labels(corpus)),
            reinforced_logits,
        )

    def reinforced(self) -> Tensor:
        assert self.reinforced_forget_logits is not None, "a reinforced model was not given"
        return self.reinforced_forget_logits


Loss = Callable[[TinyCausalLM, Corpus, Reference, Tensor], Tensor]


def _forget(model: TinyCausalLM, corpus: Corpus) -> tuple[Tensor, Tensor]:
    return model(corpus.forget.input_ids), corpus.forget.labels


def _retain_nll(model: TinyCausalLM, corpus: Corpus, rows: Tensor) -> Tensor:
    return nll_loss(model(corpus.retain.input_ids[rows]), corpus.retain.labels[rows])


def _mismatched_labels(corpus: Corpus) -> Tensor:
    """Each forget question paired with the next one's answer (as TRL pairs KTO's KL batch)."""
    return corpus.forget.labels.roll(1, dims=0)


def ga(model, corpus, ref, rows):
    return ga_loss(*_forget(model, corpus))


def ga_retain(model, corpus, ref, rows):
    return combine_with_retain(ga(model, corpus, ref, rows), _retain_nll(model, corpus, rows))


def npo(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    return npo_loss(logits, labels, ref_logprobs=ref.forget_logprobs, beta=0.1)


def npo_retain(model, corpus, ref, rows):
    return combine_with_retain(npo(model, corpus, ref, rows), _retain_nll(model, corpus, rows))


def simnpo_retain(model, corpus, ref, rows):
    forget = simnpo_loss(*_forget(model, corpus), beta=4.5, delta=0.0)
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def wga_retain(model, corpus, ref, rows):
    forget = wga_loss(*_forget(model, corpus), beta=1.0)
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def undial_retain(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    forget = undial_loss(logits, ref.forget_logits, labels, beta=10.0)
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def ceu_retain(model, corpus, ref, rows):
    forget = ceu_loss(*_forget(model, corpus))
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def kl_retain_kl(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    forget = kl_loss(logits, ref.forget_logits, labels)
    retain_logits = model(corpus.retain.input_ids[rows])
    retain = kl_divergence(retain_logits, ref.retain_logits[rows], corpus.retain.labels[rows])
    return combine_with_retain(forget, retain)


def me_retain(model, corpus, ref, rows):
    forget = me_loss(*_forget(model, corpus))
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def ihl_retain(model, corpus, ref, rows):
    forget = ihl_loss(*_forget(model, corpus))
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def jensun(model, corpus, ref, rows):
    """JensUn: the JSD to the refusal's one-hot on the forget set, to the reference on retain."""
    forget = jsd_loss(model(corpus.forget.input_ids), corpus.refusal_labels())
    retain_logits = model(corpus.retain.input_ids[rows])
    retain = jsd_loss(retain_logits, corpus.retain.labels[rows], ref_logits=ref.retain_logits[rows])
    return combine_with_retain(forget, retain)


def kto_retain(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    # KTO's reference point: the model's drift from the reference on mismatched answers,
    # read from the same logits.
    drift = kto_reference_point(
        token_logprobs(logits.detach(), _mismatched_labels(corpus)), ref.mismatched_logprobs
    )
    forget = kto_loss(
        logits, labels, ref_logprobs=ref.forget_logprobs, reference_point=drift, beta=0.1
    )
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def whp_retain(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    forget = whp_loss(
        logits, labels, ref_logits=ref.forget_logits, reinforced_logits=ref.reinforced()
    )
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def rkld_retain(model, corpus, ref, rows):
    logits, labels = _forget(model, corpus)
    forget = rkld_loss(
        logits, labels, ref_logits=ref.forget_logits, reinforced_logits=ref.reinforced()
    )
    return combine_with_retain(forget, _retain_nll(model, corpus, rows))


def flat(model, corpus, ref, rows):
    """FLAT with forget data only: the refusal is the template answer to every forget question;
    the answer is one token after the same prompt, so one forward serves both sides."""
    logits, labels = _forget(model, corpus)
    return flat_loss(logits, labels, logits, corpus.refusal_labels())


#: Loss-driven methods by name; the task vector is handled apart (fine-tune, then negate).
LOSSES: dict[str, Loss] = {
    "GA": ga,
    "GA+retain NLL": ga_retain,
    "NPO": npo,
    "NPO+retain NLL": npo_retain,
    "SimNPO+retain NLL": simnpo_retain,
    "WGA+retain NLL": wga_retain,
    "UNDIAL+retain NLL": undial_retain,
    "CE-U+retain NLL": ceu_retain,
    "KL+retain KL": kl_retain_kl,
    "ME+retain NLL": me_retain,
    "IHL+retain NLL": ihl_retain,
    "JensUn": jensun,
    "KTO+retain NLL": kto_retain,
    "WHP+retain NLL": whp_retain,
    "RKLD+retain NLL": rkld_retain,
    "FLAT": flat,
}
TASK_VECTOR = "task vector"
METHODS = (*LOSSES, TASK_VECTOR)
#: The methods that need the trained model fine-tuned further on the forget set.
REINFORCED = ("WHP+retain NLL", "RKLD+retain NLL", TASK_VECTOR)
