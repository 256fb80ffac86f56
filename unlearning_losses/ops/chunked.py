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
    valid label (prompt, padding) are skipped; on other devices, and while ``torch.compile``
    traces (the spans would be data-dependent shapes), every row is visited.
    """
    batch, length = valid.shape
    if valid.device.type != "cpu" or length == 0 or torch.compiler.is_compiling():
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
    rows = max(1, (budget or CHUNK_BYTES) // (4 * max(1, vocab)))
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
    rows = max(1, (budget or CHUNK_BYTES) // (4 * max(1, vocab)))
    for b0, b1, start, stop in groups:
        step = max(1, rows // (b1 - b0))
        for t0 in range(start, stop, step):
            yield slice(b0, b1), slice(t0, min(t0 + step, stop))


def zero_outside(grad: Tensor, groups: list[Group]) -> None:
    """Zero the gradient rows that the chunks do not visit (prompt, padding, shifted-out)."""
    for b0, b1, start, stop in groups:
        grad[b0:b1, :start].zero_()
        grad[b0:b1, stop:].zero_()


class Scratch:
    """One chunk-sized buffer that every chunk of a pass is computed in (reused, so no chunk
    allocates: fresh multi-megabyte temporaries cost page faults on each call)."""

    def __init__(
        self,
        like: Tensor,
        dtype: torch.dtype,
        budget: int | None = None,
        vocab: int | None = None,
    ):
        """Room for ``budget`` bytes of float32 rows of ``vocab`` (default: ``like``'s last
        dimension) entries, in ``dtype``, on ``like``'s device."""
        vocab = like.shape[-1] if vocab is None else vocab
        rows = max(1, (budget or CHUNK_BYTES) // (4 * max(1, vocab)))
        self.flat = torch.empty(rows * vocab, dtype=dtype, device=like.device)

    def __call__(self, shape: torch.Size) -> Tensor:
        """A contiguous view of the buffer with ``shape`` (at most one chunk)."""
        return self.flat[: shape.numel()].view(shape)

    def upcast(self, chunk: Tensor) -> Tensor:
        """``chunk`` in the buffer's dtype: itself when it has it, else a copy in the buffer."""
        if chunk.dtype == self.flat.dtype:
            return chunk
        return self(chunk.shape).copy_(chunk)


def log_ratio(first: Tensor, second: Tensor) -> Tensor:
    """``first - second`` of two log-probability chunks, finite where -inf entries meet.

    Such an entry has probability 0 on the side that weights it, so ``0 * ratio`` must be 0, not
    NaN: both sides are floored at the lowest finite value first (NaN stays NaN). Overwrites both.
    """
    floor = torch.finfo(first.dtype).min
    return first.clamp_min_(floor).sub_(second.clamp_min_(floor))


def floored_logprob(logprob: Tensor, lse: Tensor | None = None) -> Tensor:
    """A label's log-probability (``label logit - log-sum-exp``) as the losses take it.

    Floored at the dtype's lowest finite value: finite logits that span more than the float32
    range (``3e38`` and ``-3e38`` in one row), or a label whose logit is masked to ``-inf``, give a
    finite value where the difference overflows, so weights and log-ratios downstream stay finite
    (``0 * -inf`` would be NaN). A row with a ``+inf`` logit is non-finite input and gives NaN, on
    every backend; NaN stays NaN. The gradient is unaffected (it is formed from the logits).
    Without ``lse`` the caller's log-probability already carries that NaN (``log_softmax`` does).
    """
    floored = logprob.clamp_min(torch.finfo(logprob.dtype).min)
    if lse is None:
        return floored
    return torch.where(lse == float("inf"), float("nan"), floored)


def logprobs_forward(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) over rows ``[:, :L]``, ``(B, L)``, and zeros of that shape where
    the Triton forward returns the log-sum-exp (this backward recomputes the softmax instead;
    an empty placeholder trips Inductor's backward compilation).

    Float32 (float64 for float64 logits); 0 where not valid. One fused ``log_softmax`` per chunk:
    a single exponential per logit.
    """
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    safe_targets = torch.where(valid, targets, 0)
    scratch, upcast = Scratch(logits, acc), Scratch(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        chunk = upcast.upcast(logits[b, t])
        logp = torch.log_softmax(chunk, -1, out=scratch(chunk.shape))
        picked = logp.gather(-1, safe_targets[b, t, None]).squeeze(-1)
        out[b, t] = torch.where(valid[b, t], floored_logprob(picked), 0.0)
    return out, torch.zeros_like(out)


def logprobs_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * log p) / d logits into ``grad`` (which may be ``logits`` itself).

    ``lse`` is the forward's placeholder (unused here)."""
    acc = logprobs.dtype
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    safe_targets = torch.where(valid, targets, 0)
    scale = torch.where(valid, grad_out.to(acc), 0.0)
    scratch, upcast = Scratch(logits, acc), Scratch(logits, acc)
    for b, t in row_chunks(groups, logits.shape[-1]):
        chunk = upcast.upcast(logits[b, t])
        probs = torch.softmax(chunk, -1, out=scratch(chunk.shape))
        # An ignored row's logits may be NaN (padding): its gradient is 0, not NaN * 0.
        probs.masked_fill_(~valid[b, t, None], 0.0)
        label_gradient_(
            probs, logprobs[b, t, None], safe_targets[b, t, None], scale[b, t, None], grad[b, t]
        )


def label_gradient_(
    probs: Tensor,
    label_logprob: Tensor,
    targets: Tensor,
    scale: Tensor | float,
    out: Tensor,
    has_label: Tensor | None = None,
) -> None:
    """Write ``d(scale * log p_y) / dz = scale (onehot(y) - p)`` into ``out`` (may be ``probs``).

    Per-row tensors keep a trailing dimension of 1. The label entry, ``scale (1 - p_y) =
    -scale expm1(log p_y)``, is formed from the label's log-probability (exact near p_y = 1)
    and rounded once. ``has_label``: the rows whose label column is in this slice of the
    vocabulary (vocabulary shards); other rows keep ``-scale p`` there.
    """
    torch.mul(probs, -scale, out=out)
    label = -scale * torch.expm1(label_logprob)
    if has_label is not None:
        label = torch.where(has_label, label, out.gather(-1, targets))
    out.scatter_(-1, targets, label.to(out.dtype))


#: The per-token quantities of ``pair_forward``: P is the model's next-token distribution, Q the
#: reference's (for ``"soft_target"`` with the target's logit lowered by ``param``).
PAIR_MODES = ("kl_forward", "kl_reverse", "soft_target", "reference_ce")
#: Modes whose value is an expectation under the model's P, ``sum_v p_v a_v`` (their gradient is
#: ``p_j (a_j - value)``); the others are expectations under Q (gradient ``p_j - q_j``).
MODEL_WEIGHTED = ("kl_forward", "reference_ce")


def reference_log_probs(
    ref_logits: Tensor,
    targets: Tensor,
    mode: str,
    param: float,
    acc: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """log Q of a chunk (into ``out`` if given): the reference's log-softmax, for
    ``"soft_target"`` with each row's target logit lowered by ``param`` first (``inf`` removes the
    target)."""
    if mode != "soft_target":
        return torch.log_softmax(ref_logits, -1, dtype=acc, out=out)
    ref = ref_logits.to(acc, copy=True)
    lowered = ref.gather(-1, targets[..., None]) - param
    return torch.log_softmax(ref.scatter_(-1, targets[..., None], lowered), -1, out=out)


def pair_scores(
    logp: Tensor, logq: Tensor, mode: str, param: float, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The weights and scores whose row sums are the per-token value; overwrites both inputs and
    writes the weights into ``out`` if given.

    ``"kl_forward"``: p and log p - log q (KL(P || Q)); ``"kl_reverse"``: q and log q - log p;
    ``"soft_target"``: q and -log p (the cross-entropy from Q to P); ``"reference_ce"``: p and
    -log(q + param) (SOUL's cross-entropy to the reference, with its additive epsilon). A zero
    weight times a ``-inf`` log-probability gives 0, not NaN (``log_ratio`` floors); NaN stays NaN.
    """
    if mode == "kl_forward":
        return torch.exp(logp, out=out), log_ratio(logp, logq)
    if mode == "kl_reverse":
        return torch.exp(logq, out=out), log_ratio(logq, logp)
    if mode == "soft_target":
        return torch.exp(logq, out=out), logp.clamp_min_(torch.finfo(logp.dtype).min).neg_()
    return torch.exp(logp, out=out), logq.exp_().add_(param).log_().neg_()


def pair_value(weights: Tensor, scores: Tensor) -> Tensor:
    """The per-row value ``sum_v weight_v score_v``."""
    return torch.linalg.vecdot(weights, scores)


def pair_gradient(
    logp: Tensor, weights: Tensor, scores: Tensor, value: Tensor, mode: str
) -> Tensor:
    """d value / d logits of a chunk from ``pair_scores``'s inputs and outputs (overwrites them).

    Under P: ``p_j (a_j - value)``; under Q: ``p_j - q_j`` (Q does not depend on the logits).
    """
    if mode in MODEL_WEIGHTED:
        return scores.sub_(value[..., None]).mul_(weights)
    if mode == "soft_target":  # the scores are -log p
        return scores.neg_().exp_().sub_(weights)
    return logp.exp_().sub_(weights)  # log p was floored in place: exp(lowest) = 0


class PairWorkspace:
    """The reused chunk buffers of a pass over two distributions: an upcast copy, log P, log Q
    and the weights."""

    def __init__(self, logits: Tensor, acc: torch.dtype):
        self.upcast, self.logp, self.logq, self.weights = (Scratch(logits, acc) for _ in range(4))

    def log_probs(
        self, logits: Tensor, ref_logits: Tensor, targets: Tensor, mode: str, param: float
    ) -> tuple[Tensor, Tensor]:
        """log P and log Q (see ``reference_log_probs``) of one chunk, in the buffers."""
        dtype = self.logp.flat.dtype
        logp = torch.log_softmax(self.upcast.upcast(logits), -1, out=self.logp(logits.shape))
        logq = reference_log_probs(
            self.upcast.upcast(ref_logits), targets, mode, param, dtype, self.logq(logits.shape)
        )
        return logp, logq

    def model_kl_gradient(self, logits: Tensor, ref_logits: Tensor) -> Tensor:
        """d KL(P || Q) / d logits of one chunk, ``p (d - sum_v p_v d_v)`` with ``d = z - z_ref``.

        ``d`` is the log-ratio ``log p - log q`` up to a per-row constant, which the centring
        removes, so no two log-softmaxes are subtracted: where P is near Q the gradient keeps
        the float32 rounding of its own size (one exponential per logit). ``-inf`` logits are
        floored first, so their zero probabilities meet finite differences; NaN stays NaN.
        """
        p = torch.softmax(self.upcast.upcast(logits), -1, out=self.weights(logits.shape))
        delta = self._floored(self.logp, logits).sub_(self._floored(self.logq, ref_logits))
        centre = torch.linalg.vecdot(p, delta)
        return delta.sub_(centre[..., None]).mul_(p)

    @staticmethod
    def _floored(buffer: Scratch, chunk: Tensor) -> Tensor:
        """``chunk`` in the buffer's dtype with ``-inf`` raised to the lowest finite value."""
        floor = torch.finfo(buffer.flat.dtype).min
        if chunk.dtype == buffer.flat.dtype:
            return torch.clamp_min(chunk, floor, out=buffer(chunk.shape))
        return buffer(chunk.shape).copy_(chunk).clamp_min_(floor)


def pair_forward(
    logits: Tensor, ref_logits: Tensor, targets: Tensor, valid: Tensor, mode: str, param: float
) -> Tensor:
    """Per-token value of ``mode`` (see ``pair_scores``) over rows ``[:, :L]``; 0 where not
    valid."""
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    safe_targets = torch.where(valid, targets, 0)
    work = PairWorkspace(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        logp, logq = work.log_probs(logits[b, t], ref_logits[b, t], safe_targets[b, t], mode, param)
        value = pair_value(*pair_scores(logp, logq, mode, param, out=work.weights(logp.shape)))
        out[b, t] = torch.where(valid[b, t], value, 0.0)
    return out


def pair_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    out: Tensor,
    mode: str,
    param: float,
    grad: Tensor,
) -> None:
    """Write d(sum grad_out * value) / d logits into ``grad`` (which may be ``logits`` itself)."""
    acc = out.dtype
    groups = row_groups(valid, logits.shape[-1])
    zero_outside(grad, groups)
    scale = torch.where(valid, grad_out.to(acc), 0.0)
    safe_targets = torch.where(valid, targets, 0)
    work = PairWorkspace(logits, acc)
    for b, t in row_chunks(groups, logits.shape[-1]):
        if mode == "kl_forward":
            inner = work.model_kl_gradient(logits[b, t], ref_logits[b, t])
        else:
            logp, logq = work.log_probs(
                logits[b, t], ref_logits[b, t], safe_targets[b, t], mode, param
            )
            if mode == "reference_ce":
                weights, scores = pair_scores(logp, logq, mode, param, out=work.weights(logp.shape))
                inner = pair_gradient(logp, weights, scores, out[b, t], mode)
            else:  # p - q, both from log-softmax (exactly 0 where the logits are equal)
                inner = logp.exp_().sub_(logq.exp_())
        # An ignored row contributes nothing, even where its logits are NaN (padding) or it has
        # no finite target (CE-U, one finite logit): its gradient is 0, not NaN * 0.
        inner.masked_fill_(~valid[b, t, None], 0.0)
        torch.mul(inner, scale[b, t, None], out=grad[b, t])
