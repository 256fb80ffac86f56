"""FLAT: unlearning with forget data only, by a variational f-divergence between the model's
probabilities of template answers and of the forget answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import REDUCTIONS, Reduction, sequence_reduce, sequence_sums

Divergence = Literal["kl", "jensen_shannon", "pearson", "total_variation"]

_Of = Callable[[Tensor], Tensor]
#: Per divergence: the optimal variational function ``g*`` and ``f*(g*(.))``, its conjugate
#: composed with it (Nowozin et al., 2016, "f-GAN", Table 2; the FLAT code's
#: ``get_contrastive_loss`` agrees for these four).
_VARIATIONAL: dict[str, tuple[_Of, _Of]] = {
    "kl": (lambda v: v, lambda v: torch.exp(v - 1.0)),
    "jensen_shannon": (
        lambda v: math.log(2.0) - F.softplus(-v),
        lambda v: F.softplus(v) - math.log(2.0),
    ),
    "pearson": (lambda v: v, lambda v: v * v / 4.0 + v),
    "total_variation": (lambda v: torch.tanh(v) / 2.0, lambda v: torch.tanh(v) / 2.0),
}
DIVERGENCES: tuple[str, ...] = tuple(_VARIATIONAL)


def _side(
    logits: Tensor,
    labels: Tensor,
    name: str,
    labels_name: str,
    ignore_index: int,
    shift: bool,
    backend: str,
    validate: bool,
    vocab_group: object,
    sequence_group: object,
) -> _tokens.Tokens:
    return _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        name=name,
        labels_name=labels_name,
        vocab_group=vocab_group,
        sequence_group=sequence_group,
    )


@shared_arguments
def flat_loss(
    logits: Tensor,
    labels: Tensor,
    template_logits: Tensor,
    template_labels: Tensor,
    *,
    divergence: Divergence = "total_variation",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_sequences: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    vocab_group: object = None,
    sequence_group: object = None,
) -> Tensor:
    r"""FLAT forget loss (Wang et al., ICLR 2025, "LLM Unlearning via Loss Adjustment with Only
    Forget Data"), to minimize.

    With $\bar P^f_i = \frac{1}{|M_i|}\sum_{t \in M_i} p_\theta(y_t \mid y_{<t})$ the mean token
    probability of the forget answer of pair *i* and $\bar P^e_i$ that of its template answer
    (e.g. "I don't know." to the same question),

    $$
    \mathcal{L}_i = -g^*\big(\bar P^e_i\big) + f^*\big(g^*(\bar P^f_i)\big)
    $$

    the negated variational lower bound of the f-divergence between the template and the forget
    answers, averaged over pairs with a valid token on either side (a side without one adds
    nothing). No reference model and no retain data. ``divergence`` picks $f$:

    | ``divergence`` | $g^*(v)$ | $f^*(g^*(v))$ |
    |---|---|---|
    | ``"kl"`` | $v$ | $e^{v - 1}$ |
    | ``"jensen_shannon"`` | $\log 2 - \log(1 + e^{-v})$ | $\log(1 + e^{v}) - \log 2$ |
    | ``"pearson"`` | $v$ | $v^2/4 + v$ |
    | ``"total_variation"`` | $\tanh(v)/2$ | $\tanh(v)/2$ |

    The gradient raises the template answer's tokens with weight $g^{*\prime}(\bar P^e_i)$ and
    lowers the forget answer's with weight $(f^*\circ g^*)'(\bar P^f_i)$, each token's
    probability $p_t$ through $\nabla p_t = p_t \nabla \ell_t$: the loss adjustment that gives
    the method its name.

    The authors' code (``UCSC-REAL/FLAT``, ``dataloader.py``, loss ``cl``,
    ``get_contrastive_loss``) has the same signs and the same $g^*$ and $f^* \circ g^*$, but
    applies them once per batch, to each side's token probabilities averaged over every
    position of its padded batch (prompt and padding counted as probability 0), where the paper
    takes the expectation over samples of each answer's probability: the two agree on one pair
    whose every position is scored. This function follows the paper (per pair, valid tokens
    only). The code pairs each forget answer with a random line of its "I don't know" file as
    the template answer to the same question; its default divergence, ``Total-Variation``, is
    the default here (it also offers reverse KL, Jeffrey, squared Hellinger and Neyman).

    Args:
        logits: ``(B, T_f, V)`` or ``(N_f, V)``, the model on the forget answers.
        labels: their labels, ``ignore_index`` at prompt and padding.
        template_logits: ``(B, T_e, V)`` or ``(N_e, V)``, the model on the template answers to
            the same prompts, pair *i* in row *i* (2-D: one pair).
        template_labels: their labels, ``ignore_index`` at prompt and padding.
        divergence: ``"kl"``, ``"jensen_shannon"``, ``"pearson"`` or ``"total_variation"``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (``(B,)``, 0 for empty pairs).
        num_sequences: the global count of non-empty pairs (data parallel); ``"mean"`` only.
        backend: {backend}
        validate: {validate}
        vocab_group: {vocab_group}
        sequence_group: the context-parallel group, as :func:`npo_loss` (labels already
            shifted, ``shift=False``).

    Returns:
        A float32 scalar (float64 for float64 logits), or per-pair values.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> flat_loss(logits, labels, logits, labels, divergence="kl")
        tensor(0.2224)
        >>> -0.25 + math.exp(0.25 - 1)  # -g*(1/4) + f*(g*(1/4))
        0.2223665527410147
    """
    args = (ignore_index, shift, backend, validate, vocab_group, sequence_group)
    forget = _side(logits, labels, "logits", "labels", *args)
    template = _side(template_logits, template_labels, "template_logits", "template_labels", *args)
    if forget.flat != template.flat or forget.logits.shape[0] != template.logits.shape[0]:
        raise ValueError(
            "template_logits must hold as many sequences as logits, with the same number of "
            f"dimensions; got {tuple(template_logits.shape)} and {tuple(logits.shape)}"
        )
    _checks.check_choice(divergence, DIVERGENCES, "divergence")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = _checks.check_mean_count(num_sequences, forget.logits, reduction, "num_sequences")
    split = forget.sharding
    if (split.batch_group, split.sequence_group) != (
        template.sharding.batch_group,
        template.sharding.sequence_group,
    ):
        raise ValueError(
            "template_logits must be split over ranks as logits are (the same batch and "
            "sequence placements)"
        )
    (forget_mean, forget_counts), (template_mean, template_counts) = (
        _mean_probability(tokens, backend) for tokens in (forget, template)
    )
    g, conjugate = _VARIATIONAL[divergence]
    zero = forget_mean.new_zeros(())
    per_pair = torch.where(template_counts > 0, -g(template_mean), zero) + torch.where(
        forget_counts > 0, conjugate(forget_mean), zero
    )
    nonempty = (forget_counts + template_counts) > 0
    return forget.per_sequence(sequence_reduce(per_pair, nonempty, reduction, count, split))


def _mean_probability(tokens: _tokens.Tokens, backend: str) -> tuple[Tensor, Tensor]:
    """Per sequence, the mean probability of its valid labels (0 without one) and their count."""
    logprobs = ops.label_logprobs(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        vocab=tokens.sharding.vocab,
    )
    sums, counts = sequence_sums(logprobs.exp(), tokens.valid, tokens.sharding)
    return sums / counts.clamp(min=1), counts
