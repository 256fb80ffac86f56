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
    ga_loss,
    kl_divergence,
    kl_loss,
    nll_loss,
    npo_loss,
    simnpo_loss,
    undial_loss,
    wga_loss,
)
from .data import Corpus
from .model import TinyCausalLM


@dataclass(frozen=True)
class Reference:
    """What the frozen trained model contributes, computed once before unlearning."""

    forget_logits: Tensor
    retain_logits: Tensor
    forget_logprobs: Tensor

    @staticmethod
    def of(model: TinyCausalLM, corpus: Corpus) -> Reference:
        from .. import token_logprobs

        with torch.no_grad():
            forget_logits = model(corpus.forget.input_ids)
            retain_logits = model(corpus.retain.input_ids)
        return Reference(
            forget_logits,
            retain_logits,
            token_logprobs(forget_logits, corpus.forget.labels),
        )


Loss = Callable[[TinyCausalLM, Corpus, Reference, Tensor], Tensor]


def _forget(model: TinyCausalLM, corpus: Corpus) -> tuple[Tensor, Tensor]:
    return model(corpus.forget.input_ids), corpus.forget.labels


def _retain_nll(model: TinyCausalLM, corpus: Corpus, rows: Tensor) -> Tensor:
    return nll_loss(model(corpus.retain.input_ids[rows]), corpus.retain.labels[rows])


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
}
TASK_VECTOR = "task vector"
METHODS = (*LOSSES, TASK_VECTOR)
