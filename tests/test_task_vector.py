"""Task vectors: exact results, shared storage, integer buffers, and every refused input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from unlearning_losses.task_vector import apply_task_vector, negate_task_vector, task_vector


def _pair(dtype, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(11, 4, generator=g).to(dtype),
        "layer.bias": torch.randn(4, generator=g).to(dtype),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }
    finetuned = dict(base)
    finetuned["embed.weight"] = (
        base["embed.weight"].double() + scale * torch.randn(11, 4, generator=g, dtype=torch.float64)
    ).to(dtype)
    finetuned["layer.bias"] = (
        base["layer.bias"].double() + scale * torch.randn(4, generator=g, dtype=torch.float64)
    ).to(dtype)
    return base, finetuned


@given(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.sampled_from([0.5, 1.0, 5.0, 7.3]),
    st.integers(0, 10_000),
)
def test_negation_is_the_float64_result_rounded_once(dtype, alpha, seed):
    base, finetuned = _pair(dtype, seed)
    result = negate_task_vector(base, finetuned, alpha)
    for name in ("embed.weight", "layer.bias"):
        b, f = base[name].double(), finetuned[name].double()
        assert torch.equal(result[name], (b - alpha * (f - b)).to(dtype)), name
        assert result[name].dtype == dtype


def test_integer_and_bool_tensors_are_copied():
    base, finetuned = _pair(torch.float32)
    result = negate_task_vector(base, finetuned, 5.0)
    assert torch.equal(result["steps"], base["steps"]) and torch.equal(result["mask"], base["mask"])
    assert result["steps"].data_ptr() != base["steps"].data_ptr()


def test_alpha_zero_gives_the_base():
    base, finetuned = _pair(torch.bfloat16)
    result = negate_task_vector(base, finetuned, 0.0)
    assert all(torch.equal(result[n], base[n]) for n in base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_applying_the_task_vector_gives_back_the_finetuned_model(dtype):
    base, finetuned = _pair(dtype)
    vector = task_vector(base, finetuned)
    assert set(vector) == {"embed.weight", "layer.bias"}
    assert all(v.dtype == torch.float32 for v in vector.values())
    rebuilt = apply_task_vector(base, vector, 1.0)
    for name in vector:
        # The float32 vector is exact for these dtypes' differences, so rounding gives f back.
        torch.testing.assert_close(rebuilt[name], finetuned[name], rtol=0, atol=0)


def test_inputs_are_never_modified():
    base, finetuned = _pair(torch.float32)
    copies = ({n: t.clone() for n, t in base.items()}, {n: t.clone() for n, t in finetuned.items()})
    negate_task_vector(base, finetuned, 5.0)
    task_vector(base, finetuned)
    for original, copy in zip((base, finetuned), copies, strict=True):
        assert all(torch.equal(original[n], copy[n]) for n in original)


def test_tied_weights_are_updated_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    base, finetuned = Tied(), Tied()
    with torch.no_grad():
        finetuned.embed.weight.copy_(base.embed.weight + 0.1)
    result = negate_task_vector(base, finetuned, 2.0)
    assert result["embed.weight"].data_ptr() == result["head.weight"].data_ptr()
    expected = (base.embed.weight.double() - 2.0 * 0.1).float()
    torch.testing.assert_close(result["embed.weight"], expected)


def test_modules_and_state_dicts_give_the_same_result():
    base, finetuned = nn.Linear(3, 2), nn.Linear(3, 2)
    from_modules = negate_task_vector(base, finetuned, 1.5)
    from_dicts = negate_task_vector(base.state_dict(), finetuned.state_dict(), 1.5)
    assert all(torch.equal(from_modules[n], from_dicts[n]) for n in from_modules)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda b, f: f.pop("layer.bias"), ValueError, r"keys only in base: \['layer.bias'\]"),
        (
            lambda b, f: f.update(extra=torch.zeros(1)),
            ValueError,
            r"keys only in finetuned: \['extra'\]",
        ),
        (
            lambda b, f: f.update({"embed.weight": torch.zeros(12, 4)}),
            ValueError,
            r"'embed.weight' has shape \(11, 4\) in base and \(12, 4\) in finetuned \(a vocabulary-size "
            r"mismatch: call resize_token_embeddings",
        ),
        (
            lambda b, f: f.update({"layer.bias": torch.zeros(1, 4)}),
            ValueError,
            r"'layer.bias' has shape \(4,\) in base and \(1, 4\) in finetuned",
        ),
        (
            lambda b, f: f.update(steps=torch.tensor(8)),
            ValueError,
            r"'steps' is an integer/bool tensor that differs",
        ),
        (
            lambda b, f: f.update({"layer.bias": f["layer.bias"].double()}),
            TypeError,
            r"float dtypes differ .*'layer.bias' is torch.float32 in base and torch.float64",
        ),
        (
            lambda b, f: f.update({"layer.bias": [1.0]}),
            TypeError,
            r"finetuned\['layer.bias'\] must be a torch.Tensor; got list",
        ),
    ],
)
def test_mismatches_are_refused_with_a_message(change, error, message):
    base, finetuned = _pair(torch.float32)
    finetuned = dict(finetuned)
    change(base, finetuned)
    with pytest.raises(error, match=message):
        negate_task_vector(base, finetuned, 5.0)


def test_all_problems_are_reported_at_once():
    base, finetuned = _pair(torch.float32)
    finetuned = dict(finetuned)
    finetuned.pop("layer.bias")
    finetuned["steps"] = torch.tensor(9)
    with pytest.raises(ValueError, match=r"keys only in base.*; 'steps' is an integer"):
        negate_task_vector(base, finetuned, 5.0)


def test_dtype_mismatch_can_be_allowed():
    base, finetuned = _pair(torch.float32)
    finetuned = dict(finetuned, **{"layer.bias": finetuned["layer.bias"].double()})
    result = negate_task_vector(base, finetuned, 5.0, allow_dtype_mismatch=True)
    assert result["layer.bias"].dtype == torch.float32


@pytest.mark.parametrize("alpha", [math.inf, math.nan])
def test_non_finite_alpha_is_refused(alpha):
    base, finetuned = _pair(torch.float32)
    with pytest.raises(ValueError, match=r"alpha must be finite"):
        negate_task_vector(base, finetuned, alpha)


def test_all_zero_task_vector_is_refused():
    base, _ = _pair(torch.float32)
    with pytest.raises(ValueError, match=r"task vector is all zero"):
        negate_task_vector(base, dict(base), 5.0)
    with pytest.raises(ValueError, match=r"task vector is all zero"):
        task_vector(base, dict(base))


def test_float16_overflow_names_the_tensor():
    base = {"w": torch.tensor([60000.0], dtype=torch.float16)}
    finetuned = {"w": torch.tensor([40000.0], dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"the result for 'w' is not finite in torch.float16"):
        negate_task_vector(base, finetuned, 5.0)


def test_non_finite_weights_are_refused():
    base = {"w": torch.tensor([1.0, math.nan])}
    finetuned = {"w": torch.tensor([2.0, 1.0])}
    with pytest.raises(ValueError, match=r"the result for 'w' is not finite"):
        negate_task_vector(base, finetuned, 1.0)


def test_apply_refuses_a_vector_that_does_not_fit():
    base, finetuned = _pair(torch.float32)
    vector = task_vector(base, finetuned)
    with pytest.raises(ValueError, match=r"missing \['layer.bias'\]"):
        apply_task_vector(base, {"embed.weight": vector["embed.weight"]}, 1.0)
    with pytest.raises(ValueError, match=r"vector\['layer.bias'\] must have shape \(4,\)"):
        apply_task_vector(base, dict(vector, **{"layer.bias": torch.zeros(5)}), 1.0)
    with pytest.raises(TypeError, match=r"base must be a state dict or an nn.Module; got int"):
        apply_task_vector(3, vector, 1.0)


def _second_finetuning(base, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        name: (t.double() + torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
        if t.is_floating_point()
        else t
        for name, t in base.items()
    }


def test_float64_task_vectors_add_exactly_as_float64_math():
    """Two vectors of float32 weights: in float64 their sum is the float64 sum of the exact
    differences, and adding it to the base in float64 rounds once; float32 vectors do not."""
    base, first = _pair(torch.float32, seed=1, scale=1.0)
    second = _second_finetuning(base, seed=2)
    names = ("embed.weight", "layer.bias")
    exact = {
        n: (first[n].double() - base[n].double()) + (second[n].double() - base[n].double())
        for n in names
    }
    v, w = (task_vector(base, f, dtype=torch.float64) for f in (first, second))
    summed = {n: v[n] + w[n] for n in names}
    assert all(summed[n].dtype == torch.float64 and torch.equal(summed[n], exact[n]) for n in names)
    applied = apply_task_vector(base, summed, 1.0, dtype=torch.float64)
    for n in names:
        assert applied[n].dtype == torch.float64
        assert torch.equal(applied[n], base[n].double() + exact[n])
    assert torch.equal(applied["steps"], base["steps"])  # integers copied, not converted
    v32, w32 = (task_vector(base, f) for f in (first, second))
    error = max(float(((v32[n] + w32[n]).double() - exact[n]).abs().max()) for n in names)
    assert 0 < error < 1e-6  # float32 rounds each vector and their sum


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_task_vector_is_the_difference_rounded_once_to_dtype(dtype):
    base, finetuned = _pair(torch.float32, scale=1.0)
    vector = task_vector(base, finetuned, dtype=dtype)
    for n, v in vector.items():
        assert v.dtype == dtype
        assert torch.equal(v, (finetuned[n].double() - base[n].double()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float64", None])
def test_task_vector_dtype_must_be_a_floating_dtype(dtype):
    base, finetuned = _pair(torch.float32)
    shown = dtype if isinstance(dtype, torch.dtype) else type(dtype).__name__
    message = rf"^dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64; got {shown}$"
    with pytest.raises(TypeError, match=message):
        task_vector(base, finetuned, dtype=dtype)
    if dtype is not None:  # None is apply_task_vector's default: the base's dtypes
        with pytest.raises(TypeError, match=message):
            apply_task_vector(base, task_vector(base, finetuned), 1.0, dtype=dtype)


def test_a_difference_beyond_the_vectors_dtype_names_the_tensor():
    base = {"w": torch.tensor([32768.0], dtype=torch.bfloat16)}
    finetuned = {"w": torch.tensor([-32768.0], dtype=torch.bfloat16)}
    assert task_vector(base, finetuned)["w"].item() == -65536.0
    with pytest.raises(ValueError, match=r"the result for 'w' is not finite in torch.float16"):
        task_vector(base, finetuned, dtype=torch.float16)
