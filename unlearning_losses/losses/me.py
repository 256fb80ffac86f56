"""Maximum-entropy (ME) unlearning: the forget tokens' next-token distribution pulled to uniform."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..ops import vocab_stats
from ..reductions import REDUCTIONS, Reduction, token_reduce


@shared_arguments
def me_loss(
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
    r"""ME forget loss: the KL divergence from the uniform distribution to the model's, to minimize.

    $$
    \mathrm{KL}(U \,\|\, p_t) = -\log V - \frac{1}{V} \sum_v \log p_\theta(v \mid y_{<t}),
    \qquad
    \mathcal{L}_{ME} = \frac{1}{|M|} \sum_{t \in M} \mathrm{KL}(U \,\|\, p_t)
    $$

    (Yuan et al., ICLR 2025, "A Closer Look at Machine Unlearning for Large Language Models",
    whose ME+GD adds :func:`nll_loss` on the retain set). It is 0 exactly where the next-token
    distribution is uniform, its maximum entropy, so the model forgets by becoming maximally
    uncertain at the forget tokens rather than by pushing their probability down without bound.
    Per token it is the log-sum-exp less the mean logit, less $\log V$; its gradient w.r.t. the
    logits is $p_j - 1/V$. The labels only select the positions (their values are not read).

    A masked vocabulary (``-inf`` logits) lies outside the support: $U$ is then uniform over
    the row's $V'$ finite logits and $V'$ replaces $V$ (the gradient at a masked column is 0),
    so the loss stays finite where the formula over every column would be infinite. Without
    masked entries this is the formula above exactly: the direction KL(U || p) of the authors'
    code. The entropy form KL(p || U) = log V - H(p) has the same minimiser (the uniform
    distribution) but another gradient, $p_j(\log p_j + H(p))$, which vanishes as $p$ nears
    uniform; the paper's body, which might state that form, was not available to check.

    The authors' code (``sail-sg/closer-look-LLM-unlearning``, ``trainer/losses.py``,
    ``get_me_loss``) computes this direction, ``kl_div(log(softmax + 1e-12), uniform)``: the
    ``1e-12`` bounds each log-probability at about -27.6 (and so the loss of a very peaked
    distribution) and differs from the formula by up to ``1e-12 / p_v`` per entry. It averages
    over the valid tokens of the batch with the same shift, as here (a batch without one gives
    NaN there). Its ME+GD weighs this loss 0.1 and the retain NLL 1:
    ``combine_with_retain(me_loss(...), nll_loss(...), forget_weight=0.1)``.

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
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> me_loss(torch.zeros(1, 3, 4), labels)  # uniform already: its maximum entropy
        tensor(0.)
        >>> logits = torch.tensor([math.log(2), 0.0, 0.0, 0.0]).expand(1, 3, 4)  # p = 2/5, 1/5, ...
        >>> kl = sum(0.25 * math.log(0.25 / p) for p in (0.4, 0.2, 0.2, 0.2))  # KL(U || p)
        >>> me_loss(logits, labels), kl
        (tensor(0.0499), 0.04985675617422343)
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
    per_token = vocab_stats.uniform_kl(
        tokens.logits,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )
