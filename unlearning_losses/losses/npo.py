"""Negative Preference Optimization (NPO): the forget set as dispreferred answers only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import (
    REDUCTIONS,
    Reduction,
    divide_by_count,
    sequence_reduce,
    sequence_sums,
    token_reduce,
)
from ..sharding import LOCAL, Sharding
from .common import reference_logprobs

Granularity = Literal["sequence", "sequence_mean", "token", "batch"]
GRANULARITIES: tuple[str, ...] = ("sequence", "sequence_mean", "token", "batch")


@shared_arguments
def npo_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
    beta: float = 0.1,
    granularity: Granularity = "sequence",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    num_sequences: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
    sequence_group: object = None,
) -> Tensor:
    r"""NPO forget loss (Zhang et al., 2024, "Negative Preference Optimization"), to minimize.

    With $\Delta$ the log-likelihood ratio of the model to the frozen reference,

    $$
    \mathcal{L}_{NPO} = \frac{2}{\beta} \operatorname{softplus}(\beta \Delta)
    = -\frac{2}{\beta} \log \sigma(-\beta \Delta)
    $$

    where ``granularity`` sets $\Delta$:

    - ``"sequence"`` (NPO paper, open-unlearning): $\Delta_i = \sum_{t \in M_i} (\ell_t - r_t)$,
      averaged over sequences that have a valid token;
    - ``"sequence_mean"``: $\Delta_i$ is the mean instead of the sum;
    - ``"token"`` (the SOUL paper's formula): the loss of each token, averaged over tokens;
    - ``"batch"`` (the SOUL code): one $\Delta$, the token mean over the batch; a scalar for
      every ``reduction``.

    The gradient is $2\sigma(\beta\Delta)\,\nabla\Delta$: gradient ascent on the NLL, damped as
    the model moves away from the reference. As $\beta \to 0$ the loss tends to
    $2\log 2/\beta + \Delta$. 2-D input is one sequence.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being unlearned.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ref_logprobs: the reference model's per-token log-probs, shaped like
            :func:`token_logprobs`' output (already shifted); cache them once per forget batch.
        ref_logits: or the reference model's logits, shaped like ``logits``. Give exactly one.
        beta: inverse temperature, > 0.
        granularity: ``"sequence"``, ``"sequence_mean"``, ``"token"`` or ``"batch"``.
        ignore_index: {ignore_index}
        shift: {shift}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}
        sequence_group: a ``torch.distributed`` process group over which every sequence's
            positions are split (context parallel): each sequence's sums and counts are reduced
            over it before the nonlinearity, and every rank gets the whole batch's loss. Labels
            (and ``ref_logprobs``) must come already shifted, with ``shift=False``.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (per sequence ``(B,)``, 0 for a sequence
            without valid tokens; per token for ``"token"``).
        num_items_in_batch: for ``"token"`` granularity, the global count of valid tokens
            (gradient accumulation, data parallel); ``"mean"`` only.
        num_sequences: for the sequence granularities, the global count of sequences with a valid
            token (see :func:`unlearning_losses.global_counts`); ``"mean"`` only. ``"batch"``
            granularity is not a mean over items and takes neither.

    Returns:
        A float32 scalar (float64 for float64 logits), or per-sequence / per-token values.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # the model equals its reference: the log-ratio is 0, the loss 2 log(2) / beta
        >>> npo_loss(logits, labels, ref_logits=logits, beta=0.1), 2 / 0.1 * math.log(2)
        (tensor(13.8629), 13.862943611198906)
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
    _checks.check_choice(granularity, GRANULARITIES, "granularity")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = check_npo_count(num_items_in_batch, num_sequences, granularity, reduction, tokens)
    ref = reference_logprobs(tokens, ref_logprobs, ref_logits, backend)
    logprobs = tokens.label_logprobs(backend, inplace_backward=inplace_backward)
    result = npo_from_logprobs(
        logprobs, ref, tokens.valid, beta, granularity, reduction, count, tokens.sharding
    )
    return tokens.unflatten(result) if granularity == "token" else tokens.per_sequence(result)


def check_npo_count(
    num_items_in_batch: object,
    num_sequences: object,
    granularity: str,
    reduction: str,
    tokens: _tokens.Tokens,
) -> int | Tensor | None:
    """The global count that matches the granularity: tokens for ``"token"``, sequences else."""
    items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    sequences = _checks.check_mean_count(
        num_sequences, tokens.logits, reduction, name="num_sequences"
    )
    if items is not None and granularity != "token":
        raise ValueError(
            'num_items_in_batch applies to granularity="token" only (use num_sequences for '
            f"sequence granularities); got granularity={granularity!r}"
        )
    if sequences is not None and granularity not in ("sequence", "sequence_mean"):
        raise ValueError(
            'num_sequences applies to granularity="sequence" or "sequence_mean" only; '
            f"got granularity={granularity!r}"
        )
    return items if items is not None else sequences


def npo_from_logprobs(
    logprobs: Tensor,
    ref: Tensor,
    valid: Tensor,
    beta: float,
    granularity: str,
    reduction: str,
    count: int | Tensor | None = None,
    sharding: Sharding = LOCAL,
) -> Tensor:
    """NPO of per-token model and reference log-probs ``(B, L)`` (see :func:`npo_loss`).

    ``count`` is the global number of tokens (``"token"``) or sequences that the mean divides by;
    ``sharding`` says over which groups the batch is split.
    """
    log_ratio = (logprobs - ref.to(logprobs.dtype)).masked_fill(~valid, 0.0)

    def npo(delta: Tensor) -> Tensor:
        return F.softplus(beta * delta) * (2.0 / beta)

    if granularity == "token":
        return token_reduce(npo(log_ratio), valid, reduction, count, sharding)
    if granularity == "batch":
        count = sharding.sum_over_tokens(valid.sum())
        delta = divide_by_count(sharding.sum_over_tokens(log_ratio.sum()), count)
        return torch.where(count > 0, npo(delta), 0.0)
    sums, counts = sequence_sums(log_ratio, valid, sharding)
    delta = sums if granularity == "sequence" else sums / counts.clamp(min=1)
    return sequence_reduce(npo(delta), counts > 0, reduction, count, sharding)
