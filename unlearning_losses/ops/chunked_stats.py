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
    JSD_STATS,
    STATS,
    VocabMode,
    hinge_coefficients,
    hinge_value,
    jsd_log_ratios,
    jsd_value,
    uniform_kl_coefficients,
    uniform_kl_value,
)

# --- per chunk: partial statistics and gradients, shared with the vocabulary-parallel path ----


def uniform_kl_partials(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's log-sum-exps, counts of finite logits and sums of them (``-inf`` entries, a
    masked vocabulary, lie outside the uniform distribution's support; NaN and ``+inf`` count
    and poison the sum)."""
    finite = x != float("-inf")
    return torch.logsumexp(x, -1), finite.sum(-1).to(x.dtype), x.masked_fill(~finite, 0.0).sum(-1)


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


def jsd_log_probs(x: Tensor, lse: Tensor) -> Tensor:
    """``log p = z - lse`` of a chunk, floored at the lowest finite value (a masked entry, or
    logits spanning more than the dtype's range), so that log-ratios stay finite."""
    return torch.sub(x, lse[..., None]).clamp_min_(torch.finfo(x.dtype).min)


def jsd_partials(
    x: Tensor, ref: Tensor, lse: Tensor, ref_lse: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """A chunk's ``sum_v p_v log(m_v / p_v)`` and ``sum_v q_v log(m_v / q_v)`` (minus the two
    KLs to the mixture) given the rows' log-sum-exps."""
    logp, logq = jsd_log_probs(x, lse), jsd_log_probs(ref, ref_lse)
    over_p, over_q = jsd_log_ratios(logq - logp, beta)
    return torch.linalg.vecdot(logp.exp_(), over_p), torch.linalg.vecdot(logq.exp_(), over_q)


def jsd_model_gradient(
    x: Tensor, ref: Tensor, lse: Tensor, ref_lse: Tensor, over_p_sum: Tensor, beta: float
) -> Tensor:
    """``p_j (log(p_j / m_j) - KL(P || M))`` of a chunk, the JSD's gradient over ``beta``
    (``d JSD / d p_v = beta log(p_v / m_v)``, through the softmax), from the row sum
    ``over_p_sum = sum_v p_v log(m_v / p_v) = -KL(P || M)``; exactly 0 where P = Q."""
    logp, logq = jsd_log_probs(x, lse), jsd_log_probs(ref, ref_lse)
    over_p, _ = jsd_log_ratios(logq - logp, beta)
    return over_p.neg_().add_(over_p_sum[..., None]).mul_(logp.exp_())


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
            for row, value in enumerate(uniform_kl_partials(x)):
                stats[row, b, t] = value
            continue
        has_label = torch.ones_like(valid[b, t])
        lse, label, other, column = hinge_partials(x, safe_targets[b, t, None], has_label)
        stats[0, b, t], stats[1, b, t], stats[2, b, t] = lse, label, other
        index[b, t] = torch.where(other == float("-inf"), -1, column)
    if mode == VocabMode.UNIFORM_KL:
        value = uniform_kl_value(*stats)
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
    statistics ``(JSD_STATS, B, L)``: both log-sum-exps, ``sum_v p_v log(m_v / p_v)`` and
    ``sum_v q_v log(m_v / q_v)``."""
    acc = accumulation_dtype(logits.dtype)
    stats = torch.zeros((JSD_STATS, *valid.shape), dtype=acc, device=logits.device)
    upcast, ref_upcast = Scratch(logits, acc), Scratch(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        x, ref = upcast.upcast(logits[b, t]), ref_upcast.upcast(ref_logits[b, t])
        lse, ref_lse = torch.logsumexp(x, -1), torch.logsumexp(ref, -1)
        stats[0, b, t], stats[1, b, t] = lse, ref_lse
        stats[2, b, t], stats[3, b, t] = jsd_partials(x, ref, lse, ref_lse, beta)
    return torch.where(valid, jsd_value(stats[2], stats[3], beta), 0.0), stats


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
        row_stats = stats[0, b, t], stats[1, b, t], stats[2, b, t]
        inner = jsd_model_gradient(x, ref, *row_stats, beta)
        zero_ignored_rows_(inner, valid[b, t])
        torch.mul(inner, scale[b, t, None], out=grad[b, t])
