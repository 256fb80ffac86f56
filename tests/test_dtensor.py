"""DTensor inputs on four CPU ranks: every placement the losses map equals one process.

Each rank builds the same seeded float64 inputs, distributes them with the placements under test
(vocabulary, batch, sequence, and two of those on a 2-D mesh; uneven shards included: V = 11 and
T = 6 over 4 ranks), and compares the loss and the gradient's full tensor with the unsharded
computation at 1e-12. The gradient must come back as a DTensor with the input's placements.
Placements the losses cannot map are refused with the argument and the placement named.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from ranks import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import unlearning_losses as ul
from unlearning_losses.testing import Batch, entries, entry

WORLD = 4
B, T, V = 4, 6, 11
RTOL = 1e-12


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, msg=what)


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ref_logits = logits + torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a long prompt
    labels[2] = -100  # a sequence without a valid label
    labels[3, -1] = -100
    return logits, ref_logits, labels


def _losses(shift: bool):
    """name -> f(logits, batch): every loss of logits with a vocabulary-parallel path, and a
    sum; every tensor may be a DTensor."""
    table = {e.name: partial(e, shift=shift) for e in entries("logits", takes="vocab_group")}
    return {
        **table,
        "nll_loss, reduction=sum": partial(entry("nll_loss"), shift=shift, reduction="sum"),
    }


def _per_token_losses(shift: bool):
    """Those losses with ``reduction="none"``: per token or per sequence."""
    return {
        f"{e.name}, reduction=none": partial(e, shift=shift, reduction="none")
        for e in entries("logits", takes=("vocab_group", "reduction"))
    }


def _check_placements(mesh, placements, shift: bool, names=None) -> None:
    logits, ref_logits, labels = _inputs()
    token_placements = [
        Replicate() if isinstance(p, Shard) and p.dim % 3 == 2 else p for p in placements
    ]
    ref_logprobs = ul.token_logprobs(ref_logits, labels, shift=shift)
    d_ref = distribute_tensor(ref_logits, mesh, placements)
    d_labels = distribute_tensor(labels, mesh, token_placements)
    d_ref_logprobs = distribute_tensor(ref_logprobs, mesh, token_placements)
    table = {**_losses(shift), **_per_token_losses(shift)}
    for name, fn in table.items():
        if names is not None and name not in names:
            continue
        what = f"{name} with {placements}"
        full = logits.clone().requires_grad_(True)
        expected = fn(full, Batch(labels, ref_logits, ref_logprobs))
        weights = torch.linspace(0.5, 1.5, expected.numel(), dtype=expected.dtype)
        (expected * weights.reshape(expected.shape)).sum().backward()

        sharded = distribute_tensor(logits, mesh, placements).requires_grad_(True)
        got = fn(sharded, Batch(d_labels, d_ref, d_ref_logprobs))
        if expected.dim() == 0:
            assert not isinstance(got, DTensor), what  # a plain scalar, equal on every rank
            _close(got.detach(), expected.detach(), what)
            (got * weights[0]).backward()
        else:
            assert isinstance(got, DTensor), what
            _close(got.full_tensor().detach(), expected.detach(), what)
            d_weights = distribute_tensor(weights.reshape(expected.shape), mesh, got.placements)
            (got * d_weights).sum().backward()
        assert isinstance(sharded.grad, DTensor), what
        assert sharded.grad.placements == sharded.placements, what
        _close(sharded.grad.full_tensor(), full.grad, f"{what}: gradient")


def _check_all_placements(rank: int) -> None:
    line = init_device_mesh("cpu", (WORLD,))
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    _check_placements(line, [Replicate()], shift=True)
    _check_placements(line, [Shard(2)], shift=True)  # tensor parallel, uneven vocabulary
    _check_placements(line, [Shard(0)], shift=True)  # data parallel
    _check_placements(line, [Shard(1)], shift=False)  # context parallel, uneven slices
    _check_placements(square, [Shard(0), Shard(2)], shift=True)
    _check_placements(square, [Shard(1), Shard(-1)], shift=False)


def _check_flat_and_linear(rank: int) -> None:
    """2-D logits split by position are one sequence split over ranks; the fused-linear losses
    take DTensor hidden states with a whole head."""
    line = init_device_mesh("cpu", (WORLD,))
    logits, ref_logits, labels = _inputs()
    flat, flat_ref, flat_labels = (
        logits[:2].reshape(-1, V),
        ref_logits[:2].reshape(-1, V),
        labels[:2].reshape(-1),
    )
    hidden = torch.randn(B, T, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    head = torch.randn(V, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cases = {
        "flat ga": (flat, [Shard(0)], lambda x: ul.ga_loss(x, _like(flat_labels, x))),
        "flat simnpo": (flat, [Shard(0)], lambda x: ul.simnpo_loss(x, _like(flat_labels, x))),
        "flat kl": (
            flat,
            [Shard(0)],
            lambda x: ul.kl_divergence(x, _like(flat_ref, x), _like(flat_labels, x)),
        ),
        "linear ga": (hidden, [Shard(0)], lambda h: ul.linear_ga_loss(h, head, _like(labels, h))),
        "linear npo": (
            hidden,
            [Shard(0)],
            lambda h: ul.linear_npo_loss(h, head, _like(labels, h), ref_hidden=h.detach() * 0.5),
        ),
        "linear kl": (
            hidden,
            [Shard(0)],
            lambda h: ul.linear_kl_divergence(h, head, h.detach() * 0.5, None),
        ),
    }
    for what, (full_input, placements, fn) in cases.items():
        full = full_input.clone().requires_grad_(True)
        expected = fn(full)
        expected.backward()
        sharded = distribute_tensor(full_input, line, placements).requires_grad_(True)
        got = fn(sharded)
        got.backward()
        _close(got.detach(), expected.detach(), what)
        assert sharded.grad.placements == sharded.placements, what
        _close(sharded.grad.full_tensor(), full.grad, f"{what}: gradient")


def _like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` distributed as ``like`` is (its leading dimensions), or ``value`` when ``like``
    is the unsharded tensor."""
    if not isinstance(like, DTensor):
        return value
    dims = like.dim() if value.dim() == like.dim() else like.dim() - 1
    placements = [
        p if isinstance(p, Shard) and p.dim < dims else Replicate() for p in like.placements
    ]
    return distribute_tensor(value, like.device_mesh, placements)


def _check_refusals(rank: int) -> None:
    line = init_device_mesh("cpu", (WORLD,))
    logits, ref_logits, labels = _inputs()
    by_vocab = distribute_tensor(logits, line, [Shard(2)])
    partial = DTensor.from_local(logits, line, [Partial()], run_check=False)
    cases = [
        (lambda: ul.ga_loss(partial, labels), r"logits has placement P\(sum\) on mesh dimension 0"),
        (
            lambda: ul.ga_loss(by_vocab, distribute_tensor(labels, line, [Shard(0)])),
            r"labels must be a DTensor on the logits' mesh with placements \(Replicate\(\),\)",
        ),
        (
            lambda: ul.kl_divergence(by_vocab, distribute_tensor(ref_logits, line, [Shard(0)])),
            r"ref_logits must be a DTensor on the logits' mesh with placements \(Shard\(dim=2\),\)",
        ),
        (
            lambda: ul.npo_loss(
                distribute_tensor(logits, line, [Shard(1)]),
                labels[:, :2],
                ref_logprobs=labels[:, :2].double(),
            ),
            r"shift=False",
        ),
        (
            lambda: ul.ga_loss(by_vocab, labels, vocab_group=line.get_group()),
            r"logits is a DTensor, whose placements give its groups",
        ),
        (
            lambda: ul.logit_margin_loss(by_vocab, labels),
            r"logits is sharded on its last dimension",
        ),
        (
            lambda: ul.rmu_loss(
                by_vocab,
                by_vocab,
                by_vocab,
                torch.ones(V, dtype=torch.float64),
                forget_labels=labels,
            ),
            r"forget_labels must be DTensors on one mesh with the other activations",
        ),
        (
            lambda: ul.rmu_loss(
                logits, logits, logits, distribute_tensor(logits[0, 0], line, [Replicate()])
            ),
            r"control_vector is a DTensor but the activations are plain tensors",
        ),
        (
            lambda: ul.kl_divergence(logits, distribute_tensor(ref_logits, line, [Shard(2)])),
            r"ref_logits is a DTensor but the logits are a plain tensor",
        ),
        (
            lambda: ul.linear_ga_loss(
                logits[..., :5],
                distribute_tensor(torch.randn(8, 5, dtype=torch.float64), line, [Shard(1)]),
                labels,
            ),
            r"weight is a DTensor with placements \(Shard\(dim=1\),\); the fused-linear losses "
            r"take a whole head or one split by vocabulary rows",
        ),
        (lambda: ul.ga_loss(logits, labels, vocab_group="tp"), r"vocab_group must be a"),
        (
            lambda: ul.ga_loss(by_vocab, labels, backend="triton"),
            r'backend="triton" has no vocabulary-parallel path',
        ),
        (
            lambda: ul.kl_divergence(
                logits[..., :3],
                ref_logits[..., :3],
                labels.clamp(max=2),
                vocab_group=line.get_group(),
                inplace_backward=True,
            ),
            r"inplace_backward=True is not available with vocab_group",
        ),
        (
            lambda: ul.undial_loss(by_vocab, by_vocab, labels, inplace_backward=True),
            r"inplace_backward=True is not available with vocab_group",
        ),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def _check_rmu(rank: int) -> None:
    """RMU's activations ``(B, T, H)`` under every placement (H = 11 is uneven over 4 ranks), with
    and without labels, the control vector plain (the same on every rank) or a DTensor: the loss
    is a plain scalar equal to one process's, the gradient a DTensor placed like the input."""
    line = init_device_mesh("cpu", (WORLD,))
    forget, retain, labels = _inputs()
    ref_retain = retain + 0.1
    control = torch.rand(V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for with_labels in (True, False):
        kw = {"forget_labels": labels, "retain_labels": labels} if with_labels else {}
        full = forget.clone().requires_grad_(True)
        expected = ul.rmu_loss(full, retain, ref_retain, control, **kw)
        expected.backward()
        for placements in ([Shard(0)], [Shard(1)], [Shard(2)], [Replicate()]):
            label_placements = [Replicate() if p == Shard(2) else p for p in placements]
            d_labels = distribute_tensor(labels, line, label_placements)
            d_kw = {"forget_labels": d_labels, "retain_labels": d_labels} if with_labels else {}
            for vector in (control, distribute_tensor(control, line, [Replicate()])):
                what = f"rmu with {placements}, labels {with_labels}, {type(vector).__name__}"
                sharded = distribute_tensor(forget, line, placements).requires_grad_(True)
                got = ul.rmu_loss(
                    sharded,
                    distribute_tensor(retain, line, placements),
                    distribute_tensor(ref_retain, line, placements),
                    vector,
                    **d_kw,
                )
                assert not isinstance(got, DTensor), what
                _close(got.detach(), expected.detach(), what)
                got.backward()
                assert sharded.grad.placements == sharded.placements, what
                _close(sharded.grad.full_tensor(), full.grad, f"{what}: gradient")


@pytest.mark.parametrize(
    "check",
    [_check_all_placements, _check_flat_and_linear, _check_refusals, _check_rmu],
    ids=lambda f: f.__name__.strip("_"),
)
def test_dtensor_inputs_equal_one_process(check, tmp_path):
    run_on_ranks(check, WORLD, tmp_path)
