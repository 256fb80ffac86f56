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

from .numerics import (
    PairMode,
    accumulation_dtype,
    floored_logprob,
    label_gradient_,
    pair_gradient,
    pair_scores,
    pair_value,
)

#: Upper bound on the bytes of one float32 chunk of logits; results do not depend on it.
CHUNK_BYTES = 2 * 1024 * 1024
#: Beyond this log-ratio a row's KL constant comes from its log-sum-exps (expm1 would overflow).
_NEAR = 60.0


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


def zero_ignored_rows_(chunk: Tensor, valid: Tensor) -> None:
    """Zero the rows of ``chunk`` whose position is ignored: their logits may be NaN (padding),
    and a coefficient of 0 times NaN is NaN. On the CPU, where reading the mask costs no device
    sync, a chunk without an ignored row is left alone (most are: the spans skip prompt and
    padding at the ends)."""
    if valid.device.type == "cpu" and bool(valid.all()):
        return
    chunk.masked_fill_(~valid[..., None], 0.0)


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
        zero_ignored_rows_(probs, valid[b, t])
        label_gradient_(
            probs, logprobs[b, t, None], safe_targets[b, t, None], scale[b, t, None], grad[b, t]
        )


def reference_log_probs(
    ref_logits: Tensor,
    targets: Tensor,
    mode: PairMode,
    constant: float,
    acc: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """log Q of a chunk (into ``out`` if given): the reference's log-softmax, for
    ``SOFT_TARGET`` with each row's target logit lowered by ``constant`` first (``inf`` removes the
    target)."""
    if mode != PairMode.SOFT_TARGET:
        return torch.log_softmax(ref_logits, -1, dtype=acc, out=out)
    ref = ref_logits.to(acc, copy=True)
    lowered = ref.gather(-1, targets[..., None]) - constant
    return torch.log_softmax(ref.scatter_(-1, targets[..., None], lowered), -1, out=out)


class PairWorkspace:
    """The reused chunk buffers of a pass over two distributions: an upcast copy, log P, log Q
    and the weights."""

    def __init__(self, logits: Tensor, acc: torch.dtype):
        self.upcast, self.logp, self.logq, self.weights = (Scratch(logits, acc) for _ in range(4))

    def log_probs(
        self, logits: Tensor, ref_logits: Tensor, targets: Tensor, mode: PairMode, constant: float
    ) -> tuple[Tensor, Tensor]:
        """log P and log Q (see ``reference_log_probs``) of one chunk, in the buffers."""
        dtype = self.logp.flat.dtype
        logp = torch.log_softmax(self.upcast.upcast(logits), -1, out=self.logp(logits.shape))
        logq = reference_log_probs(
            self.upcast.upcast(ref_logits), targets, mode, constant, dtype, self.logq(logits.shape)
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

    def reference_kl_gradient(self, logits: Tensor, ref_logits: Tensor) -> Tensor:
        """d KL(Q || P) / d logits of one chunk, ``p - q``, formed as ``q expm1(d)``: no
        difference of two rounded softmaxes where P is near Q.

        ``d = delta - c`` with ``delta = z - z_ref`` and the row constant ``c = lse - lse_ref``
        taken as ``log1p(sum_v q_v expm1(delta_v))``, exact when the rows are close (the
        difference of two log-sum-exps keeps only the digits they share). The same
        ``expm1(delta)`` gives ``expm1(d) = expm1(delta) e^-c + expm1(-c)``, so the chunk takes
        one ``expm1`` pass. Rows far apart (that sum beyond 1/2, or a ``delta`` beyond 60 where
        ``expm1`` was clamped) take ``p - q`` with ``p`` from its own log-sum-exp.
        """
        z, z_ref = self._floored(self.logp, logits), self._floored(self.logq, ref_logits)
        q = torch.softmax(z_ref, -1, out=self.upcast(z.shape))
        delta = torch.sub(z, z_ref, out=self.weights(z.shape))
        far = delta.amax(-1) > _NEAR
        grad = torch.clamp(delta, max=_NEAR, out=z_ref).expm1_()
        ratio = torch.linalg.vecdot(q, grad)
        far |= ratio.abs() > 0.5
        c = torch.log1p(ratio)[..., None]
        grad.mul_(torch.exp(-c)).add_(torch.expm1(-c)).mul_(q)
        # On the CPU far rows are looked for first; elsewhere that would wait on the host.
        if z.device.type != "cpu" or bool(far.any()):
            p = z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_()
            grad = torch.where(far[..., None], p.sub_(q), grad, out=grad)
        return grad

    @staticmethod
    def _floored(buffer: Scratch, chunk: Tensor) -> Tensor:
        """``chunk`` in the buffer's dtype with ``-inf`` raised to the lowest finite value."""
        floor = torch.finfo(buffer.flat.dtype).min
        if chunk.dtype == buffer.flat.dtype:
            return torch.clamp_min(chunk, floor, out=buffer(chunk.shape))
        return buffer(chunk.shape).copy_(chunk).clamp_min_(floor)


def pair_forward(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    mode: PairMode,
    constant: float,
) -> Tensor:
    """Per-token value of ``mode`` (see ``pair_scores``) over rows ``[:, :L]``; 0 where not
    valid."""
    acc = accumulation_dtype(logits.dtype)
    out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
    safe_targets = torch.where(valid, targets, 0)
    work = PairWorkspace(logits, acc)
    for b, t in row_chunks(row_groups(valid, logits.shape[-1]), logits.shape[-1]):
        logp, logq = work.log_probs(
            logits[b, t], ref_logits[b, t], safe_targets[b, t], mode, constant
        )
        value = pair_value(*pair_scores(logp, logq, mode, constant, out=work.weights(logp.shape)))
        out[b, t] = torch.where(valid[b, t], value, 0.0)
    return out


def pair_backward(
    grad_out: Tensor,
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    out: Tensor,
    mode: PairMode,
    constant: float,
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
        if mode == PairMode.KL_FORWARD:
            inner = work.model_kl_gradient(logits[b, t], ref_logits[b, t])
        elif mode == PairMode.KL_REVERSE:
            inner = work.reference_kl_gradient(logits[b, t], ref_logits[b, t])
        else:
            logp, logq = work.log_probs(
                logits[b, t], ref_logits[b, t], safe_targets[b, t], mode, constant
            )
            if mode == PairMode.REFERENCE_CE:
                weights, scores = pair_scores(
                    logp, logq, mode, constant, out=work.weights(logp.shape)
                )
                inner = pair_gradient(logp, weights, scores, out[b, t], mode)
            else:  # the soft target's p - q, both from log-softmax
                inner = logp.exp_().sub_(logq.exp_())
        # An ignored row contributes nothing, even where its logits are NaN (padding) or it has
        # no finite target (CE-U, one finite logit): its gradient is 0, not NaN * 0.
        zero_ignored_rows_(inner, valid[b, t])
        torch.mul(inner, scale[b, t, None], out=grad[b, t])
