"""What several loss families share: the weighted token reduction of label log-probs, and the
reference model's log-probs from cached values or reference logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _checks, _tokens, ops
from ..reductions import REDUCTIONS, token_reduce

#: From the detached log-probs ``(B, L)`` to per-token weights (constants of the backward).
WeightsOf = Callable[[Tensor], Tensor]
#: From the validated tokens to their ``WeightsOf``; runs before the log-prob pass, so it may check
#: its own inputs (a reference) before any heavy work.
WeightsFor = Callable[[_tokens.Tokens], WeightsOf]


def weights_from_logprobs(weights_of: WeightsOf) -> WeightsFor:
    """Weights that need nothing from the tokens but their log-probs (WGA, SatImp)."""
    return lambda _tokens: weights_of


def reduce_weighted_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int,
    shift: bool,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    backend: str,
    validate: bool,
    inplace_backward: bool,
    vocab_group: object = None,
    weights_for: WeightsFor | None = None,
) -> Tensor:
    """The token reduction of ``w_t * log p(y_t)``: ``w_t = 1`` unless ``weights_for`` is given
    (WGA, SatImp, TNPO: see ``WeightsFor``)."""
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
    weights_of = weights_for(tokens) if weights_for is not None else None
    logprobs = ops.label_logprobs(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
        vocab=tokens.sharding.vocab,
    )
    if weights_of is not None:
        logprobs = logprobs * weights_of(logprobs.detach())
    return tokens.unflatten(
        token_reduce(logprobs, tokens.valid, reduction, num_items, tokens.sharding)
    )


def reference_logprobs(
    tokens: _tokens.Tokens,
    ref_logprobs: Tensor | None,
    ref_logits: Tensor | None,
    backend: str,
    *,
    names: tuple[str, str] = ("ref_logprobs", "ref_logits"),
) -> Tensor:
    """The reference model's per-token log-probs ``(B, L)``, from exactly one of the two sources
    (named ``names`` in messages)."""
    logprobs_name, logits_arg = names
    if (ref_logprobs is None) == (ref_logits is None):
        raise ValueError(
            f"give exactly one of {logprobs_name} or {logits_arg}; got "
            + ("both" if ref_logprobs is not None else "neither")
        )
    if ref_logits is not None:
        ref_logits = tokens.like_logits(ref_logits, logits_arg)
        with torch.no_grad():
            return ops.label_logprobs(
                ref_logits,
                tokens.targets,
                tokens.valid,
                backend=backend,
                vocab=tokens.sharding.vocab,
            )
    ref_logprobs = tokens.local(ref_logprobs, logprobs_name, per_token=True)
    expected = tuple(tokens.targets.shape[1:] if tokens.flat else tokens.targets.shape)
    ref_logprobs = _checks.check_token_values(ref_logprobs, expected, tokens.logits, logprobs_name)
    return ref_logprobs.detach().reshape(tokens.targets.shape)
