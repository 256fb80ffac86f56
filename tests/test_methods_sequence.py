"""KTO and FLAT, losses of sequence-level probabilities, against the float64 reference in every
dtype and on both backends, and the properties their math implies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearning_losses import (
    flat_loss,
    kto_loss,
    kto_reference_point,
    npo_loss,
    token_logprobs,
)
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import DTYPES, batches

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = ["kl", "jensen_shannon", "pearson", "total_variation"]


# --- KTO ----------------------------------------------------------------------------------------


def _kto_sensitivity(case, beta: float, variant: str) -> float:
    """A sequence's log-ratio sums its tokens' float32 errors (up to ``max_length`` of them), and
    the log-sigmoid's weight ``2`` reaches ``2 / beta * beta``: both bound the conditioning."""
    return float(case.labels.shape[-1]) * (2.0 if variant == "logsigmoid" else beta)


@given(
    batches(dtypes=DTYPES),
    st.sampled_from(["sigmoid", "logsigmoid"]),
    st.sampled_from([0.1, 1.0, 3.0]),
    st.sampled_from([0.0, -2.0, 4.5]),
    st.booleans(),
)
def test_kto_matches_reference_in_every_dtype(case, variant, beta, z0, cached):
    ref_logprobs = ref.token_logprobs(case.ref_logits, case.labels, case.shift)
    given_ref = {"ref_logprobs": ref_logprobs} if cached else {"ref_logits": case.ref_logits}
    assert_close_to_reference(
        lambda x: kto_loss(
            x,
            case.labels,
            **given_ref,
            reference_point=z0,
            beta=beta,
            variant=variant,
            shift=case.shift,
        ),
        lambda x: ref.kto_loss(
            x,
            case.labels,
            ref_logprobs=ref_logprobs,
            reference_point=z0,
            beta=beta,
            variant=variant,
            shift=case.shift,
        ),
        case,
        sensitivity=_kto_sensitivity(case, beta, variant),
    )


@settings(max_examples=10)
@given(batches(dtypes=LOW_PRECISION), st.sampled_from(["sigmoid", "logsigmoid"]))
@pytest.mark.triton
def test_kto_on_the_triton_backend_matches_reference(case, variant):
    assert_close_to_reference(
        lambda x: kto_loss(
            x,
            case.labels,
            ref_logits=case.ref_logits,
            reference_point=1.0,
            variant=variant,
            beta=1.0,
            shift=case.shift,
            backend="triton",
        ),
        lambda x: ref.kto_loss(
            x,
            case.labels,
            ref_logprobs=case.ref_logprobs,
            reference_point=1.0,
            variant=variant,
            beta=1.0,
            shift=case.shift,
        ),
        case,
        sensitivity=_kto_sensitivity(case, 1.0, variant),
    )


@settings(max_examples=20)
@given(batches(dtypes=[torch.float64]), st.sampled_from([0.1, 2.0]))
def test_logsigmoid_kto_at_reference_point_zero_is_npo(case, beta):
    kto = kto_loss(
        case.logits,
        case.labels,
        ref_logits=case.ref_logits,
        reference_point=0.0,
        beta=beta,
        variant="logsigmoid",
        shift=case.shift,
    )
    npo = npo_loss(
        case.logits, case.labels, ref_logits=case.ref_logits, beta=beta, shift=case.shift
    )
    torch.testing.assert_close(kto, npo, rtol=1e-12, atol=1e-12)


@settings(max_examples=20)
@given(batches(three_d=True, dtypes=[torch.float64]), st.sampled_from([0.5, 2.0]))
def test_sigmoid_kto_is_one_minus_the_desirable_value(case, beta):
    """sigma(beta (D - z0)) = 1 - sigma(beta (z0 - D)), per sequence, with the reference point
    as a 0-d tensor; the gradient in D is beta sigma (1 - sigma) (the reference's autograd)."""
    z0 = torch.tensor(0.7, dtype=torch.float64)
    per_sequence = kto_loss(
        case.logits,
        case.labels,
        ref_logits=case.ref_logits,
        reference_point=z0,
        beta=beta,
        reduction="none",
        shift=case.shift,
    )
    lp = ref.token_logprobs(case.logits, case.labels, case.shift)
    rp = ref.token_logprobs(case.ref_logits, case.labels, case.shift)
    nonempty = ref.valid_mask(case.labels, case.logits, case.shift).any(-1)
    expected = 1 - torch.sigmoid(beta * (z0 - (lp - rp).sum(-1)))
    torch.testing.assert_close(per_sequence, torch.where(nonempty, expected, 0.0))


def test_the_reference_point_is_a_constant_and_shifts_the_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    z0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = kto_loss(logits, labels, ref_logits=ref_logits, reference_point=z0)
    assert not loss.requires_grad  # nothing but the logits carries a gradient
    # A larger reference point makes every undesirable answer look better: the loss falls.
    higher = kto_loss(logits, labels, ref_logits=ref_logits, reference_point=5.0)
    assert higher < loss


def test_kto_reference_point_is_the_clamped_mean_sequence_log_ratio():
    g = torch.Generator().manual_seed(1)
    logprobs = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logprobs = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for clamp in (True, False):
        got = kto_reference_point(logprobs, ref_logprobs, clamp=clamp)
        expected = ref.kto_reference_point(logprobs, ref_logprobs, clamp=clamp)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not got.requires_grad and got.dtype == torch.float64
    below = kto_reference_point(ref_logprobs - 1.0, ref_logprobs)
    assert below == 0  # clamped: the mean log-ratio is -6
    assert kto_reference_point(ref_logprobs - 1.0, ref_logprobs, clamp=False) == -6
    one_sequence = kto_reference_point(logprobs[0].float(), ref_logprobs[0].float())
    assert one_sequence.dtype == torch.float32
    torch.testing.assert_close(
        one_sequence.double(), (logprobs[0] - ref_logprobs[0]).sum().clamp(min=0).detach()
    )


def test_kto_reference_point_from_cached_logprobs_matches_the_papers_estimate():
    """token_logprobs gives 0 at ignored positions, so each row's sum is its sequence's."""
    g = torch.Generator().manual_seed(2)
    logits, ref_logits = torch.randn(2, 3, 5, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 5), generator=g)
    labels[0, :3] = -100
    got = kto_reference_point(
        token_logprobs(logits, labels), token_logprobs(ref_logits, labels), clamp=False
    )
    lp, rp = ref.token_logprobs(logits, labels), ref.token_logprobs(ref_logits, labels)
    torch.testing.assert_close(got, (lp - rp).sum(-1).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reference_point": math.nan}, ValueError, r"reference_point must be finite; got nan"),
        ({"reference_point": "0"}, TypeError, r"reference_point must be a real number; got str"),
        (
            {"reference_point": torch.zeros(2)},
            TypeError,
            r"reference_point must be a real number or a floating 0-d tensor; got a tensor of "
            r"dtype torch.float32 and shape \(2,\)",
        ),
        (
            {"reference_point": torch.tensor(1)},
            TypeError,
            r"reference_point must be a real number or a floating 0-d tensor",
        ),
        (
            {"reference_point": torch.tensor(math.inf)},
            ValueError,
            r"reference_point must be finite; got inf",
        ),
        (
            {"reference_point": torch.tensor(0.0, device="meta")},
            ValueError,
            r"reference_point must be on the same device as logits \(cpu\); got meta",
        ),
        ({"reference_point": 0.0, "variant": "hinge"}, ValueError, r"variant must be one of"),
        ({"reference_point": 0.0, "beta": 0.0}, ValueError, r"beta must be > 0; got 0.0"),
        (
            {"reference_point": 0.0, "ref_logprobs": torch.zeros(2, 3)},
            ValueError,
            r"give exactly one of ref_logprobs or ref_logits; got both",
        ),
    ],
)
def test_kto_refuses(kwargs, error, message):
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    with pytest.raises(error, match=message):
        kto_loss(logits, labels, ref_logits=logits, **kwargs)


def test_kto_reference_point_refuses():
    with pytest.raises(TypeError, match=r"logprobs must be a floating tensor"):
        kto_reference_point(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"logprobs must have shape \(B, L\) or \(N,\)"):
        kto_reference_point(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"ref_logprobs must have shape \(2, 3\) to match"):
        kto_reference_point(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"group must be a torch.distributed ProcessGroup"):
        kto_reference_point(torch.zeros(2, 3), torch.zeros(2, 3), group="dp")


# --- FLAT ---------------------------------------------------------------------------------------


@st.composite
def pairs(draw, dtypes=DTYPES):
    """Forget answers and template answers to the same prompts: as many sequences, any lengths."""
    forget = draw(batches(three_d=True, dtypes=dtypes))
    template = draw(
        batches(
            three_d=True,
            dtypes=[forget.dtype],
            batch=forget.labels.shape[0],
            shift=forget.shift,
            scales=(1.0, 5.0),
        )
    )
    return forget, template


# Each side's mean probability moves by at most the float32 error of its log-probs, and the
# divergences' derivatives are bounded by e^0 = 1 (KL), 3/2 (Pearson), 1/2 (JS, TV).
@given(pairs(), st.sampled_from(DIVERGENCES), st.sampled_from(["forget", "template"]))
def test_flat_matches_reference_in_every_dtype(pair, divergence, varied):
    forget, template = pair
    case = forget if varied == "forget" else template

    def inputs(x):
        if varied == "forget":
            return x, forget.labels, template.logits, template.labels
        return forget.logits, forget.labels, x, template.labels

    assert_close_to_reference(
        lambda x: flat_loss(*inputs(x), divergence=divergence, shift=case.shift),
        lambda x: ref.flat_loss(
            *(t.double() if t.is_floating_point() else t for t in inputs(x)),
            divergence=divergence,
            shift=case.shift,
        ),
        case,
    )


@settings(max_examples=10)
@given(pairs(dtypes=LOW_PRECISION), st.sampled_from(DIVERGENCES))
@pytest.mark.triton
def test_flat_on_the_triton_backend_matches_reference(pair, divergence):
    forget, template = pair
    assert_close_to_reference(
        lambda x: flat_loss(
            x,
            forget.labels,
            template.logits,
            template.labels,
            divergence=divergence,
            shift=forget.shift,
            backend="triton",
        ),
        lambda x: ref.flat_loss(
            x,
            forget.labels,
            template.logits.double(),
            template.labels,
            divergence=divergence,
            shift=forget.shift,
        ),
        forget,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_flat_raises_the_template_and_lowers_the_forget_answer(divergence):
    """One step along the negative gradient makes the template answer likelier and the forget
    answer less likely: the loss adjustment, for every divergence."""
    g = torch.Generator().manual_seed(3)
    forget, template = torch.randn(2, 2, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 2, 6), generator=g)
    (forget_grad, template_grad) = torch.autograd.grad(
        flat_loss(
            forget.requires_grad_(),
            labels[0],
            template.requires_grad_(),
            labels[1],
            divergence=divergence,
        ),
        (forget, template),
    )

    def mean_logprob(logits, labels):
        return token_logprobs(logits, labels).sum().item()

    step = 1e-3
    assert mean_logprob(forget - step * forget_grad, labels[0]) < mean_logprob(forget, labels[0])
    assert mean_logprob(template - step * template_grad, labels[1]) > mean_logprob(
        template, labels[1]
    )


def test_flat_without_template_tokens_is_the_forget_term_alone():
    g = torch.Generator().manual_seed(4)
    forget, template = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 8, (3, 5), generator=g)
    none = torch.full_like(labels, -100)
    mean_p = (
        ref.token_logprobs(forget, labels).exp().sum(-1)
        / ref.valid_mask(labels, forget).sum(-1).double()
    )
    got = flat_loss(forget, labels, template, none, divergence="kl", reduction="none")
    torch.testing.assert_close(got, torch.exp(mean_p - 1), rtol=1e-12, atol=1e-12)
    both_empty = flat_loss(forget, none, template, none)
    assert both_empty == 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_flat_averages_pairs_where_the_authors_code_pools_the_batch(divergence):
    """The paper's expectation over pairs: a batch's loss is the mean of its pairs' losses. The
    authors' code pools each side's probabilities over every position of its padded batch
    (ignored positions as 0) before g* and f*∘g*: the same on one pair whose every position is
    scored, not on a padded batch (the documented difference)."""
    g = torch.Generator().manual_seed(5)
    forget, template = 2 * torch.randn(2, 3, 6, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (2, 3, 6), generator=g)
    g_star, conjugate = ref.FLAT_VARIATIONAL[divergence]

    def pooled(logits, labels):
        valid = ref.valid_mask(labels, logits)
        return torch.where(valid, ref.token_logprobs(logits, labels).exp(), 0.0).mean()

    def authors_form(f, f_labels, e, e_labels):
        return -g_star(pooled(e, e_labels)) + conjugate(pooled(f, f_labels))

    def ours(f, f_labels, e, e_labels):
        return flat_loss(f, f_labels, e, e_labels, divergence=divergence)

    scored = (forget[:1], labels[0, :1], template[:1], labels[1, :1])
    torch.testing.assert_close(ours(*scored), authors_form(*scored), rtol=1e-12, atol=1e-12)

    labels[:, :, :2] = -100  # prompts
    labels[0, 1, 4:] = -100  # and padding of unequal lengths
    labels[1, 2, 3:] = -100
    batch = (forget, labels[0], template, labels[1])
    per_pair = torch.stack([ours(*(t[i : i + 1] for t in batch)) for i in range(3)])
    torch.testing.assert_close(ours(*batch), per_pair.mean(), rtol=1e-12, atol=1e-12)
    assert abs(ours(*batch) - authors_form(*batch)) > 1e-3


def test_flat_refuses():
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    with pytest.raises(ValueError, match=r"template_logits must hold as many sequences as logits"):
        flat_loss(logits, labels, logits[:1], labels[:1])
    with pytest.raises(ValueError, match=r"template_logits must hold as many sequences"):
        flat_loss(logits, labels, logits[0], labels[0])
    with pytest.raises(ValueError, match=r"template_labels must have shape \(2, 4\) to match"):
        flat_loss(logits, labels, logits, labels[:, :3])
    with pytest.raises(TypeError, match=r"template_logits must be float16"):
        flat_loss(logits, labels, logits.long(), labels)
    with pytest.raises(ValueError, match=r"divergence must be one of 'kl', 'jensen_shannon'"):
        flat_loss(logits, labels, logits, labels, divergence="hellinger")


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_and_kto_give_no_nan_for_logits_spanning_the_float32_range(backend):
    x = torch.zeros(1, 4, 5)
    x[0, :, 0], x[0, :, 1] = 3e38, -3e38
    labels = torch.tensor([[0, 1, 1, 2]])
    for fn in (
        lambda x: flat_loss(x, labels, x, labels, divergence="kl", backend=backend),
        lambda x: kto_loss(
            x, labels, ref_logits=torch.zeros_like(x), reference_point=0.0, backend=backend
        ),
    ):
        value, grad = value_and_grad(fn, x, 1.0)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
