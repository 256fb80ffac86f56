"""The numerics every backend shares: the accumulation dtype, the floored label log-probability,
the label's gradient, and the per-token quantities of two distributions (:class:`PairMode`) as
weights and scores of a chunk, with their gradient. The chunked, vocabulary-parallel and
fused-linear paths compute with these; the Triton kernels implement the same formulas and take
their mode numbers from here.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class PairMode(str, Enum):
    """The per-token quantities of two next-token distributions: P is the model's, Q the
    reference's. The values travel as these strings through the custom ops (whose schemas take
    no enum) and as the integers of :data:`KERNEL_MODES` into the Triton kernels."""

    KL_FORWARD = "kl_forward"
    """KL(P || Q) = sum_v p_v (log p_v - log q_v)."""
    KL_REVERSE = "kl_reverse"
    """KL(Q || P) = sum_v q_v (log q_v - log p_v)."""
    SOFT_TARGET = "soft_target"
    """-sum_v q_v log p_v, Q with the row's target logit lowered by the mode's constant (UNDIAL's
    label shift; ``inf`` removes the target, CE-U)."""
    REFERENCE_CE = "reference_ce"
    """-sum_v p_v log(q_v + eps), eps the mode's constant (SOUL's cross-entropy to the
    reference)."""

    @classmethod
    def kl(cls, direction: str) -> PairMode:
        """The KL mode of a loss's ``direction`` (``"forward"`` or ``"reverse"``)."""
        return cls.KL_FORWARD if direction == "forward" else cls.KL_REVERSE

    @property
    def model_weighted(self) -> bool:
        """An expectation under the model's P, ``sum_v p_v a_v`` (gradient ``p_j (a_j - value)``);
        otherwise under Q (gradient ``p_j - q_j``)."""
        return self in (PairMode.KL_FORWARD, PairMode.REFERENCE_CE)


#: The ``MODE`` integer the Triton kernels branch on, by mode.
KERNEL_MODES = {mode: index for index, mode in enumerate(PairMode)}


def pair_scores(
    logp: Tensor, logq: Tensor, mode: PairMode, constant: float, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The weights and scores whose row sums are the per-token value; overwrites both inputs and
    writes the weights into ``out`` if given.

    ``KL_FORWARD``: p and log p - log q; ``KL_REVERSE``: q and log q - log p; ``SOFT_TARGET``: q
    and -log p; ``REFERENCE_CE``: p and -log(q + constant). A zero weight times a ``-inf``
    log-probability gives 0, not NaN (``log_ratio`` floors); NaN stays NaN.
    """
    if mode == PairMode.KL_FORWARD:
        return torch.exp(logp, out=out), log_ratio(logp, logq)
    if mode == PairMode.KL_REVERSE:
        return torch.exp(logq, out=out), log_ratio(logq, logp)
    if mode == PairMode.SOFT_TARGET:
        return torch.exp(logq, out=out), logp.clamp_min_(torch.finfo(logp.dtype).min).neg_()
    return torch.exp(logp, out=out), logq.exp_().add_(constant).log_().neg_()


def pair_value(weights: Tensor, scores: Tensor) -> Tensor:
    """The per-row value ``sum_v weight_v score_v``."""
    return torch.linalg.vecdot(weights, scores)


def pair_gradient(
    logp: Tensor, weights: Tensor, scores: Tensor, value: Tensor, mode: PairMode
) -> Tensor:
    """d value / d logits of a chunk from ``pair_scores``'s inputs and outputs (overwrites them).

    Under P: ``p_j (a_j - value)``; under Q: ``p_j - q_j`` (Q does not depend on the logits).
    """
    if PairMode(mode).model_weighted:
        return scores.sub_(value[..., None]).mul_(weights)
    if mode == PairMode.SOFT_TARGET:  # the scores are -log p
        return scores.neg_().exp_().sub_(weights)
    return logp.exp_().sub_(weights)  # log p was floored in place: exp(lowest) = 0


def kl_gradient(
    logp: Tensor,
    weights: Tensor,
    scores: Tensor,
    value: Tensor,
    mode: PairMode,
    logits: Tensor,
    ref_logits: Tensor,
) -> Tensor:
    """d value / d logits of a KL chunk, as :func:`pair_gradient` (overwrites its inputs and
    ``ref_logits``), but the forward KL's from the logits themselves: ``p (d - sum_v p_v d_v)``
    with ``d = z - z_ref``, the log-ratio up to a row constant that the centring removes. Where P
    is near Q, ``log p - log q`` of two log-softmaxes cancels to a few digits; ``d`` keeps them.
    ``-inf`` logits are floored first, so their zero probabilities meet finite differences."""
    if mode != PairMode.KL_FORWARD:
        return pair_gradient(logp, weights, scores, value, mode)
    floor = torch.finfo(ref_logits.dtype).min
    delta = torch.sub(logits.clamp_min(floor), ref_logits.clamp_min_(floor), out=ref_logits)
    centre = torch.linalg.vecdot(weights, delta)
    return delta.sub_(centre[..., None]).mul_(weights)
