"""SimNPO: NPO without a reference model, on the length-normalised NLL."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import REDUCTIONS, Reduction, sequence_reduce, sequence_sums
from ..sharding import LOCAL, Sharding


@shared_arguments
def simnpo_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    beta: float = 4.5,
    delta: float = 0.0,
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
    r"""SimNPO forget loss (Fan et al., 2024, "Simplicity Prevails"), to minimize.

    With $\bar L_i = -\frac{1}{|M_i|} \sum_{t \in M_i} \ell_t$ the mean NLL of sequence *i*,

    $$
    \mathcal{L}_{SimNPO} = -\frac{2}{\beta} \log \sigma\big(\beta (\bar L_i - \delta)\big)
    $$

    averaged over sequences with at least one valid token (the paper's $\gamma$ is
    $\beta\delta$). Its gradient pushes $\bar L_i$ up with weight
    $2\sigma(-\beta(\bar L_i - \delta))$, which fades once a sequence is forgotten.

    Args:
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}
        sequence_group: the context-parallel group over which every sequence's positions are
            split, as :func:`npo_loss` (labels already shifted, ``shift=False``).
        beta: inverse temperature, > 0 (default 4.5, the paper's TOFU setting).
        delta: margin on the mean NLL, finite.
        reduction: ``"mean"`` over sequences, ``"sum"``, or ``"none"`` (``(B,)``, 0 for empty ones).
            2-D input is one sequence.
        num_sequences: the global count of sequences with a valid token (data parallel; see
            :func:`unlearning_losses.global_counts`); ``"mean"`` only.

    Returns:
        A float32 scalar (float64 for float64 logits), or per-sequence values.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> expected = -2 / 4.5 * math.log(1 / (1 + math.exp(-4.5 * math.log(4))))
        >>> simnpo_loss(logits, labels, beta=4.5), expected  # mean NLL log 4, delta 0
        (tensor(0.0009), 0.0008672089472274687)
    """
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_group=vocab_group,
        sequence_group=sequence_group,
    )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    delta = _checks.check_finite_number(delta, "delta")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = _checks.check_mean_count(num_sequences, tokens.logits, reduction, "num_sequences")
    logprobs = tokens.label_logprobs(backend, inplace_backward=inplace_backward)
    return tokens.per_sequence(
        simnpo_from_logprobs(logprobs, tokens.valid, beta, delta, reduction, count, tokens.sharding)
    )


def simnpo_from_logprobs(
    logprobs: Tensor,
    valid: Tensor,
    beta: float,
    delta: float,
    reduction: str,
    num_sequences: int | Tensor | None = None,
    sharding: Sharding = LOCAL,
) -> Tensor:
    """SimNPO of per-token log-probs ``(B, L)`` (see :func:`simnpo_loss`)."""
    sums, counts = sequence_sums(logprobs, valid, sharding)
    mean_nll = -sums / counts.clamp(min=1)
    per_sequence = F.logsigmoid(beta * (mean_nll - delta)) * (-2.0 / beta)
    return sequence_reduce(per_sequence, counts > 0, reduction, num_sequences, sharding)
