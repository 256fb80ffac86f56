"""Negative Preference Optimization (NPO): the forget set as dispreferred answers only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops
from ..reductions import REDUCTIONS, Reduction, sequence_reduce, sequence_sums, token_reduce

Granularity = Literal["sequence", "sequence_mean", "token", "batch"]
GRANULARITIES: tuple[str, ...] = ("sequence", "sequence_mean", "token", "batch")


def reference_logprobs(
    tokens: _tokens.Tokens,
    logits: Tensor,
    ref_logprobs: Tensor | None,
    ref_logits: Tensor | None,
    backend: str,
) -> Tensor:
    """The reference model's per-token log-probs ``(B, L)``, from exactly one of the two sources."""
    if (ref_logprobs is None) == (ref_logits is None):
        raise ValueError(
            "give exactly one of ref_logprobs or ref_logits; got "
            + ("both" if ref_logprobs is not None else "neither")
        )
    if ref_logits is not None:
        ref_logits = _checks.check_like(ref_logits, logits, "ref_logits")
        with torch.no_grad():
            return ops.label_logprobs(
                tokens.batched(ref_logits), tokens.targets, tokens.valid, backend=backend
            )
    expected = tuple(tokens.unflatten(tokens.targets).shape)
    ref_logprobs = _checks.check_token_values(ref_logprobs, expected, tokens.logits, "ref_logprobs")
    return ref_logprobs.detach().reshape(tokens.targets.shape)


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
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""NPO forget loss (Zhang et al., 2024, "Negative Preference Optimization"), to minimize.

    With :math:`\Delta` the log-likelihood ratio of the model to the frozen reference,

    .. math:: \mathcal{L}_{NPO} = \frac{2}{\beta} \operatorname{softplus}(\beta \Delta)
              = -\frac{2}{\beta} \log \sigma(-\beta \Delta)

    where ``granularity`` sets :math:`\Delta`:

    - ``"sequence"`` (NPO paper, open-unlearning): :math:`\Delta_i = \sum_{t \in M_i} (\ell_t - r_t)`,
      averaged over sequences that have a valid token;
    - ``"sequence_mean"``: :math:`\Delta_i` is the mean instead of the sum;
    - ``"token"`` (the SOUL paper's formula): the loss of each token, averaged over tokens;
    - ``"batch"`` (the SOUL code): one :math:`\Delta`, the token mean over the batch; a scalar for
      every ``reduction``.

    The gradient is :math:`2\sigma(\beta\Delta)\,\nabla\Delta`: gradient ascent on the NLL, damped as
    the model moves away from the reference. As :math:`\beta \to 0` the loss tends to
    :math:`2\log 2/\beta + \Delta`. 2-D input is one sequence.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being unlearned.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ref_logprobs: the reference model's per-token log-probs, shaped like
            :func:`token_logprobs`' output (already shifted); cache them once per forget batch.
        ref_logits: or the reference model's logits, shaped like ``logits``. Give exactly one.
        beta: inverse temperature, > 0.
        granularity: ``"sequence"``, ``"sequence_mean"``, ``"token"`` or ``"batch"``.
        ignore_index, shift, backend, validate, inplace_backward: as :func:`ga_loss`.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (per sequence ``(B,)``, 0 for a sequence
            without valid tokens; per token for ``"token"``).

    Returns:
        A float32 scalar (float64 for float64 logits), or per-sequence / per-token values.
    """
    tokens = _tokens.align(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend, validate=validate
    )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    _checks.check_choice(granularity, GRANULARITIES, "granularity")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    ref = reference_logprobs(tokens, logits, ref_logprobs, ref_logits, backend)
    logprobs = ops.label_logprobs(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
    )
    result = npo_from_logprobs(logprobs, ref, tokens.valid, beta, granularity, reduction)
    return tokens.unflatten(result) if granularity == "token" else result


def npo_from_logprobs(
    logprobs: Tensor, ref: Tensor, valid: Tensor, beta: float, granularity: str, reduction: str
) -> Tensor:
    """NPO of per-token model and reference log-probs ``(B, L)`` (see :func:`npo_loss`)."""
    log_ratio = (logprobs - ref.to(logprobs.dtype)).masked_fill(~valid, 0.0)

    def npo(delta: Tensor) -> Tensor:
        return F.softplus(beta * delta) * (2.0 / beta)

    if granularity == "token":
        return token_reduce(npo(log_ratio), valid, reduction)
    if granularity == "batch":
        count = valid.sum()
        delta = log_ratio.sum() / count.clamp(min=1)
        return torch.where(count > 0, npo(delta), 0.0)
    sums, counts = sequence_sums(log_ratio, valid)
    delta = sums if granularity == "sequence" else sums / counts.clamp(min=1)
    return sequence_reduce(npo(delta), counts > 0, reduction)
