r"""Forget losses that distil the model toward a soft target without the label: UNDIAL and CE-U.

Both are the token mean of the cross-entropy $-\sum_v q_v \log p_\theta(v)$ from a
constant target distribution Q to the model. Q is a softmax of logits with the label's logit
lowered: by ``beta`` on the reference model's logits (UNDIAL) or removed from the model's own
detached logits (CE-U). One fused pass forward, one backward (the Triton KL kernels in their
soft-target mode on CUDA, the chunked path elsewhere); the gradient w.r.t. the logits is ``p - q``.
UNDIAL takes ``inplace_backward``; CE-U cannot: its target is the model's own logits, which the
backward reads while it writes the gradient. With the vocabulary sharded over ranks, Q's normaliser
is a log-sum-exp over the whole vocabulary, joined over the group like the model's own.
"""

from __future__ import annotations

import math

from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..reductions import REDUCTIONS, Reduction, token_reduce


def _soft_target_mean(
    logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    label_shift: float,
    ignore_index: int,
    shift: bool,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    backend: str,
    validate: bool,
    vocab_group: object,
    inplace_backward: bool = False,
) -> Tensor:
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_group=vocab_group,
    )
    if ref_logits is None:
        vocab = (
            tokens.logits.shape[-1] if tokens.sharding.vocab is None else tokens.sharding.vocab.size
        )
        # A vocabulary shard's global width is a device tensor on accelerators: not read there.
        if isinstance(vocab, int) and vocab < 2:
            raise ValueError(
                "logits must have a vocabulary of at least 2 entries: removing the label from a "
                f"vocabulary of 1 leaves no target; got {tuple(logits.shape)}"
            )
        target_logits = tokens.logits.detach()
    else:
        target_logits = tokens.like_logits(ref_logits, "ref_logits")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    per_token = ops.soft_target_cross_entropy(
        tokens.logits,
        target_logits,
        tokens.targets,
        tokens.valid,
        label_shift=label_shift,
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )


@shared_arguments
def undial_loss(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    *,
    beta: float = 10.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""UNDIAL forget loss: self-distillation toward the reference with the label's logit lowered.

    $$
    q = \operatorname{softmax}(z^{ref} - \beta\, e_{y_t}), \qquad
    \mathcal{L}_{UNDIAL} = \frac{1}{|M|}\sum_{t\in M} -\sum_v q_v \log p_\theta(v)
    $$

    (Dong et al., 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
    Large Language Models"). The model is pulled toward the reference everywhere except that the
    memorised token is made less likely by the factor $e^{-\beta}$ before renormalising, which
    keeps the update bounded where gradient ascent diverges. Masked and shifted like every loss here
    (open-unlearning's version averages over every position, prompt and padding included).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being unlearned.
        ref_logits: the frozen reference, same shape, dtype and device (a constant; with
            ``vocab_group``, sharded like ``logits``).
        labels: ``(B, T)`` or ``(N,)``, ``ignore_index`` at prompt and padding.
        beta: how far the label's logit is lowered, >= 0 (default 10.0, open-unlearning's
            config; 0 is plain distillation to the reference).
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # the cross-entropy to any target from a uniform model is log V
        >>> undial_loss(logits, logits, labels), math.log(4)
        (tensor(1.3863), 1.3862943611198906)
    """
    beta = _checks.check_finite_number(beta, "beta", nonnegative=True)
    return _soft_target_mean(
        logits,
        ref_logits,
        labels,
        beta,
        ignore_index,
        shift,
        reduction,
        num_items_in_batch,
        backend,
        validate,
        vocab_group,
        inplace_backward,
    )


@shared_arguments
def ceu_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""CE-U (cross-entropy unlearning) forget loss, to minimize.

    $$
    q = \operatorname{softmax}\big(\operatorname{sg}[z]\ \text{with}\ z_{y_t} = -\infty\big),
    \qquad \mathcal{L}_{CE\text{-}U} = \frac{1}{|M|}\sum_{t\in M} -\sum_{v} q_v \log p_\theta(v)
    $$

    (Yang et al., 2025, "CE-U: Cross Entropy Unlearning"). The target is the model's own
    distribution with the label removed and renormalised, so the gradient ``p - q`` moves mass off
    the label only: at the label it is $p_y$, bounded, unlike gradient ascent's. The paper
    also leaves out each answer's first token; mask it in ``labels`` for that (open-unlearning's
    ``ignore_first_n_answer_tokens``; see :func:`unlearning_losses.compat.open_unlearning.ceu_loss`).

    A scored row whose label is its only finite logit has no target and gives NaN.

    There is no ``inplace_backward``: the target is the model's own logits (detached), so the
    gradient buffer would also be the backward's read-only input, the target. The log-prob
    backward of GA or NPO, and UNDIAL's with its separate reference, overwrite only the tensor
    they differentiate; here the result would rest on every backend reading each block of the
    target before writing that block's gradient, and the backward op declares that it mutates its
    gradient buffer alone, which ``torch.compile`` relies on.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)`` with ``V >= 2``.
        ignore_index: {ignore_index}
        labels: {labels}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        vocab_group: {vocab_group}

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> ceu_loss(logits, labels), math.log(4)  # a uniform model: log V for any target
        (tensor(1.3863), 1.3862943611198906)
    """
    return _soft_target_mean(
        logits,
        None,
        labels,
        math.inf,
        ignore_index,
        shift,
        reduction,
        num_items_in_batch,
        backend,
        validate,
        vocab_group,
    )
