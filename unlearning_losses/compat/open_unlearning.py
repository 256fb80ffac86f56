"""open-unlearning's GradDiff, NPO, SimNPO and retain KL, computed from logits.

Each trainer returns ``gamma * forget + alpha * retain``, the retain term being the Hugging Face
NLL (``retain_loss_type="NLL"``) or :func:`retain_kl_loss` against a frozen reference (``"KL"``).
Defaults are those of the trainer classes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens
from ..losses.kl import kl_divergence
from ..losses.nll import ga_loss, nll_loss
from ..ops import Backend, label_logprobs

RetainLossType = Literal["NLL", "KL"]


def retain_kl_loss(logits: Tensor, ref_logits: Tensor, *, backend: Backend = "auto") -> Tensor:
    r"""open-unlearning's retain KL: ``kl_div(log p_theta, log p_ref, log_target=True, "batchmean")``.

    That is :math:`\mathrm{KL}(P_{ref} \| P_\theta)` averaged over **every** row of the flattened
    ``B x T`` logits. Quirk kept: prompt and padding positions count, and there is no shift; use
    :func:`unlearning_losses.kl_divergence` with ``labels`` and ``direction="reverse"`` to count
    only answer tokens.
    """
    return kl_divergence(logits, ref_logits, direction="reverse", backend=backend)


def _retain_term(
    retain_logits: Tensor,
    retain_labels: Tensor,
    retain_loss_type: str,
    ref_retain_logits: Tensor | None,
    ignore_index: int,
    backend: str,
) -> Tensor:
    _checks.check_choice(retain_loss_type, ("NLL", "KL"), "retain_loss_type")
    if retain_loss_type == "NLL":
        return nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    if ref_retain_logits is None:
        raise ValueError('retain_loss_type="KL" needs ref_retain_logits; got None')
    return retain_kl_loss(retain_logits, ref_retain_logits, backend=backend)


def _weights(gamma: float, alpha: float) -> tuple[float, float]:
    return _checks.check_finite_number(gamma, "gamma"), _checks.check_finite_number(alpha, "alpha")


def grad_diff_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's GradDiff: :math:`-\gamma L_f + \alpha\,\text{retain}`, HF token-mean NLLs."""
    gamma, alpha = _weights(gamma, alpha)
    forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = _retain_term(
        retain_logits, retain_labels, retain_loss_type, ref_retain_logits, ignore_index, backend
    )
    return gamma * forget + alpha * retain


def npo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's NPO: :math:`\gamma \frac{2}{\beta}\operatorname{softplus}(\beta\Delta_i)`
    averaged over sequences, :math:`\Delta_i` the summed log-ratio of sequence *i*, plus
    :math:`\alpha\,\text{retain}`.

    Quirk kept: a sequence without a valid label enters the mean with :math:`\Delta_i = 0`, adding
    :math:`2\log 2/\beta`; :func:`unlearning_losses.npo_loss` leaves it out.
    """
    gamma, alpha = _weights(gamma, alpha)
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    tokens = _tokens.align(
        forget_logits, forget_labels, ignore_index=ignore_index, shift=True, backend=backend
    )
    ref_forget_logits = _checks.check_like(ref_forget_logits, forget_logits, "ref_forget_logits")
    logprobs = label_logprobs(tokens.logits, tokens.targets, tokens.valid, backend=backend)
    with torch.no_grad():
        ref_logprobs = label_logprobs(
            tokens.batched(ref_forget_logits), tokens.targets, tokens.valid, backend=backend
        )
    delta = (logprobs - ref_logprobs).sum(-1)
    forget = (F.softplus(beta * delta) * (2.0 / beta)).mean()
    retain = _retain_term(
        retain_logits, retain_labels, retain_loss_type, ref_retain_logits, ignore_index, backend
    )
    return gamma * forget + alpha * retain


def simnpo_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    delta: float = 0.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's SimNPO: :math:`-\gamma\frac{2}{\beta}\log\sigma(\beta(S_i / n_i - \delta))`
    averaged over all sequences, plus :math:`\alpha\,\text{retain}`.

    Quirks kept: :math:`S_i` is the summed NLL over the shifted labels, but :math:`n_i` counts the
    *unshifted* labels, so a first label that is not ``ignore_index`` is counted without being
    scored; every sequence enters the mean. Difference: a sequence with :math:`n_i = 0` divides 0 by
    0 (NaN) there; here :math:`n_i` is taken as 1.
    """
    gamma, alpha = _weights(gamma, alpha)
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    delta = _checks.check_finite_number(delta, "delta")
    tokens = _tokens.align(
        forget_logits, forget_labels, ignore_index=ignore_index, shift=True, backend=backend
    )
    logprobs = label_logprobs(tokens.logits, tokens.targets, tokens.valid, backend=backend)
    unshifted_count = (tokens.batched(forget_labels) != ignore_index).sum(-1).clamp(min=1)
    mean_nll = -logprobs.sum(-1) / unshifted_count
    forget = (F.logsigmoid(beta * (mean_nll - delta)) * (-2.0 / beta)).mean()
    retain = _retain_term(
        retain_logits, retain_labels, retain_loss_type, ref_retain_logits, ignore_index, backend
    )
    return gamma * forget + alpha * retain
