"""Inverted hinge (IHL) unlearning: the label's probability pushed below its strongest rival's."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..ops import vocab_stats
from ..reductions import REDUCTIONS, Reduction, token_reduce


@shared_arguments
def ihl_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""Inverted hinge forget loss, to minimize.

    $$
    \mathrm{IHL}_t = 1 + p_\theta(y_t \mid y_{<t}) - \max_{v \ne y_t} p_\theta(v \mid y_{<t}),
    \qquad
    \mathcal{L}_{IHL} = \frac{1}{|M|} \sum_{t \in M} \mathrm{IHL}_t
    $$

    (Cha et al., ICLR 2025, "Towards Robust and Parameter-Efficient Knowledge Unlearning for
    LLMs"). Each term lies in $[0, 2]$: minimizing it lowers the label's probability only until
    another token overtakes it, which keeps the update bounded where gradient ascent diverges.
    With $a$ the runner-up (the first of the largest other logits on ties) and
    $c = p_y - p_a$, the gradient w.r.t. the logits is
    $p_y\,[j = y] - p_a\,[j = a] - c\,p_j$. A row whose label is its only finite logit has no
    runner-up: $p_a = 0$.

    The authors' code (``csm9493/efficient-llm-unlearning``, ``TOFU/dataloader.py``, a copy of
    torchmetrics' Crammer-Singer multiclass hinge) computes the same value from the
    probabilities, not their logarithms, clamped at 0 (a no-op: the margin is never below -1),
    averaged over the valid tokens of the batch with the same shift. It applies the softmax only
    when some value of the batch lies outside ``[0, 1]``, so logits that all lie in ``[0, 1]``
    are taken as probabilities there; here the logits are always logits. Its ``IHL`` run adds
    the retain set's :func:`nll_loss` with weight 1 (gradient difference with IHL in place of
    ascent): ``combine_with_retain(ihl_loss(...), nll_loss(...))``.

    Args:
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import math, torch
        >>> logits = torch.tensor([math.log(2), 0.0, 0.0, 0.0]).expand(1, 3, 4)  # p = 2/5, 1/5, ...
        >>> ihl_loss(logits, torch.tensor([[-100, 0, 0]]))  # 1 + 2/5 - 1/5
        tensor(1.2000)
        >>> ihl_loss(logits, torch.tensor([[-100, 1, 1]]))  # 1 + 1/5 - 2/5
        tensor(0.8000)
    """
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_group=vocab_group,
    )
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    per_token = vocab_stats.inverted_hinge(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )
