"""The numerics of the per-token quantities that reduce a row over the whole vocabulary beyond its
log-sum-exp: the KL from the uniform distribution (ME), the inverted hinge (IHL) and the
generalised Jensen-Shannon divergence to a reference (JSD).

Each value and each gradient coefficient is written here once; the chunked and the
vocabulary-parallel paths call these functions, the Triton launchers form their per-row
coefficients with them, and the Triton kernels implement the same formulas element by element
(taking their mode numbers from :data:`KERNEL_VOCAB_MODES`).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor


class VocabMode(str, Enum):
    """The per-token quantities of one distribution P = softmax(z) that need more of each row than
    its log-sum-exp. The values travel as these strings through the custom ops and as the
    integers of :data:`KERNEL_VOCAB_MODES` into the Triton kernels."""

    UNIFORM_KL = "uniform_kl"
    """KL(U || P) = -log V' - (1/V') sum_v log p_v, U uniform over the V' finite logits of the row
    (maximum-entropy unlearning)."""
    INVERTED_HINGE = "inverted_hinge"
    """1 + p_y - max_{v != y} p_v (inverted hinge unlearning; the first maximum on ties)."""


#: The ``MODE`` integer the Triton kernels branch on, by mode.
KERNEL_VOCAB_MODES = {mode: index for index, mode in enumerate(VocabMode)}

#: Rows of the per-row statistics a forward of :class:`VocabMode` returns beside its values:
#: ``UNIFORM_KL``: the log-sum-exp, the count V' of finite logits, and the sum of those logits;
#: ``INVERTED_HINGE``: the log-sum-exp, log p_y and log p_a (a: the runner-up, the largest
#: other logit; log p_a = -inf where the row has none).
STATS = 3
#: Rows of the JSD forward's per-row statistics: both log-sum-exps, ``sum_v p_v log(m_v / p_v)``
#: (``-KL(P || M)``, which the backward reads) and ``sum_v q_v log(m_v / q_v)``.
JSD_STATS = 4


def uniform_kl_value(lse: Tensor, count: Tensor, total: Tensor) -> Tensor:
    """KL(U || P) from a row's log-sum-exp, its count V' of finite logits and their sum:
    ``lse - total / V' - log V'`` (the mean log-probability is the mean logit less the
    log-sum-exp)."""
    return lse - total / count - torch.log(count)


def uniform_kl_coefficients(count: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient ``d(scale * KL(U || P)) / dz_j = scale p_j - scale [z_j finite] / V'`` as its
    two per-row coefficients: of ``p_j``, and of the finite columns."""
    return scale, scale / count


def hinge_value(label_logprob: Tensor, other_logprob: Tensor) -> Tensor:
    """``1 + p_y - p_a`` from the label's and the runner-up's log-probabilities."""
    return 1.0 + torch.exp(label_logprob) - torch.exp(other_logprob)


def hinge_coefficients(
    label_logprob: Tensor, other_logprob: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient of ``scale * (1 + p_y - p_a)`` as three per-row coefficients.

    With ``c = p_y - p_a``, ``d / dz_j = scale (p_y [j = y] - p_a [j = a] - c p_j)``: the
    coefficient of ``p_j`` everywhere (``-scale c``), and the whole entries at the label,
    ``scale p_y (1 - p_y + p_a)``, and at the runner-up, ``-scale p_a (1 + c)``. The label's is
    formed with ``1 - p_y = -expm1(log p_y)``: exact where ``p_y`` is near 1, where the sum of
    its two parts would cancel.
    """
    p_label, p_other = torch.exp(label_logprob), torch.exp(other_logprob)
    difference = p_label - p_other
    label_term = scale * p_label * (p_other - torch.expm1(label_logprob))
    return -scale * difference, label_term, -scale * p_other * (1.0 + difference)


def jsd_log_ratios(delta: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``log(m / p)`` and ``log(m / q)`` of the mixture ``m = beta p + (1 - beta) q`` from
    ``delta = log q - log p`` (both log-probabilities floored at the lowest finite value).

    ``log(m / p) = log(beta + (1 - beta) e^delta)`` is never formed as the log of a sum that may
    underflow, nor as a difference of two logs: with ``w`` the weight of the smaller side,
    ``L = log1p(w expm1(-|delta|))`` lies in ``[log w, 0]`` and ``log(m / p) = L + max(delta,
    0)``, ``log(m / q) = L - min(delta, 0)``. Both are exactly 0 at ``delta = 0`` (p = q) and
    finite for any finite ``delta``, so a zero probability times either is 0; NaN stays NaN.
    """
    e = torch.expm1(-delta.abs())
    # A 0-d tensor of delta's dtype: two Python numbers would make a float32 tensor.
    weight = torch.where(delta > 0, delta.new_full((), beta), 1.0 - beta)
    shared = torch.log1p(weight * e)
    return shared + delta.clamp_min(0.0), shared - delta.clamp_max(0.0)


def jsd_value(over_p: Tensor, over_q: Tensor, beta: float) -> Tensor:
    """``beta KL(P || M) + (1 - beta) KL(Q || M)`` from the row sums ``sum_v p_v log(m_v / p_v)``
    (``= -KL(P || M)``) and ``sum_v q_v log(m_v / q_v)``."""
    return -beta * over_p - (1.0 - beta) * over_q


def jsd_of_label(label_logprob: Tensor, beta: float) -> Tensor:
    """The generalised JSD to the one-hot distribution of the label, from ``log p_y`` alone.

    With ``q = onehot(y)`` the mixture is ``beta p`` off the label and ``m_y = 1 - beta (1 -
    p_y)`` at it, so ``beta KL(P || M) + (1 - beta) KL(Q || M) = -beta (1 - p_y) log beta + beta
    p_y log p_y - m_y log m_y``; ``1 - p_y`` and ``log m_y`` are formed with ``expm1`` and
    ``log1p`` (no cancellation where ``p_y`` is near 1; exactly 0 at ``p_y = 1``).
    """
    p_label = torch.exp(label_logprob)
    off_label = torch.expm1(label_logprob)  # p_y - 1
    log_mixture = torch.log1p(beta * off_label)
    return (
        beta * math.log(beta) * off_label
        + beta * p_label * label_logprob
        - (1.0 + beta * off_label) * log_mixture
    )
