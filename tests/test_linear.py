"""The fused-linear losses equal their logits versions on ``hidden @ weight.T + bias``."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import unlearning_losses as ul
from unlearning_losses.ops import linear as linear_ops
from unlearning_losses.testing import Batch, Entry, entries, entry
from unlearning_losses.testing import reference as ref


def _variants(*reductions: str) -> dict[str, tuple[Entry, dict]]:
    """Every registered fused-linear loss as registered and, where it takes a reduction, with
    each of ``reductions``: name -> (entry, options)."""
    table: dict[str, tuple[Entry, dict]] = {}
    for e in entries("hidden"):
        table[e.name] = (e, {})
        for reduction in reductions if "reduction" in e.takes else ():
            table[f"{e.name}, reduction={reduction}"] = (e, {"reduction": reduction})
    return table


# Per-token and per-sequence values ("none") get their own upstream gradient per element.
VARIANTS = _variants("none", "sum")
#: What the parametrised tests run; a sum only rescales the mean, so Hypothesis draws those.
LOSSES = sorted(name for name, (_, options) in VARIANTS.items() if options != {"reduction": "sum"})


def _mapped(logits, scale=1.0, softcap=None):
    """What a scaled (Cohere) or softcapped (Gemma 2/3) head makes of its output."""
    logits = logits * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _pair(name, ref_hidden, labels, chunk_rows, scale=1.0, softcap=None):
    """(fused-linear call, logits-version call) of one variant, as functions of (h, W, b). The
    reference is ``ref_hidden`` through the same head (a constant): the fused call reads the
    hidden states, the logits version their logits; both read the same cached log-probs."""
    e, options = VARIANTS[name]
    twin = entry(e.on_logits)
    head_options = {"chunk_rows": chunk_rows}
    if (scale, softcap) != (1.0, None):
        head_options.update(logit_scale=scale, logit_softcap=softcap)

    def reference(W, b):
        ref_logits = _mapped(F.linear(ref_hidden, W, b), scale, softcap).detach()
        return ref_logits, ul.token_logprobs(ref_logits, labels)

    def fused(h, W, b):
        ref_logprobs = reference(W, b)[1]
        batch = Batch(labels, ref_logprobs=ref_logprobs, weight=W, bias=b, ref_hidden=ref_hidden)
        return e(h, batch, **options, **head_options)

    def logits_version(z, W, b):
        return twin(z, Batch(labels, *reference(W, b)), **options)

    return fused, logits_version


def _upstream(value):
    """The gradient that reaches a loss from above: not 1, and another per element of a
    per-token or per-sequence value ("not the last layer")."""
    if value.dim() == 0:
        return 0.7
    g = torch.Generator().manual_seed(11)
    return 0.5 + torch.rand(value.shape, generator=g, dtype=value.dtype)


def _run(fn, h, W, b, upstream, through_logits: bool, frozen_head: bool = False, head_map=()):
    """The value and the gradients of (h, W, b), None where not trained; ``upstream`` None
    takes :func:`_upstream`'s."""
    trained = (True, not frozen_head, not frozen_head)
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip((h, W, b), trained, strict=True)]
    value = (
        fn(_mapped(F.linear(*leaves), *head_map), leaves[1], leaves[2])
        if through_logits
        else fn(*leaves)
    )
    (value * (_upstream(value) if upstream is None else upstream)).sum().backward()
    return [value.detach()] + [t.grad for t in leaves]


@given(
    st.sampled_from(sorted(VARIANTS)),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 9),
    st.integers(1, 40),
    st.booleans(),
    st.sampled_from([None, 1, 2, 5]),
    st.sampled_from([None, 1, 3]),
    st.booleans(),
    st.sampled_from([1.0, -2.5]),
    st.integers(0, 2**31 - 1),
)
def test_fused_linear_equals_the_logits_version(
    name, batch, length, width, vocab, flat, chunk_rows, cache_rows, frozen_head, upstream, seed
):
    g = torch.Generator().manual_seed(seed)
    shape = (batch * length,) if flat else (batch, length)
    h = torch.randn(*shape, width, generator=g)
    W = torch.randn(vocab, width, generator=g)
    b = torch.randn(vocab, generator=g)
    ref_hidden = h + 0.3 * torch.randn(h.shape, generator=g)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    fused, logits_version = _pair(name, ref_hidden, labels, chunk_rows)
    # Blocks of a few rows inside a chunk, as a large vocabulary gets them.
    block_bytes = linear_ops.CACHE_BLOCK_BYTES if cache_rows is None else cache_rows * 4 * vocab
    with mock.patch.object(linear_ops, "CACHE_BLOCK_BYTES", block_bytes):
        got = _run(fused, h, W, b, upstream, False, frozen_head)
    expected = _run(logits_version, h, W, b, upstream, True, frozen_head)
    for a, e in zip(got, expected, strict=True):
        if frozen_head and e is None:  # the head's gradients
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ga", "npo", "kl"])
def test_bfloat16_matches_the_float64_reference(name):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 8, generator=g).bfloat16()
    W = torch.randn(33, 8, generator=g).bfloat16()
    labels = torch.randint(0, 33, (2, 6), generator=g)
    ref_hidden = (h.float() + 0.3 * torch.randn(h.shape, generator=g)).bfloat16()
    logits64 = F.linear(h.double(), W.double())
    ref64 = F.linear(ref_hidden.double(), W.double())
    fused = {
        "ga": lambda: ul.linear_ga_loss(h, W, labels),
        "npo": lambda: ul.linear_npo_loss(h, W, labels, ref_hidden=ref_hidden),
        "kl": lambda: ul.linear_kl_divergence(h, W, ref_hidden, labels=labels),
    }[name]()
    # The logits of bf16 inputs are rounded to bf16, as the model computes them.
    z, zr = logits64.bfloat16().double(), ref64.bfloat16().double()
    expected = {
        "ga": lambda: ref.ga_loss(z, labels),
        "npo": lambda: ref.npo_loss(z, labels, ref_logprobs=ref.token_logprobs(zr, labels)),
        "kl": lambda: ref.kl_divergence(z, zr, labels),
    }[name]()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_costs_none(monkeypatch):
    """A frozen head allocates no (V, H) accumulator; the hidden states' gradient is the one a
    trainable head gives."""
    from unlearning_losses.ops import linear as fused

    allocated = []
    real_init = fused._Gradients.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        allocated.append(self.weight is not None)

    monkeypatch.setattr(fused._Gradients, "__init__", recording_init)
    h = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 5))
    trained = torch.randn(20, 8, requires_grad=True)
    ul.linear_ga_loss(h, trained, labels).backward()
    assert allocated == [True] and trained.grad is not None  # the control: a head accumulator
    expected, h.grad = h.grad, None
    allocated.clear()
    frozen = trained.detach()
    ul.linear_ga_loss(h, frozen, labels).backward()
    assert allocated == [False] and frozen.grad is None
    torch.testing.assert_close(h.grad, expected)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda h, W, y: ul.linear_ga_loss(h, W[:, :5], y),
            ValueError,
            r"weight must have shape \(V, 8\) to match hidden \(2, 5, 8\); got \(20, 5\)",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h, W.double(), y),
            TypeError,
            r"weight must have dtype torch.float32 to match hidden; got torch.float64",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h, W, y, bias=torch.zeros(3)),
            ValueError,
            r"bias must have shape \(20,\) to match weight; got \(3,\)",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h, W, y[:, :4]),
            ValueError,
            r"labels must have shape \(2, 5\) to match hidden \(2, 5, 8\); got \(2, 4\)",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h, W, y + 20),
            ValueError,
            r"labels must lie in \[0, 20\)",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h[0, 0], W, y[0, 0]),
            ValueError,
            r"hidden must have shape \(B, T, H\) or \(N, H\)",
        ),
        (
            lambda h, W, y: ul.linear_ga_loss(h, W, y, chunk_rows=0),
            ValueError,
            r"chunk_rows must be >= 1; got 0",
        ),
        (
            lambda h, W, y: ul.linear_npo_loss(h, W, y),
            ValueError,
            r"give exactly one of ref_logprobs or ref_hidden; got neither",
        ),
        (
            lambda h, W, y: ul.linear_npo_loss(h, W, y, ref_hidden=h[:, :3]),
            ValueError,
            r"ref_hidden must have shape \(2, 5, 8\) to match hidden",
        ),
        (
            lambda h, W, y: ul.linear_kl_divergence(h, W, h, ref_weight=W[:3], labels=y),
            ValueError,
            r"ref_weight must have shape",
        ),
        (
            lambda h, W, y: ul.linear_simnpo_loss(h, W, y, beta=-1.0),
            ValueError,
            r"beta must be > 0",
        ),
    ],
)
def test_bad_input(call, error, message):
    h, W = torch.randn(2, 5, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 5))
    with pytest.raises(error, match=message):
        call(h, W, labels)


def test_a_second_backward_through_a_fused_token_mean_is_refused():
    h = torch.randn(2, 5, 8, requires_grad=True)
    W = torch.randn(20, 8, requires_grad=True)
    loss = ul.linear_ga_loss(h, W, torch.randint(0, 20, (2, 5)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r'differentiated already.*reduction="none"'):
        loss.backward()


@pytest.mark.parametrize(
    "name", [e.name for e in entries("hidden") if e.labelled and e.count is not None]
)
def test_fused_linear_means_take_global_counts(name):
    """Two halves of a batch, each divided by the whole batch's count (of tokens or of
    sequences, as the loss averages), add up to the whole."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    W = torch.randn(20, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 20, (4, 6), generator=g)
    labels[0, :4] = -100
    labels[3] = -100  # an empty sequence: not counted
    ref_lp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    ref_h = h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64)
    batch = Batch(labels, ref_logprobs=ref_lp, weight=W, ref_hidden=ref_h)
    e = entry(name)
    counts = ul.global_counts(labels)
    count = {e.count: counts.tokens if e.count == "num_items_in_batch" else counts.sequences}
    whole = e(h, batch)
    halves = e(h[:2], batch.rows(slice(0, 2)), **count) + e(h[2:], batch.rows(slice(2, 4)), **count)
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-12)


def test_chunk_rows_is_checked_without_labels_too():
    h, W = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"chunk_rows must be >= 1; got -1"):
        ul.linear_kl_divergence(h, W, h, chunk_rows=-1)
    with pytest.raises(TypeError, match=r"chunk_rows must be an int; got float"):
        ul.linear_kl_divergence(h, W, h, chunk_rows=1.5)


@pytest.mark.parametrize("name", LOSSES)
def test_float64_heads_stay_float64_and_equal_the_logits_path(name):
    """A trainable float64 head and bias: values and every gradient equal the logits version's to
    1e-12 (the head's gradient is accumulated in float64, not float32)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    W = torch.randn(11, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(11, generator=g, dtype=torch.float64)
    ref_h = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    fused, logits_version = _pair(name, ref_h, labels, chunk_rows=None)
    got = _run(fused, h, W, bias, None, False)
    expected = _run(logits_version, h, W, bias, None, True)
    assert all(t.dtype == torch.float64 for t in got)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("select", [True, False], ids=["valid rows", "every row, masked"])
def test_a_trained_heads_log_probs_never_read_ignored_hidden_states(monkeypatch, select):
    """Both row choices of the vocabulary-sliced pass (the valid rows, as on the CPU; every row with
    the ignored ones zeroed, as on a GPU, without a host sync): NaN hidden states at an ignored
    position reach neither the value nor any gradient, which equal the logits version's."""
    from unlearning_losses.ops import linear as fused

    choose = fused._token_rows
    monkeypatch.setattr(fused, "_token_rows", lambda h, v: choose(h, v, select=select))
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(30, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[0, :3] = -100  # after the shift, positions 0 and 1 of the first sequence are ignored
    ref = -torch.rand(2, 5, generator=g, dtype=torch.float64)
    dirty = h.clone()
    dirty[0, 1] = float("nan")

    def value_and_grads(fn, hidden):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        value = fn(*leaves)
        return [value, *torch.autograd.grad(value, leaves)]

    ours = value_and_grads(
        lambda x, w, b: ul.linear_npo_loss(x, w, labels, bias=b, ref_logprobs=ref), dirty
    )
    expected = value_and_grads(
        lambda x, w, b: ul.npo_loss(torch.nn.functional.linear(x, w, b), labels, ref_logprobs=ref),
        h,
    )
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained head", "frozen head"])
@pytest.mark.parametrize("name", [name for name in LOSSES if VARIANTS[name][0].labelled])
def test_nan_hidden_states_at_an_ignored_row_reach_nothing(name, frozen_head):
    """Padding's hidden states may be NaN: at an ignored row inside a sequence (where the row
    chunks visit it) they reach neither the value nor any gradient, on the model's side and the
    reference's, which equal the logits version on clean inputs."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    ref_hidden = h + 0.1 * torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[0, 4] = -100  # row 3 of the first sequence scores nothing
    dirty, dirty_ref = h.clone(), ref_hidden.clone()
    dirty[0, 3] = dirty_ref[0, 3] = float("nan")
    fused = _pair(name, dirty_ref, labels, chunk_rows=None)[0]
    logits_version = _pair(name, ref_hidden, labels, chunk_rows=None)[1]
    ours = _run(fused, dirty, weight, bias, None, False, frozen_head)
    expected = _run(logits_version, h, weight, bias, None, True, frozen_head)
    for got, want in zip(ours, expected, strict=True):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_reference_sharing_the_head_shares_its_bias():
    """``ref_weight`` omitted: the reference is the model's head, bias included."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64)
    bias = 3 * torch.randn(11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    assert ul.linear_kl_divergence(h, weight, h, labels=labels, bias=bias) == 0
    npo = ul.linear_npo_loss(h, weight, labels, bias=bias, ref_hidden=h)
    torch.testing.assert_close(npo, torch.tensor(2 / 0.1 * math.log(2), dtype=torch.float64))
    # An explicit ref_bias still wins: None is not "no bias" there, so pass zeros for that.
    other = ul.linear_kl_divergence(h, weight, h, labels=labels, bias=bias, ref_bias=0 * bias)
    expected = ul.kl_divergence(F.linear(h, weight, bias), h @ weight.T, labels)
    torch.testing.assert_close(other, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained head", "frozen head"])
@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one chunk", "chunks of 2 rows"])
@pytest.mark.parametrize(
    "head_map", [(0.25, None), (1.0, 3.0), (1.7, 2.0)], ids=["scaled", "softcapped", "both"]
)
@pytest.mark.parametrize("name", LOSSES)
def test_softcapped_and_scaled_heads_equal_the_mapped_logits(
    name, head_map, chunk_rows, frozen_head
):
    """``logit_scale`` and ``logit_softcap`` on every fused-linear path (row chunks, vocabulary
    slices, cache blocks of 3 rows, frozen and trained heads) equal float64 autograd through
    ``c * tanh(s * z / c)`` of the materialised logits, value and every gradient."""
    g = torch.Generator().manual_seed(7)
    h = 2 * torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    W = torch.randn(17, 8, generator=g, dtype=torch.float64)
    b = torch.randn(17, generator=g, dtype=torch.float64)
    ref_hidden = h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (2, 6), generator=g)
    labels[0, 2] = -100
    fused, logits_version = _pair(name, ref_hidden, labels, chunk_rows, *head_map)
    with mock.patch.object(linear_ops, "CACHE_BLOCK_BYTES", 3 * 8 * 17):
        got = _run(fused, h, W, b, None, False, frozen_head)
    expected = _run(logits_version, h, W, b, None, True, frozen_head, head_map)
    for a, e in zip(got, expected, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # The map matters: without it the same call gives another value.
    plain = _run(_pair(name, ref_hidden, labels, chunk_rows)[0], h, W, b, None, False)
    assert not torch.allclose(plain[0], got[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logit_scale": 0.0}, "logit_scale must be"),
        ({"logit_scale": float("nan")}, "logit_scale must be"),
        ({"logit_softcap": -1.0}, "logit_softcap must be"),
        ({"logit_softcap": "30"}, "logit_softcap must be"),
    ],
)
def test_bad_logit_maps_are_refused_by_name(kwargs, message):
    h, W = torch.randn(2, 4, 3), torch.randn(5, 3)
    with pytest.raises((TypeError, ValueError), match=message):
        ul.linear_ga_loss(h, W, torch.zeros(2, 4, dtype=torch.long), **kwargs)


@pytest.mark.parametrize(
    ("family", "config_options", "expected"),
    [
        ("Gemma2", {"final_logit_softcapping": 0.5}, {"logit_softcap": 0.5}),
        ("Cohere", {"logit_scale": 0.0625}, {"logit_scale": 0.0625}),
        ("Granite", {"logits_scaling": 8.0}, {"logit_scale": 0.125}),
        ("Llama", {}, {}),
    ],
)
def test_logit_options_reproduce_the_models_own_loss(family, config_options, expected):
    """A tiny model of each family: its own ``model(..., labels=).loss`` equals the fused-linear
    NLL of its last hidden states with ``logit_options(config)``, and not without them."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(
        vocab_size=97,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        **config_options,
    )
    config._attn_implementation = "eager"  # float64 end to end
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).double()
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    options = ul.logit_options(config)
    assert options == expected
    ours = ul.linear_nll_loss(out.hidden_states[-1], model.lm_head.weight, labels, **options)
    torch.testing.assert_close(ours, out.loss.double(), rtol=1e-6, atol=0)
    if options:
        plain = ul.linear_nll_loss(out.hidden_states[-1], model.lm_head.weight, labels)
        assert not torch.allclose(plain, out.loss.double(), rtol=1e-6, atol=0)


def test_logit_options_refuse_a_scale_they_cannot_place():
    class Config:
        model_type = "new_family"
        logits_scaling = 4.0

    with pytest.raises(ValueError, match=r"has logits_scaling, and how its head applies it"):
        ul.logit_options(Config())


@pytest.mark.parametrize("name", ["ga", "npo", "kl"])
def test_a_bfloat16_heads_gradient_is_accumulated_in_float32_and_rounded_once(name):
    """Llama 3's vocabulary (V = 128256), bfloat16 head, 17 chunks of 4 rows: the head's gradients
    equal those of one chunk to float32 summation order (a bfloat16 running sum would differ by
    whole bfloat16 units), and GA's and NPO's equal float64 math on the same bfloat16 inputs within
    bfloat16 rounding (the KL's gradient, p - q of nearby distributions, is dominated by the
    bfloat16 rounding of the logits themselves, as in the model's own forward)."""
    g = torch.Generator().manual_seed(0)
    vocab, width = 128256, 16
    h = torch.randn(2, 35, width, generator=g).bfloat16()
    weight = (0.5 * torch.randn(vocab, width, generator=g)).bfloat16()
    bias = torch.randn(vocab, generator=g).bfloat16()
    labels = torch.randint(0, vocab, (2, 35), generator=g)
    labels[0, :5] = -100
    ref_h = (h.float() + 0.1 * torch.randn(h.shape, generator=g)).bfloat16()
    loss = {
        "ga": lambda h, w, b, **kw: ul.linear_ga_loss(h, w, labels, bias=b, **kw),
        "npo": lambda h, w, b, **kw: ul.linear_npo_loss(
            h, w, labels, bias=b, ref_hidden=ref_h.to(h.dtype), **kw
        ),
        "kl": lambda h, w, b, **kw: ul.linear_kl_divergence(
            h, w, ref_h.to(h.dtype), labels=labels, bias=b, **kw
        ),
    }[name]

    def run(dtype, **kw):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (h, weight, bias)]
        loss(*leaves, **kw).backward()
        return [leaf.grad.double() for leaf in leaves[1:]]

    chunked, whole = run(torch.bfloat16, chunk_rows=4), run(torch.bfloat16)
    for got, want in zip(chunked, whole, strict=True):
        # Another float32 order rounds a few sums to the neighbouring bfloat16 value (a running
        # bfloat16 sum over the 17 chunks changes 57% of them).
        assert (got != want).double().mean() < 1e-3
        assert (got - want).abs().max() <= 2**-9 * want.abs().max()
    if name != "kl":
        for got, want in zip(chunked, run(torch.float64), strict=True):
            assert (got - want).abs().max() <= 2**-7 * want.abs().max()


def test_forward_kl_gradient_near_the_reference_keeps_float32_rounding():
    """Hidden states 2e-3 from the reference's: the forward KL's gradient, formed from the
    centred logit difference ``p (d - sum p d)``, is within 8 float32 units (max-norm) of float64
    math on the same float32 logits; ``log p - log q`` of two log-softmaxes was 100 units off."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 4, 16, generator=g)
    weight = 0.5 * torch.randn(256, 16, generator=g)
    ref_h = h + 2e-3 * torch.randn(2, 4, 16, generator=g)
    x = h.clone().requires_grad_()
    value = ul.linear_kl_divergence(x, weight, ref_h, reduction="sum")
    (grad,) = torch.autograd.grad(value, x)
    z = (h @ weight.T).double().requires_grad_()
    logp, logq = z.log_softmax(-1), (ref_h @ weight.T).double().log_softmax(-1)
    (grad_z,) = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), z)
    expected = grad_z @ weight.double()
    error = (grad.double() - expected).abs().max() / expected.abs().max()
    assert error <= 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_me_over_a_masked_vocabulary_is_uniform_over_the_kept_columns(reduction):
    """A bias of -inf masks columns (a restricted vocabulary): the fused ME is uniform over the
    finite logits, as the logits version is, with no gradient into the masked columns."""
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(2, 5, 3, generator=g), torch.randn(9, 3, generator=g)
    b = torch.randn(9, generator=g)
    b[[2, 7]] = float("-inf")
    labels = torch.randint(0, 7, (2, 5), generator=g)  # ME reads only which positions count
    labels[0, 1] = -100

    def fused(h, W, b):
        return ul.linear_me_loss(h, W, labels, bias=b, reduction=reduction, chunk_rows=3)

    def logits_version(z, W, b):
        return ul.me_loss(z, labels, reduction=reduction)

    got = _run(fused, h, W, b, None, False)
    expected = _run(logits_version, h, W, b, None, True)
    kept = torch.ones(9, dtype=torch.bool)
    kept[[2, 7]] = False
    assert torch.isfinite(got[0]).all()
    assert (got[3][~kept] == 0).all()  # the masked columns' bias gradient
    torch.testing.assert_close(got[3][kept], expected[3][kept], rtol=1e-5, atol=1e-6)
    for a, e in zip(got[:3], expected[:3], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # The same loss with the masked columns dropped from the head.
    dropped = _run(lambda h, W, b: fused(h, W[kept], b[kept]), h, W, b, None, False)
    torch.testing.assert_close(got[0], dropped[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 30.0, 1e3, 1e4])
def test_linear_me_value_keeps_float32_rounding_at_any_logit_offset(offset):
    """A bias of ``offset`` (one column masked) under near-uniform logits, KL about 5e-5: per
    token and summed, within 4 float32 units of ``eps log V'`` of float64 math on the same
    float32 logits, never negative. The log-sum-exp less the mean logit, each rounded at the
    offset's scale, went negative at 1e4."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 4, 8, generator=g)
    weight = 0.004 * torch.randn(32000, 8, generator=g)
    bias = torch.full((32000,), offset)
    bias[7] = float("-inf")
    labels = torch.zeros(2, 4, dtype=torch.long)
    logits = F.linear(h[:, :-1], weight, bias).double()
    kept = logits[..., torch.arange(32000) != 7]
    expected = -math.log(31999) - (kept - kept.logsumexp(-1, keepdim=True)).mean(-1)
    tolerance = 4 * torch.finfo(torch.float32).eps * math.log(31999)
    value = ul.linear_me_loss(h, weight, labels, bias=bias, reduction="none", chunk_rows=4)
    assert (value.double() - expected).abs().max() <= tolerance
    assert (value >= 0).all()
    total = ul.linear_me_loss(h, weight, labels, bias=bias, reduction="sum", chunk_rows=4)
    assert (total.double() - expected.sum()).abs() <= expected.numel() * tolerance
