"""The SOUL repository's unlearning trainers (GA+FT, KL+FT, NPO), computed from logits.

Their ``compute_loss`` methods combine Hugging Face ``outputs.loss`` (the token-mean NLL under the
causal-LM shift) of a forget and a retain batch. The functions here give the same numbers through
this library's fused primitives, so a SOUL run can be reproduced in any training loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from ..losses.kl import kl_divergence
from ..losses.nll import ga_loss, nll_loss
from ..losses.npo import npo_loss as _npo_loss
from ..ops import Backend


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
    forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return forget + gamma * retain


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
    r"""SOUL's KL+FT: $-\gamma H + L_r$.

    Quirks kept: SOUL's "kl_loss" $H$ is a cross-entropy,
    $-\sum_v p_\theta(v) \log(p_{ref}(v) + 10^{-12})$, not a KL divergence, and it is averaged
    over **all** ``B x T`` positions of the forget batch, prompt and padding included, without the
    causal-LM shift. Here $H = \mathrm{KL}(P_\theta \| P_{ref}) + \mathcal{H}(P_\theta)$, with
    the entropy $\mathcal{H}(P) = \log V - \mathrm{KL}(P \| U)$ against the uniform $U$;
    the $10^{-12}$ moves the value only where a reference probability is below about
    $10^{-6}$ times the model's.
    """
    gamma = _checks.check_finite_number(gamma, "gamma")
    forget_logits = _checks.check_logits(forget_logits, "forget_logits")
    uniform = torch.zeros((), dtype=forget_logits.dtype, device=forget_logits.device)
    uniform = uniform.expand(forget_logits.shape)
    kl_to_ref = kl_divergence(forget_logits, ref_forget_logits, backend=backend)
    kl_to_uniform = kl_divergence(forget_logits, uniform, backend=backend)
    cross_entropy = kl_to_ref + (math.log(forget_logits.shape[-1]) - kl_to_uniform)
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return -gamma * cross_entropy + retain


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
