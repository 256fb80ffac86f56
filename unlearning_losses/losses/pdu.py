"""Primal-dual unlearning (PDU): a logit-flattening forget term under a retain-loss constraint."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _tokens
from ..ops.numerics import accumulation_dtype
from ..reductions import REDUCTIONS, Reduction, token_reduce


def logit_margin_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    r"""The squared margin of the largest logit over the mean logit, at the forget tokens.

    $$
    \mathcal{L}_{F} = \frac{1}{|M|} \sum_{t \in M}
        \Bigl(\max_v z_{t,v} - \frac{1}{V} \sum_v z_{t,v}\Bigr)^2
    $$

    It is 0 exactly when every logit of a row is equal, so minimizing it drives the next-token
    distribution at the forget tokens towards uniform (maximum entropy): the forget objective of
    primal-dual unlearning (Entesari et al., 2025, "Constrained Entropic Unlearning: A Primal-Dual
    Framework for Large Language Models"). The gradient w.r.t. a row's logits is
    $2m\,(\mathbb{1}[v = \arg\max] - 1/V)$ for margin $m$ (ties: the first maximum).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, any float dtype.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding; only
            whether a label is ignored matters.
        ignore_index: the label value of ignored positions.
        shift: Hugging Face causal-LM shift for 3-D input (``logits[:, t]`` counts when
            ``labels[:, t+1]`` is not ignored).
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"`` (per token, 0 at ignored).
        num_items_in_batch: divide the sum by this instead of the local count. ``"mean"`` only.

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> logit_margin_loss(torch.zeros(1, 3, 5), labels)
        tensor(0.)
    """
    # The margin's max and mean run over the whole row: a vocabulary shard is refused by name.
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend="torch",
        vocab_parallel=False,
    )
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    length = tokens.valid.shape[1]
    rows = tokens.logits[:, :length]
    acc = accumulation_dtype(rows.dtype)
    # Reductions over the vocabulary in the logits' dtype with a wider accumulator: no float32
    # copy of the logits.
    margin = rows.amax(-1).to(acc) - rows.mean(-1, dtype=acc)
    # Masked before squaring: an ignored row's margin may be inf (a -inf logit), and the square's
    # gradient there, 2 * inf * 0, would be NaN.
    per_token = torch.where(tokens.valid, margin, 0.0).square()
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )


def pdu_loss(
    forget_loss: Tensor,
    retain_loss: Tensor,
    *,
    dual: float,
    retain_epsilon: float,
    gamma: float = 1.0,
) -> Tensor:
    r"""The primal-dual unlearning Lagrangian: $\gamma\,\mathcal{L}_F + \lambda\,(\mathcal{L}_R - \epsilon)$.

    The model minimizes it for a fixed dual variable $\lambda \ge 0$ (``dual``), which
    :func:`pdu_dual_update` then raises while the retain loss exceeds its budget $\epsilon$
    and lowers (to 0 at most) once it is met: the constrained problem
    $\min \mathcal{L}_F$ subject to $\mathcal{L}_R \le \epsilon$ (Entesari et al., 2025).

    Args:
        forget_loss: a scalar forget term, usually :func:`logit_margin_loss`.
        retain_loss: a scalar retain term, e.g. :func:`unlearning_losses.nll_loss` on the retain set.
        dual: the current dual variable $\lambda \ge 0$.
        retain_epsilon: the retain-loss budget $\epsilon$.
        gamma: weight of the forget term.

    Returns:
        A scalar in the dtype of ``forget_loss + retain_loss``.

    Example:
        >>> import torch
        >>> pdu_loss(torch.tensor(2.0), torch.tensor(1.5), dual=0.5, retain_epsilon=1.0)
        tensor(2.2500)
    """
    dual = _checks.check_finite_number(dual, "dual", nonnegative=True)
    retain_epsilon = _checks.check_finite_number(retain_epsilon, "retain_epsilon")
    gamma = _checks.check_finite_number(gamma, "gamma")
    forget_loss = _checks.check_tensor(forget_loss, "forget_loss")
    retain_loss = _checks.check_tensor(retain_loss, "retain_loss")
    return gamma * forget_loss + dual * (retain_loss - retain_epsilon)


def pdu_dual_update(
    dual: float, retain_loss: Tensor | float, *, retain_epsilon: float, step_size: float = 1.0
) -> float:
    r"""One projected dual ascent step: $\lambda \leftarrow \max(0, \lambda + \eta\,(\mathcal{L}_R - \epsilon))$.

    Call it once per optimizer step (or per epoch with the epoch's mean retain loss) after the
    backward pass. A tensor ``retain_loss`` is read with ``.item()``: one host sync per call.

    Args:
        dual: the current dual variable $\lambda \ge 0$.
        retain_loss: the retain loss measured at this step.
        retain_epsilon: the retain-loss budget $\epsilon$.
        step_size: the dual step $\eta > 0$.

    Returns:
        The new dual variable, a Python float.

    Example:
        >>> pdu_dual_update(0.5, 1.5, retain_epsilon=1.0, step_size=2.0)
        1.5
    """
    dual = _checks.check_finite_number(dual, "dual", nonnegative=True)
    retain_epsilon = _checks.check_finite_number(retain_epsilon, "retain_epsilon")
    step_size = _checks.check_finite_number(step_size, "step_size", positive=True)
    if isinstance(retain_loss, Tensor):
        retain_loss = retain_loss.detach()
    value = _checks.check_finite_number(retain_loss, "retain_loss")
    return max(0.0, dual + step_size * (value - retain_epsilon))
