"""Token-weighted gradient ascent: WGA, SatImp and TNPO.

Each is the token mean of ``w_t * log p(y_t)`` with a per-token weight ``w_t`` computed from the
detached log-probs, so its gradient is gradient ascent on the NLL with every token rescaled. The
weights are constants of the backward: one fused log-prob pass, one gradient buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import Reduction
from .common import LogprobMean, reference_logprobs, weights_from_logprobs


@shared_arguments
def wga_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    beta: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""Weighted gradient ascent (WGA) forget loss, to minimize.

    $$
    \mathcal{L}_{WGA} = \frac{1}{|M|}\sum_{t\in M} \operatorname{sg}\!\big[p_t^{\beta}\big]\,\ell_t,
    \qquad p_t = e^{\ell_t}
    $$

    (Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
    Beyond"). Tokens the model already finds unlikely get small weights, so the ascent stops
    pushing them once forgotten; ``beta = 0`` is :func:`ga_loss`. ``sg`` is stop-gradient.

    Args:
        beta: the weight's exponent, >= 0 (default 1.0, open-unlearning's).
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> wga_loss(logits, labels, beta=1.0), 0.25 * math.log(0.25)  # sg[p^beta] log p
        (tensor(-0.3466), -0.34657359027997264)
    """
    beta = _checks.check_finite_number(beta, "beta", nonnegative=True)

    def weights(logprobs: Tensor) -> Tensor:
        return torch.exp(beta * logprobs)

    return LogprobMean.of(locals())(logits, labels, weights_from_logprobs(weights))


@shared_arguments
def satimp_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    beta1: float = 5.0,
    beta2: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""SatImp forget loss (saturation x importance token weights), to minimize.

    $$
    \mathcal{L}_{SatImp} = \frac{1}{|M|}\sum_{t\in M}
    \operatorname{sg}\!\big[p_t^{\beta_1} (1 - p_t)^{\beta_2}\big]\,\ell_t
    $$

    (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning").
    $1 - p_t$ is formed as ``-expm1(l_t)``, exact for tokens the model is sure of.

    Args:
        beta1: exponent of $p_t$, >= 0 (default 5.0, open-unlearning's).
        beta2: exponent of $1 - p_t$, >= 0 (default 1.0).
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> satimp_loss(logits, labels, beta1=1.0, beta2=1.0), 0.25 * 0.75 * math.log(0.25)
        (tensor(-0.2599), -0.25993019270997947)
    """
    beta1 = _checks.check_finite_number(beta1, "beta1", nonnegative=True)
    beta2 = _checks.check_finite_number(beta2, "beta2", nonnegative=True)

    def weights(logprobs: Tensor) -> Tensor:
        return torch.exp(beta1 * logprobs) * (-torch.expm1(logprobs)).pow(beta2)

    return LogprobMean.of(locals())(logits, labels, weights_from_logprobs(weights))


@shared_arguments
def tnpo_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""Token-wise NPO (TNPO) forget loss, to minimize.

    $$
    \mathcal{L}_{TNPO} = \frac{1}{|M|}\sum_{t\in M}
    \operatorname{sg}\!\big[2\sigma(\beta(\ell_t - r_t))\big]\,\ell_t
    $$

    with $r_t$ the reference model's log-prob of the same token (Wang et al., 2025,
    "Rethinking LLM Unlearning Objectives"). The weight is the factor that NPO's gradient puts on
    $\nabla \ell$, taken per token instead of per sequence: 1 at the reference, fading as the
    token is forgotten. The value is the weighted log-likelihood, not the NPO loss; the gradients
    agree with ``npo_loss(granularity="token")``.

    Args:
        ref_logprobs: the reference, exactly one, as in :func:`npo_loss`.
        ref_logits: the reference, exactly one, as in :func:`npo_loss`.
        beta: inverse temperature, > 0 (default 0.1, as :func:`npo_loss`).
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # at the reference every weight is 2 sigmoid(0) = 1: the log-likelihood itself
        >>> tnpo_loss(logits, labels, ref_logits=logits), math.log(1 / 4)
        (tensor(-1.3863), -1.3862943611198906)
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)

    def weights_for(tokens: _tokens.Tokens) -> Callable[[Tensor], Tensor]:
        ref = reference_logprobs(tokens, ref_logprobs, ref_logits, backend)

        def npo_gradient_weights(logprobs: Tensor) -> Tensor:
            return 2.0 * torch.sigmoid(beta * (logprobs - ref.to(logprobs.dtype)))

        return npo_gradient_weights

    return LogprobMean.of(locals())(logits, labels, weights_for)
