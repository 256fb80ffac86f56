"""``unlearning_losses.zero3`` on ordinary modules (one process; DeepSpeed itself is exercised by
``test_deepspeed.py``): the loss it computes is the loss's own, gradients included, and the
head's forward is left as it was found."""

from __future__ import annotations

import pytest
import torch

import unlearning_losses as ul
from unlearning_losses import zero3


def _inputs():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 16, (2, 5))
    labels[0, :2] = -100
    return hidden, labels


@pytest.mark.parametrize(
    "loss", [ul.linear_ga_loss, ul.linear_npo_loss, ul.linear_simnpo_loss, ul.linear_me_loss]
)
def test_head_loss_is_the_loss_of_the_heads_weight_and_bias(loss):
    head = torch.nn.Linear(8, 16)
    hidden, labels = _inputs()
    options = {"ref_logprobs": torch.zeros(2, 4)} if loss is ul.linear_npo_loss else {}
    got = zero3.head_loss(head, loss, hidden, labels, **options)
    got.backward()
    grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    expected = loss(hidden, head.weight, labels, bias=head.bias, **options)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, t in zip(grads, (hidden, head.weight, head.bias), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


def test_head_loss_passes_the_reference_head_to_the_kl_losses():
    head, ref_head = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
    hidden, labels = _inputs()
    ref_hidden = torch.randn(2, 5, 8)
    got = zero3.head_loss(
        head, ul.linear_kl_divergence, hidden, ref_hidden, labels=labels, ref_head=ref_head
    )
    expected = ul.linear_kl_divergence(
        hidden,
        head.weight,
        ref_hidden,
        ref_head.weight,
        labels,
        bias=head.bias,
        ref_bias=ref_head.bias,
    )
    assert got > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_heads_own_forward_is_restored_even_when_the_loss_raises():
    head = torch.nn.Linear(8, 16)
    hidden, labels = _inputs()
    zero3.head_loss(head, ul.linear_ga_loss, hidden, labels)
    assert "forward" not in head.__dict__
    hooked = lambda x: "hooked"  # noqa: E731 (an instance-level forward, as accelerate's hooks set)
    head.forward = hooked
    with pytest.raises(ValueError, match="labels"):
        zero3.head_loss(head, ul.linear_ga_loss, hidden, labels[:, :2])
    assert head.forward is hooked


def test_engine_forward_runs_the_function_through_the_wrapper():
    calls = []

    class Engine(torch.nn.Module):  # what DDP and DeepSpeed's engine do: call their .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append("engine")
            return self.module(*args, **kwargs)

    engine = Engine(torch.nn.Linear(2, 2))
    assert zero3.engine_forward(engine, lambda x, *, y: x + y, torch.ones(2), y=1).tolist() == [
        2,
        2,
    ]
    assert calls == ["engine"] and "forward" not in engine.module.__dict__
    with pytest.raises(TypeError, match=r"\.module"):
        zero3.engine_forward(torch.nn.Linear(2, 2), lambda: None)
