"""Direct Preference Optimization on a preferred (e.g. refusal) and a dispreferred (forget) answer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import REDUCTIONS, Reduction, sequence_reduce, sequence_sums
from .common import reference_logprobs


def _side(
    logits: Tensor,
    labels: Tensor,
    name: str,
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
        name=f"{name}_logits",
        labels_name=f"{name}_labels",
        vocab_group=vocab_group,
        sequence_group=sequence_group,
    )


@shared_arguments
def dpo_loss(
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    rejected_logits: Tensor,
    rejected_labels: Tensor,
    *,
    ref_chosen_logprobs: Tensor | None = None,
    ref_chosen_logits: Tensor | None = None,
    ref_rejected_logprobs: Tensor | None = None,
    ref_rejected_logits: Tensor | None = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_sequences: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
    sequence_group: object = None,
) -> Tensor:
    r"""DPO loss on answer pairs (Rafailov et al., 2023), the IdkDPO baseline of unlearning.

    With $\Delta^w_i = \sum_{t} (\ell^w_t - r^w_t)$ the summed log-ratio of the model to the
    frozen reference on the chosen answer of pair *i* (e.g. "I don't know."), and
    $\Delta^l_i$ the same on the rejected one (the forget answer),

    $$
    \mathcal{L}_{DPO} = -\log\sigma\big(\beta(\Delta^w_i - \Delta^l_i)\big)
    $$

    averaged over pairs with at least one valid token on either side (Maini et al., 2024, "TOFU"
    use it with a refusal as the chosen answer; β = 0.1 as in the DPO paper). Without the chosen
    side it is NPO up to the factor $2/\beta$.

    Args:
        chosen_logits: ``(B, T_w, V)`` and ``(B, T_l, V)`` (or ``(N_w, V)`` and ``(N_l, V)``: one
            pair), the model on each answer.
        rejected_logits: ``(B, T_w, V)`` and ``(B, T_l, V)`` (or ``(N_w, V)`` and ``(N_l, V)``: one
            pair), the model on each answer.
        chosen_labels: their labels, ``ignore_index`` at prompt and padding.
        rejected_labels: their labels, ``ignore_index`` at prompt and padding.
        ref_chosen_logprobs: the reference on the chosen answers, exactly one (cached per-token log-
            probs as :func:`token_logprobs` gives them, or logits).
        ref_chosen_logits: the reference on the chosen answers, exactly one (cached per-token log-
            probs as :func:`token_logprobs` gives them, or logits).
        ref_rejected_logprobs: the same for the rejected answers.
        ref_rejected_logits: the same for the rejected answers.
        beta: inverse temperature, > 0.
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (``(B,)``, 0 for empty pairs).
        num_sequences: the global count of non-empty pairs (data parallel); ``"mean"`` only.
        ignore_index: {ignore_index}
        shift: {shift}
        backend: {backend}
        validate: {validate}
        inplace_backward: write each side's gradient into its own logits' buffer (see
            :func:`token_logprobs` for the hazard).
        vocab_group: {vocab_group}
        sequence_group: the context-parallel group, as :func:`npo_loss` (labels already
            shifted, ``shift=False``).

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # model = reference on both answers: both log-ratios 0, the loss -log sigmoid(0)
        >>> dpo_loss(logits, labels, logits, labels, ref_chosen_logits=logits,
        ...          ref_rejected_logits=logits), math.log(2)
        (tensor(0.6931), 0.6931471805599453)
    """
    args = (ignore_index, shift, backend, validate, vocab_group, sequence_group)
    chosen = _side(chosen_logits, chosen_labels, "chosen", *args)
    rejected = _side(rejected_logits, rejected_labels, "rejected", *args)
    if chosen.flat != rejected.flat or chosen.logits.shape[0] != rejected.logits.shape[0]:
        raise ValueError(
            "rejected_logits must hold as many sequences as chosen_logits, with the same number "
            f"of dimensions; got {tuple(rejected_logits.shape)} and {tuple(chosen_logits.shape)}"
        )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = _checks.check_mean_count(num_sequences, chosen.logits, reduction, "num_sequences")
    split = chosen.sharding
    if (split.batch_group, split.sequence_group) != (
        rejected.sharding.batch_group,
        rejected.sharding.sequence_group,
    ):
        raise ValueError(
            "rejected_logits must be split over ranks as chosen_logits are (the same batch and "
            "sequence placements)"
        )
    sides = (
        ("chosen", chosen, ref_chosen_logprobs, ref_chosen_logits),
        ("rejected", rejected, ref_rejected_logprobs, ref_rejected_logits),
    )
    # Both references are checked (and computed) before either side's log-prob pass.
    references = [
        reference_logprobs(
            tokens, logprobs, logits, backend, names=(f"ref_{side}_logprobs", f"ref_{side}_logits")
        )
        for side, tokens, logprobs, logits in sides
    ]
    (chosen_ratio, chosen_counts), (rejected_ratio, rejected_counts) = (
        _log_ratio_sums(tokens, reference, backend, inplace_backward)
        for (_, tokens, _, _), reference in zip(sides, references, strict=True)
    )
    per_pair = F.softplus(-beta * (chosen_ratio - rejected_ratio))
    nonempty = (chosen_counts + rejected_counts) > 0
    return chosen.per_sequence(sequence_reduce(per_pair, nonempty, reduction, count, split))


def _log_ratio_sums(
    tokens: _tokens.Tokens, ref: Tensor, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor]:
    """Per sequence, the summed log-ratio of the model to the reference and the valid count."""
    logprobs = tokens.label_logprobs(backend, inplace_backward=inplace_backward)
    return sequence_sums(logprobs - ref.to(logprobs.dtype), tokens.valid, tokens.sharding)
