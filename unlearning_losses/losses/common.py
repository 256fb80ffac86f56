"""What several loss families share: the weighted token reduction of label log-probs, and the
reference model's log-probs from cached values or from its logits (or hidden states)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .. import _checks, _tokens
from ..reductions import REDUCTIONS, token_reduce

#: From the detached log-probs ``(B, L)`` to per-token weights (constants of the backward).
WeightsOf = Callable[[Tensor], Tensor]
#: From the validated tokens to their ``WeightsOf``; runs before the log-prob pass, so it may check
#: its own inputs (a reference) before any heavy work.
WeightsFor = Callable[[_tokens.Tokens], WeightsOf]


def weights_from_logprobs(weights_of: WeightsOf) -> WeightsFor:
    """Weights that need nothing from the tokens but their log-probs (WGA, SatImp)."""
    return lambda _tokens: weights_of


@dataclass(frozen=True)
class LogprobMean:
    """The token reduction of ``w_t * log p(y_t)`` (GA, NLL, IDK, WGA, SatImp, TNPO) with the
    options those public losses share, taken by name from a loss's own arguments (:meth:`of`),
    so each loss forwards them in one line instead of spelling every one out."""

    ignore_index: int
    shift: bool
    reduction: str
    num_items_in_batch: int | Tensor | None
    backend: str
    validate: bool
    inplace_backward: bool
    vocab_group: object

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> LogprobMean:
        """The options among a public loss's ``arguments`` (its ``locals()`` on entry)."""
        return cls(**{name: arguments[name] for name in _LOGPROB_MEAN_OPTIONS})

    def __call__(
        self, logits: Tensor, labels: Tensor, weights_for: WeightsFor | None = None
    ) -> Tensor:
        """The reduction of ``logits`` scored at ``labels``: ``w_t = 1`` unless ``weights_for``
        is given (WGA, SatImp, TNPO: see ``WeightsFor``)."""
        tokens = _tokens.align(
            logits,
            labels,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.backend,
            validate=self.validate,
            vocab_group=self.vocab_group,
        )
        _checks.check_choice(self.reduction, REDUCTIONS, "reduction")
        num_items = _checks.check_mean_count(self.num_items_in_batch, tokens.logits, self.reduction)
        weights_of = weights_for(tokens) if weights_for is not None else None
        logprobs = tokens.label_logprobs(self.backend, inplace_backward=self.inplace_backward)
        if weights_of is not None:
            logprobs = logprobs * weights_of(logprobs.detach())
        return tokens.unflatten(
            token_reduce(logprobs, tokens.valid, self.reduction, num_items, tokens.sharding)
        )


# Named once at import: ``torch.compile`` traces the losses but not ``dataclasses.fields``.
_LOGPROB_MEAN_OPTIONS = tuple(option.name for option in fields(LogprobMean))


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

    def from_logits(ref_logits: Tensor) -> Tensor:
        return tokens.label_logprobs(backend, logits=tokens.like_logits(ref_logits, names[1]))

    return cached_or_computed_reference(tokens, ref_logprobs, ref_logits, from_logits, names)


def cached_or_computed_reference(
    tokens: _tokens.Tokens,
    ref_logprobs: Tensor | None,
    ref_input: Any,
    logprobs_of: Callable[[Any], Tensor],
    names: tuple[str, str],
) -> Tensor:
    """The reference's per-token log-probs ``(B, L)``, detached: cached ``ref_logprobs`` checked
    against ``tokens``, or ``logprobs_of(ref_input)`` (the reference's logits or hidden states)
    computed without a graph. Exactly one of the two must be given; ``names`` are theirs."""
    logprobs_name, input_name = names
    if (ref_logprobs is None) == (ref_input is None):
        raise ValueError(
            f"give exactly one of {logprobs_name} or {input_name}; got "
            + ("both" if ref_logprobs is not None else "neither")
        )
    if ref_input is not None:
        with torch.no_grad():
            return logprobs_of(ref_input)
    ref_logprobs = tokens.local(ref_logprobs, logprobs_name, per_token=True)
    expected = tuple(tokens.targets.shape[1:] if tokens.flat else tokens.targets.shape)
    ref_logprobs = _checks.check_token_values(ref_logprobs, expected, tokens.logits, logprobs_name)
    return ref_logprobs.detach().reshape(tokens.targets.shape)
