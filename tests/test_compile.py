"""torch.compile(fullgraph=True) traces the losses through the custom ops without graph breaks."""

from __future__ import annotations

import pytest
import torch

from unlearning_losses import (
    ceu_loss,
    combine_with_retain,
    ga_loss,
    kl_divergence,
    kl_loss,
    nll_loss,
    npo_loss,
    tnpo_loss,
    undial_loss,
    wga_loss,
)


def unlearning_objective(logits, ref_logits, labels, retain_logits, retain_labels):
    forget = (
        ga_loss(logits, labels)
        + npo_loss(logits, labels, ref_logits=ref_logits)
        + kl_loss(logits, ref_logits, labels)
        + wga_loss(logits, labels)
        + tnpo_loss(logits, labels, ref_logits=ref_logits)
        + undial_loss(logits, ref_logits, labels)
        + ceu_loss(logits, labels)
    )
    retain = nll_loss(retain_logits, retain_labels) + kl_divergence(
        retain_logits, retain_logits.detach() * 0.5, retain_labels, direction="reverse"
    )
    return combine_with_retain(forget, retain, retain_weight=0.5)


def one_of_each_primitive(logits, ref_logits, labels, retain_logits, retain_labels):
    return ga_loss(logits, labels) + kl_divergence(retain_logits, ref_logits, retain_labels)


# Every loss through AOTAutograd; Inductor's code generation (C++ on the CPU, the slow part) on one
# loss of each primitive: the losses differ only in the glue around the same custom ops.
@pytest.mark.parametrize(
    ("compiler", "objective"),
    [("aot_eager", unlearning_objective), ("inductor", one_of_each_primitive)],
    ids=["aot_eager", "inductor"],
)
def test_compiled_losses_equal_eager_values_and_gradients(compiler, objective):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 31, generator=g)
    retain_logits = torch.randn(2, 9, 31, generator=g)
    ref_logits = torch.randn(2, 9, 31, generator=g)
    labels = torch.randint(0, 31, (2, 9), generator=g)
    labels[:, :3] = -100
    retain_labels = torch.randint(0, 31, (2, 9), generator=g)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        r = retain_logits.clone().requires_grad_(True)
        value = fn(x, ref_logits, labels, r, retain_labels)
        value.backward()
        return value.detach(), x.grad, r.grad

    compiled = torch.compile(objective, fullgraph=True, backend=compiler)
    for got, expected in zip(run(compiled), run(objective), strict=True):
        torch.testing.assert_close(got, expected)
