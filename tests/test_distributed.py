"""Exactness across processes: two ranks on the CPU (gloo, loopback only) against one process.

Data parallel: each rank holds half the batch and passes the global counts from
``global_counts``; the summed per-rank losses and head gradients equal the full batch's.
Vocab parallel: each rank holds half the vocabulary; values and gradients equal the unsharded
primitive's. Every rank builds the same seeded inputs, so each can compute the full-batch answer.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

from unlearning_losses import ga_loss, global_counts, kl_divergence, token_logprobs
from unlearning_losses.testing import Batch, entries

WORLD = 2
RTOL = 1e-6


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)


def _inputs(vocab: int, dtype: torch.dtype = torch.float32):
    """Seeded hidden states, a shared head, reference logits and uneven labels."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, generator=g, dtype=dtype)
    head = torch.randn(vocab, 5, generator=g, dtype=dtype)
    ref_logits = hidden @ head.T + 0.5 * torch.randn(4, 7, vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (4, 7), generator=g)
    labels[0, :5] = -100  # the first half holds fewer answer tokens than the second
    labels[1, :2] = -100
    labels[3, -2:] = -100
    return hidden, head, ref_logits, labels


def _data_parallel_losses(counts):
    """Every loss of labelled logits that takes a global count, as ``f(logits, batch)``."""
    given = {"num_items_in_batch": counts.tokens, "num_sequences": counts.sequences}
    return {
        e.name: partial(e, **{e.count: given[e.count]})
        for e in entries("logits")
        if e.labelled and e.count is not None
    }


def _check_data_parallel(rank: int) -> None:
    hidden, head, ref_logits, labels = _inputs(vocab=11)
    head.requires_grad_(True)
    rows = slice(rank * 2, rank * 2 + 2)
    counts = global_counts(labels[rows])
    scored = labels[:, 1:] != -100
    assert int(counts.tokens) == int(scored.sum())
    assert int(counts.sequences) == int(scored.any(-1).sum())
    batch = Batch(labels, ref_logits, token_logprobs(ref_logits, labels))
    for name, loss in _data_parallel_losses(counts).items():
        full = loss(hidden @ head.T, batch)
        (full_grad,) = torch.autograd.grad(full, head)
        part = loss(hidden[rows] @ head.T, batch.rows(rows))
        (part_grad,) = torch.autograd.grad(part, head)
        summed = part.detach().clone()
        dist.all_reduce(summed)
        dist.all_reduce(part_grad)
        _close(summed, full.detach(), f"{name} value")
        _close(part_grad, full_grad, f"{name} head gradient")
    # Without the global count each rank's mean weighs its own tokens: the check above can fail.
    local = ga_loss(hidden[rows] @ head.T, labels[rows]).detach()
    dist.all_reduce(local)
    assert not torch.allclose(local / WORLD, ga_loss(hidden @ head.T, labels).detach())


def _weighted_sum(values: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """A scalar whose backward sends an upstream gradient other than 1 to each value."""
    if values.dim() == 0:
        return values * upstream[0, 0]
    return (values * upstream.flatten()[: values.numel()].reshape(values.shape)).sum()


# Reductions other than the mean whose vocabulary-parallel path is their own.
OTHER_REDUCTIONS = {
    "nll_loss": "sum",
    "kl_divergence": "none",
    "kl_divergence[reverse]": "none",
    "kl_divergence[labels=None]": "none",
    "npo_loss[ref_logits]": "none",
    "simnpo_loss": "none",
    "wga_loss": "none",
}


def _vocab_parallel_losses(labels: torch.Tensor, ref_logprobs, labelled: bool):
    """Every loss of logits with a vocabulary-parallel path that reads labels (or none), as
    ``f(logits, ref_logits, **kw)``; those in ``OTHER_REDUCTIONS`` with that reduction too."""

    def on(e, **fixed):
        return lambda x, r, **kw: e(x, Batch(labels, r, ref_logprobs), **fixed, **kw)

    table = {}
    for e in entries("logits", takes="vocab_group"):
        if e.labelled == labelled:
            table[e.name] = on(e)
            if e.name in OTHER_REDUCTIONS:
                reduction = OTHER_REDUCTIONS[e.name]
                table[f"{e.name}, reduction={reduction}"] = on(e, reduction=reduction)
    return table


def _check_vocab_parallel(rank: int, widths: tuple[int, ...]) -> None:
    """Each rank holds ``widths[rank]`` columns, in rank order: uneven slices, and a rank holding
    none when the vocabulary is smaller than the group."""
    vocab = sum(widths)
    # float64: the sharded reductions sum in another order, and a float32 KL of ~1e-3 is only
    # good to ~1e-4 relative whichever order; in float64 both paths agree to rounding.
    hidden, head, ref_logits, labels = _inputs(vocab, torch.float64)
    logits = hidden @ head.T
    logits[1, 3, : widths[0]] = float("-inf")  # masked vocabulary, wholly inside rank 0's shard
    ref_logits[1, 3, : widths[0]] = float("-inf")
    labels[1, 4] = vocab - 1  # row 3 scores the last column, which the last rank holds
    labels[2, 3] = -100  # row 2 of sequence 2 is ignored: it becomes NaN padding below
    offset = sum(widths[:rank])
    columns = slice(offset, offset + widths[rank])

    def check(name, fn, logits):
        upstream = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).double()
        full_input = logits.clone().requires_grad_(True)
        full = fn(full_input, ref_logits)
        _weighted_sum(full, upstream).backward()
        shard = logits[..., columns].clone().requires_grad_(True)
        sharded = fn(shard, ref_logits[..., columns].contiguous(), vocab_group=dist.group.WORLD)
        _weighted_sum(sharded, upstream).backward()
        what = f"{name} with widths {widths}"
        assert torch.isfinite(full.detach()).all(), what
        _close(sharded.detach(), full.detach(), f"{what}: value", rtol=1e-12)
        _close(shard.grad, full_input.grad[..., columns], f"{what}: gradient", rtol=1e-12)
        return shard.grad

    # Every position counts without labels, so those take the logits before the NaN padding row.
    for name, fn in _vocab_parallel_losses(labels, None, labelled=False).items():
        check(name, fn, logits)
    logits[2, 2] = float("nan")
    ref_logprobs = token_logprobs(ref_logits, labels)
    for name, fn in _vocab_parallel_losses(labels, ref_logprobs, labelled=True).items():
        grad = check(name, fn, logits)
        assert not grad[2, 2].isnan().any(), f"{name}: an ignored NaN row gets gradient 0"


def _check_forward_kl_near_the_reference(rank: int) -> None:
    """Logits 1e-2 from the reference's, float32, the vocabulary split 130 + 126: the forward
    KL's gradient, from the centred logit difference with its centre summed over the ranks,
    stays within 8 float32 units (max-norm) of float64 math on the same float32 logits."""
    g = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(2, 4, 256, generator=g)
    ref_logits = logits + 1e-2 * torch.randn(2, 4, 256, generator=g)
    columns = slice(0, 130) if rank == 0 else slice(130, 256)
    exact = logits.double().requires_grad_()
    logp, logq = exact.log_softmax(-1), ref_logits.double().log_softmax(-1)
    (expected,) = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), exact)
    shard = logits[..., columns].clone().requires_grad_()
    value = kl_divergence(
        shard, ref_logits[..., columns], reduction="sum", vocab_group=dist.group.WORLD
    )
    (grad,) = torch.autograd.grad(value, shard)
    error = (grad.double() - expected[..., columns]).abs().max() / expected.abs().max()
    assert error <= 8 * torch.finfo(torch.float32).eps, error


def test_vocab_parallel_forward_kl_gradient_keeps_float32_rounding(tmp_path):
    run_on_ranks(_check_forward_kl_near_the_reference, WORLD, tmp_path)


def _check_uneven_vocab_parallel(rank: int) -> None:
    _check_vocab_parallel(rank, (7, 4))  # V = 11: any widths, not only torch.chunk's 6 + 5


def _check_vocab_smaller_than_group(rank: int) -> None:
    _check_vocab_parallel(rank, (3, 0, 5, 1))  # rank 1 holds no column


CHECKS = {"data_parallel": _check_data_parallel, "vocab_parallel": _check_uneven_vocab_parallel}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_two_ranks_equal_one_process(check, tmp_path):
    run_on_ranks(CHECKS[check], WORLD, tmp_path)


def test_a_rank_without_vocabulary_columns_equals_one_process(tmp_path):
    run_on_ranks(_check_vocab_smaller_than_group, 4, tmp_path)


def test_global_counts_over_micro_batches_equal_the_counts_of_their_union():
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 9, (2, 5), generator=g)
    second = torch.randint(0, 9, (3, 7), generator=g)  # another length: a list, not a stack
    first[0, :3] = -100
    second[1] = -100
    together = global_counts([first, second])
    apart = [global_counts(first), global_counts(second)]
    assert int(together.tokens) == sum(int(c.tokens) for c in apart) == 4 * 2 - 2 + 6 * 3 - 6
    assert int(together.sequences) == sum(int(c.sequences) for c in apart) == 4
    with pytest.raises(ValueError, match=r"labels must be a tensor or a non-empty list"):
        global_counts([])
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor; got str"):
        global_counts(["x"])
