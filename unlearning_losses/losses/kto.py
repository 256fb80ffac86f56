"""Kahneman-Tversky Optimization (KTO) as an unlearning loss: forget answers as undesirable ones."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens, ops, sharding
from .._doc import shared_arguments
from ..ops.numerics import accumulation_dtype
from ..reductions import REDUCTIONS, Reduction, sequence_reduce, sequence_sums
from ..sharding import LOCAL, Sharding, check_group
from .common import reference_logprobs

Variant = Literal["sigmoid", "logsigmoid"]
VARIANTS: tuple[str, ...] = ("sigmoid", "logsigmoid")


@shared_arguments
def kto_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
    reference_point: float | Tensor,
    beta: float = 0.1,
    variant: Variant = "sigmoid",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_sequences: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
    sequence_group: object = None,
) -> Tensor:
    r"""KTO forget loss (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization"), every forget answer an undesirable one, to minimize.

    With $\Delta_i = \sum_{t \in M_i} (\ell_t - r_t)$ the summed log-ratio of the model to the
    frozen reference on sequence *i* and $z_0$ the reference point (``reference_point``, a
    constant: the KL term, see :func:`kto_reference_point`),

    $$
    \mathcal{L}^{\text{sigmoid}}_i = 1 - \sigma\big(\beta (z_0 - \Delta_i)\big)
    = \sigma\big(\beta(\Delta_i - z_0)\big), \qquad
    \mathcal{L}^{\text{logsigmoid}}_i = -\frac{2}{\beta} \log \sigma\big(\beta (z_0 - \Delta_i)\big)
    $$

    ``"sigmoid"`` is the paper's loss of an undesirable answer (with $\lambda_U = 1$);
    ``"logsigmoid"`` is the NPO authors' variant, which at $z_0 = 0$ is :func:`npo_loss`. Both are
    averaged over sequences with a valid token. Gradients in $\Delta_i$:
    $\beta\,\sigma(\beta(\Delta_i - z_0))\,\sigma(\beta(z_0 - \Delta_i))$ (sigmoid: it vanishes
    once the answer is far below the reference point, and far above it) and
    $2\sigma(\beta(\Delta_i - z_0))$ (log-sigmoid: NPO's weight, shifted by $z_0$). The paper's
    $\lambda_U$ is a plain scale: use ``forget_weight`` of :func:`combine_with_retain`. KTO with
    gradient descent on a retain set (the NPO authors' ``kto_logsigmoid_grad_diff``) is
    ``combine_with_retain(kto_loss(...), nll_loss(retain_logits, retain_labels))``.

    The NPO authors' code (``kto_sigmoid``, ``kto_logsigmoid`` in their ``TOFU/dataloader.py``)
    differs in four ways (checked against their file to 1e-12 in ``tests/test_peers_methods.py``):
    their argument is $z_0 - \beta\Delta_i$ ($z_0$ not multiplied by $\beta$: pass their KL
    term divided by $\beta$); their sigmoid loss is $1 - \frac{2}{\beta}\,\mathrm{mean}\,
    \sigma(\cdot)$, i.e. $1 - \frac{2}{\beta} + \frac{2}{\beta}$ times this one; their
    log-sigmoid loss is this one plus 1; and their mean counts sequences without a valid token
    (each adding $\sigma(z_0)$ to their mean). Their $z_0$ is the mean log-ratio of the model on
    the IDK answers, not clamped at 0 (``kto_reference_point(..., clamp=False)`` on those).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model on the forget answers.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ref_logprobs: the reference model's per-token log-probs, shaped like
            :func:`token_logprobs`' output (already shifted); cache them once per forget batch.
        ref_logits: or the reference model's logits, shaped like ``logits``. Give exactly one.
        reference_point: $z_0$, a real number or a 0-d tensor on the logits' device; detached
            (KTO does not back-propagate through it). :func:`kto_reference_point` estimates it
            as the paper does.
        beta: inverse temperature, > 0 (default 0.1, the paper's).
        variant: ``"sigmoid"`` (the paper's) or ``"logsigmoid"``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: ``"mean"`` over sequences, ``"sum"``, or ``"none"`` (``(B,)``, 0 for a sequence
            without valid tokens). 2-D input is one sequence.
        num_sequences: the global count of sequences with a valid token (data parallel; see
            :func:`unlearning_losses.global_counts`); ``"mean"`` only.
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}
        sequence_group: the context-parallel group, as :func:`npo_loss` (labels already
            shifted, ``shift=False``).

    Returns:
        A float32 scalar (float64 for float64 logits), or per-sequence values.

    Raises:
        TypeError: a tensor of the wrong type or dtype, or a reference point that is neither a
            real number nor a floating 0-d tensor.
        ValueError: shapes that do not match, neither or both references, ``beta <= 0``, an
            unknown ``variant`` or ``reduction``, a non-finite reference point.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # the model equals its reference: the log-ratio is 0, the loss sigma(-beta z0)
        >>> kto_loss(logits, labels, ref_logits=logits, reference_point=1.0, beta=0.5)
        tensor(0.3775)
        >>> 1 / (1 + math.exp(0.5))
        0.3775406687981454
    """
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_group=vocab_group,
        sequence_group=sequence_group,
    )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    _checks.check_choice(variant, VARIANTS, "variant")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = _checks.check_mean_count(num_sequences, tokens.logits, reduction, "num_sequences")
    z0 = _reference_point(reference_point, tokens.logits)
    ref = reference_logprobs(tokens, ref_logprobs, ref_logits, backend)
    logprobs = ops.label_logprobs(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    return tokens.per_sequence(
        kto_from_logprobs(
            logprobs, ref, tokens.valid, z0, beta, variant, reduction, count, tokens.sharding
        )
    )


def kto_from_logprobs(
    logprobs: Tensor,
    ref: Tensor,
    valid: Tensor,
    reference_point: float | Tensor,
    beta: float,
    variant: str,
    reduction: str,
    num_sequences: int | Tensor | None = None,
    sharding: Sharding = LOCAL,
) -> Tensor:
    """KTO of per-token model and reference log-probs ``(B, L)`` (see :func:`kto_loss`)."""
    log_ratio = (logprobs - ref.to(logprobs.dtype)).masked_fill(~valid, 0.0)
    sums, counts = sequence_sums(log_ratio, valid, sharding)
    excess = beta * (sums - reference_point)
    if variant == "sigmoid":
        per_sequence = torch.sigmoid(excess)
    else:
        per_sequence = F.softplus(excess) * (2.0 / beta)
    return sequence_reduce(per_sequence, counts > 0, reduction, num_sequences, sharding)


def _reference_point(value: object, logits: Tensor) -> float | Tensor:
    """A finite number, or a detached floating 0-d tensor in the accumulation dtype on the
    logits' device (its finiteness is checked where reading it costs no device sync)."""
    if not isinstance(value, Tensor):
        return _checks.check_finite_number(value, "reference_point")
    point: Tensor = value.full_tensor() if sharding.is_dtensor(value) else value  # type: ignore[attr-defined]
    if point.dim() != 0 or not point.is_floating_point():
        raise TypeError(
            "reference_point must be a real number or a floating 0-d tensor; got a tensor of "
            f"dtype {point.dtype} and shape {tuple(point.shape)}"
        )
    _checks.check_same_device(point, logits, "reference_point")
    if point.device.type == "cpu" and not torch.compiler.is_compiling():
        _checks.check_finite_number(point, "reference_point")
    return point.detach().to(accumulation_dtype(logits.dtype))


def kto_reference_point(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    clamp: bool = True,
    group: object = None,
) -> Tensor:
    r"""KTO's reference point $z_0$: the mean over sequences of the summed log-ratio of the
    model to the reference, clamped at 0, detached.

    $$
    z_0 = \max\Big(0,\ \frac{1}{m} \sum_{j=1}^{m} \sum_{t} \big(\ell'_{j,t} - r'_{j,t}\big)\Big)
    $$

    The KTO paper (and TRL) estimate $\mathrm{KL}(\pi_\theta \| \pi_{ref})$ so, on answers
    that do not belong to their prompts (each prompt of the batch paired with another
    example's answer); the NPO authors use refusal ("I don't know") answers instead, without
    the clamp. Compute both log-probs with :func:`token_logprobs` under ``torch.no_grad()``
    (0 at ignored positions, so each row's sum is its sequence's): a row is one sequence,
    every row counts, as in both codebases.

    Args:
        logprobs: ``(B, L)`` (or ``(N,)``: one sequence) per-token log-probs of the model.
        ref_logprobs: the reference's, same shape, dtype and device.
        clamp: take ``max(0, .)`` (the paper's); ``False`` for the NPO authors' estimate.
        group: the data-parallel process group (the default group when ``None``): when
            ``torch.distributed`` is initialised, sums and counts are reduced over it (one
            ``all_reduce``, as :func:`global_counts`), so every rank gets the whole batch's
            $z_0$; the local estimate otherwise.

    Returns:
        A detached 0-d tensor, float32 (float64 for float64 input), to pass as ``kto_loss``'s
        ``reference_point``.

    Example:
        >>> import torch
        >>> logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
        >>> ref_logprobs = torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
        >>> kto_reference_point(logprobs, ref_logprobs)  # row sums 0.5 and 0.5
        tensor(0.5000)
    """
    logprobs = _checks.check_tensor(logprobs, "logprobs")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating tensor; got {logprobs.dtype}")
    if logprobs.dim() not in (1, 2):
        raise ValueError(
            f"logprobs must have shape (B, L) or (N,); got {logprobs.dim()} dimensions "
            f"{tuple(logprobs.shape)}"
        )
    ref_logprobs = _checks.check_like(ref_logprobs, logprobs, "ref_logprobs", "logprobs")
    _checks.check_bool(clamp, "clamp")
    check_group(group, "group")
    if sharding.is_dtensor(logprobs):
        logprobs, ref_logprobs = logprobs.full_tensor(), ref_logprobs.full_tensor()  # type: ignore[attr-defined]
    rows = logprobs.reshape(-1, logprobs.shape[-1])
    ratio = rows.detach() - ref_logprobs.reshape(rows.shape).detach().to(rows.dtype)
    dtype = accumulation_dtype(logprobs.dtype)
    count = torch.tensor(rows.shape[0], dtype=dtype, device=rows.device)
    totals = torch.stack([ratio.to(dtype).sum(), count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, group=group)
    mean = totals[0] / totals[1].clamp(min=1)
    return mean.clamp(min=0) if clamp else mean
