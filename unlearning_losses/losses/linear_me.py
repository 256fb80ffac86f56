"""The maximum-entropy forget loss from hidden states and the output head: the logits are never
materialised."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .._doc import shared_arguments
from ..ops.linear_parallel import vocab_parallel_uniform_kl
from ..ops.linear_uniform_kl import LinearUniformKL, LinearUniformKLSum
from ..reductions import REDUCTIONS, Reduction, token_reduce
from .linear import _align, _scalar_scale


@shared_arguments
def linear_me_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    r""":func:`~unlearning_losses.me_loss` of ``hidden @ weight.T + bias``, the logits never
    materialised: $\mathrm{KL}(U \,\|\, p_t)$ per token, its gradient $p_j - 1/V$ with respect
    to the logits, formed chunk by chunk (in the forward pass for a scalar reduction).

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        A float32 scalar (float64 for a float64 head), or per-token values for ``"none"``;
        differentiable in ``hidden``, ``weight`` and ``bias``. No valid token gives 0.

    Example:
        >>> import torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: uniform already
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> linear_me_loss(hidden, head, labels)
        tensor(0.)
    """
    tokens, weight, bias, logit_map, vocab = _align(
        hidden,
        (weight, bias, vocab_group),
        labels,
        ignore_index,
        shift,
        validate,
        chunk_rows,
        logit_scale,
        logit_softcap,
    )
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.hidden, reduction)
    if reduction == "none" or vocab is not None:
        if vocab is not None:
            per_token = vocab_parallel_uniform_kl(
                tokens.hidden, (weight, bias), tokens.valid, vocab, logit_map, chunk_rows
            )
        else:
            per_token = LinearUniformKL.apply(
                tokens.hidden, weight, bias, tokens.valid, chunk_rows, logit_map
            )
        reduced = token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
        return tokens.unflatten(reduced)
    # A scalar: every token's coefficient is known now, so the gradient is formed in this pass.
    scale = _scalar_scale(tokens, reduction, num_items)
    total = LinearUniformKLSum.apply(
        tokens.hidden,
        weight,
        bias,
        tokens.valid,
        scale,
        chunk_rows,
        logit_map,
        torch.is_grad_enabled(),
    )
    return tokens.sharding.sum_over_tokens(total)
