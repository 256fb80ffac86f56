"""The generalised JSD in float32 against float64 math on the same float32 logits, where a direct
implementation cancels: a model near its reference (log-probabilities 1e-2 apart, subtracted, keep
a few digits; the divergence is second order in them while its terms are first order), and a
token holding almost all of both distributions (the gradient there is the small difference of
two near-equal log-ratios), on both backends and over a vocabulary split between two ranks.

Errors are in float32 units (eps): the gradient's in max-norm relative to its largest entry, the
value's relative per row.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

from unlearning_losses import jsd_loss
from unlearning_losses.ops import _triton_common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
BETAS = [0.5, 0.1, 0.9]
EPS = torch.finfo(torch.float32).eps
#: Near the reference the gradient keeps the rounding of float32 probabilities, as the KL
#: kernels' does (measured: 2.2-3.2 units; log-probabilities subtracted were 46 units off).
NEAR_UNITS = 8.0
#: A token holding all but ~1e-10 of both distributions, the rest 3 apart: every probability
#: carries the rounding of its log-probability, ``eps |log p|`` with ``log p`` near -25 for the
#: others and the log-sum-exp's ``eps |lse|`` for the token's (measured: gradient 4.0-7.4 units,
#: value 6.2-8.2; the row sum subtracted from the token's log-ratio was 22-99 units off).
DOMINANT_UNITS = 16.0


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-wide Triton tiles: a row of 256 spans 16 of them, so the kernels' running centres move."""
    monkeypatch.setattr(_triton_common, "MAX_BLOCK_V", 16)


def _logits(scale: float, dominant: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``(2, 4, 256)`` and reference logits ``scale`` apart; with ``dominant``,
    one column of each row raised by that much in both."""
    g = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(2, 4, 256, generator=g, dtype=torch.float64)
    ref_logits = logits + scale * torch.randn(2, 4, 256, generator=g, dtype=torch.float64)
    column = torch.randint(0, 256, (2, 4, 1), generator=g)
    raise_ = torch.full((2, 4, 1), dominant, dtype=torch.float64)
    logits, ref_logits = (
        logits.scatter_add(-1, column, raise_),
        ref_logits.scatter_add(-1, column, raise_),
    )
    return logits.float(), ref_logits.float()


def _float64_jsd(logits: torch.Tensor, ref_logits: torch.Tensor, beta: float):
    """Per-row ``beta KL(P || M) + (1 - beta) KL(Q || M)`` and the gradient of their sum,
    ``beta p_j (log(p_j / m_j) - KL(P || M))``, in float64 from the mixture itself."""
    logp, logq = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    log_mixture = torch.log(beta * p + (1 - beta) * q)
    kl_p = (p * (logp - log_mixture)).sum(-1, keepdim=True)
    kl_q = (q * (logq - log_mixture)).sum(-1)
    value = beta * kl_p.squeeze(-1) + (1 - beta) * kl_q
    return value, beta * p * (logp - log_mixture - kl_p)


def _units(logits, ref_logits, beta, **options) -> tuple[float, float]:
    """The value's and the gradient's float32 error in units of eps (see the module)."""
    expected_value, expected_grad = _float64_jsd(logits, ref_logits, beta)
    x = logits.clone().requires_grad_()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    value = jsd_loss(
        x, labels, ref_logits=ref_logits, beta=beta, shift=False, reduction="none", **options
    )
    (grad,) = torch.autograd.grad(value.sum(), x)
    value_error = ((value.double() - expected_value).abs() / expected_value.abs()).max()
    grad_error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
    return value_error.item() / EPS, grad_error.item() / EPS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_near_the_reference_keeps_float32_rounding(beta, backend):
    logits, ref_logits = (t.to(DEVICE) for t in _logits(1e-2))
    value_units, grad_units = _units(logits, ref_logits, beta, backend=backend)
    assert grad_units <= NEAR_UNITS, grad_units
    assert value_units <= NEAR_UNITS, value_units


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_of_a_dominant_token_keeps_float32_rounding(beta, backend):
    logits, ref_logits = (t.to(DEVICE) for t in _logits(3.0, dominant=25.0))
    value_units, grad_units = _units(logits, ref_logits, beta, backend=backend)
    assert grad_units <= DOMINANT_UNITS, grad_units
    assert value_units <= DOMINANT_UNITS, value_units


def _check_accuracy_over_ranks(rank: int) -> None:
    """The vocabulary split 130 + 126: each rank's shift, largest logit and row sums joined over
    the ranks, near the reference and with a dominant token."""
    columns = slice(0, 130) if rank == 0 else slice(130, 256)
    labels = torch.zeros(2, 4, dtype=torch.long)
    for (scale, dominant), units in (((1e-2, 0.0), NEAR_UNITS), ((3.0, 25.0), DOMINANT_UNITS)):
        logits, ref_logits = _logits(scale, dominant)
        expected_value, expected_grad = _float64_jsd(logits, ref_logits, 0.3)
        shard = logits[..., columns].clone().requires_grad_()
        value = jsd_loss(
            shard,
            labels,
            ref_logits=ref_logits[..., columns],
            beta=0.3,
            shift=False,
            reduction="none",
            vocab_group=dist.group.WORLD,
        )
        (grad,) = torch.autograd.grad(value.sum(), shard)
        value_error = ((value.double() - expected_value).abs() / expected_value.abs()).max()
        grad_error = (grad.double() - expected_grad[..., columns]).abs().max()
        grad_error /= expected_grad.abs().max()
        assert value_error <= units * EPS, (dominant, value_error / EPS)
        assert grad_error <= units * EPS, (dominant, grad_error / EPS)


def test_vocab_parallel_jsd_keeps_float32_rounding(tmp_path):
    run_on_ranks(_check_accuracy_over_ranks, 2, tmp_path)
