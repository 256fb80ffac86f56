"""SOUL's unlearning trainers (GA+FT, GA+KL, KL, NPO, and the KL+FT of the SOUL paper's supplementary note), computed from logits.

Their ``compute_loss`` methods combine Hugging Face ``outputs.loss`` (the token-mean NLL under the
causal-LM shift) of a forget and a retain batch. The functions here give the same numbers through
this library's fused primitives, so a SOUL run can be reproduced in any training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..losses.nll import ga_loss, nll_loss
from ..losses.npo import npo_loss as _npo_loss
from ..ops import Backend, reference_cross_entropy
from .arguments import check_backend, check_compared, check_scored, check_scored_compared

#: SOUL's additive epsilon inside ``log(q + eps)``.
SOUL_EPSILON = 1e-12


def ga_ft_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    gamma: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""SOUL's GA+FT: $-L_f + \gamma L_r$, both Hugging Face token-mean NLLs.

    Quirk kept: none beyond the objective itself. Difference: a batch without a valid label gives
    0 here where Hugging Face's mean gives NaN.
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return forget + gamma * retain


def _soul_cross_entropy(logits: Tensor, ref_logits: Tensor, backend: Backend) -> Tensor:
    """SOUL's ``kl_loss``: ``-sum_v p_v log(q_v + 1e-12)`` averaged over every ``B x T`` row,
    of logits and a reference checked by :func:`check_compared`."""
    batched = logits if logits.dim() == 3 else logits.unsqueeze(0)
    every_row = torch.ones(batched.shape[:2], dtype=torch.bool, device=logits.device)
    per_row = reference_cross_entropy(
        batched,
        ref_logits.reshape(batched.shape),
        every_row,
        eps=SOUL_EPSILON,
        backend=backend,
    )
    return per_row.mean()


def kl_ft_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    gamma: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""SOUL's KL+FT (its paper's supplementary note): $-\gamma H_f + L_r$.

    Quirks kept: SOUL's "kl_loss" $H$ is a cross-entropy,
    $-\sum_v p_\theta(v) \log(p_{ref}(v) + 10^{-12})$, not a KL divergence, averaged over
    **all** ``B x T`` positions of the forget batch, prompt and padding included, without the
    causal-LM shift; the $10^{-12}$ is kept too (it caps $-\log p_{ref}$ at 27.6 where the
    reference's probability underflows, which KL ascent seeks out).
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    ref_forget = check_compared(forget_logits, ref_forget_logits, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    cross_entropy = _soul_cross_entropy(forget_logits, ref_forget, backend)
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return -gamma * cross_entropy + retain


def kl_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    gamma: float = 1.0,
    backend: Backend = "auto",
) -> Tensor:
    r"""SOUL's ``KL`` trainer: $-\gamma H_f + H_r$, with SOUL's cross-entropy to the frozen
    model on both sets.

    Quirks kept: $H$ as in :func:`kl_ft_loss` (a cross-entropy with $+10^{-12}$ inside the log,
    averaged over every position, no shift, no mask) on the forget **and** the retain batch; the
    retain term has no weight. Labels are never read.
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    ref_forget = check_compared(forget_logits, ref_forget_logits, "forget_logits")
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    check_backend(backend)
    forget = _soul_cross_entropy(forget_logits, ref_forget, backend)
    retain = _soul_cross_entropy(retain_logits, ref_retain, backend)
    return -gamma * forget + retain


def ga_kl_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    gamma: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""SOUL's ``GA_KL`` trainer ("GA+KL"): $-L_f + \gamma H_r$, $L_f$ the Hugging Face
    token-mean NLL of the forget batch and $H_r$ SOUL's cross-entropy to the frozen model on the
    retain batch (as in :func:`kl_ft_loss`).

    Note: SOUL's ``get_unlearn_method("GA+KL")`` builds this trainer without ``if_kl=True``, so it
    has no frozen model and cannot run as shipped; this is what its ``compute_loss`` computes once
    one is given. Difference: a forget batch without a valid label gives 0 here, NaN there.
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    check_backend(backend)
    forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = _soul_cross_entropy(retain_logits, ref_retain, backend)
    return forget + gamma * retain


def npo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    gamma: float = 1.0,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""SOUL's NPO: $\frac{2}{\beta}\operatorname{softplus}(\beta\Delta) + \gamma L_r$.

    Quirk kept: $\Delta$ is one number per batch, the difference of the model's and the
    reference's token-mean NLLs over the whole forget batch (``granularity="batch"``), where the NPO
    paper uses one per sequence; $\beta = 0.1$ is hard-coded there.
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _npo_loss(
        forget_logits,
        forget_labels,
        ref_logits=ref_forget_logits,
        beta=beta,
        granularity="batch",
        ignore_index=ignore_index,
        backend=backend,
    )
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return forget + gamma * retain
