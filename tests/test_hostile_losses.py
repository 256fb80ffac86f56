"""Inputs a careful user (or a hostile one) passes to the losses: labels of every integer dtype,
references made under ``torch.inference_mode()``, logits that span more than the float32 range,
and counts and flags of the wrong kind."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import unlearning_losses as ul
from unlearning_losses.testing import Batch, entries, entry

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _losses(labels, ref_logits, ref_logprobs, backend):
    """Every loss of logits that takes a backend, as a function of the model's logits."""
    batch = Batch(labels, ref_logits, ref_logprobs)
    return {
        e.name: partial(e, batch=batch, backend=backend) for e in entries("logits", takes="backend")
    }


def _inputs(vocab: int = 256):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, vocab, generator=g)
    ref_logits = logits + torch.randn(2, 7, vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 2] = 156  # -100 stored as uint8 is 156: this label must still count
    return logits, ref_logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16])
def test_every_integer_label_dtype_equals_int64_to_the_bit(dtype, backend):
    logits, ref_logits, labels = _inputs()
    if dtype == torch.int8:
        labels = torch.where(labels > 127, labels % 128, labels)
    ref_logprobs = ul.token_logprobs(ref_logits, labels)
    narrow = labels.to(dtype) if dtype.is_signed else torch.where(labels < 0, 0, labels).to(dtype)
    wide = narrow.to(torch.int64)  # what the narrow labels mean
    expected = _losses(wide, ref_logits, ref_logprobs, backend)
    for name, fn in _losses(narrow, ref_logits, ref_logprobs, backend).items():
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = fn(x), expected[name](y)
        assert torch.equal(got, want), name
        got.sum().backward()
        want.sum().backward()
        assert torch.equal(x.grad, y.grad), name
    assert ul.global_counts(narrow) == ul.global_counts(wide)
    # RMU's two halves read their own labels. The retain activations differ from their
    # reference, so the retain term depends on which positions the retain labels select (with
    # one tensor for both it would be 0 whatever they select, and that half could not fail).
    forget, retain, ref_retain = torch.randn(3, 2, 7, 4, generator=torch.Generator().manual_seed(1))

    def rmu(forget_labels, retain_labels):
        return ul.rmu_loss(
            forget,
            retain,
            ref_retain,
            torch.ones(4),
            forget_labels=forget_labels,
            retain_labels=retain_labels,
        )

    as_int64 = rmu(wide, wide)
    assert torch.equal(rmu(narrow, wide), as_int64), "forget_labels"
    assert torch.equal(rmu(wide, narrow), as_int64), "retain_labels"
    # Each half counts position (1, 2), labelled 156 (28 as int8): ignoring it changes the loss.
    dropped = wide.clone()
    dropped[1, 2] = -100
    assert not torch.equal(rmu(dropped, wide), as_int64)
    assert not torch.equal(rmu(wide, dropped), as_int64)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_bool_and_float_labels_are_a_type_error(dtype):
    logits, _, labels = _inputs()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        ul.ga_loss(logits, labels.clamp(min=0).to(dtype))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_references_and_labels_from_inference_mode_work_as_constants(backend, compiled):
    logits, ref_logits, labels = _inputs(vocab=31)
    labels = labels.clamp(max=30)
    with torch.inference_mode():
        frozen_ref = ref_logits.clone()
        frozen_labels = labels.clone()
        frozen_ref_logprobs = ul.token_logprobs(frozen_ref, frozen_labels)
    assert frozen_ref.is_inference() and frozen_labels.is_inference()
    ref_logprobs = ul.token_logprobs(ref_logits, labels)
    expected = _losses(labels, ref_logits, ref_logprobs, backend)
    table = _losses(frozen_labels, frozen_ref, frozen_ref_logprobs, backend)
    # Compiled, a reference the backward must read (KL, UNDIAL) cannot come from inference mode:
    # the compiled graph saves its inputs itself (PyTorch's compiled F.kl_div fails alike).
    names = (
        ["ga_loss", "npo_loss[ref_logits]", "npo_loss", "tnpo_loss[ref_logits]"]
        if compiled
        else list(table)
    )
    for name in names:
        fn = (
            torch.compile(table[name], backend="aot_eager", fullgraph=True)
            if compiled
            else table[name]
        )
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = fn(x), expected[name](y)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want, msg=name)
        torch.testing.assert_close(x.grad, y.grad, msg=name)


def _spanning_logits(dtype=torch.float32):
    """Finite logits from -3e38 to 3e38 in every row: their differences overflow float32."""
    x = torch.zeros(1, 4, 5, dtype=dtype)
    x[0, :, 0], x[0, :, 1] = 3e38, -3e38
    return x, torch.tensor([[0, 1, 1, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_spanning_the_float32_range_give_no_nan(backend):
    x, y = _spanning_logits()
    zeros = torch.zeros_like(x)
    cases = {
        "wga": lambda x: ul.wga_loss(x, y, backend=backend),
        "satimp": lambda x: ul.satimp_loss(x, y, backend=backend),
        "npo_ref_logits": lambda x: ul.npo_loss(x, y, ref_logits=0.5 * x.detach(), backend=backend),
        "tnpo": lambda x: ul.tnpo_loss(x, y, ref_logits=zeros.to(x.dtype), backend=backend),
    }
    for name, fn in cases.items():
        logits = x.clone().requires_grad_()
        value = fn(logits)
        value.backward()
        expected = fn(x.double())  # float64 holds every intermediate
        torch.testing.assert_close(value.double(), expected, msg=name)
        assert torch.isfinite(logits.grad).all(), name
    # DPO sums two sequences' log-ratios beyond the float32 range: no float32 computation holds
    # them, but they stay finite (held at the range's extremes) instead of -inf - -inf = NaN.
    logits = x.clone().requires_grad_()
    value = ul.dpo_loss(
        logits,
        y,
        0.5 * logits,
        y,
        ref_chosen_logits=zeros,
        ref_rejected_logits=zeros,
        backend=backend,
    )
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_positive_infinite_logit_gives_nan_on_every_backend(backend):
    x, y = _spanning_logits()
    x[0, :, 3] = float("inf")
    assert torch.isnan(ul.token_logprobs(x, y, backend=backend)).all()
    assert torch.isnan(ul.ga_loss(x, y, backend=backend))


@pytest.mark.parametrize(
    "count, message",
    [
        (torch.tensor(-4), r"num_items_in_batch must be a count .* got -4"),
        (torch.tensor(0.5), r"num_items_in_batch must be a count .* got 0.5"),
    ],
)
def test_tensor_counts_are_checked_on_the_cpu(count, message):
    logits, _, labels = _inputs()
    with pytest.raises(ValueError, match=message):
        ul.ga_loss(logits, labels, num_items_in_batch=count)
    with pytest.raises(ValueError, match=message.replace("num_items_in_batch", "num_sequences")):
        ul.simnpo_loss(logits, labels, num_sequences=count)


def test_groups_and_flags_of_the_wrong_type_are_named():
    logits, _, labels = _inputs()
    with pytest.raises(TypeError, match=r"vocab_group must be a torch.distributed ProcessGroup"):
        ul.ga_loss(logits, labels, vocab_group="tp")
    with pytest.raises(TypeError, match=r"sequence_group must be a torch.distributed ProcessGroup"):
        ul.npo_loss(logits, labels, ref_logits=logits, shift=False, sequence_group="cp")
    with pytest.raises(TypeError, match=r"group must be a torch.distributed ProcessGroup"):
        ul.global_counts(labels, group="dp")
    with pytest.raises(TypeError, match=r"shift must be True or False; got int"):
        ul.ga_loss(logits, labels, shift=1)
    with pytest.raises(TypeError, match=r"validate must be True or False; got str"):
        ul.ga_loss(logits, labels, validate="yes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_at_an_ignored_row_give_a_zero_gradient_on_every_backend(backend):
    """Padding rows may hold NaN logits: an ignored row contributes nothing, to the value or the
    gradient, on both backends (a coefficient of 0 times a NaN softmax is still NaN)."""
    logits, ref_logits, labels = _inputs()
    labels[1, 5] = -100  # row 4 of the second sequence: inside the visited span, ignored
    clean = logits.clone()
    logits[1, 4] = ref_logits[1, 4] = float("nan")
    clean_ref = ref_logits.nan_to_num()
    ref_logprobs = ul.token_logprobs(clean_ref, labels)
    expected = _losses(labels, clean_ref, ref_logprobs, backend)
    for name, fn in _losses(labels, ref_logits, ref_logprobs, backend).items():
        if not entry(name).labelled:  # every row counts there: NaN in, NaN out
            continue
        x, y = logits.clone().requires_grad_(), clean.clone().requires_grad_()
        got, want = fn(x), expected[name](y)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
        assert not x.grad[1, 4].isnan().any(), name
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7, msg=name)


def _autocast_losses(labels, ref_logits, ref_logprobs, backend):
    """Every registered loss as a function of float32 logits: the losses of hidden states on
    hidden states shifted by some of them, RMU on some of them as activations."""
    hidden = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2))
    head = torch.randn(ref_logits.shape[-1], 8, generator=torch.Generator().manual_seed(3))
    batch = Batch(
        labels,
        ref_logits,
        ref_logprobs,
        weight=head,
        ref_hidden=hidden,
        control_vector=head[0],
    )
    inputs = {
        "logits": lambda x: x,
        "hidden": lambda x: hidden + x[..., :8],
        "activations": lambda x: x[..., :8],
    }

    def of_logits(e):
        options = {"backend": backend} if "backend" in e.takes else {}
        return lambda x: e(inputs[e.kind](x), batch, **options)

    return {
        **{e.name: of_logits(e) for e in entries()},
        # Paths the standard calls do not take: per-token values of a fused-linear loss, and
        # RMU without labels on distinct forget and retain activations.
        "linear_kl_none": lambda x: ul.linear_kl_divergence(
            hidden + x[..., :8], head, hidden, labels=labels, reduction="none"
        ),
        "rmu_unlabelled": lambda x: ul.rmu_loss(x[..., :8], x[..., 8:16], hidden, head[0]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_leaves_the_float32_reductions_in_float32(backend):
    """A Trainer with ``bf16=True`` calls ``compute_loss`` under ``torch.autocast``: float32
    logits must give the same value and gradient as outside it (autocast would run the KL's row
    sums and the fused-linear matmuls in bfloat16, 1e-4 to 1e-3 off)."""
    logits, ref_logits, labels = _inputs()
    ref_logprobs = ul.token_logprobs(ref_logits, labels)
    outside = _autocast_losses(labels, ref_logits, ref_logprobs, backend)
    for name, fn in _autocast_losses(labels, ref_logits, ref_logprobs, backend).items():
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(x)
            got.sum().backward()
        want = outside[name](y)
        want.sum().backward()
        assert got.dtype == want.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7, msg=name)
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-7, atol=1e-7, msg=name)
