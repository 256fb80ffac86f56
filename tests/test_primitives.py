"""The token reductions against the float64 reference, and their own invariants."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unlearning_losses import kl_divergence, token_logprobs
from unlearning_losses.bench.measure import peak_extra_bytes
from unlearning_losses.ops import chunked
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference
from unlearning_losses.testing.strategies import batches


@given(batches())
def test_token_logprobs_match_reference(case):
    assert_close_to_reference(
        lambda x: token_logprobs(x, case.labels, shift=case.shift),
        lambda x: ref.token_logprobs(x, case.labels, case.shift),
        case,
    )


@given(batches(), st.sampled_from(["forward", "reverse"]))
def test_per_token_kl_matches_reference(case, direction):
    def ours(x):
        return kl_divergence(
            x, case.ref_logits, case.labels, direction=direction, shift=case.shift, reduction="none"
        )

    def expected(x):
        rows, _, valid, shape = ref.align(x, case.labels, case.shift)
        ref_rows = ref.align(case.ref_logits.double(), case.labels, case.shift)[0]
        per_row = ref.token_kl(rows, ref_rows, direction)
        return torch.where(valid, per_row, torch.zeros_like(per_row)).reshape(shape)

    assert_close_to_reference(ours, expected, case)


@given(batches(min_vocab=2), st.sampled_from(["forward", "reverse"]))
def test_results_do_not_depend_on_chunk_size(case, direction):
    def run():
        x = case.logits.clone().requires_grad_(True)
        lp = token_logprobs(x, case.labels, shift=case.shift, backend="torch")
        kl = kl_divergence(
            x,
            case.ref_logits,
            case.labels,
            direction=direction,
            shift=case.shift,
            reduction="none",
            backend="torch",
        )
        (lp.sum() + kl.sum()).backward()
        return lp.detach(), kl.detach(), x.grad

    default = run()
    original = chunked.CHUNK_BYTES
    try:
        chunked.CHUNK_BYTES = 1  # one row per chunk
        one_row = run()
    finally:
        chunked.CHUNK_BYTES = original
    for a, b in zip(default, one_row, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@given(batches(dtypes=[torch.float64, torch.float32]))
def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative(case):
    # At p = q the promise is exact (docs/conventions.md §2): value and gradient are 0, not small,
    # in both directions, since both distributions come from the same logits by the same steps.
    for direction in ("forward", "reverse"):
        x = case.logits.clone().requires_grad_(True)
        same = kl_divergence(
            x, case.logits, case.labels, direction=direction, shift=case.shift, reduction="none"
        )
        same.sum().backward()
        assert torch.equal(same, torch.zeros_like(same)), direction
        assert torch.equal(x.grad, torch.zeros_like(x.grad)), direction
    for direction in ("forward", "reverse"):
        kl = kl_divergence(
            case.logits,
            case.ref_logits,
            case.labels,
            direction=direction,
            shift=case.shift,
            reduction="none",
        )
        assert (kl >= -1e-5).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gradcheck_in_float64(direction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_logits = torch.randn(2, 4, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (2, 4), generator=g)
    labels[0, 2] = -100
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: kl_divergence(x, ref_logits, labels, direction=direction, reduction="none"),
        (logits,),
    )


def test_shift_reads_a_view_and_zeroes_the_last_positions_gradient(monkeypatch):
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    seen = []
    real_forward = chunked.logprobs_forward

    def spy(x, targets, valid):
        seen.append(x)
        return real_forward(x, targets, valid)

    monkeypatch.setattr(chunked, "logprobs_forward", spy)
    token_logprobs(logits, labels, backend="torch").sum().backward()
    # The kernel got the caller's own storage, unshifted: it reads rows [:, :T-1] in place.
    (read,) = seen
    assert read.data_ptr() == logits.data_ptr() and read.shape == logits.shape
    assert logits.grad.shape == logits.shape
    assert (logits.grad[:, -1] == 0).all()
    assert (logits.grad[:, :-1] != 0).any()


def test_nan_logits_propagate():
    logits = torch.randn(1, 3, 5)
    logits[0, 0, 2] = float("nan")
    labels = torch.tensor([[1, 2, 3]])
    assert torch.isnan(token_logprobs(logits, labels)[0, 0])
    assert torch.isnan(kl_divergence(logits, torch.randn(1, 3, 5), labels, reduction="none")[0, 0])
    assert torch.isnan(kl_divergence(torch.randn(1, 3, 5), logits, labels, reduction="none")[0, 0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_gradient_of_bf16_logits_is_bf16_and_needs_no_float32_copy():
    """The peak memory of forward+backward beyond the inputs is the bf16 gradient and chunks:
    a float32 copy of the logits would add twice their size."""
    logits = torch.randn(4, 257, 32000).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 32000, (4, 257))
    extra = peak_extra_bytes(
        lambda: token_logprobs(logits, labels, backend="torch").sum().backward(),
        torch.device("cpu"),
    )
    assert logits.grad.dtype == torch.bfloat16
    logits_bytes = logits.numel() * logits.element_size()
    assert extra < 1.5 * logits_bytes, f"{extra / 2**20:.0f} MiB for {logits_bytes / 2**20:.0f} MiB"
