"""Hypothesis strategies that draw the hard cases of a token loss (docs/conventions.md §1).

A drawn case takes its shape, dtype and flags from Hypothesis and its numbers from a seeded
generator: fast to draw, and still reproducible from the seed that Hypothesis shrinks.

- :func:`batches`: logits, labels (``-100`` at ignored positions, possibly every one) and a
  reference's logits that is near the model, far from it, or with underflowing tails;
- :func:`linear_batches`: hidden states and an output head instead of logits;
- :func:`state_dict_pairs`: a base and a fine-tuned state dict for task vectors;
- :func:`check_batches_options`: the options of :func:`batches`, refused by name when wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from numbers import Real

import torch
from hypothesis import strategies as st

from . import reference

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
REFERENCES = ("independent", "near", "far", "underflow")


@dataclass
class Case:
    """One drawn batch. ``upstream`` is the gradient that reaches the loss from above (not 1:
    the loss may be scaled or summed with others)."""

    logits: torch.Tensor
    labels: torch.Tensor
    ref_logits: torch.Tensor
    shift: bool
    upstream: float

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    @property
    def ref_logprobs(self) -> torch.Tensor:
        """The reference's per-token log-probs (float64), as a cached reference is passed."""
        return reference.token_logprobs(self.ref_logits, self.labels, self.shift)


@st.composite
def batches(
    draw,
    *,
    min_vocab: int = 1,
    max_vocab: int = 37,
    max_batch: int = 3,
    max_length: int = 6,
    three_d: bool | None = None,
    dtypes: Sequence[torch.dtype] = DTYPES,
    batch: int | None = None,
    shift: bool | None = None,
    scales: Sequence[float] = (1.0, 5.0, 1e4),
    masked_vocab: bool | None = None,
    empty: bool = True,
    references: Sequence[str] = ("independent",),
    device: str | torch.device = "cpu",
) -> Case:
    """A :class:`Case`: ``(B, T, V)`` or ``(N, V)`` logits and their labels.

    Args:
        min_vocab: the vocabulary size's range.
        max_vocab: the vocabulary size's range.
        max_batch: the batch's size and each sequence's length at most.
        max_length: the batch's size and each sequence's length at most.
        three_d: ``(B, T, V)`` (True), ``(N, V)`` (False) or either (None).
        dtypes: the logits' dtypes to draw from.
        batch: a fixed batch size instead of a drawn one.
        shift: the causal-LM shift (3-D only); drawn when None.
        scales: the logits' standard deviations to draw from (``1e4``: extreme logits).
        masked_vocab: ``-inf`` entries (a masked vocabulary, never at a label) always (True),
            never (False) or sometimes (None; never in float16).
        empty: allow batches in which every label is ignored.
        references: how the reference's logits relate to the model's: ``"independent"`` noise,
            ``"near"`` (equal up to 1e-3: the start of unlearning), ``"far"`` (another
            distribution) or ``"underflow"`` (a much sharper reference, some of whose
            probabilities fall below 1e-12).
        device: where the tensors live.
    """
    dtype = draw(st.sampled_from(list(dtypes)))
    is_3d = draw(st.booleans()) if three_d is None else three_d
    vocab = draw(st.integers(min_vocab, max(min_vocab, max_vocab)))
    batch = draw(st.integers(1, max_batch)) if batch is None else batch
    length = draw(st.integers(1, max_length))
    if shift is None:
        shift = draw(st.booleans()) if is_3d else False
    scale = draw(st.sampled_from(list(scales)))
    ignore_fractions = [0.0, 0.3, 1.0] if empty else [0.0, 0.3]
    ignore_frac = draw(st.sampled_from(ignore_fractions))
    can_mask = vocab > 2 and dtype != torch.float16
    mask_vocab = can_mask and (draw(st.booleans()) if masked_vocab is None else masked_vocab)
    relation = draw(st.sampled_from(list(references)))
    seed = draw(st.integers(0, 2**31 - 1))
    upstream = draw(st.sampled_from([1.0, -0.7, 3.0]))

    g = torch.Generator().manual_seed(seed)
    shape = (batch, length) if is_3d else (batch * length,)
    logits = torch.randn(*shape, vocab, generator=g) * scale
    noise = torch.randn(*shape, vocab, generator=g)
    ref_logits = {
        "independent": logits + noise * min(scale, 2.0),
        "near": logits + noise * 1e-3,
        "far": noise * 3.0,
        "underflow": logits * 8.0,
    }[relation]
    labels = torch.randint(0, vocab, shape, generator=g)
    if mask_vocab:
        # Masked vocabulary: -inf entries shared by model and reference, never at a label.
        masked = torch.rand(*shape, vocab, generator=g) < 0.3
        masked.scatter_(-1, labels.unsqueeze(-1), False)
        if shift:  # row t scores labels[:, t + 1]
            masked[:, :-1].scatter_(-1, labels[:, 1:].unsqueeze(-1), False)
        logits = logits.masked_fill(masked, float("-inf"))
        ref_logits = ref_logits.masked_fill(masked, float("-inf"))
    ignored = torch.rand(shape, generator=g) < ignore_frac
    labels = labels.masked_fill(ignored, -100)
    return Case(
        logits.to(dtype=dtype, device=device),
        labels.to(device),
        ref_logits.to(dtype=dtype, device=device),
        shift,
        upstream,
    )


def check_batches_options(options: Mapping[str, object]) -> None:
    """Refuse by name an unknown or out-of-range option of :func:`batches`, before anything is
    drawn: a wrong one otherwise fails deep inside torch or Hypothesis, naming no option.

    Raises:
        TypeError: an option of the wrong type.
        ValueError: an option out of its range, or an unknown one.
    """
    unknown = sorted(set(options) - set(_OPTION_CHECKS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; the options of batches are {', '.join(_OPTION_CHECKS)}"
        )
    for name, value in options.items():
        _OPTION_CHECKS[name](name, value)
    three_d = options.get("three_d")
    if options.get("shift") and three_d is not True:
        raise ValueError(
            "shift=True needs three_d=True (the causal-LM shift of (B, T, V) logits); "
            f"got three_d={three_d!r}"
        )


def check_int(name: str, value: object, *, least: int, optional: bool = False) -> None:
    """``value`` is an int ``>= least`` (or None, when ``optional``); a bool is no int here."""
    if optional and value is None:
        return
    expected = f"an int >= {least}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be {expected}; got {value!r}")


def check_number(name: str, value: object, *, least: float, what: str = "a finite number") -> None:
    """``value`` is a finite real number ``>= least`` (a bool is no number here)."""
    expected = f"{what} >= {least:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    if not math.isfinite(value) or value < least:
        raise ValueError(f"{name} must be {expected}; got {value!r}")


def check_members(
    name: str, value: object, *, choices: Sequence[object], kind: type, what: str
) -> None:
    """``value`` is a non-empty sequence of ``kind`` values, each among ``choices``."""
    expected = f"{what} among {tuple(choices)}"
    for item in _non_empty_sequence(name, value, expected):
        if not isinstance(item, kind):
            raise TypeError(f"{name} must be {expected}; got {item!r}")
        if item not in choices:
            raise ValueError(f"{name} must be {expected}; got {item!r}")


def _non_empty_sequence(name: str, value: object, what: str) -> Sequence[object]:
    # A string is a sequence, of characters: "near" would draw "n", "e", ...
    expected = f"a non-empty sequence of {what}"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    if not value:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return value


def _check_flag(name: str, value: object, *, optional: bool) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        expected = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {expected}; got {value!r}")


def _check_scales(name: str, value: object) -> None:
    for scale in _non_empty_sequence(name, value, "finite numbers >= 0"):
        check_number(name, scale, least=0.0, what="finite numbers")


def _check_device(name: str, value: object) -> None:
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or a torch.device; got {value!r}")
    # torch raises AssertionError for a backend it was built without ("cuda" on a CPU build).
    try:
        torch.empty(0, device=value)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(
            f"{name} must name a device usable here; got {value!r} ({error})"
        ) from None


_OPTION_CHECKS: dict[str, Callable[[str, object], None]] = {
    "min_vocab": partial(check_int, least=1),
    "max_vocab": partial(check_int, least=1),  # below min_vocab, min_vocab wins
    "max_batch": partial(check_int, least=1),
    "max_length": partial(check_int, least=1),
    "three_d": partial(_check_flag, optional=True),
    "dtypes": partial(check_members, choices=DTYPES, kind=torch.dtype, what="torch.dtype values"),
    "batch": partial(check_int, least=1, optional=True),
    "shift": partial(_check_flag, optional=True),
    "scales": _check_scales,
    "masked_vocab": partial(_check_flag, optional=True),
    "empty": partial(_check_flag, optional=False),
    "references": partial(check_members, choices=REFERENCES, kind=str, what="strings"),
    "device": _check_device,
}


@dataclass
class LinearCase:
    """Hidden states and an output head whose logits are ``hidden @ weight.T + bias``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    shift: bool
    upstream: float

    @property
    def logits(self) -> torch.Tensor:
        logits = self.hidden @ self.weight.T
        return logits if self.bias is None else logits + self.bias


@st.composite
def linear_batches(
    draw,
    *,
    max_hidden: int = 8,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    with_bias: bool | None = None,
    **batch_options,
) -> LinearCase:
    """A :class:`LinearCase`: a drawn batch's labels, with hidden states and a head whose
    logits have the batch's shape (``batch_options`` as :func:`batches`)."""
    case = draw(batches(dtypes=dtypes, masked_vocab=False, scales=(1.0,), **batch_options))
    hidden_size = draw(st.integers(1, max_hidden))
    bias = draw(st.booleans()) if with_bias is None else with_bias
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vocab = case.logits.shape[-1]
    kw = {"generator": g, "dtype": case.dtype}
    hidden = torch.randn(*case.labels.shape, hidden_size, **kw).to(case.logits.device)
    weight = torch.randn(vocab, hidden_size, **kw).to(case.logits.device)
    return LinearCase(
        hidden,
        weight,
        torch.randn(vocab, **kw).to(case.logits.device) if bias else None,
        case.labels,
        case.shift,
        case.upstream,
    )


@st.composite
def state_dict_pairs(
    draw,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16),
    max_tensors: int = 4,
    tied: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base state dict and that model fine-tuned a little: floating tensors of drawn dtypes,
    an integer buffer equal in both, and optionally a head tied to the embedding in both."""
    dtype = draw(st.sampled_from(list(dtypes)))
    count = draw(st.integers(1, max_tensors))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base: dict[str, torch.Tensor] = {
        f"layers.{i}.weight": torch.randn(3, 4, generator=g).to(dtype) for i in range(count)
    }
    base["embed.weight"] = torch.randn(5, 4, generator=g).to(dtype)
    base["position_ids"] = torch.arange(6)
    finetuned = {
        name: t + (0.05 * torch.randn(t.shape, generator=g)).to(t.dtype)
        if t.is_floating_point()
        else t.clone()
        for name, t in base.items()
    }
    if draw(st.booleans()) if tied is None else tied:
        base["lm_head.weight"] = base["embed.weight"]
        finetuned["lm_head.weight"] = finetuned["embed.weight"]
    return base, finetuned
