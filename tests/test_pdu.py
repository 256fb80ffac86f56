"""Primal-dual unlearning: the logit-margin forget term against the float64 reference, the
Lagrangian and the dual step by their formulas, and their refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from unlearning_losses import logit_margin_loss, pdu_dual_update, pdu_loss
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference
from unlearning_losses.testing.strategies import batches


@settings(deadline=None)
@given(batches(masked_vocab=False))  # a -inf logit makes the mean over V -inf
def test_logit_margin_loss_matches_the_reference(case):
    assert_close_to_reference(
        lambda x: logit_margin_loss(x, case.labels, shift=case.shift),
        lambda x: ref.logit_margin_loss(x, case.labels, shift=case.shift),
        case,
    )


def test_logit_margin_is_zero_for_flat_rows_and_counts_only_valid_tokens():
    logits = torch.zeros(1, 4, 6)
    logits[0, 3] = torch.arange(6.0)  # the last row is never scored under the shift
    labels = torch.tensor([[-100, 1, 2, 3]])
    assert logit_margin_loss(logits, labels).item() == 0.0
    logits[0, 1, 0] = 6.0  # margin 6 - 1 = 5 on one of the three scored rows (0, 1, 2)
    assert logit_margin_loss(logits, labels).item() == pytest.approx(25 / 3)
    assert logit_margin_loss(logits, torch.full((1, 4), -100)).item() == 0.0


def test_pdu_loss_is_the_lagrangian_and_the_dual_step_is_projected():
    forget, retain = torch.tensor(2.0), torch.tensor(1.5)
    value = pdu_loss(forget, retain, dual=0.5, retain_epsilon=1.0, gamma=3.0)
    assert value.item() == pytest.approx(3.0 * 2.0 + 0.5 * (1.5 - 1.0))
    assert pdu_dual_update(0.5, retain, retain_epsilon=1.0, step_size=2.0) == pytest.approx(1.5)
    assert pdu_dual_update(0.5, 0.2, retain_epsilon=1.0, step_size=2.0) == 0.0  # max(0, -1.1)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: pdu_loss(torch.tensor(1.0), torch.tensor(1.0), dual=-1.0, retain_epsilon=0.0),
            ValueError,
            "dual",
        ),
        (
            lambda: pdu_loss(
                torch.tensor(1.0), torch.tensor(1.0), dual=1.0, retain_epsilon=math.inf
            ),
            ValueError,
            "retain_epsilon",
        ),
        (
            lambda: pdu_loss(1.0, torch.tensor(1.0), dual=1.0, retain_epsilon=0.0),
            TypeError,
            "forget_loss",
        ),
        (
            lambda: pdu_dual_update(1.0, 1.0, retain_epsilon=0.0, step_size=0.0),
            ValueError,
            "step_size",
        ),
        (
            lambda: pdu_dual_update(1.0, torch.tensor(math.nan), retain_epsilon=0.0),
            ValueError,
            "retain_loss",
        ),
        (
            lambda: pdu_dual_update(1.0, torch.ones(2), retain_epsilon=0.0),
            ValueError,
            "retain_loss",
        ),
        (
            lambda: logit_margin_loss(
                torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.int64), reduction="max"
            ),
            ValueError,
            "reduction",
        ),
        (
            lambda: logit_margin_loss(torch.zeros(1, 3, 4, dtype=torch.int64), torch.zeros(1, 3)),
            TypeError,
            "logits",
        ),
    ],
)
def test_pdu_refusals_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_an_ignored_row_with_a_masked_logit_gets_a_zero_gradient():
    """A -inf logit makes an ignored row's margin infinite; it must not turn the gradient NaN."""
    logits = torch.tensor([[[1.0, float("-inf"), 0.5], [0.2, 0.1, 0.3], [0.0, 1.0, 2.0]]])
    labels = torch.tensor([[-100, -100, 1]])  # after the shift only row 1 counts
    x = logits.clone().requires_grad_()
    loss = logit_margin_loss(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(x.grad[0, 0], torch.zeros(3))
    torch.testing.assert_close(loss, torch.tensor((0.3 - 0.2) ** 2))
