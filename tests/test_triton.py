"""The Triton kernels (on the CPU through TRITON_INTERPRET=1 without a GPU) against the float64
reference and against the chunked path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unlearning_losses import (
    ceu_loss,
    elm_loss,
    kl_divergence,
    rkld_loss,
    token_logprobs,
    undial_loss,
)
from unlearning_losses.ops import _triton_common
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import batches

pytestmark = pytest.mark.triton
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-wide tiles, so that the test vocabularies span one or several tiles."""
    monkeypatch.setattr(_triton_common, "MAX_BLOCK_V", 16)


def _on_device(case):
    case.logits, case.ref_logits = case.logits.to(DEVICE), case.ref_logits.to(DEVICE)
    case.labels = case.labels.to(DEVICE)
    return case


@settings(max_examples=15)
@given(batches(dtypes=LOW_PRECISION))
def test_triton_logprobs_match_reference(case):
    case = _on_device(case)
    assert_close_to_reference(
        lambda x: token_logprobs(x, case.labels, shift=case.shift, backend="triton"),
        lambda x: ref.token_logprobs(x, case.labels, case.shift),
        case,
    )


@settings(max_examples=15)
@given(batches(dtypes=LOW_PRECISION), st.sampled_from(["forward", "reverse"]))
def test_triton_kl_matches_reference(case, direction):
    case = _on_device(case)
    assert_close_to_reference(
        lambda x: kl_divergence(
            x, case.ref_logits, case.labels, direction=direction, shift=case.shift, backend="triton"
        ),
        lambda x: ref.kl_divergence(
            x, case.ref_logits.double(), case.labels, direction=direction, shift=case.shift
        ),
        case,
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("vocab", [1, 13, 50])
@pytest.mark.parametrize("primitive", ["logprobs", "forward", "reverse"])
def test_triton_equals_the_chunked_path(dtype, vocab, primitive):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    ref_logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (2, 7), generator=g).to(DEVICE)
    labels[0, :3] = -100
    labels[1, 4] = -100
    upstream = torch.randn(2, 6, generator=g).to(DEVICE)

    def run(backend):
        def fn(x):
            if primitive == "logprobs":
                return token_logprobs(x, labels, backend=backend) * upstream
            return (
                kl_divergence(
                    x, ref_logits, labels, direction=primitive, reduction="none", backend=backend
                )
                * upstream
            )

        return value_and_grad(fn, logits, 1.0)

    (value_t, grad_t), (value_c, grad_c) = run("triton"), run("torch")
    torch.testing.assert_close(value_t, value_c, rtol=1e-5, atol=1e-5)
    # Both round the same float32 gradient once; the float32 values may differ in the last bits.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad_t.float(), grad_c.float(), rtol=tol, atol=tol)
    assert (grad_t[:, -1] == 0).all()  # the shifted-out position


def test_all_ignored_rows_give_zero_value_and_gradient():
    logits = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 5), -100, device=DEVICE)
    loss = token_logprobs(logits, labels, backend="triton").sum() + kl_divergence(
        logits, torch.randn_like(logits), labels, backend="triton"
    )
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_extreme_and_masked_logits_stay_finite():
    logits = torch.tensor(
        [[[1e4, -1e4, float("-inf"), 0.0] * 5]],
        device=DEVICE,
        dtype=torch.bfloat16,
        requires_grad=True,
    )
    ref_logits = torch.tensor(
        [[[-1e4, 1e4, float("-inf"), 3.0] * 5]], device=DEVICE, dtype=torch.bfloat16
    )
    labels = torch.tensor([[0]], device=DEVICE)
    total = (
        token_logprobs(logits[0], labels[0], backend="triton").sum()
        + kl_divergence(logits, ref_logits, backend="triton")
        + kl_divergence(logits, ref_logits, direction="reverse", backend="triton")
    )
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def test_out_of_range_label_is_never_read_and_gives_nan():
    logits = torch.randn(1, 3, 20, device=DEVICE)
    labels = torch.tensor([[0, 25, -7]], device=DEVICE)
    from unlearning_losses.ops import label_logprobs

    valid = labels[:, 1:] != -100
    out = label_logprobs(logits, labels[:, 1:], valid, backend="triton")
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("primitive", ["logprobs", "forward", "reverse", "undial"])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(backend, primitive):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 6, 37, generator=g).to(DEVICE)
    ref_logits = torch.randn(2, 6, 37, generator=g).to(DEVICE)
    labels = torch.randint(0, 37, (2, 6), generator=g).to(DEVICE)
    labels[1, :2] = -100

    def loss(x, inplace):
        if primitive == "logprobs":
            return token_logprobs(x, labels, backend=backend, inplace_backward=inplace).sum()
        if primitive == "undial":
            return undial_loss(x, ref_logits, labels, backend=backend, inplace_backward=inplace)
        return kl_divergence(
            x, ref_logits, labels, direction=primitive, backend=backend, inplace_backward=inplace
        )

    leaf = base.clone().requires_grad_(True)
    loss(leaf, False).backward()
    expected = leaf.grad

    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, as a model's output is
    captured = {}
    logits.register_hook(lambda grad: captured.setdefault("grad", grad))
    loss(logits, True).backward()
    assert captured["grad"].data_ptr() == logits.data_ptr()
    torch.testing.assert_close(leaf.grad, expected)


def _scored_rows_keep_two_entries(case) -> bool:
    """CE-U's target is undefined where the label is a scored row's only finite logit."""
    x, _, valid, _ = ref.align(case.logits, case.labels, case.shift)
    return bool((torch.isfinite(x.double()).sum(-1)[valid] >= 2).all())


@settings(max_examples=15)
@given(batches(dtypes=LOW_PRECISION, min_vocab=2), st.sampled_from([0.0, 3.0, "ceu"]))
def test_triton_soft_targets_match_reference(case, beta):
    """UNDIAL (the reference's label logit lowered by beta) and CE-U (the label removed)."""
    assume(beta != "ceu" or _scored_rows_keep_two_entries(case))
    case = _on_device(case)

    def ours(x):
        if beta == "ceu":
            return ceu_loss(x, case.labels, shift=case.shift, backend="triton")
        return undial_loss(
            x, case.ref_logits, case.labels, beta=beta, shift=case.shift, backend="triton"
        )

    def expected(x):
        if beta == "ceu":
            return ref.ceu_loss(x, case.labels, shift=case.shift)
        return ref.undial_loss(
            x, case.ref_logits.double(), case.labels, beta=beta, shift=case.shift
        )

    assert_close_to_reference(ours, expected, case)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("vocab", [2, 13, 50])
@pytest.mark.parametrize("loss", ["undial", "ceu"])
def test_triton_soft_targets_equal_the_chunked_path(dtype, vocab, loss):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    ref_logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (2, 7), generator=g).to(DEVICE)
    labels[0, :3] = -100
    upstream = torch.randn(2, 6, generator=g).to(DEVICE)

    def run(backend):
        def fn(x):
            if loss == "ceu":
                return ceu_loss(x, labels, reduction="none", backend=backend) * upstream
            return undial_loss(x, ref_logits, labels, reduction="none", backend=backend) * upstream

        return value_and_grad(fn, logits, 1.0)

    (value_t, grad_t), (value_c, grad_c) = run("triton"), run("torch")
    torch.testing.assert_close(value_t, value_c, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad_t.float(), grad_c.float(), rtol=tol, atol=tol)


def _near_identical(dtype, scale):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 4, 256, generator=g, dtype=torch.float64) * 2
    noise = torch.randn(2, 4, 256, generator=g, dtype=torch.float64)
    return base.to(dtype).to(DEVICE), (base + scale * noise).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kl_of_a_model_equal_to_its_reference_is_exactly_zero(backend, direction, dtype):
    logits, _ = _near_identical(dtype, 0.0)
    x = logits.clone().requires_grad_()
    value = kl_divergence(x, logits, None, direction=direction, backend=backend)
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == 0.0
    assert grad.abs().max().item() == 0.0


#: The gradient's error bound in units of the dtype's epsilon (max-norm, relative to float64 math
#: on the same rounded inputs), with logits 1e-2 apart. In float32 the probabilities themselves
#: carry a few units of rounding (Triton: q = exp(log q), 4.0 units measured; chunked forward KL:
#: p from a float32 softmax times the centred logit difference, 5.4 units measured; chunked
#: reverse KL: q expm1(d), where p - q from two float32 softmaxes was 572 units off).
NEAR_UNITS = {
    ("triton", torch.float16): 2.0,
    ("triton", torch.bfloat16): 2.0,
    ("triton", torch.float32): 8.0,
    ("torch", torch.float16): 2.0,
    ("torch", torch.bfloat16): 2.0,
    ("torch", torch.float32): 8.0,
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kl_gradient_near_the_reference_within_the_dtype_rounding(backend, direction, dtype):
    units = NEAR_UNITS[backend, dtype]
    logits, ref_logits = _near_identical(dtype, 1e-2)
    exact = logits.double().requires_grad_()
    (expected,) = torch.autograd.grad(
        ref.kl_divergence(exact, ref_logits.double(), None, direction=direction), exact
    )
    x = logits.clone().requires_grad_()
    value = kl_divergence(x, ref_logits, None, direction=direction, backend=backend)
    (grad,) = torch.autograd.grad(value, x)
    error = (grad.double() - expected).abs().max() / expected.abs().max()
    assert error <= units * torch.finfo(dtype).eps


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reverse_kl_gradient_far_from_the_reference(backend):
    """The cases the cancellation-free form hands to the log-sum-exps: a reference that masks
    columns the model uses (log-ratio beyond 60) and a row far apart; float32 within 1e-6 of
    float64."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 5, 50, generator=g, dtype=torch.float64) * 3
    ref_logits[0, :, :10] = float("-inf")
    ref_logits[1, 2, 3] += 100.0
    exact = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        ref.kl_divergence(exact, ref_logits, None, direction="reverse"), exact
    )
    x = logits.float().to(DEVICE).requires_grad_()
    value = kl_divergence(
        x, ref_logits.float().to(DEVICE), None, direction="reverse", backend=backend
    )
    (grad,) = torch.autograd.grad(value, x)
    assert ((grad.double().cpu() - expected).abs().max() / expected.abs().max()).item() < 1e-6


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_soul_reference_cross_entropy_kernel_equals_the_chunked_path(dtype):
    """SOUL's ``-sum p log(q + 1e-12)`` with a reference sharp enough that some q underflow."""
    from unlearning_losses.compat import soul

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 300, generator=g).to(dtype).to(DEVICE)
    ref_logits = (torch.randn(2, 5, 300, generator=g) * 12).to(dtype).to(DEVICE)

    def run(backend):
        x = logits.clone().requires_grad_()
        value = soul.kl_loss(x, ref_logits, x, ref_logits, gamma=0.5, backend=backend)
        (grad,) = torch.autograd.grad(value, x)
        return value, grad

    (value, grad), (expected, expected_grad) = run("triton"), run("torch")
    assert (torch.softmax(ref_logits.float(), -1) < 1e-12).any()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=1e-4)


def _masked_at_top_two(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``logits`` with ``-inf`` at the two entries per row where ``weights`` are largest."""
    return logits.scatter(-1, weights.topk(2, dim=-1).indices, float("-inf"))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("loss", ["kl forward", "kl reverse", "rkld", "elm"])
def test_entries_masked_on_one_side_give_the_chunked_paths_finite_value_and_gradient(dtype, loss):
    """One side masks (``-inf``) the two entries the other weighs most: their floored log-ratio
    is near the largest float32 and the value a huge finite one. The kernel's unnormalised
    weights there sum past 1, so an unscaled weighted sum overflows to inf (and the gradient to
    -inf). Forward KL and RKLD: the reference masks; reverse KL and ELM's soft target: the model
    masks."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 7, 40, generator=g)
    ref_logits = torch.randn(2, 7, 40, generator=g)
    positive = torch.randn(2, 7, 40, generator=g)
    negative = torch.randn(2, 7, 40, generator=g)
    eta = 0.5
    if loss in ("kl forward", "rkld"):
        ref_logits = _masked_at_top_two(ref_logits, logits)
    elif loss == "kl reverse":
        logits = _masked_at_top_two(logits, ref_logits)
    else:  # ELM's target logits, z_ref + eta (z_positive - z_negative)
        logits = _masked_at_top_two(logits, ref_logits + eta * (positive - negative))
    logits, ref_logits = logits.to(dtype).to(DEVICE), ref_logits.to(dtype).to(DEVICE)
    positive, negative = positive.to(dtype).to(DEVICE), negative.to(dtype).to(DEVICE)
    labels = torch.randint(0, 40, (2, 7), generator=g).to(DEVICE)
    labels[1, 4] = -100
    # The model-weighted KL's gradient is as huge as its value: an upstream gradient that scales
    # both to about 1 keeps float16's gradient finite.
    scale = 1e-37 if loss in ("kl forward", "rkld") else 1.0
    upstream = (torch.randn(2, 7, generator=g) * scale).to(DEVICE)
    aligned = {"reduction": "none", "shift": False}

    def run(backend):
        def fn(x):
            if loss == "rkld":
                per_token = rkld_loss(
                    x,
                    labels,
                    ref_logits=ref_logits,
                    reinforced_logits=ref_logits,
                    backend=backend,
                    **aligned,
                )
            elif loss == "elm":
                per_token = elm_loss(
                    x,
                    labels,
                    ref_logits=ref_logits,
                    positive_logits=positive,
                    negative_logits=negative,
                    eta=eta,
                    backend=backend,
                    **aligned,
                )
            else:
                direction = loss.removeprefix("kl ")
                per_token = kl_divergence(
                    x, ref_logits, labels, direction=direction, backend=backend, **aligned
                )
            return per_token * upstream

        return value_and_grad(fn, logits, 1.0)

    (value_t, grad_t), (value_c, grad_c) = run("triton"), run("torch")
    assert torch.isfinite(value_c).all() and (value_c / upstream).abs().max() > 1e37
    torch.testing.assert_close(value_t, value_c, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad_t).all() and torch.isfinite(grad_c).all()
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad_t.float(), grad_c.float(), rtol=tol, atol=tol)
