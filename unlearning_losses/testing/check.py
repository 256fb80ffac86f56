"""``check_loss``: the whole property-based test of a token loss, in one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import given, settings
from torch import Tensor

from .compare import VALUE_ATOL, VALUE_RTOL, assert_close_to_reference, value_and_grad
from .strategies import Case, batches, check_batches_options, check_int, check_members, check_number

TokenLoss = Callable[[Tensor, Tensor], Tensor]
DEFAULT_PROPERTIES = ("reference", "empty", "masking")


def check_loss(
    fn: TokenLoss,
    ref_fn: TokenLoss,
    *,
    properties: Sequence[str] = DEFAULT_PROPERTIES,
    sensitivity: float = 1.0,
    max_examples: int | None = None,
    **strategy_options,
) -> None:
    """Run Hypothesis properties of ``fn(logits, labels)`` against ``ref_fn``, its float64 math.

    Cases come from :func:`~.strategies.batches` (``strategy_options`` pass through; by default
    ``(N, V)`` logits aligned with their labels, every dtype, extreme scales, masked vocabulary
    entries, ignored labels; with ``three_d=True`` labels follow the Hugging Face shift). The
    properties:

    - ``"reference"``: value and gradient of the logits equal the reference's within the
      dtype's tolerance (:func:`~.compare.assert_close_to_reference`);
    - ``"empty"``: with every label ignored the value is 0 and the gradient 0, never NaN;
    - ``"masking"``: ignoring a position (label ``-100``) equals dropping its row, in value and
      gradient (2-D cases);
    - ``"additive"`` (for token *sums*): the loss of the batch is the sum of its two halves'.

    Raises:
        AssertionError: from the first failing example, after Hypothesis has shrunk it; the
            message names the property, the worst element and the tolerance.
        TypeError: before any example, an option of the wrong type (naming it); from an
            example, ``fn`` or ``ref_fn`` returning anything but a tensor (naming which).
        ValueError: before any example, an option out of its range or an unknown one.
    """
    fn = _returning_a_tensor(fn, "fn", "the loss under test")
    ref_fn = _returning_a_tensor(ref_fn, "ref_fn", "the reference")
    check_members("properties", properties, choices=tuple(CHECKS), kind=str, what="property names")
    check_number("sensitivity", sensitivity, least=0.0)
    check_int("max_examples", max_examples, least=1, optional=True)
    options = {"three_d": False, **strategy_options}
    check_batches_options(options)
    if options["three_d"]:
        options.setdefault("shift", True)

    @given(batches(**options))
    def run(case: Case) -> None:
        for name in properties:
            try:
                CHECKS[name](fn, ref_fn, case, sensitivity)
            except AssertionError as error:
                raise AssertionError(f"property {name!r}: {error}") from None

    # One failure, shrunk, rather than a group of them: the message stays readable.
    overrides: dict[str, Any] = {"report_multiple_bugs": False}
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    settings(**overrides)(run)()


def _returning_a_tensor(loss: object, argument: str, role: str) -> TokenLoss:
    """``loss``, refusing by name a value that is not a tensor: a float otherwise fails later
    as "'float' object has no attribute 'sum'", whichever of ``fn`` and ``ref_fn`` returned it."""
    if not callable(loss):
        raise TypeError(f"{argument} ({role}) must be callable; got {loss!r}")
    name = getattr(loss, "__qualname__", repr(loss))

    def checked(logits: Tensor, labels: Tensor) -> Tensor:
        value = loss(logits, labels)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{argument} ({role}, {name}) returned {type(value).__name__}; "
                "expected a torch.Tensor"
            )
        return value

    return checked


def _reference(fn: TokenLoss, ref_fn: TokenLoss, case: Case, sensitivity: float) -> None:
    assert_close_to_reference(
        lambda x: fn(x, case.labels),
        lambda x: ref_fn(x, case.labels),
        case,
        sensitivity=sensitivity,
    )


def _empty(fn: TokenLoss, ref_fn: TokenLoss, case: Case, sensitivity: float) -> None:
    ignored = torch.full_like(case.labels, -100)
    value, grad = value_and_grad(lambda x: fn(x, ignored), case.logits, case.upstream)
    if not (value == 0).all():
        raise AssertionError(f"with every label ignored the value must be 0; got {value}")
    if not (grad == 0).all():
        worst = grad.abs().nan_to_num(nan=float("inf")).max().item()
        raise AssertionError(f"with every label ignored the gradient must be 0; got up to {worst}")


def _masking(fn: TokenLoss, ref_fn: TokenLoss, case: Case, sensitivity: float) -> None:
    labels = case.labels
    valid = (labels != -100).nonzero()
    if labels.dim() != 1 or len(labels) < 2 or len(valid) == 0:
        return
    drop = int(valid[0])
    keep = torch.arange(len(labels)) != drop
    masked = labels.clone()
    masked[drop] = -100
    value, grad = value_and_grad(lambda x: fn(x, masked), case.logits, case.upstream)
    kept_value, kept_grad = value_and_grad(
        lambda x: fn(x, labels[keep]), case.logits[keep], case.upstream
    )
    rtol, atol = VALUE_RTOL[case.dtype], VALUE_ATOL[case.dtype]
    if not torch.allclose(value.double(), kept_value.double(), rtol=rtol, atol=atol):
        raise AssertionError(
            f"ignoring position {drop} gives {value.tolist()}, dropping it {kept_value.tolist()}"
        )
    if not (grad[drop] == 0).all():
        raise AssertionError(f"an ignored position (row {drop}) must get a zero gradient")
    scale = max(kept_grad.abs().max().item(), 1e-30) if kept_grad.numel() else 1.0
    if not torch.allclose(grad[keep].double(), kept_grad.double(), rtol=1e-2, atol=1e-2 * scale):
        raise AssertionError(f"ignoring position {drop} changes the other rows' gradients")


def _additive(fn: TokenLoss, ref_fn: TokenLoss, case: Case, sensitivity: float) -> None:
    if case.labels.shape[0] < 2:
        return
    half = case.labels.shape[0] // 2
    whole = fn(case.logits, case.labels).double()
    parts = fn(case.logits[:half], case.labels[:half]).double()
    parts = parts + fn(case.logits[half:], case.labels[half:]).double()
    rtol, atol = VALUE_RTOL[case.dtype], VALUE_ATOL[case.dtype]
    if not torch.allclose(whole, parts, rtol=rtol, atol=atol * max(1.0, whole.abs().item())):
        raise AssertionError(f"the batch gives {whole.item()}, its halves add to {parts.item()}")


CHECKS: dict[str, Callable[[TokenLoss, TokenLoss, Case, float], None]] = {
    "reference": _reference,
    "empty": _empty,
    "masking": _masking,
    "additive": _additive,
}
