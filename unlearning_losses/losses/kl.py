"""KL divergence to a reference model: a retain regularizer, or (negated) a forget term."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..ops.numerics import PairMode
from ..reductions import REDUCTIONS, Reduction, token_reduce

Direction = Literal["forward", "reverse"]
DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


@shared_arguments
def kl_divergence(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor | None = None,
    *,
    direction: Direction = "forward",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""Mean per-token KL divergence between the model's and a reference's next-token distributions.

    $$
    \mathrm{KL}_t = \sum_v p_\theta(v)\,\big(\log p_\theta(v) - \log p_{ref}(v)\big)
    \quad \text{(forward)}, \qquad
    \mathrm{KL}_t = \sum_v p_{ref}(v)\,\big(\log p_{ref}(v) - \log p_\theta(v)\big)
    \quad \text{(reverse)}
    $$

    and the loss is $\frac{1}{|M|}\sum_{t\in M} \mathrm{KL}_t$, to minimize (a retain
    regularizer; open-unlearning's retain KL is the reverse direction). Entries where the first
    distribution is 0 contribute 0. Gradients w.r.t. the logits:
    $p_j(\log p_j - \log q_j - \mathrm{KL}_t)$ (forward) and $p_j - q_j$ (reverse).
    ``ref_logits`` is a constant: no gradient flows into it.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being trained.
        ref_logits: the frozen reference, same shape, dtype and device (with ``vocab_group``,
            sharded like ``logits``).
        labels: selects positions as in :func:`ga_loss` (with the shift); ``None`` counts every
            position of the logits (shift then does not apply).
        direction: ``"forward"`` (KL(P_theta || P_ref), the SOUL paper's) or ``"reverse"``.
        ignore_index: {ignore_index}
        shift: {shift}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per token).

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> kl_divergence(logits, logits, labels)  # a distribution against itself
        tensor(0.)
    """
    if labels is None:
        _checks.check_choice(backend, ops.BACKENDS, "backend")
        tokens = _tokens.align_all_positions(logits, vocab_group=vocab_group)
    else:
        tokens = _tokens.align(
            logits,
            labels,
            ignore_index=ignore_index,
            shift=shift,
            backend=backend,
            validate=validate,
            vocab_group=vocab_group,
        )
    ref_logits = tokens.like_logits(ref_logits, "ref_logits")
    _checks.check_choice(direction, DIRECTIONS, "direction")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    per_token = ops.token_kl(
        tokens.logits,
        ref_logits,
        tokens.valid,
        mode=PairMode.kl(direction),
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )


@shared_arguments
def kl_loss(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor | None = None,
    *,
    direction: Direction = "forward",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""KL forget loss: the negative of :func:`kl_divergence`, to minimize.

    $$
    \mathcal{L}_{KL} = -\frac{1}{|M|}\sum_{t\in M} \mathrm{KL}_t
    $$

    Minimizing it drives the model's predictions on the forget set away from the reference
    (the KL baseline of the SOUL paper, forward direction).

    Args:
        logits: {logits}
        ref_logits: the frozen reference, same shape, dtype and device.
        labels: selects positions as in :func:`kl_divergence`; ``None`` counts every position.
        direction: ``"forward"`` (KL(P_theta || P_ref)) or ``"reverse"``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Returns:
        Minus :func:`kl_divergence` of the same arguments.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> ref_logits = torch.tensor([math.log(2), 0.0, 0.0, 0.0]).expand(1, 3, 4)  # q = 2/5, 1/5, ...
        >>> kl = sum(0.25 * math.log(0.25 / q) for q in (0.4, 0.2, 0.2, 0.2))  # KL(P || Q) per token
        >>> kl_loss(logits, ref_logits, labels), -kl  # ascent on the KL: its negative
        (tensor(-0.0499), -0.04985675617422343)
    """
    return -kl_divergence(
        logits,
        ref_logits,
        labels,
        direction=direction,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
        validate=validate,
        inplace_backward=inplace_backward,
        vocab_group=vocab_group,
    )
