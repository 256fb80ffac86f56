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
#: ``UNIFORM_KL``: the log-sum-exp, the count V' of finite logits, and KL(U || P) itself
#: (:func:`uniform_kl_stats`);
#: ``INVERTED_HINGE``: the log-sum-exp, log p_y and log p_a (a: the runner-up, the largest
#: other logit; log p_a = -inf where the row has none).
STATS = 3
#: Rows of the JSD forward's per-row statistics: both log-sum-exps, the backward's row sum
#: ``sum_v p_v (log(m_v / p_v) - c)`` (``-KL(P || M) - c``), the divergence, the row's shift
#: (:func:`jsd_row_shift`) and its centre ``c`` (:func:`jsd_row_sum`).
JSD_STATS = 6
#: The largest log-ratio ``expm1`` is taken of (e^60 is far inside float32's range). A row whose
#: model puts more than e^60 times the reference's probability on a column takes its row
#: constant from the log-sum-exps; a mixture's log-ratio ``log(m / p)`` beyond it is held
#: there, short by ``d - 60`` where ``p < e^-60 q``: ``p log(m / p)`` is then off by less than
#: ``e^-61 q``.
JSD_FAR = 60.0


def uniform_kl_centre(largest: Tensor) -> Tensor:
    """The centre ``m`` that ME's partials of a row, or of a part of it, are formed about: the
    largest logit where that is finite, else 0 (no finite logit: the partials are 0; ``+inf`` or
    NaN: they are poisoned anyway)."""
    return torch.where(torch.isfinite(largest), largest, 0.0)


def uniform_kl_recentred(
    largest: Tensor, exp_sum: Tensor, count: Tensor, centred_sum: Tensor, new_largest: Tensor
) -> tuple[Tensor, Tensor]:
    r"""ME's partials of a part of a row, ``s = sum_v e^{z_v - m}`` and ``t = sum_v (z_v - m)``
    over its ``c`` finite logits about its centre ``m`` (:func:`uniform_kl_centre` of its
    ``largest`` logit), moved to the centre ``M`` of a larger ``new_largest``: ``s e^{m - M}``
    and ``t + c (m - M)``. Parts join by moving each to the largest centre and adding ``s``,
    ``c`` and ``t``: every term is formed at the scale of the logits' spread, never of their
    offset (the log-sum-exp and the sum of the logits, each rounded at the offset's scale,
    cancel in the KL). A part without a finite logit stays 0, whatever its centre."""
    gap = uniform_kl_centre(largest) - uniform_kl_centre(new_largest)
    gap = torch.where(count > 0, gap, 0.0)
    return exp_sum * torch.exp(gap), centred_sum + count * gap


def uniform_kl_value(exp_sum: Tensor, count: Tensor, centred_sum: Tensor) -> Tensor:
    r"""KL(U || P) from a whole row's partials ``s``, ``V'``, ``t`` (:func:`uniform_kl_recentred`):
    ``log(s / V') - t / V'``, which is ``lse - mean_v z_v - log V'`` with ``lse = m + log s``
    and the mean finite logit ``m + t / V'`` (the mean log-probability is the mean logit less
    the log-sum-exp). Exactly 0 on a uniform row (``s = V'``, ``t = 0``); NaN without a finite
    logit (0 / 0) and where a logit is NaN or ``+inf``."""
    return torch.log(exp_sum / count) - centred_sum / count


def uniform_kl_stats(
    largest: Tensor, exp_sum: Tensor, count: Tensor, centred_sum: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row statistics of ``UNIFORM_KL`` (:data:`STATS`) from a whole row's partials: its
    log-sum-exp ``m + log s`` (for the gradient), its count V' and KL(U || P)."""
    lse = uniform_kl_centre(largest) + torch.log(exp_sum)
    return lse, count, uniform_kl_value(exp_sum, count, centred_sum)


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


def jsd_row_shift(ratio: Tensor, largest: Tensor) -> Tensor:
    r"""The row's shift ``s``: ``log q_v - log p_v = s - a_v`` with the centred differences
    ``a_v = (z_v - z'_v) - (lse - lse')`` of a row's logits ``z`` and reference logits ``z'``.

    Where P is near Q, two log-softmaxes subtracted keep only the digits they share; ``z - z'``
    is exact there, so the log-ratio is centred on the logits instead: with the rounded
    log-sum-exps ``lse``, ``lse'`` the shift is what their difference misses,
    ``s = log sum_v q_v e^{a_v} = log1p(ratio)`` with ``ratio = sum_v q_v expm1(a_v)``, formed
    without cancellation (and exactly 0 where P = Q). Where the largest ``a_v`` exceeds
    :data:`JSD_FAR` (``expm1`` was clamped) the shift is 0: the log-sum-exps' difference, exact
    enough there.
    """
    return torch.where(largest > JSD_FAR, 0.0, torch.log1p(ratio))


def jsd_model_log_ratio(log_ratio: Tensor, beta: float) -> Tensor:
    r"""``log(m / p) = log1p((1 - beta) expm1(d))`` of the mixture ``m = beta p + (1 - beta) q``
    from ``d = log q - log p`` (:func:`jsd_row_shift`), without cancellation and without the
    log of the mixture (whose probabilities may underflow where neither side's do).

    ``expm1`` is taken of ``d`` clamped at :data:`JSD_FAR`. Exactly 0 at ``d = 0`` and finite
    for any ``d``. Q's side is the same with ``-d`` and ``beta``:
    ``log(m / q) = log1p(beta expm1(-d))``; :func:`jsd_mixture_terms` forms both, this one bit
    for bit as here (the gradient's centring relies on it, :func:`jsd_row_sum`).
    """
    return _mixture_side(log_ratio, 1.0 - beta)[1]


def _mixture_side(
    log_ratio: Tensor, weight: float, reference: bool = False
) -> tuple[Tensor, Tensor]:
    """``x = weight expm1(d)`` (``m / p - 1`` for ``d = log q - log p`` and Q's weight) and
    ``log1p(x)``, ``d`` clamped at :data:`JSD_FAR` for ``expm1``; with ``reference``, Q's side:
    ``expm1(-d)`` and P's weight."""
    if reference:
        ratio = log_ratio.clamp(min=-JSD_FAR).neg_()
    else:
        ratio = log_ratio.clamp(max=JSD_FAR)
    ratio.expm1_().mul_(weight)
    return ratio, torch.log1p(ratio)


#: The plain row sum gives way to the centred one where it would lose more than this factor of
#: its precision to cancellation (:func:`jsd_row_sum`).
JSD_CANCELLATION = 8.0


def jsd_row_sum(plain: Tensor, centred: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    r"""The backward's row sum ``S`` and centre ``c``, from the row sums ``sum_v p_v log(m_v /
    p_v)`` (``plain``) and ``sum_v p_v (log(m_v / p_v) - c_k)`` (``centred``), ``c_k = log(m_k
    / p_k)`` at a column ``k`` of the largest probability (``centre``, bit for bit as at ``k``).

    The gradient is ``p_j (S - (log(m_j / p_j) - c))`` with ``S = sum_v p_v (log(m_v / p_v) -
    c)``, for any ``c``. Where ``k`` holds almost all of P and the other columns' log-ratios are
    far from ``c_k``, the plain sum (``c = 0``) is nearly ``c_k``, and the gradient at ``k`` is
    the small difference of the two, rounded away; centred at ``c_k`` the inner difference at
    ``k`` is exactly 0 and ``S`` has no such term. Elsewhere centring only adds roundings (near
    P = Q its terms cancel to first order, ``sum_v p_v (m_v / p_v - 1) = 0``), so the centred
    sum is taken where it is small against ``c_k``, where the plain one would lose more than
    :data:`JSD_CANCELLATION` times its precision, and the plain one with ``c = 0`` elsewhere.
    """
    centring = centred.abs() * JSD_CANCELLATION < centre.abs()
    return torch.where(centring, centred, plain), torch.where(centring, centre, 0.0)


def jsd_mixture_terms(
    log_ratio: Tensor, probs: Tensor, ref_probs: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    r"""``log(m / p)`` (:func:`jsd_model_log_ratio`) and the terms of the row's divergence
    ``beta KL(P || M) + (1 - beta) KL(Q || M)``, without cancellation, from ``log_ratio =
    log q - log p`` and both probabilities.

    With ``m / p = 1 + x_p``, ``x_p = (1 - beta) expm1(d)``, and ``m / q = 1 + x_q``,
    ``x_q = beta expm1(-d)``: near P = Q the divergence is second order in ``d`` while
    ``p log(p / m)`` is first order, so its terms here are ``-beta t_p - (1 - beta) t_q`` with
    ``t_p = p log(m / p) - (m - p)`` and ``t_q = q log(m / q) - (m - q)``: the same row sum
    (``sum_v m_v = sum_v p_v = sum_v q_v``), every ``t`` ``<= 0``. Where ``x`` is small
    ``t_p = p (log1p(x_p) - x_p)`` by :func:`_log1p_less_identity`; elsewhere
    ``p log(m / p) - (1 - beta)(q - p)``, its two parts no longer near each other. Exactly 0
    where P = Q, and 0 at a zero probability on both sides; NaN stays NaN.
    """
    ratio_p, over_p = _mixture_side(log_ratio, 1.0 - beta)
    ratio_q, over_q = _mixture_side(log_ratio, beta, reference=True)
    # m - p = (1 - beta)(q - p) and m - q = -beta (q - p).
    difference = ref_probs - probs
    terms = []
    for ratio, over, weight, mixture_less_weight in (
        (ratio_p, over_p, probs, 1.0 - beta),
        (ratio_q, over_q, ref_probs, -beta),
    ):
        near_term, near = _log1p_less_identity(ratio)
        far_term = torch.mul(weight, over).sub_(difference, alpha=mixture_less_weight)
        terms.append(torch.where(near, near_term.mul_(weight), far_term, out=far_term))
    return over_p, terms[0].mul_(-beta).sub_(terms[1], alpha=1.0 - beta)


#: The coefficients ``1 / (2k + 3)`` of ``atanh(u) / u - 1 = u^2 (1/3 + u^2 / 5 + ...)`` that
#: :func:`_log1p_less_identity` sums.
ATANH_SERIES = tuple(1.0 / (2 * k + 3) for k in range(6))
#: Where that truncated series is exact to the dtype's rounding (its first term left out is
#: ``u^12 / 15`` of the leading one): ``|u| <= 0.3`` in float32, ``0.07`` in float64.
ATANH_REACH = {torch.float32: 0.3, torch.float64: 0.07}


def _log1p_less_identity(x: Tensor) -> tuple[Tensor, Tensor]:
    """``log1p(x) - x`` where ``u = x / (2 + x)`` lies within :data:`ATANH_REACH` (x within
    about ``[-0.46, 0.86]`` in float32), and that mask.

    ``log1p(x) = 2 atanh(u)`` and ``x - 2u = x u``, so ``log1p(x) - x = u (2 u^2 S(u^2) - x)``
    with ``S`` the series of :data:`ATANH_SERIES`: its two parts differ in size by ``u / 3`` at
    most, where ``log1p(x) - x`` itself would lose ``2 / |x|`` of its relative precision. Outside
    the mask the caller forms the term another way (the value here is then meaningless).
    """
    u = x.add(2.0)
    torch.div(x, u, out=u)
    square = torch.mul(u, u)
    series = torch.mul(square, ATANH_SERIES[-1]).add_(ATANH_SERIES[-2])
    for coefficient in reversed(ATANH_SERIES[:-2]):
        series.mul_(square).add_(coefficient)
    near = square <= ATANH_REACH[x.dtype] ** 2
    return series.mul_(square).mul_(2.0).sub_(x).mul_(u), near


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
