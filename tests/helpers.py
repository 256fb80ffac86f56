"""Comparing the package against the float64 reference: values and gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from cases import GRAD_RTOL, VALUE_ATOL, VALUE_RTOL, Case


def value_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, upstream: float
):
    """``fn(logits)`` and the gradient of ``upstream * fn(logits).sum()`` w.r.t. the logits."""
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x)
    (value.sum() * upstream).backward()
    return value.detach(), x.grad


def assert_matches_reference(case: Case, ours, reference, sensitivity: float = 1.0) -> None:
    """``ours`` on the case's logits equals ``reference`` on their float64 values, value and grad.

    ``sensitivity`` scales the allowance for the accumulation dtype's own error, for losses whose
    derivative in the log-probs exceeds 2 (e.g. weights that depend on the log-probs times them).
    """
    value, grad = value_and_grad(ours, case.logits, case.upstream)
    ref_value, ref_grad = value_and_grad(reference, case.logits.double(), case.upstream)
    expected_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert value.dtype == expected_dtype
    assert grad.dtype == case.dtype
    assert torch.isfinite(value).all()
    # log p = z - logsumexp(z) in the accumulation dtype is exact only to eps * |z|, and every loss
    # here has |d loss / d log p| <= 2: that much error is the accumulation dtype's own.
    both = torch.cat([case.logits.double().flatten(), case.ref_logits.double().flatten()])
    finite = both[torch.isfinite(both)]
    magnitude = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    eps = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps
    conditioning = 8 * eps * magnitude * sensitivity
    torch.testing.assert_close(
        value.double(),
        ref_value,
        rtol=VALUE_RTOL[case.dtype],
        atol=VALUE_ATOL[case.dtype] + conditioning,
    )
    # Gradient entries are rounded once to the logits' dtype: compare relative to the largest.
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    rtol = GRAD_RTOL[case.dtype]
    conditioning *= abs(case.upstream)
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=rtol, atol=rtol * scale + conditioning + 1e-12
    )
