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
    linear_ga_loss,
    linear_kl_divergence,
    linear_kl_loss,
    linear_me_loss,
    linear_nll_loss,
    linear_npo_loss,
    linear_simnpo_loss,
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


def fused_linear_objective(hidden, weight, bias, labels, ref_hidden):
    """Every fused-linear loss, trained and frozen heads, scalar and per-token reductions."""
    ref_logprobs = torch.full(labels[:, 1:].shape, -2.0)
    return (
        linear_ga_loss(hidden, weight, labels, bias=bias)
        + linear_nll_loss(hidden, weight, labels, bias=bias, reduction="none").sum()
        + linear_npo_loss(hidden, weight, labels, bias=bias, ref_logprobs=ref_logprobs)
        + linear_npo_loss(hidden, weight.detach(), labels, ref_hidden=ref_hidden)
        + linear_simnpo_loss(hidden, weight, labels, bias=bias)
        + linear_kl_divergence(hidden, weight, ref_hidden, labels=labels, bias=bias)
        + linear_kl_loss(hidden, weight, ref_hidden, labels=labels, reduction="none").sum()
        + linear_me_loss(hidden, weight, labels, bias=bias)
        + linear_me_loss(hidden, weight.detach(), labels, reduction="none").sum()
    )


def test_compiled_fused_linear_losses_equal_eager():
    """No data-dependent shapes while tracing: every row is visited (the ignored ones zeroed),
    where eager calls on the CPU skip prompt and padding rows."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    bias = torch.randn(13, generator=g)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 4] = -100
    ref_hidden = hidden + 0.1 * torch.randn(2, 7, 8, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        value = fn(*leaves, labels, ref_hidden)
        return [value, *torch.autograd.grad(value, leaves)]

    compiled = torch.compile(fused_linear_objective, backend="aot_eager", fullgraph=True)
    for got, want in zip(run(compiled), run(fused_linear_objective), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
