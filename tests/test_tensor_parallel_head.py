"""The fused-linear losses with a head split by vocabulary rows over CPU ranks (gloo): Megatron's
``ColumnParallelLinear`` layout as plain tensors with ``vocab_group=``, and a DTensor ``Shard(0)``
weight. Every rank builds the same seeded float64 inputs; the loss, the hidden states' gradient
and this rank's rows of the head's gradients equal one process with the whole head at 1e-10,
for uneven slices and a rank holding none, with a softcapped head and NaN padding rows."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import unlearning_losses as ul
from unlearning_losses.ops import linear_parallel

H = 6


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, H, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(3, 7, H, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, H, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 4] = -100  # row 3 of sequence 1: ignored, made NaN padding below
    labels[2, 5] = vocab - 1  # the last rank's last column
    hidden[1, 3] = ref_hidden[1, 3] = float("nan")
    ref_logprobs = -torch.rand(3, 6, generator=g, dtype=torch.float64)
    return hidden, ref_hidden, weight, bias, labels, ref_logprobs


def _losses(labels, ref_hidden, ref_logprobs):
    """name -> f(hidden, weight, bias, **kw), every fused-linear loss and reduction."""
    return {
        "token_logprobs": lambda h, w, b, **kw: ul.linear_token_logprobs(
            h, w, labels, bias=b, **kw
        ),
        "ga": lambda h, w, b, **kw: ul.linear_ga_loss(h, w, labels, bias=b, **kw),
        "nll_sum": lambda h, w, b, **kw: ul.linear_nll_loss(
            h, w, labels, bias=b, reduction="sum", **kw
        ),
        "npo_ref_hidden": lambda h, w, b, **kw: ul.linear_npo_loss(
            h, w, labels, bias=b, ref_hidden=ref_hidden, **kw
        ),
        "npo_token": lambda h, w, b, **kw: ul.linear_npo_loss(
            h, w, labels, bias=b, ref_logprobs=ref_logprobs, granularity="token", **kw
        ),
        "simnpo": lambda h, w, b, **kw: ul.linear_simnpo_loss(h, w, labels, bias=b, **kw),
        "kl": lambda h, w, b, **kw: ul.linear_kl_divergence(
            h, w, ref_hidden, labels=labels, bias=b, **kw
        ),
        "me": lambda h, w, b, **kw: ul.linear_me_loss(h, w, labels, bias=b, **kw),
        "me_none": lambda h, w, b, **kw: ul.linear_me_loss(
            h, w, labels, bias=b, reduction="none", **kw
        ),
        "kl_loss_reverse": lambda h, w, b, **kw: ul.linear_kl_loss(
            h, w, ref_hidden, labels=labels, bias=b, direction="reverse", reduction="none", **kw
        ),
    }


def _value_and_grads(fn, hidden, weight, bias, **kw):
    leaves = [hidden.clone().requires_grad_(True), weight, bias]
    value = fn(*leaves, **kw)
    upstream = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    grads = torch.autograd.grad((value * upstream).sum(), leaves)
    return value.detach(), grads


def _close(actual, expected, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale, msg=what)


def _check(
    rank: int, widths: tuple[int, ...], as_dtensor: bool, chunk_rows: int | None = 4
) -> None:
    vocab = sum(widths)
    hidden, ref_hidden, weight, bias, labels, ref_logprobs = _inputs(vocab)
    rows = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    options = {"logit_softcap": 2.5, "chunk_rows": chunk_rows}
    for name, fn in _losses(labels, ref_hidden, ref_logprobs).items():
        what = f"{name} with widths {widths}{' as a DTensor' if as_dtensor else ''}"
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        expected, (grad_h, grad_w, grad_b) = _value_and_grads(fn, hidden, w, b, **options)
        assert torch.isfinite(expected).all() and torch.isfinite(grad_h).all(), what
        if as_dtensor:
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
            b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(True)
            got, (got_h, got_w, got_b) = _value_and_grads(fn, hidden, w, b, **options)
            got_w, got_b = got_w.to_local(), got_b.to_local()
        else:
            w = weight[rows].clone().requires_grad_(True)
            b = bias[rows].clone().requires_grad_(True)
            kw = {**options, "vocab_group": dist.group.WORLD}
            got, (got_h, got_w, got_b) = _value_and_grads(fn, hidden, w, b, **kw)
        _close(got, expected, f"{what}: value")
        _close(got_h, grad_h, f"{what}: hidden gradient")
        _close(got_w, grad_w[rows], f"{what}: this rank's rows of the weight gradient")
        _close(got_b, grad_b[rows], f"{what}: this rank's rows of the bias gradient")


def _check_autocast(rank: int) -> None:
    """float32 under CPU bfloat16 autocast (a Trainer with bf16=True): the same value and
    gradients as outside it, the head's matmul included."""
    hidden, ref_hidden, weight, bias, labels, ref_logprobs = (
        t.float() if t.is_floating_point() else t for t in _inputs(11)
    )
    rows = slice(0, 7) if rank == 0 else slice(7, 11)
    for name, fn in _losses(labels, ref_hidden, ref_logprobs).items():
        w = weight[rows].clone().requires_grad_(True)
        b = bias[rows].clone().requires_grad_(True)
        kw = {"vocab_group": dist.group.WORLD, "chunk_rows": 4}
        want = _value_and_grads(fn, hidden, w, b, **kw)
        leaves = [hidden.clone().requires_grad_(True), w, b]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward, as a Trainer runs it
            value = fn(*leaves, **kw)
        upstream = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
        got = value.detach(), torch.autograd.grad((value * upstream).sum(), leaves)
        for a, e in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def _check_default_chunks(rank: int, widths: tuple[int, ...]) -> None:
    """Without ``chunk_rows``, slices of different widths still take the same chunks of rows:
    sized by a rank's own width, the ranks' per-chunk collectives would not pair up."""
    budget = 4 * 3 * max(widths)  # three rows of the widest slice: several chunks
    with mock.patch.object(linear_parallel, "LINEAR_CHUNK_BYTES", budget):
        _check(rank, widths, as_dtensor=False, chunk_rows=None)


def _two_ranks(rank: int) -> None:
    _check(rank, (7, 4), as_dtensor=False)
    _check_default_chunks(rank, (9, 2))
    _check_autocast(rank)


def _four_ranks(rank: int) -> None:
    _check(rank, (3, 0, 5, 1), as_dtensor=False)
    _check(rank, (3, 3, 3, 2), as_dtensor=True)  # DTensor's split of 11 rows over 4 ranks


@pytest.mark.parametrize(("check", "world"), [(_two_ranks, 2), (_four_ranks, 4)])
def test_a_vocabulary_parallel_head_equals_the_whole_head(check, world, tmp_path):
    run_on_ranks(check, world, tmp_path)


class _Tiny(torch.nn.Module):
    """Embeddings, one layer and a head with a bias: enough for FSDP2 to shard a body and a root."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, H)
        self.layer = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, vocab)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(self.embed(ids)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids))


def _objective(method, model, reference, batch, counts=(None, None)):
    """A forget term and a retain term from hidden states through the fused-linear losses."""
    forget, forget_labels, retain, retain_labels = batch
    head = {"bias": model.lm_head.bias}
    hidden = model.hidden(forget)
    if method == "npo":
        forget_term = ul.linear_npo_loss(
            hidden,
            model.lm_head.weight,
            forget_labels,
            ref_hidden=reference.hidden(forget),
            ref_weight=reference.lm_head.weight,
            ref_bias=reference.lm_head.bias,
            num_sequences=None if counts[0] is None else counts[0].sequences,
            **head,
        )
    else:
        forget_term = ul.linear_simnpo_loss(
            hidden,
            model.lm_head.weight,
            forget_labels,
            num_sequences=None if counts[0] is None else counts[0].sequences,
            **head,
        )
    retain_count = None if counts[1] is None else counts[1].tokens
    retain_hidden = model.hidden(retain)
    if method == "npo":
        retain_term = ul.linear_nll_loss(
            retain_hidden,
            model.lm_head.weight,
            retain_labels,
            num_items_in_batch=retain_count,
            **head,
        )
    else:
        retain_term = ul.linear_kl_divergence(
            retain_hidden,
            model.lm_head.weight,
            reference.hidden(retain),
            labels=retain_labels,
            ref_weight=reference.lm_head.weight,
            ref_bias=reference.lm_head.bias,
            num_items_in_batch=retain_count,
            **head,
        )
    return forget_term + retain_term


def _engine_batch(vocab: int):
    g = torch.Generator().manual_seed(2)
    forget, retain = (torch.randint(0, vocab, (4, 6), generator=g) for _ in range(2))
    forget_labels, retain_labels = forget.clone(), retain.clone()
    forget_labels[0, :4] = -100  # the data-parallel ranks hold unequal token counts
    retain_labels[3, -3:] = -100
    return forget, forget_labels, retain, retain_labels


def _sgd(model, loss, lr=0.5):
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def _fsdp2_and_tensor_parallel(rank: int) -> None:
    """FSDP2 over "dp" and the head column-parallel over "tp" on a 2 x 2 mesh: the fused-linear
    losses computed inside the model's forward (fsdp.root_forward) take one SGD step equal to
    one process with the whole model on the whole batch (float64, 1e-10)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from unlearning_losses.fsdp import root_forward

    vocab = 11  # 6 + 5 rows over "tp"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_group("dp")
    batch = _engine_batch(vocab)
    mine = slice(2 * mesh.get_local_rank("dp"), 2 * mesh.get_local_rank("dp") + 2)
    local = tuple(t[mine] for t in batch)
    for method in ("npo", "simnpo_kl"):
        plain, reference = _Tiny(vocab, 0).double(), _Tiny(vocab, 1).double().requires_grad_(False)
        _sgd(plain, _objective(method, plain, reference, batch))

        model = _Tiny(vocab, 0).double()
        plan = {"lm_head": ColwiseParallel(use_local_output=False)}
        parallelize_module(model, mesh["tp"], plan)
        parallelize_module(reference, mesh["tp"], plan)
        fully_shard(model.layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        for module in model.modules():  # each rank's loss is its share of the global mean
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        counts = (ul.global_counts(local[1], group=dp), ul.global_counts(local[3], group=dp))
        loss = root_forward(model, _objective, method, model, reference, local, counts)
        _sgd(model, loss)
        expected = dict(plain.named_parameters())
        for name, p in model.named_parameters():
            _close(p.detach().full_tensor(), expected[name].detach(), f"{method}: {name}")


def _fsdp2_head_outside_the_forward(rank: int) -> None:
    """A head FSDP2 leaves sharded over the data-parallel ranks looks like a tensor-parallel
    Shard(0); the ranks' different tokens give it away, and the loss is refused by name."""
    from torch.distributed.fsdp import fully_shard

    model = _Tiny(11, 0).double()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    forget_labels = _engine_batch(11)[1][2 * rank : 2 * rank + 2]
    hidden = torch.randn(
        2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)
    )
    with pytest.raises(ValueError, match=r"differ between the ranks.*root_forward"):
        ul.linear_ga_loss(hidden, model.lm_head.weight, forget_labels, bias=model.lm_head.bias)


@pytest.mark.slow
def test_fsdp2_over_a_tensor_parallel_head_equals_one_process(tmp_path):
    run_on_ranks(_fsdp2_and_tensor_parallel, 4, tmp_path)


def test_a_head_sharded_over_data_parallel_ranks_is_refused(tmp_path):
    run_on_ranks(_fsdp2_head_outside_the_forward, 2, tmp_path)
