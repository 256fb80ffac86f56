"""WHP, RKLD and ELM, whose targets are built from helper models' logits: against the float64
reference in every dtype and on both backends, their special cases, the chunking (no float32
copy of the logits, results independent of the chunk size) and their refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from ranks import run_on_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from unlearning_losses import (
    elm_loss,
    kl_divergence,
    nll_loss,
    rkld_loss,
    undial_loss,
    whp_loss,
)
from unlearning_losses.losses import helper_targets
from unlearning_losses.ops import chunked
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import DTYPES, batches

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _third(case) -> torch.Tensor:
    """A third helper of the case's dtype: the mean of its logits and its reference's (masked
    entries stay -inf, as both share them)."""
    return ((case.logits.double() + case.ref_logits.double()) / 2).to(case.dtype)


def _argmax_is_clear(case, alpha: float) -> bool:
    """WHP's argmax is a step function: a target whose two largest entries lie within float32
    rounding of each other may fall either way. Those cases are left out."""
    x, _, valid, _ = ref.align(case.ref_logits, case.labels, case.shift)
    reinforced = ref.align(case.logits, case.labels, case.shift)[0]
    targets = ref.whp_targets(x, reinforced, alpha)[valid]
    if targets.shape[-1] < 2 or targets.numel() == 0:
        return True
    top = targets.topk(2, -1).values
    finite = torch.isfinite(targets)
    scale = targets.where(finite, 0.0).abs().amax(-1).clamp(min=1.0)
    return bool(((top[:, 0] - top[:, 1]) > 1e-4 * scale * (1 + alpha)).all())


# --- WHP ----------------------------------------------------------------------------------------


@given(batches(dtypes=DTYPES), st.sampled_from([0.0, 1.0, 2.5]))
def test_whp_matches_reference_in_every_dtype(case, alpha):
    assume(_argmax_is_clear(case, alpha))
    reinforced = case.logits.detach().clone()  # the reinforced model: another set of logits
    assert_close_to_reference(
        lambda x: whp_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reinforced_logits=reinforced,
            alpha=alpha,
            shift=case.shift,
        ),
        lambda x: ref.whp_loss(
            x, case.ref_logits, reinforced, case.labels, alpha=alpha, shift=case.shift
        ),
        case,
    )


@settings(max_examples=10)
@given(batches(dtypes=LOW_PRECISION), st.sampled_from([1.0, 2.5]))
@pytest.mark.triton
def test_whp_on_the_triton_backend_matches_reference(case, alpha):
    assume(_argmax_is_clear(case, alpha))
    reinforced = case.logits.detach().clone()
    assert_close_to_reference(
        lambda x: whp_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reinforced_logits=reinforced,
            alpha=alpha,
            shift=case.shift,
            backend="triton",
        ),
        lambda x: ref.whp_loss(
            x, case.ref_logits, reinforced, case.labels, alpha=alpha, shift=case.shift
        ),
        case,
    )


@given(batches(three_d=False, dtypes=[torch.float64]), st.sampled_from([0.0, 5.0]))
@settings(max_examples=20)
def test_whp_without_excess_is_the_nll_of_the_references_argmax(case, alpha):
    """A reinforced model never above the reference leaves z* = z_ref, for any alpha."""
    valid = case.labels != -100
    generic = torch.where(valid, case.ref_logits.argmax(-1), -100)
    got = whp_loss(
        case.logits,
        case.labels,
        ref_logits=case.ref_logits,
        reinforced_logits=case.ref_logits - 1.0,
        alpha=alpha,
    )
    torch.testing.assert_close(got, nll_loss(case.logits, generic), rtol=1e-12, atol=1e-12)


def test_whp_targets_lower_what_the_reinforced_model_likes_more():
    base = torch.tensor([0.0, 2.0, 1.0, -math.inf, -math.inf, 0.5, math.nan])
    reinforced = torch.tensor([0.0, 4.0, 0.0, -math.inf, 3.0, math.nan, 0.0])
    got = helper_targets.whp_target_logits(torch.empty(7), base, reinforced, 1.5)
    expected = torch.tensor([0.0, -1.0, 1.0, -math.inf, -math.inf, math.nan, math.nan])
    torch.testing.assert_close(got, expected, equal_nan=True)
    # the masked entry (-inf in the reference) stays masked; NaN in either gives NaN
    torch.testing.assert_close(
        ref.whp_targets(base, reinforced, 1.5), expected.double(), equal_nan=True
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("helper", ["ref_logits", "reinforced_logits"])
def test_whp_with_a_nan_in_a_helper_is_nan_only_where_it_lies(helper, backend):
    """argmax reads a NaN as the largest entry: the token must come out NaN, not trained toward
    the NaN's column; other tokens and an ignored row's NaN are unaffected."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, 6, generator=g)
    helpers = {"ref_logits": torch.randn(1, 4, 6, generator=g)}
    helpers["reinforced_logits"] = helpers["ref_logits"] + torch.rand(1, 4, 6, generator=g)
    helpers[helper][0, 1, 3] = math.nan  # scores the label at position 2
    helpers[helper][0, 3, 0] = math.nan  # the last position: shifted out
    labels = torch.tensor([[-100, 2, 4, 1]])
    per_token = whp_loss(logits, labels, **helpers, backend=backend, reduction="none")
    assert torch.isnan(per_token[0, 1]) and torch.isfinite(per_token[0, 2])
    assert torch.isnan(whp_loss(logits, labels, **helpers, backend=backend))
    clean = torch.tensor([[-100, 2, -100, 1]])  # the NaN row scores nothing
    assert torch.isfinite(whp_loss(logits, clean, **helpers, backend=backend))


# --- RKLD ---------------------------------------------------------------------------------------


@given(batches(dtypes=DTYPES), st.sampled_from([0.0, 1.0, 2.5]))
def test_rkld_matches_reference_in_every_dtype(case, alpha):
    reinforced = _third(case)
    assert_close_to_reference(
        lambda x: rkld_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reinforced_logits=reinforced,
            alpha=alpha,
            shift=case.shift,
        ),
        lambda x: ref.rkld_loss(
            x, case.ref_logits, reinforced, case.labels, alpha=alpha, shift=case.shift
        ),
        case,
        sensitivity=1.0 + 2.0 * alpha,  # the target's float32 rounding: eps (1 + 2 alpha) |z|
    )


@settings(max_examples=10)
@given(batches(dtypes=LOW_PRECISION), st.sampled_from([0.0, 2.5]))
@pytest.mark.triton
def test_rkld_on_the_triton_backend_matches_reference(case, alpha):
    reinforced = _third(case)
    assert_close_to_reference(
        lambda x: rkld_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reinforced_logits=reinforced,
            alpha=alpha,
            shift=case.shift,
            backend="triton",
        ),
        lambda x: ref.rkld_loss(
            x, case.ref_logits, reinforced, case.labels, alpha=alpha, shift=case.shift
        ),
        case,
        sensitivity=1.0 + 2.0 * alpha,
    )


@settings(max_examples=20)
@given(batches(dtypes=[torch.float64, torch.float32, torch.bfloat16]))
def test_rkld_without_excess_is_the_forward_kl_to_the_reference(case):
    """No token liked more by the reinforced model: the teacher is the reference itself, and the
    loss is kl_divergence(direction="forward") (the model first)."""
    kw = {"shift": case.shift}
    got = value_and_grad(
        lambda x: rkld_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reinforced_logits=case.ref_logits,
            alpha=3.0,
            **kw,
        ),
        case.logits,
        case.upstream,
    )
    expected = value_and_grad(
        lambda x: kl_divergence(x, case.ref_logits, case.labels, direction="forward", **kw),
        case.logits,
        case.upstream,
    )
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


# --- ELM ----------------------------------------------------------------------------------------


@given(
    batches(dtypes=DTYPES),
    st.sampled_from([0.0, 0.5, 3.0, -1.0]),
    st.booleans(),
)
def test_elm_matches_reference_in_every_dtype(case, eta, with_labels):
    labels = case.labels if with_labels else None
    positive, negative = case.logits.detach().clone(), _third(case)
    assert_close_to_reference(
        lambda x: elm_loss(
            x,
            labels,
            ref_logits=case.ref_logits,
            positive_logits=positive,
            negative_logits=negative,
            eta=eta,
            shift=case.shift,
        ),
        lambda x: ref.elm_loss(
            x, case.ref_logits, positive, negative, labels, eta=eta, shift=case.shift
        ),
        case,
        sensitivity=1.0 + 2.0 * abs(eta),  # the target's float32 rounding
    )


@settings(max_examples=10)
@given(batches(dtypes=LOW_PRECISION), st.sampled_from([0.0, 3.0]))
@pytest.mark.triton
def test_elm_on_the_triton_backend_matches_reference(case, eta):
    positive, negative = case.logits.detach().clone(), _third(case)
    assert_close_to_reference(
        lambda x: elm_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            positive_logits=positive,
            negative_logits=negative,
            eta=eta,
            shift=case.shift,
            backend="triton",
        ),
        lambda x: ref.elm_loss(
            x, case.ref_logits, positive, negative, case.labels, eta=eta, shift=case.shift
        ),
        case,
        sensitivity=1.0 + 2.0 * eta,
    )


@settings(max_examples=20)
@given(batches(dtypes=[torch.float64]))
def test_elm_without_steering_is_distillation_to_the_original_model(case):
    """eta = 0, or the two prompted runs equal: q is the original model's distribution, as
    UNDIAL's target without lowering."""
    undial = undial_loss(case.logits, case.ref_logits, case.labels, beta=0.0, shift=case.shift)
    for eta, negative in ((0.0, 0.5 * case.logits), (4.0, case.logits)):
        got = elm_loss(
            case.logits,
            case.labels,
            ref_logits=case.ref_logits,
            positive_logits=case.logits,
            negative_logits=negative,
            eta=eta,
            shift=case.shift,
        )
        torch.testing.assert_close(got, undial, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_elm_steers_by_log_probabilities_whatever_each_runs_row_constant():
    """log p + eta (log p+ - log p-) differs from z + eta (z+ - z-) by a constant per row: adding
    a constant to any helper's row changes nothing, and eta moves mass toward the tokens the
    positive prompt prefers."""
    g = torch.Generator().manual_seed(0)
    logits, base, positive, negative = torch.randn(4, 2, 5, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    offsets = 100 * torch.randn(2, 5, 1, generator=g, dtype=torch.float64)

    def loss(base, positive, negative):
        return value_and_grad(
            lambda x: elm_loss(
                x,
                labels,
                ref_logits=base,
                positive_logits=positive,
                negative_logits=negative,
                eta=2.0,
            ),
            logits,
            1.0,
        )

    expected = loss(base, positive, negative)
    for shifted in (
        loss(base + offsets, positive, negative),
        loss(base, positive - offsets, negative),
        loss(base, positive, negative + offsets),
    ):
        for a, b in zip(shifted, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The gradient is p - q: a step against it moves the model toward q, which favours the
    # tokens that the positive prompt likes more than the negative one.
    favoured = (positive - negative)[:, :-1].argmax(-1)
    step = logits - 0.5 * expected[1]
    before = logits[:, :-1].log_softmax(-1).gather(-1, favoured[..., None])
    after = step[:, :-1].log_softmax(-1).gather(-1, favoured[..., None])
    assert (after > before).float().mean() > 0.8


def test_elm_targets_mask_an_entry_masked_in_any_run():
    inf = math.inf
    base = torch.tensor([0.0, -inf, 1.0, 0.0, 0.0, math.nan])
    positive = torch.tensor([1.0, 0.0, -inf, 0.0, -inf, 0.0])
    negative = torch.tensor([0.0, 0.0, 0.0, -inf, -inf, 0.0])
    got = helper_targets.elm_target_logits(torch.empty(6), base, positive, negative, 2.0)
    expected = torch.tensor([2.0, -inf, -inf, -inf, -inf, math.nan])
    torch.testing.assert_close(got, expected, equal_nan=True)


# --- all three: chunks, memory, backends, refusals ----------------------------------------------


def _three(logits, labels, helpers, **kw):
    """name -> the loss of ``logits``: WHP, RKLD and ELM on the same helpers."""
    base, other, third = helpers
    return {
        "whp": lambda x: whp_loss(
            x, labels, ref_logits=base, reinforced_logits=other, alpha=2.0, **kw
        ),
        "rkld": lambda x: rkld_loss(
            x, labels, ref_logits=base, reinforced_logits=other, alpha=2.0, **kw
        ),
        "elm": lambda x: elm_loss(
            x, labels, ref_logits=base, positive_logits=other, negative_logits=third, eta=2.0, **kw
        ),
    }


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(5)
    tensors = (3 * torch.randn(4, 3, 9, 40, generator=g)).unbind(0)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[1, -3:] = -100
    labels[2, 5] = -100
    return tensors[0], labels, tensors[1:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_chunk_size_changes_nothing(batch, backend, monkeypatch):
    """Chunks of 4 rows against the default ones: values and gradients to the bit, with an
    upstream gradient other than 1 and ``inplace_backward``."""
    logits, labels, helpers = batch
    results = {}
    for budget in (None, 4 * 4 * logits.shape[-1]):  # the default, then 4 float32 rows a chunk
        if budget is not None:
            monkeypatch.setattr(chunked, "CHUNK_BYTES", budget)
        for name, fn in _three(logits, labels, helpers, backend=backend).items():
            results.setdefault(name, []).append(value_and_grad(fn, logits, -0.7))
    for name, (default, one_row) in results.items():
        assert torch.equal(default[0], one_row[0]), name
        assert torch.equal(default[1], one_row[1]), name
    for name, fn in _three(logits, labels, helpers, backend=backend, inplace_backward=True).items():
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1.0  # a non-leaf, as a model's output is: its buffer takes the gradient
        (fn(x) * -0.7).backward()
        torch.testing.assert_close(leaf.grad, results[name][0][1], msg=name)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any operation returns (in elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["whp", "rkld", "elm"])
def test_no_float32_copy_of_the_logits_forward_or_backward(batch, name, monkeypatch):
    """bfloat16 logits and helpers, chunks of 8 rows: no operation, forward or backward, returns
    a float32 tensor of more than a chunk (the target, the softmax, the gradient's scratch);
    the gradient itself comes back in bfloat16."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 4 * 40)
    logits, labels, helpers = batch
    logits, helpers = logits.bfloat16(), [h.bfloat16() for h in helpers]
    x = logits.clone().requires_grad_(True)
    with _LargestFloat32() as watch:
        _three(x, labels, helpers)[name](x).backward()
    assert x.grad.dtype == torch.bfloat16
    assert 0 < watch.largest <= 8 * 40, watch.largest  # a chunk; the whole is 27 * 40


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda x, y, h: whp_loss(x, y, ref_logits=h[0], reinforced_logits=h[1][:, :5]),
            ValueError,
            r"reinforced_logits must have shape \(3, 9, 40\) to match logits; got \(3, 5, 40\)",
        ),
        (
            lambda x, y, h: rkld_loss(x, y, ref_logits=h[0].double(), reinforced_logits=h[1]),
            TypeError,
            r"ref_logits must have dtype torch.float32 to match logits; got torch.float64",
        ),
        (
            lambda x, y, h: rkld_loss(x, y, ref_logits=h[0], reinforced_logits=h[1], alpha=-1),
            ValueError,
            r"alpha must be >= 0; got -1.0",
        ),
        (
            lambda x, y, h: whp_loss(x, y, ref_logits=h[0], reinforced_logits=h[1], alpha=math.nan),
            ValueError,
            r"alpha must be finite; got nan",
        ),
        (
            lambda x, y, h: elm_loss(
                x, y, ref_logits=h[0], positive_logits=h[1], negative_logits=[0.0], eta=1.0
            ),
            TypeError,
            r"negative_logits must be a torch.Tensor; got list",
        ),
        (
            lambda x, y, h: elm_loss(
                x, ref_logits=h[0], positive_logits=h[1], negative_logits=h[2], eta=math.inf
            ),
            ValueError,
            r"eta must be finite; got inf",
        ),
        (
            lambda x, y, h: elm_loss(
                x,
                y,
                ref_logits=h[0],
                positive_logits=h[1].to("meta"),
                negative_logits=h[2],
                eta=1.0,
            ),
            ValueError,
            r"positive_logits must be on the same device as logits \(cpu\); got meta",
        ),
        (
            lambda x, y, h: elm_loss(
                x, ref_logits=h[0], positive_logits=h[1], negative_logits=h[2], eta=1.0, backend="x"
            ),
            ValueError,
            r"backend must be one of 'auto', 'torch', 'triton'; got 'x'",
        ),
    ],
)
def test_refusals_name_the_argument(batch, call, error, message):
    logits, labels, helpers = batch
    with pytest.raises(error, match=message):
        call(logits, labels, helpers)


def _check_dtensors(rank: int) -> None:
    """A vocabulary shard is refused by name; a batch split over ranks equals one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    logits, *helpers = (3 * torch.randn(4, 4, 6, 11, generator=g, dtype=torch.float64)).unbind(0)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[0, :3] = -100
    for name, fn in _three(logits, labels, helpers).items():
        by_vocab = distribute_tensor(logits, mesh, [Shard(2)])
        with pytest.raises(ValueError, match=r"logits is sharded on its last dimension"):
            _three(by_vocab, labels, [distribute_tensor(h, mesh, [Shard(2)]) for h in helpers])[
                name
            ](by_vocab)
        expected, expected_grad = value_and_grad(fn, logits, 1.0)
        d_helpers = [distribute_tensor(h, mesh, [Shard(0)]) for h in helpers]
        d_labels = distribute_tensor(labels, mesh, [Shard(0)])
        x = distribute_tensor(logits, mesh, [Shard(0)]).requires_grad_(True)
        got = _three(x, d_labels, d_helpers)[name](x)
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
        assert x.grad.placements == x.placements, name
        torch.testing.assert_close(
            x.grad.full_tensor(), expected_grad, rtol=1e-12, atol=1e-12, msg=name
        )


@pytest.mark.slow
def test_dtensors_refuse_a_vocabulary_shard_and_split_the_batch(tmp_path):
    run_on_ranks(_check_dtensors, 2, tmp_path)
