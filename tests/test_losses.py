"""Every loss against the float64 reference, and the properties its math implies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from unlearning_losses import (
    combine_with_retain,
    ga_loss,
    kl_divergence,
    kl_loss,
    nll_loss,
    npo_loss,
    simnpo_loss,
    token_logprobs,
)
from unlearning_losses.testing import Batch, entries, entry
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import batches

GRANULARITIES = ["sequence", "sequence_mean", "token", "batch"]


@given(batches())
def test_ga_and_nll_match_reference(case):
    assert_close_to_reference(
        lambda x: ga_loss(x, case.labels, shift=case.shift),
        lambda x: ref.ga_loss(x, case.labels, shift=case.shift),
        case,
    )
    assert_close_to_reference(
        lambda x: nll_loss(x, case.labels, shift=case.shift),
        lambda x: ref.nll_loss(x, case.labels, shift=case.shift),
        case,
    )


@given(batches(), st.sampled_from(["forward", "reverse"]), st.booleans())
def test_kl_losses_match_reference(case, direction, with_labels):
    labels = case.labels if with_labels else None
    assert_close_to_reference(
        lambda x: kl_divergence(x, case.ref_logits, labels, direction=direction, shift=case.shift),
        lambda x: ref.kl_divergence(
            x, case.ref_logits.double(), labels, direction=direction, shift=case.shift
        ),
        case,
    )
    assert_close_to_reference(
        lambda x: kl_loss(x, case.ref_logits, labels, direction=direction, shift=case.shift),
        lambda x: (
            -ref.kl_divergence(
                x, case.ref_logits.double(), labels, direction=direction, shift=case.shift
            )
        ),
        case,
    )


@given(batches(), st.sampled_from(GRANULARITIES), st.sampled_from([0.05, 0.1, 1.0, 4.0]))
def test_npo_matches_reference(case, granularity, beta):
    ref_logprobs = ref.token_logprobs(case.ref_logits, case.labels, case.shift)
    assert_close_to_reference(
        lambda x: npo_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            beta=beta,
            granularity=granularity,
            shift=case.shift,
        ),
        lambda x: ref.npo_loss(
            x,
            case.labels,
            ref_logprobs=ref_logprobs,
            beta=beta,
            granularity=granularity,
            shift=case.shift,
        ),
        case,
    )


@given(batches(dtypes=[torch.float64, torch.float32]), st.sampled_from(GRANULARITIES))
def test_npo_from_cached_ref_logprobs_equals_npo_from_ref_logits(case, granularity):
    cached = token_logprobs(case.ref_logits, case.labels, shift=case.shift)
    from_cache = npo_loss(
        case.logits, case.labels, ref_logprobs=cached, granularity=granularity, shift=case.shift
    )
    from_logits = npo_loss(
        case.logits,
        case.labels,
        ref_logits=case.ref_logits,
        granularity=granularity,
        shift=case.shift,
    )
    torch.testing.assert_close(from_cache, from_logits)


@given(batches(), st.sampled_from([0.5, 4.5]), st.sampled_from([0.0, 1.5]))
def test_simnpo_matches_reference(case, beta, delta):
    assert_close_to_reference(
        lambda x: simnpo_loss(x, case.labels, beta=beta, delta=delta, shift=case.shift),
        lambda x: ref.simnpo_loss(x, case.labels, beta=beta, delta=delta, shift=case.shift),
        case,
    )


REDUCED = [e for e in entries("logits", takes="reduction") if e.labelled]


def _all_losses(logits, batch, shift, reduction="mean"):
    """Every loss of labelled logits with a reduction that is defined on these logits."""
    return {
        e.name: e(logits, batch, shift=shift, reduction=reduction)
        for e in REDUCED
        if e.defined_on(logits, batch.labels, shift)
    }


@given(batches(three_d=True, dtypes=[torch.float64]))
def test_masking_a_position_equals_dropping_it(case):
    """Ignoring the last label of each sequence equals cutting that position off entirely."""
    labels = case.labels.clone()
    labels[:, -1] = -100
    masked = _all_losses(
        case.logits, Batch.with_reference(labels, case.ref_logits, shift=case.shift), case.shift
    )
    keep = labels.shape[1] - 1
    assume(keep > 0 and not (case.shift and keep == 1))  # something left to compare against
    kept = Batch.with_reference(labels[:, :keep], case.ref_logits[:, :keep], shift=case.shift)
    dropped = _all_losses(case.logits[:, :keep], kept, case.shift)
    for name in masked.keys() & dropped.keys():  # a loss defined on both
        torch.testing.assert_close(masked[name], dropped[name], msg=name)


@given(batches(dtypes=[torch.float64, torch.float32]))
def test_sum_equals_mean_times_count(case):
    """A token mean times the valid tokens, a sequence mean times the sequences with one."""
    valid = ref.valid_mask(case.labels, case.logits, case.shift)
    sequences = valid if valid.dim() == 2 else valid[None]  # (N, V) logits: one sequence
    counts = {"num_items_in_batch": valid.sum(), "num_sequences": (sequences.sum(-1) > 0).sum()}
    batch = Batch.with_reference(case.labels, case.ref_logits, shift=case.shift)
    totals = _all_losses(case.logits, batch, case.shift, "sum")
    means = _all_losses(case.logits, batch, case.shift)
    for e in REDUCED:
        if e.name in means and e.count is not None:
            torch.testing.assert_close(totals[e.name], means[e.name] * counts[e.count], msg=e.name)


@given(batches(dtypes=[torch.float64, torch.float32]))
def test_reduction_none_sums_to_reduction_sum(case):
    batch = Batch.with_reference(case.labels, case.ref_logits, shift=case.shift)
    totals = _all_losses(case.logits, batch, case.shift, "sum")
    for name, per_item in _all_losses(case.logits, batch, case.shift, "none").items():
        torch.testing.assert_close(per_item.sum(), totals[name], msg=name)


@given(batches(three_d=True, dtypes=[torch.float64]))
def test_npo_gradient_at_the_reference_is_the_sequence_loglikelihood_gradient(case):
    """At theta = reference, sigma(0) = 1/2, so grad NPO = grad of mean_i sum_t log p."""
    x = case.logits.detach().clone().requires_grad_(True)
    npo_loss(x, case.labels, ref_logits=case.logits, shift=case.shift).backward()
    y = case.logits.detach().clone().requires_grad_(True)
    lp = token_logprobs(y, case.labels, shift=case.shift)
    nonempty = (ref.valid_mask(case.labels, case.logits, case.shift).sum(-1) > 0).sum()
    (lp.sum() / nonempty.clamp(min=1)).backward()
    torch.testing.assert_close(x.grad, y.grad)


@given(batches(three_d=True, dtypes=[torch.float64]))
def test_npo_tends_to_mean_log_ratio_as_beta_vanishes(case):
    beta = 1e-6
    loss = npo_loss(
        case.logits, case.labels, ref_logits=case.ref_logits, beta=beta, shift=case.shift
    )
    lp = ref.token_logprobs(case.logits, case.labels, case.shift)
    rp = ref.token_logprobs(case.ref_logits, case.labels, case.shift)
    valid = ref.valid_mask(case.labels, case.logits, case.shift)
    nonempty = valid.sum(-1) > 0
    if not nonempty.any():
        assert loss == 0
        return
    delta = (lp - rp).sum(-1)[nonempty].mean()
    torch.testing.assert_close(loss - 2 * math.log(2) / beta, delta, rtol=1e-3, atol=1e-3)


TOKEN_MEAN_LOSSES = [e.name for e in entries("logits", takes="num_items_in_batch") if e.labelled]


@given(
    batches(three_d=True, dtypes=[torch.float64, torch.float32]),
    st.sampled_from(TOKEN_MEAN_LOSSES),
)
def test_num_items_in_batch_halves_add_up_to_the_full_batch(case, name):
    fn = entry(name)
    size = case.logits.shape[0]
    assume(size >= 2 and fn.defined_on(case.logits, case.labels, case.shift))
    halves = [slice(0, size // 2), slice(size // 2, size)]
    count = ref.valid_mask(case.labels, case.logits, case.shift).sum()
    batch = Batch.with_reference(case.labels, case.ref_logits, shift=case.shift)
    full_value, full_grad = value_and_grad(
        lambda x: fn(x, batch, shift=case.shift), case.logits, 1.0
    )
    x = case.logits.detach().clone().requires_grad_(True)
    total = sum(fn(x[h], batch.rows(h), shift=case.shift, num_items_in_batch=count) for h in halves)
    total.backward()
    torch.testing.assert_close(total.detach(), full_value)
    torch.testing.assert_close(x.grad, full_grad)


LABELLED = [e.name for e in entries("logits") if e.labelled]


@pytest.mark.parametrize("name", LABELLED)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = entry(name)(logits, Batch.with_reference(labels, torch.randn(2, 4, 6)))
    assert (loss == 0).all()
    loss.sum().backward()
    assert (logits.grad == 0).all()


def test_t_equals_one_with_shift_is_empty():
    logits = torch.randn(3, 1, 5, requires_grad=True)
    labels = torch.randint(0, 5, (3, 1))
    assert token_logprobs(logits, labels).shape == (3, 0)
    batch = Batch.with_reference(labels, logits.detach())
    loss = sum(entry(name)(logits, batch).sum() for name in LABELLED)
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


def test_reduction_none_shapes():
    logits, labels = torch.randn(3, 6, 5), torch.randint(0, 5, (3, 6))
    ref_logits = torch.randn(3, 6, 5)
    assert ga_loss(logits, labels, reduction="none").shape == (3, 5)
    assert kl_divergence(logits, ref_logits, labels, reduction="none").shape == (3, 5)
    assert kl_divergence(logits, ref_logits, reduction="none").shape == (3, 6)
    assert npo_loss(logits, labels, ref_logits=ref_logits, reduction="none").shape == (3,)
    assert npo_loss(
        logits, labels, ref_logits=ref_logits, granularity="token", reduction="none"
    ).shape == (3, 5)
    assert simnpo_loss(logits, labels, reduction="none").shape == (3,)
    assert ga_loss(logits[0], labels[0], reduction="none").shape == (6,)


def test_ga_is_the_negative_of_hugging_face_causal_lm_loss():
    logits, labels = torch.randn(2, 7, 9), torch.randint(0, 9, (2, 7))
    labels[:, :3] = -100
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ga_loss(logits, labels), -hf)
    torch.testing.assert_close(nll_loss(logits, labels), hf)


def test_combine_with_retain_is_the_weighted_sum():
    forget, retain = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total = combine_with_retain(forget, retain, forget_weight=0.5, retain_weight=4.0)
    assert total.item() == 0.5 * 2.0 + 4.0 * 3.0
    total.backward()
    assert forget.grad.item() == 0.5 and retain.grad.item() == 4.0


def test_extreme_finite_logits_give_finite_losses():
    logits = torch.tensor(
        [[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4]]], requires_grad=True
    )
    ref_logits = -logits.detach()
    labels = torch.tensor([[0, 0, 1]])
    batch = Batch.with_reference(labels, ref_logits)
    loss = sum(e(logits, batch).sum() for e in entries("logits"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
