"""The rest of the family (IDK, DPO, WGA, SatImp, TNPO, UNDIAL, CE-U, RMU) against the float64
reference, and the properties their math implies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from unlearning_losses import (
    ceu_loss,
    dpo_loss,
    ga_loss,
    global_counts,
    idk_loss,
    kl_divergence,
    npo_loss,
    rmu_control_vector,
    rmu_loss,
    satimp_loss,
    tnpo_loss,
    token_logprobs,
    undial_loss,
    wga_loss,
)
from unlearning_losses.testing import Batch, entries
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import batches

BETAS = st.sampled_from([0.0, 0.5, 1.0, 3.0])


@given(batches(), BETAS)
def test_wga_matches_reference(case, beta):
    assert_close_to_reference(
        lambda x: wga_loss(x, case.labels, beta=beta, shift=case.shift),
        lambda x: ref.wga_loss(x, case.labels, beta=beta, shift=case.shift),
        case,
    )


@given(batches(), BETAS, BETAS)
def test_satimp_matches_reference(case, beta1, beta2):
    assert_close_to_reference(
        lambda x: satimp_loss(x, case.labels, beta1=beta1, beta2=beta2, shift=case.shift),
        lambda x: ref.satimp_loss(x, case.labels, beta1=beta1, beta2=beta2, shift=case.shift),
        case,
    )


@given(batches(), st.sampled_from([0.1, 1.0, 5.0]))
def test_tnpo_matches_reference(case, beta):
    cached = token_logprobs(case.ref_logits, case.labels, shift=case.shift)
    # d(w l)/dl = w + l w' grows with |l| (w depends on l - r): at |l| ~ 1e4 the value is that
    # much more sensitive to the float32 rounding of l than the other losses (the sum bounds the
    # largest |l|, and is 0 for an empty selection).
    magnitude = ref.token_logprobs(case.logits, case.labels, case.shift).abs().sum().item()
    assert_close_to_reference(
        lambda x: tnpo_loss(x, case.labels, ref_logprobs=cached, beta=beta, shift=case.shift),
        lambda x: ref.tnpo_loss(x, case.labels, ref_logprobs=cached, beta=beta, shift=case.shift),
        case,
        sensitivity=1.0 + beta * magnitude / 2,
    )


@given(batches())
def test_idk_is_the_nll_of_the_refusal(case):
    assert_close_to_reference(
        lambda x: idk_loss(x, case.labels, shift=case.shift),
        lambda x: ref.nll_loss(x, case.labels, shift=case.shift),
        case,
    )


@given(batches(), st.sampled_from([0.0, 1.0, 10.0]))
def test_undial_matches_reference(case, beta):
    assert_close_to_reference(
        lambda x: undial_loss(x, case.ref_logits, case.labels, beta=beta, shift=case.shift),
        lambda x: ref.undial_loss(x, case.ref_logits, case.labels, beta=beta, shift=case.shift),
        case,
    )


def _every_scored_row_keeps_two_entries(case) -> bool:
    """CE-U's target is undefined where the label is the only finite logit of a scored row."""
    x, _, valid, _ = ref.align(case.logits, case.labels, case.shift)
    return bool((torch.isfinite(x.double()).sum(-1)[valid] >= 2).all())


@given(batches(min_vocab=2))
def test_ceu_matches_reference(case):
    assume(_every_scored_row_keeps_two_entries(case))
    assert_close_to_reference(
        lambda x: ceu_loss(x, case.labels, shift=case.shift),
        lambda x: ref.ceu_loss(x, case.labels, shift=case.shift),
        case,
    )


@st.composite
def pairs(draw):
    """A chosen and a rejected batch with the same number of sequences."""
    rejected = draw(batches(three_d=True, dtypes=[torch.float64, torch.float32, torch.bfloat16]))
    # The chosen side is a constant of the comparison: its logits stay moderate so that its own
    # float32 rounding (eps * |z|) stays below the tolerance, which the helper sets from the
    # rejected side's logits.
    chosen = draw(
        batches(
            three_d=True,
            dtypes=[rejected.dtype],
            batch=rejected.labels.shape[0],
            shift=rejected.shift,
            scales=(1.0, 5.0),
        )
    )
    return chosen, rejected


@given(pairs(), st.sampled_from([0.1, 1.0]))
def test_dpo_matches_reference(pair, beta):
    chosen, rejected = pair
    ref_chosen = token_logprobs(chosen.ref_logits, chosen.labels, shift=chosen.shift)
    ref_rejected = ref.token_logprobs(rejected.ref_logits, rejected.labels, rejected.shift)

    def ours(x):
        return dpo_loss(
            chosen.logits,
            chosen.labels,
            x,
            rejected.labels,
            ref_chosen_logprobs=ref_chosen,
            ref_rejected_logits=rejected.ref_logits,
            beta=beta,
            shift=chosen.shift,
        )

    def reference(x):
        return ref.dpo_loss(
            chosen.logits.double(),
            chosen.labels,
            x,
            rejected.labels,
            ref_chosen_logprobs=ref_chosen,
            ref_rejected_logprobs=ref_rejected,
            beta=beta,
            shift=chosen.shift,
        )

    assert_close_to_reference(ours, reference, rejected)


@given(batches(three_d=True, dtypes=[torch.float64]), st.sampled_from([0.1, 1.0]))
def test_dpo_without_a_chosen_answer_is_scaled_npo(case, beta):
    """All chosen labels ignored: -log sigmoid(-beta D) = softplus(beta D) = beta/2 NPO."""
    ignored = torch.full_like(case.labels, -100)
    dpo = dpo_loss(
        case.logits,
        ignored,
        case.logits,
        case.labels,
        ref_chosen_logits=case.logits,
        ref_rejected_logits=case.ref_logits,
        beta=beta,
        shift=case.shift,
    )
    npo = npo_loss(
        case.logits, case.labels, ref_logits=case.ref_logits, beta=beta, shift=case.shift
    )
    torch.testing.assert_close(dpo, npo * beta / 2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_dpo_inplace_backward_writes_each_sides_gradient_into_its_logits(backend):
    """Value and both sides' gradients equal those of ``inplace_backward=False``, and each
    gradient arrives in its own side's logits buffer (a non-leaf, as a model's output is)."""
    g = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(2, 6, 37, generator=g), torch.randn(2, 5, 37, generator=g)
    ref_chosen, ref_rejected = torch.randn(2, 6, 37, generator=g), torch.randn(2, 5, 37)
    chosen_labels = torch.randint(0, 37, (2, 6), generator=g)
    rejected_labels = torch.randint(0, 37, (2, 5), generator=g)
    chosen_labels[0, :3] = rejected_labels[1, -2:] = -100
    upstream = torch.tensor([0.7, -1.3])  # per pair: the gradients are not one scale of another

    def run(inplace):
        leaves = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
        logits = [leaf * 1.0 for leaf in leaves]
        captured = []
        for x in logits:
            x.register_hook(captured.append)
        value = dpo_loss(
            logits[0],
            chosen_labels,
            logits[1],
            rejected_labels,
            ref_chosen_logits=ref_chosen,
            ref_rejected_logits=ref_rejected,
            reduction="none",
            backend=backend,
            inplace_backward=inplace,
        )
        (value * upstream).sum().backward()
        written = {grad.data_ptr() for grad in captured}
        buffers = {x.data_ptr() for x in logits}
        return value.detach(), [leaf.grad for leaf in leaves], written, buffers

    value, grads, written, buffers = run(False)
    assert not written & buffers
    inplace_value, inplace_grads, written, buffers = run(True)
    assert written == buffers  # the flag reached both sides' backward
    torch.testing.assert_close(inplace_value, value, rtol=0, atol=0)
    for got, expected in zip(inplace_grads, grads, strict=True):
        torch.testing.assert_close(got, expected)


@given(batches(dtypes=[torch.float64]))
def test_zero_exponents_give_gradient_ascent(case):
    plain = ga_loss(case.logits, case.labels, shift=case.shift)
    torch.testing.assert_close(
        wga_loss(case.logits, case.labels, beta=0.0, shift=case.shift), plain
    )
    torch.testing.assert_close(
        satimp_loss(case.logits, case.labels, beta1=0.0, beta2=0.0, shift=case.shift), plain
    )


@given(batches(dtypes=[torch.float64]), st.sampled_from([0.1, 2.0]))
def test_tnpo_has_the_gradient_of_token_npo(case, beta):
    _, tnpo_grad = value_and_grad(
        lambda x: tnpo_loss(
            x, case.labels, ref_logits=case.ref_logits, beta=beta, shift=case.shift
        ),
        case.logits,
        1.0,
    )
    _, npo_grad = value_and_grad(
        lambda x: npo_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            beta=beta,
            granularity="token",
            shift=case.shift,
        ),
        case.logits,
        1.0,
    )
    torch.testing.assert_close(tnpo_grad, npo_grad)


@given(batches(dtypes=[torch.float64]))
def test_undial_without_lowering_has_the_gradient_of_reverse_kl(case):
    """beta = 0: the target is the reference, and CE(q, p) = KL(q || p) + H(q)."""
    _, undial_grad = value_and_grad(
        lambda x: undial_loss(x, case.ref_logits, case.labels, beta=0.0, shift=case.shift),
        case.logits,
        1.0,
    )
    _, kl_grad = value_and_grad(
        lambda x: kl_divergence(
            x, case.ref_logits, case.labels, direction="reverse", shift=case.shift
        ),
        case.logits,
        1.0,
    )
    torch.testing.assert_close(undial_grad, kl_grad)


@given(batches(min_vocab=2, dtypes=[torch.float64]), st.sampled_from([0.0, 10.0]))
def test_soft_target_gradients_sum_to_zero_per_row(case, beta):
    """d/dz of CE(q, p) is p - q: it sums to 0 over the vocabulary. At the label it is >= 0
    where the target lowers the model's own label mass: CE-U always (q_y = 0), UNDIAL with the
    model as its reference (q_y <= p_y for beta >= 0)."""
    assume(_every_scored_row_keeps_two_entries(case))
    _, labels, valid, _ = ref.align(case.logits, case.labels, case.shift)
    for lowers_label, fn in (
        (
            False,
            lambda x: undial_loss(x, case.ref_logits, case.labels, beta=beta, shift=case.shift),
        ),
        (True, lambda x: undial_loss(x, x.detach(), case.labels, beta=beta, shift=case.shift)),
        (True, lambda x: ceu_loss(x, case.labels, shift=case.shift)),
    ):
        _, grad = value_and_grad(fn, case.logits, 1.0)
        torch.testing.assert_close(grad.sum(-1), torch.zeros_like(grad.sum(-1)), atol=1e-12, rtol=0)
        if lowers_label:
            rows = ref.align(grad, case.labels, case.shift)[0][valid]
            at_label = rows.gather(1, labels[valid][:, None]).squeeze(1)
            assert (at_label >= -1e-15).all()


def _rmu_inputs(seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(3, 5, 8, generator=g, dtype=torch.float64).to(dtype)
    retain = torch.randn(2, 4, 8, generator=g, dtype=torch.float64).to(dtype)
    ref_retain = (retain.double() + 0.1 * torch.randn(2, 4, 8, generator=g)).to(dtype)
    control = rmu_control_vector(8, steering_coeff=6.5, generator=g, dtype=dtype)
    forget_labels = torch.randint(0, 9, (3, 5), generator=g)
    forget_labels[:, :2] = -100
    retain_labels = torch.randint(0, 9, (2, 4), generator=g)
    retain_labels[1] = -100
    return forget, retain, ref_retain, control, forget_labels, retain_labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_rmu_matches_reference(seed, dtype):
    forget, retain, ref_retain, control, forget_labels, retain_labels = _rmu_inputs(seed, dtype)
    ours = rmu_loss(
        forget,
        retain,
        ref_retain,
        control,
        forget_labels=forget_labels,
        retain_labels=retain_labels,
        alpha=3.0,
    )
    expected = ref.rmu_loss(
        forget, retain, ref_retain, control, forget_labels != -100, retain_labels != -100, 3.0
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol)
    for name, tensor in (("forget", forget), ("retain", retain)):
        x = tensor.detach().clone().requires_grad_(True)
        xr = tensor.double().detach().clone().requires_grad_(True)
        args = dict(forget=forget, retain=retain)
        args[name] = x
        rmu_loss(
            args["forget"],
            args["retain"],
            ref_retain,
            control,
            forget_labels=forget_labels,
            retain_labels=retain_labels,
            alpha=3.0,
        ).backward()
        args = dict(forget=forget, retain=retain)
        args[name] = xr
        valid = (forget_labels if name == "forget" else retain_labels) != -100
        ref.rmu_loss(
            args["forget"],
            args["retain"],
            ref_retain,
            control,
            forget_labels != -100,
            retain_labels != -100,
            3.0,
        ).backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(
            x.grad.double(), xr.grad, rtol=1e-2 if dtype == torch.bfloat16 else tol, atol=tol
        )
        assert (x.grad[~valid] == 0).all()


def test_rmu_control_vector_has_the_steering_norm_and_is_reproducible():
    first = rmu_control_vector(64, steering_coeff=20.0, generator=torch.Generator().manual_seed(1))
    again = rmu_control_vector(64, steering_coeff=20.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first.norm(), torch.tensor(20.0))
    assert torch.equal(first, again) and (first >= 0).all()


def test_rmu_padding_does_not_count():
    forget, retain, ref_retain, control, forget_labels, retain_labels = _rmu_inputs(0)
    padded = torch.cat([forget, 1e3 * torch.ones(3, 4, 8, dtype=forget.dtype)], 1)
    padded_labels = torch.cat([forget_labels, torch.full((3, 4), -100)], 1)
    kwargs = dict(retain_labels=retain_labels, alpha=2.0)
    torch.testing.assert_close(
        rmu_loss(padded, retain, ref_retain, control, forget_labels=padded_labels, **kwargs),
        rmu_loss(forget, retain, ref_retain, control, forget_labels=forget_labels, **kwargs),
    )


# --- data parallel: halves with global counts add up to the full batch -----------------------


# Every loss of labelled logits that takes a global count, each given the whole batch's.
COUNTED = [e for e in entries("logits") if e.labelled and e.count is not None]


@given(batches(three_d=True, min_vocab=2, dtypes=[torch.float64]))
def test_split_batches_with_global_counts_add_up_to_the_full_batch(case):
    assume(case.labels.shape[0] >= 2 and case.shift)
    assume(_every_scored_row_keeps_two_entries(case))
    counts = global_counts(case.labels)
    given = {"num_items_in_batch": counts.tokens, "num_sequences": counts.sequences}
    full = Batch.with_reference(case.labels, case.ref_logits, shift=case.shift)
    half = case.labels.shape[0] // 2
    for e in COUNTED:
        if not e.defined_on(case.logits, case.labels, case.shift):
            continue
        count = {e.count: given[e.count]}

        def on(rows: slice, e=e, count=count):
            return lambda x: e(x, full.rows(rows), **count)

        whole_value, whole_grad = value_and_grad(on(slice(None)), case.logits, 1.0)
        parts = [
            value_and_grad(on(rows), case.logits[rows], 1.0)
            for rows in (slice(None, half), slice(half, None))
        ]
        torch.testing.assert_close(parts[0][0] + parts[1][0], whole_value, msg=e.name)
        torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole_grad, msg=e.name)
