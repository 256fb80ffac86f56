"""The chunked PyTorch backend of the token reductions: forward and backward of each primitive.

Each function walks the rows of ``logits`` (B, T, V) in chunks of a bounded number of bytes, so the
only temporaries are chunk-sized and stay in cache. The forwards keep per-token results (and the
log-sum-exp) in float32 (float64 for float64 logits); the backwards recompute the softmax chunk by
chunk and write the gradient, scaled and rounded in one step, into one buffer in the logits' dtype.
Only the rows ``[:, :L]`` are read (L = the mask's length), so the causal-LM shift needs no copy of
the logits; rows past ``L`` get a zero gradient. Autograd wiring lives in ``custom_ops``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Upper bound on the bytes of one float32 chunk of logits; results do not depend on it.
CHUNK_BYTES = 2 * 1024 * 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_spans(valid: Tensor) -> list[tuple[int, int]]:
    """Per batch element, the rows to visit: from the first to the last valid one.

    On the CPU, where reading the mask costs no device sync, leading and trailing rows without a
    valid label (prompt, padding) are skipped; on other devices every row is visited.
    """
    batch, length = valid.shape
    if valid.device.type != "cpu" or length == 0:
        return [(0, length)] * batch
    positions = torch.arange(length).expand(batch, length)
    first = torch.where(valid, positions, length).min(-1).values.tolist()
    last = torch.where(valid, positions, -1).max(-1).values.tolist()
    return [(lo, hi + 1) if hi >= 0 else (0, 0) for lo, hi in zip(first, last, strict=True)]


Group = tuple[int, int, int, int]  # batch rows [b0, b1) and time rows [start, stop)


def row_groups(valid: Tensor, vocab: int, budget: int | None = None) -> list[Group]:
    """Consecutive batch elements whose spans, united, fit one chunk together (short sequences);
    a long sequence is a group of its own. A chunk is ``budget`` bytes of float32 rows of ``vocab``
    (default ``CHUNK_BYTES``)."""
    rows = max(1, (budget or CHUNK_BYTES) // (4 * vocab))
    spans = valid_spans(valid)
    groups: list[Group] = []
    b0 = 0
    while b0 < len(spans):
        start, stop = spans[b0]
        b1 = b0 + 1
        while b1 < len(spans):
            lo, hi = spans[b1]
            if hi <= lo:  # an empty span constrains nothing
                lo, hi = start, stop
            elif stop > start:
                lo, hi = min(start, lo), max(stop, hi)
            if (b1 + 1 - b0) * (hi - lo) > rows:
                break
            start, stop, b1 = lo, hi, b1 + 1
        groups.append((b0, b1, start, stop))
        b0 = b1
    return groups


def row_chunks(
    groups: list[Group], vocab: int, budget: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """Yield (batch slice, time slice) blocks of at most ``budget`` bytes of float32 rows."""
    rows = max(1, (budget or CHUNK_BYTES) // (4 * vocab))
    for b0, b1, start, stop in groups:
        step = max(1, rows // (b1 - b0))
        for t0 in range(start, stop, step):
            yield slice(b0, b1), slice(t0, min(t0 + step, stop))


def zero_outside(grad: Tensor, groups: list[Group]) -> None:
    """Zero the gradient rows that the chunks do not visit (prompt, padding, shifted-out)."""
    for b0, b1, start, stop in groups:
        grad[b0:b1, :start].zero_()
        grad[b0:b1, stop:].zero_()


def _chunk_workspace(out: Tensor, acc: torch.dtype) -> Tensor:
    """Where a chunk is computed: ``out`` itself when it already has the accumulation dtype."""
    return out if out.dtype == acc else torch.empty(out.shape, dtype=acc, device=out.device)


def log_ratio(first: Tensor, second: Tensor) -> Tensor:
    """``first - second`` of two log-probability chunks, finite where -inf entries meet.

    Such an entry has probability 0 on the side that weights it, so ``0 * ratio`` must be 0, not
    NaN: both sides are floored at the lowest finite value first (NaN stays NaN). Overwrites both.
    """
    floor = torch.finfo(first.dtype).min
    return first.clamp_min_(floor).sub_(second.clamp_min_(floor))


def floored_logprob(logprob: Tensor, lse: Tensor) -> Tensor:
    """A label's log-probability (``label logit - log-sum-exp``) as the losses take it.

    Floored at the dtype's lowest finite value: finite logits that span more than the float32
    range (``3e38`` and ``-3e38`` in one row), or a label whose logit is masked to ``-inf``, give a
    finite value where the difference overflows, so weights and log-ratios downstream stay finite
    (``0 * -inf`` would be NaN). A row with a ``+inf`` logit is non-finite input and gives NaN, on
    every backend; NaN stays NaN. The gradient is unaffected (it is formed from the logits).
    """
    floored = logprob.clamp_min(torch.finfo(logprob.dtype).min)
    return torch.where(lse == float("inf"), float("nan"), floored)


def logprobs_forward(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) over rows ``[:, :L]`` and their log-sum-exp, both ``(B, L)``.

    Float32 (float64 for float64 logits); 0 where not valid.
    """
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    lse = torch.zeros_like(out)
    safe_targets = torch.where(valid, targets, 0)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        x = logits[b, t].to(acc)
        chunk_lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(-1, safe_targets[b, t, None]).squeeze(-1)
        lse[b, t] = chunk_lse
        out[b, t] = torch.where(valid[b, t], floored_logprob(picked - chunk_lse, chunk_lse), 0.0)
    return out, lse


def logprobs_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * log p) / d logits into ``grad`` (which may be ``logits`` itself)."""
    acc = logprobs.dtype
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    safe_targets = torch.where(valid, targets, 0)
    neg_scale = torch.where(valid, -grad_out.to(acc), 0.0)
    # d log p_y / d z_j = 1[j = y] - p_j. The label entry, 1 - p_y = -expm1(log p_y), is formed in
    # float32 (exact near p_y = 1) and rounded once.
    label_term = (neg_scale * torch.expm1(logprobs)).to(grad.dtype)
    for b, t in row_chunks(groups, logits.shape[-1]):
        probs = _chunk_workspace(grad[b, t], acc)
        torch.sub(logits[b, t].to(acc), lse[b, t, None], out=probs).exp_()
        torch.mul(probs, neg_scale[b, t, None], out=grad[b, t])
        grad[b, t].scatter_(-1, safe_targets[b, t, None], label_term[b, t, None])


def kl_forward(logits: Tensor, ref_logits: Tensor, valid: Tensor, forward_kl: bool) -> Tensor:
    """Per-token KL(P || Q) (``forward_kl``) or KL(Q || P) over rows ``[:, :L]``; 0 where not valid.

    P is the softmax of ``logits``, Q of ``ref_logits``.
    """
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        logp = torch.log_softmax(logits[b, t], -1, dtype=acc)
        logq = torch.log_softmax(ref_logits[b, t], -1, dtype=acc)
        first, second = (logp, logq) if forward_kl else (logq, logp)
        weight = first.exp()
        kl = (weight * log_ratio(first, second)).sum(-1)
        out[b, t] = torch.where(valid[b, t], kl, 0.0)
    return out


def kl_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    valid: Tensor,
    kl: Tensor,
    forward_kl: bool,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * KL) / d logits into ``grad`` (which may be ``logits`` itself)."""
    acc = kl.dtype
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    scale = torch.where(valid, grad_out.to(acc), 0.0)
    for b, t in row_chunks(groups, logits.shape[-1]):
        if forward_kl:
            # d KL(P||Q) / d z_j = p_j (log p_j - log q_j - KL)
            logp = torch.log_softmax(logits[b, t], -1, dtype=acc)
            probs = logp.exp()
            logq = torch.log_softmax(ref_logits[b, t], -1, dtype=acc)
            inner = log_ratio(logp, logq).sub_(kl[b, t, None]).mul_(probs)
        else:
            # d KL(Q||P) / d z_j = p_j - q_j
            inner = torch.softmax(logits[b, t], -1, dtype=acc)
            inner.sub_(torch.softmax(ref_logits[b, t], -1, dtype=acc))
        torch.mul(inner, scale[b, t, None], out=grad[b, t])


def _soft_target_log_probs(
    ref_logits: Tensor, targets: Tensor, label_shift: float, acc: torch.dtype
) -> Tensor:
    """log of the target distribution ``softmax(ref_logits - label_shift * onehot(target))``."""
    ref = ref_logits.to(acc, copy=True)
    lowered = ref.gather(-1, targets[..., None]) - label_shift
    return torch.log_softmax(ref.scatter_(-1, targets[..., None], lowered), -1)


def soft_target_forward(
    logits: Tensor, ref_logits: Tensor, targets: Tensor, valid: Tensor, label_shift: float
) -> Tensor:
    """Per-token cross-entropy ``-sum_v q_v log p_v`` over rows ``[:, :L]``; 0 where not valid.

    P is the softmax of ``logits``; Q that of ``ref_logits`` with the target's logit lowered by
    ``label_shift`` (``inf`` removes the target from Q). Entries where Q is 0 contribute 0.
    """
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    safe_targets = torch.where(valid, targets, 0)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        logq = _soft_target_log_probs(ref_logits[b, t], safe_targets[b, t], label_shift, acc)
        logp = torch.log_softmax(logits[b, t], -1, dtype=acc)
        # q_v = 0 where log p_v = -inf must give 0, not NaN: floor log p (NaN stays NaN).
        cross = logq.exp_().mul_(logp.clamp_min_(torch.finfo(acc).min)).sum(-1).neg_()
        out[b, t] = torch.where(valid[b, t], cross, 0.0)
    return out


def soft_target_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    label_shift: float,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * CE) / d logits = grad_out (p - q) into ``grad``."""
    acc = accumulation_dtype(logits.dtype)
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    scale = torch.where(valid, grad_out.to(acc), 0.0)
    safe_targets = torch.where(valid, targets, 0)
    for b, t in row_chunks(groups, logits.shape[-1]):
        q = _soft_target_log_probs(ref_logits[b, t], safe_targets[b, t], label_shift, acc).exp_()
        inner = torch.softmax(logits[b, t], -1, dtype=acc).sub_(q).mul_(scale[b, t, None])
        # An ignored row may have no target at all (CE-U, one finite logit): NaN * 0 stays NaN.
        grad[b, t] = inner.masked_fill_(~valid[b, t, None], 0.0)
