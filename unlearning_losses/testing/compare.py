"""A loss against its float64 reference: values and gradients, with tolerances from the dtype.

The tolerances follow from how the library computes (docs/conventions.md §1): values accumulate in
float32 whatever the logits' dtype (float64 stays float64), and each gradient element is rounded
once to the logits' dtype. On top comes the problem's own conditioning:
``log p = z - logsumexp(z)`` in the accumulation dtype is exact only to ``eps * |z|``, so logits
of 1e4 allow that much more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .strategies import Case

# Values to float32 accuracy whatever the dtype (accumulation is float32).
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
VALUE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# Gradients come back in the logits' dtype: one rounding of each element.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

Loss = Callable[[Tensor], Tensor]


def value_and_grad(fn: Loss, logits: Tensor, upstream: float) -> tuple[Tensor, Tensor]:
    """``fn(logits)`` and the gradient of ``upstream * fn(logits).sum()`` w.r.t. the logits."""
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x)
    # A value that does not require grad (a constant 0 for a batch whose labels are all
    # ignored) has a zero gradient, which autograd would refuse to compute.
    if value.requires_grad:
        (value.sum() * upstream).backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return value.detach(), grad


def assert_close_to_reference(
    fn: Loss,
    ref_fn: Loss,
    case: Case,
    *,
    sensitivity: float = 1.0,
) -> None:
    """``fn(case.logits)`` equals ``ref_fn`` on their float64 values, in value and gradient.

    Args:
        fn: the loss under test, a function of the logits (close over labels and options).
        ref_fn: its float64 reference, a function of float64 logits.
        case: a drawn :class:`~.strategies.Case` (its ``upstream`` scales the gradient).
        sensitivity: more allowance for the accumulation dtype's own error, for losses whose
            derivative in the log-probs exceeds 2 (weights that depend on the log-probs).

    Raises:
        AssertionError: naming the worst element, its index, both values and the tolerance.
    """
    value, grad = value_and_grad(fn, case.logits, case.upstream)
    ref_value, ref_grad = value_and_grad(ref_fn, case.logits.double(), case.upstream)
    accumulation = torch.float64 if case.dtype == torch.float64 else torch.float32
    if value.dtype != accumulation:
        raise AssertionError(f"the value must be {accumulation}; got {value.dtype}")
    if grad.dtype != case.dtype:
        raise AssertionError(f"the gradient must be {case.dtype} like the logits; got {grad.dtype}")
    conditioning = _conditioning(case, accumulation) * sensitivity
    _assert_close(
        "value",
        value.double(),
        ref_value,
        rtol=VALUE_RTOL[case.dtype],
        atol=VALUE_ATOL[case.dtype] + conditioning,
    )
    # Gradient entries are rounded once to the logits' dtype: relative to the largest entry.
    rtol = GRAD_RTOL[case.dtype]
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    atol = rtol * scale + conditioning * abs(case.upstream) + 1e-12
    _assert_close("gradient of the logits", grad.double(), ref_grad, rtol=rtol, atol=atol)


def _conditioning(case: Case, accumulation: torch.dtype) -> float:
    """The accumulation dtype's own error on log-probs of logits this large (every loss here
    has ``|d loss / d log p| <= 2``)."""
    both = torch.cat([case.logits.double().flatten(), case.ref_logits.double().flatten()])
    finite = both[torch.isfinite(both)]
    magnitude = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    return 8 * torch.finfo(accumulation).eps * magnitude


def _assert_close(what: str, actual: Tensor, expected: Tensor, *, rtol: float, atol: float) -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` (NaN only against NaN),
    failing with the worst element."""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: shape {tuple(actual.shape)}, the reference's {tuple(expected.shape)}"
        )
    allowed = atol + rtol * expected.abs()
    excess = (actual - expected).abs() - allowed
    both_nan = actual.isnan() & expected.isnan()
    same_inf = (actual == expected) & actual.isinf()
    excess = torch.where(both_nan | same_inf, -1.0, excess.nan_to_num(nan=float("inf")))
    if excess.numel() == 0 or excess.max() <= 0:
        return
    flat = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), excess.shape))
    raise AssertionError(
        f"{what} differs from the float64 reference at index {index}: got "
        f"{actual.flatten()[flat].item():.10g}, reference {expected.flatten()[flat].item():.10g}, "
        f"tolerance {allowed.flatten()[flat].item():.3g} (atol {atol:.3g} + rtol {rtol:.3g} * "
        f"|reference|); {int((excess > 0).sum())} of {excess.numel()} element(s) outside"
    )
