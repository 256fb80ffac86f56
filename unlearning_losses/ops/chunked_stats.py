"""The chunked PyTorch backend of the vocabulary statistics (``vocab_numerics``): ME's KL from the
uniform distribution, the inverted hinge, and the generalised JSD to a reference.

As in ``chunked``, rows ``[:, :L]`` of the logits are walked in chunks of a bounded number of
bytes (no float32 ``(N, V)`` temporary), per-row statistics are kept in float32 (float64 for
float64 logits), and each backward writes the gradient, rounded once, into one buffer in the
logits' dtype (which may be the logits themselves). The per-chunk functions here also serve the
vocabulary-parallel path, where a chunk holds one rank's columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunked import Scratch, row_chunks, row_groups, zero_ignored_rows_, zero_outside
from .numerics import accumulation_dtype, floored_logprob
from .vocab_numerics import (
    JSD_FAR,
    JSD_STATS,
    STATS,
    VocabMode,
    hinge_coefficients,
    hinge_value,
    jsd_mixture_terms,
    jsd_model_log_ratio,
    jsd_row_shift,
    jsd_row_sum,
    uniform_kl_centre,
    uniform_kl_coefficients,
    uniform_kl_stats,
)

# --- per chunk: partial statistics and gradients, shared with the vocabulary-parallel path ----

#: The JSD statistics the backward reads, in ``jsd_model_gradient``'s order: both log-sum-exps,
#: the shift, the centre and the centred row sum.
JSD_GRADIENT_ROWS = (0, 1, 4, 5, 2)


def uniform_kl_partials(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ME's partials of a chunk's rows (``vocab_numerics.uniform_kl_recentred``): the largest
    logit, and about its centre ``m``, ``sum_v e^{z_v - m}``, the count of finite logits and the
    sum of their differences from ``m``. ``-inf`` entries (a masked vocabulary) lie outside the
    uniform distribution's support; NaN and ``+inf`` count and poison the sums."""
    largest = x.amax(-1)
    finite = x != float("-inf")
    shifted = torch.sub(x, uniform_kl_centre(largest)[..., None])
    centred_sum = torch.where(finite, shifted, 0.0).sum(-1)
    exp_sum = shifted.exp_().sum(-1)
    return largest, exp_sum, finite.sum(-1).to(x.dtype), centred_sum


def hinge_partials(x: Tensor, targets: Tensor, has_label: Tensor) -> tuple[Tensor, ...]:
    """A chunk's log-sum-exps, label logits (0 where ``has_label`` is False), and the largest
    other logit with its column (the first on ties; ``-inf`` and any column where there is
    none). ``targets``: ``(..., 1)`` columns of the labels, any column where not ``has_label``."""
    picked = x.gather(-1, targets)
    label = torch.where(has_label, picked.squeeze(-1), 0.0)
    # The label's column out of the running (where it lies in this chunk's columns).
    others = x.scatter(-1, targets, torch.where(has_label[..., None], float("-inf"), picked))
    column = others.argmax(-1, keepdim=True)
    other = others.gather(-1, column).squeeze(-1)
    return torch.logsumexp(x, -1), label, other, column.squeeze(-1)


def jsd_difference(x: Tensor, ref: Tensor) -> Tensor:
    """``z - z'``, both logits floored at the lowest finite value first (masked entries give
    finite differences; NaN stays NaN): exact where the logits are close."""
    floor = torch.finfo(x.dtype).min
    return torch.clamp_min(x, floor).sub_(ref.clamp_min(floor))


def jsd_centred(x: Tensor, ref: Tensor, lse: Tensor, ref_lse: Tensor) -> Tensor:
    """``a = (z - z') - (lse - lse')`` of a chunk (``vocab_numerics.jsd_row_shift``): ``log p -
    log q`` up to the row's shift, from the logits' :func:`jsd_difference`."""
    return jsd_difference(x, ref).sub_((lse - ref_lse)[..., None])


def jsd_probs(x: Tensor, lse: Tensor) -> Tensor:
    """The probabilities ``exp(z - lse)`` of a chunk (0 at ``-inf`` logits)."""
    return torch.sub(x, lse[..., None]).exp_()


def jsd_shift_terms(centred: Tensor, ref_probs: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk's ``sum_v q_v expm1(a_v)`` (``expm1`` clamped at ``JSD_FAR``) and its largest
    ``a_v``, from which ``vocab_numerics.jsd_row_shift`` makes the row's shift."""
    ratio = torch.linalg.vecdot(ref_probs, centred.clamp(max=JSD_FAR).expm1_())
    return ratio, centred.amax(-1)


def jsd_partials(
    centred: Tensor,
    probs: Tensor,
    ref_probs: Tensor,
    shift: Tensor,
    beta: float,
    centre: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A chunk's ``sum_v p_v log(m_v / p_v)``, ``sum_v p_v (log(m_v / p_v) - c)``, its part of
    the divergence and the centre ``c`` (``vocab_numerics.jsd_row_sum``), from its centred
    differences and the rows' shifts. ``centre``: ``c`` where known (the vocabulary-parallel
    path's); otherwise ``log(m / p)`` at a column of the row's largest probability."""
    over_p, terms = jsd_mixture_terms(shift[..., None] - centred, probs, ref_probs, beta)
    if centre is None:
        centre = over_p.gather(-1, probs.argmax(-1, keepdim=True)).squeeze(-1)
    plain = torch.linalg.vecdot(probs, over_p)
    centred_sum = torch.linalg.vecdot(probs, over_p.sub_(centre[..., None]))
    return plain, centred_sum, terms.sum(-1), centre


def jsd_model_gradient(
    x: Tensor, ref: Tensor, row_stats: tuple[Tensor, ...], beta: float
) -> Tensor:
    """``p_j (log(p_j / m_j) - KL(P || M))`` of a chunk, the JSD's gradient over ``beta``
    (``d JSD / d p_v = beta log(p_v / m_v)``, through the softmax), as ``p_j (S - (log(m_j /
    p_j) - c))`` from the rows' ``lse``, ``lse'``, shift, centre ``c`` and ``S = sum_v p_v
    (log(m_v / p_v) - c)`` (``vocab_numerics.jsd_model_log_ratio``); exactly 0 where P = Q."""
    lse, ref_lse, shift, centre, centred_sum = row_stats
    log_ratio = jsd_centred(x, ref, lse, ref_lse).neg_().add_(shift[..., None])
    inner = jsd_model_log_ratio(log_ratio, beta).sub_(centre[..., None])
    return inner.neg_().add_(centred_sum[..., None]).mul_(jsd_probs(x, lse))


def uniform_kl_gradient(x: Tensor, lse: Tensor, on_probs: Tensor, on_finite: Tensor) -> Tensor:
    """``on_probs p_j - on_finite [z_j finite]`` of a chunk (see ``uniform_kl_coefficients``)."""
    p = torch.sub(x, lse[..., None]).exp_()
    finite_term = torch.where(x == float("-inf"), 0.0, on_finite[..., None])
    return p.mul_(on_probs[..., None]).sub_(finite_term)


def hinge_probs_term(x: Tensor, lse: Tensor, on_probs: Tensor) -> Tensor:
    """``on_probs p_j`` of a chunk: the inverted hinge's gradient off the label and runner-up."""
    return torch.sub(x, lse[..., None]).exp_().mul_(on_probs[..., None])


# --- one process: forward and backward over every chunk ---------------------------------------


def vocab_forward(
    logits: Tensor, targets: Tensor, valid: Tensor, mode: VocabMode
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token value of ``mode`` over rows ``[:, :L]`` (0 where not valid), the per-row
    statistics ``(STATS, B, L)`` of ``vocab_numerics.STATS`` and the runner-up's column
    (``INVERTED_HINGE``; -1 where none, and for ``UNIFORM_KL``)."""
    acc = accumulation_dtype(logits.dtype)
    stats = torch.zeros((STATS, *valid.shape), dtype=acc, device=logits.device)
    index = torch.full(valid.shape, -1, dtype=torch.long, device=logits.device)
    safe_targets = torch.where(valid, targets, 0)
    upcast = Scratch(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        x = upcast.upcast(logits[b, t])
        if mode == VocabMode.UNIFORM_KL:
            # Whole rows: their partials make the statistics at once.
            for row, value in enumerate(uniform_kl_stats(*uniform_kl_partials(x))):
                stats[row, b, t] = value
            continue
        has_label = torch.ones_like(valid[b, t])
        lse, label, other, column = hinge_partials(x, safe_targets[b, t, None], has_label)
        stats[0, b, t], stats[1, b, t], stats[2, b, t] = lse, label, other
        index[b, t] = torch.where(other == float("-inf"), -1, column)
    if mode == VocabMode.UNIFORM_KL:
        value = stats[2]
    else:
        lse = stats[0]
        stats[1] = floored_logprob(stats[1] - lse, lse)
        stats[2] = stats[2] - lse
        value = hinge_value(stats[1], stats[2])
    return torch.where(valid, value, 0.0), stats, index


def vocab_coefficients(
    grad_out: Tensor, valid: Tensor, stats: Tensor, mode: VocabMode
) -> tuple[Tensor, ...]:
    """The per-row gradient coefficients of ``mode`` (``vocab_numerics``), 0 where not valid:
    ``UNIFORM_KL``: of ``p`` and of the finite columns; ``INVERTED_HINGE``: of ``p``, and the
    label's and the runner-up's entries."""
    scale = torch.where(valid, grad_out.to(stats.dtype), 0.0)
    coefficients: tuple[Tensor, ...]
    if mode == VocabMode.UNIFORM_KL:
        coefficients = uniform_kl_coefficients(stats[1], scale)
    else:
        coefficients = hinge_coefficients(stats[1], stats[2], scale)
    # An ignored row has no statistics (a count of 0): its coefficients are 0, not 0 / 0.
    return tuple(torch.where(valid, c, 0.0) for c in coefficients)


def vocab_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    stats: Tensor,
    index: Tensor,
    mode: VocabMode,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * value) / d logits into ``grad`` (which may be ``logits`` itself)."""
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    coefficients = vocab_coefficients(grad_out, valid, stats, mode)
    safe_targets = torch.where(valid, targets, 0)[..., None]
    # No runner-up: its entry (0) goes to the label, which the label's entry then overwrites.
    safe_index = torch.where(index >= 0, index, safe_targets.squeeze(-1))[..., None]
    upcast = Scratch(logits, stats.dtype)
    lse = stats[0]
    for b, t in row_chunks(groups, logits.shape[-1]):
        x = upcast.upcast(logits[b, t])
        if mode == VocabMode.UNIFORM_KL:
            inner = uniform_kl_gradient(x, lse[b, t], coefficients[0][b, t], coefficients[1][b, t])
        else:
            on_probs, label_term, other_term = (c[b, t, None] for c in coefficients)
            inner = hinge_probs_term(x, lse[b, t], on_probs.squeeze(-1))
            inner.scatter_(-1, safe_index[b, t], other_term)
            inner.scatter_(-1, safe_targets[b, t], label_term)
        # An ignored row's logits may be NaN (padding): its gradient is 0, not NaN * 0.
        zero_ignored_rows_(inner, valid[b, t])
        grad[b, t] = inner


def jsd_forward(
    logits: Tensor, ref_logits: Tensor, valid: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-token generalised JSD over rows ``[:, :L]`` (0 where not valid) and the per-row
    statistics ``(JSD_STATS, B, L)`` of ``vocab_numerics.JSD_STATS``."""
    acc = accumulation_dtype(logits.dtype)
    stats = torch.zeros((JSD_STATS, *valid.shape), dtype=acc, device=logits.device)
    upcast, ref_upcast = Scratch(logits, acc), Scratch(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        x, ref = upcast.upcast(logits[b, t]), ref_upcast.upcast(ref_logits[b, t])
        lse, ref_lse = torch.logsumexp(x, -1), torch.logsumexp(ref, -1)
        centred = jsd_centred(x, ref, lse, ref_lse)
        probs, ref_probs = jsd_probs(x, lse), jsd_probs(ref, ref_lse)
        shift = jsd_row_shift(*jsd_shift_terms(centred, ref_probs))
        stats[0, b, t], stats[1, b, t], stats[4, b, t] = lse, ref_lse, shift
        plain, centred_sum, divergence, centre = jsd_partials(
            centred, probs, ref_probs, shift, beta
        )
        stats[2, b, t], stats[5, b, t] = jsd_row_sum(plain, centred_sum, centre)
        stats[3, b, t] = divergence
    return torch.where(valid, stats[3], 0.0), stats


def jsd_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    stats: Tensor,
    beta: float,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * JSD) / d logits into ``grad`` (which may be ``logits`` itself):
    ``beta p_j (log(p_j / m_j) - KL(P || M))`` per unit of upstream gradient."""
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    scale = torch.where(valid, grad_out.to(stats.dtype), 0.0) * beta
    upcast, ref_upcast = Scratch(logits, stats.dtype), Scratch(logits, stats.dtype)
    for b, t in row_chunks(groups, logits.shape[-1]):
        x, ref = upcast.upcast(logits[b, t]), ref_upcast.upcast(ref_logits[b, t])
        row_stats = tuple(stats[k, b, t] for k in JSD_GRADIENT_ROWS)
        inner = jsd_model_gradient(x, ref, row_stats, beta)
        zero_ignored_rows_(inner, valid[b, t])
        torch.mul(inner, scale[b, t, None], out=grad[b, t])
