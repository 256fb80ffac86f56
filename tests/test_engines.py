"""The engines users scale out with, on CPU ranks (gloo): one optimizer step of a tiny Llama.

Each check builds the same seeded ``LlamaForCausalLM`` and batch on every rank, takes one SGD step
of the unsharded model on the whole batch, and one step under the engine: FSDP2 (``fully_shard``,
each rank half the batch, global counts), tensor parallelism (``lm_head`` vocabulary-parallel,
DTensor logits straight into the losses), both on a 2-D mesh, and context parallelism (each rank
half of every sequence). Losses must agree to 1e-6 and every parameter after the step to 1e-6
relative (float32). FSDP2 averages gradients over ranks, while the losses with global counts
already give each rank its share of the global mean: its modules sum instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import unlearning_losses as ul

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
_spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
hf_trainer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_trainer)

VOCAB, LR, RTOL = 64, 0.5, 1e-6
METHODS = ("ga+nll", "npo_ref_logprobs", "npo_ref_logits", "simnpo", "kl")


def _batch():
    g = torch.Generator().manual_seed(1)
    forget = torch.randint(0, VOCAB, (4, 12), generator=g)
    retain = torch.randint(0, VOCAB, (4, 12), generator=g)
    forget_labels, retain_labels = forget.clone(), retain.clone()
    forget_labels[:, :3] = -100
    forget_labels[0, :9] = -100  # a long prompt: the ranks hold unequal token counts
    retain_labels[:, :2] = -100
    retain_labels[3, -4:] = -100
    return forget, forget_labels, retain, retain_labels


def _loss(method, model, reference, batch, counts=None):
    """The unlearning objective of ``method``; ``counts`` = (forget, retain) global counts."""
    forget, forget_labels, retain, retain_labels = batch
    f_counts, r_counts = counts or (None, None)

    def tokens(c):
        return None if c is None else c.tokens

    def sequences(c):
        return None if c is None else c.sequences

    logits = model(input_ids=forget).logits
    if method == "ga+nll":
        forget_term = ul.ga_loss(logits, forget_labels, num_items_in_batch=tokens(f_counts))
    elif method.startswith("npo"):
        with torch.no_grad():
            ref_logits = reference(input_ids=forget).logits
        source = (
            {"ref_logits": ref_logits}
            if method == "npo_ref_logits"
            else {"ref_logprobs": ul.token_logprobs(ref_logits, forget_labels)}
        )
        forget_term = ul.npo_loss(
            logits, forget_labels, num_sequences=sequences(f_counts), **source
        )
    elif method == "simnpo":
        forget_term = ul.simnpo_loss(logits, forget_labels, num_sequences=sequences(f_counts))
    else:
        forget_term = ul.ga_loss(logits, forget_labels, num_items_in_batch=tokens(f_counts))
    retain_logits = model(input_ids=retain).logits
    if method == "kl":
        with torch.no_grad():
            ref_retain = reference(input_ids=retain).logits
        retain_term = ul.kl_divergence(
            retain_logits, ref_retain, retain_labels, num_items_in_batch=tokens(r_counts)
        )
    else:
        retain_term = ul.nll_loss(retain_logits, retain_labels, num_items_in_batch=tokens(r_counts))
    return ul.combine_with_retain(forget_term, retain_term)


def _step(model, loss):
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return loss.detach()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _compare(method, engine_model, engine_loss, plain_model, plain_loss, what):
    torch.testing.assert_close(engine_loss, plain_loss, rtol=RTOL, atol=RTOL, msg=what)
    plain = dict(plain_model.named_parameters())
    for name, p in engine_model.named_parameters():
        expected = plain[name.replace("_fsdp_wrapped_module.", "")].detach()
        torch.testing.assert_close(
            _whole(p.detach()),
            expected,
            rtol=RTOL,
            atol=RTOL * expected.abs().max().item(),
            msg=f"{what} {method}: {name} after the step",
        )


def _models():
    """The model and a frozen reference that differs from it (at the reference itself NPO's
    log-ratio and the KL vanish, and a test of their reductions could not fail)."""
    model = hf_trainer.tiny_llama(vocab=VOCAB, seed=0)
    reference = hf_trainer.tiny_llama(vocab=VOCAB, seed=1).eval().requires_grad_(False)
    return model, reference


def _plain_step(method):
    model, reference = _models()
    loss = _step(model, _loss(method, model, reference, _batch()))
    return model, reference, loss


def _halves(batch, rank: int, ranks: int = 2):
    rows = slice(rank * 4 // ranks, (rank + 1) * 4 // ranks)
    return tuple(t[rows] for t in batch)


def _global_counts(batch, group=None):
    _, forget_labels, _, retain_labels = batch
    return ul.global_counts(forget_labels, group=group), ul.global_counts(
        retain_labels, group=group
    )


def _sum_gradients(model) -> None:
    """FSDP2 averages gradients over ranks; the losses already give each rank its share of the
    global mean, so every FSDP module sums instead (a plain sum: gloo has no pre-scaled sum)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _check_fsdp2(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    for method in METHODS:
        plain_model, _, plain_loss = _plain_step(method)
        model, reference = _models()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        _sum_gradients(model)
        local = _halves(_batch(), rank)
        share = _step(model, _loss(method, model, reference, local, _global_counts(local)))
        dist.all_reduce(share)  # each rank's loss is its share of the global mean
        _compare(method, model, share, plain_model, plain_loss, "FSDP2")


def _tensor_parallel(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    plan = {"lm_head": ColwiseParallel(use_local_output=False)}
    return parallelize_module(model, mesh, plan)


def _check_tensor_parallel(rank: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    for method in METHODS:
        plain_model, _, plain_loss = _plain_step(method)
        model, reference = _models()
        _tensor_parallel(model, mesh)
        _tensor_parallel(reference, mesh)
        logits = model(input_ids=_batch()[0]).logits
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
        loss = _step(model, _loss(method, model, reference, _batch()))
        _compare(method, model, loss, plain_model, plain_loss, "tensor parallel")


def _check_fsdp2_and_tensor_parallel(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_group = mesh.get_group("dp")
    for method in METHODS:
        plain_model, _, plain_loss = _plain_step(method)
        model, reference = _models()
        _tensor_parallel(model, mesh["tp"])
        _tensor_parallel(reference, mesh["tp"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        _sum_gradients(model)
        local = _halves(_batch(), mesh.get_local_rank("dp"))
        counts = _global_counts(local, group=dp_group)
        share = _step(model, _loss(method, model, reference, local, counts))
        dist.all_reduce(share, group=dp_group)
        _compare(method, model, share, plain_model, plain_loss, "FSDP2 + tensor parallel")


def _check_context_parallel(rank: int) -> None:
    """Each rank scores half of every sequence's positions (labels pre-shifted); the losses
    reduce each sequence over the group, and the summed parameter gradients equal one process."""
    mesh = init_device_mesh("cpu", (2,))
    forget, forget_labels, _, _ = _batch()
    aligned = forget_labels[:, 1:]  # labels[:, t] is scored by logits[:, t]
    half = slice(rank * 6, rank * 6 + 6) if rank == 0 else slice(6, 11)
    model, reference = _models()
    with torch.no_grad():
        ref_logprobs = ul.token_logprobs(reference(input_ids=forget).logits, forget_labels)
    losses = {
        "npo": lambda x, y, lp, **kw: ul.npo_loss(x, y, ref_logprobs=lp, shift=False, **kw),
        "simnpo": lambda x, y, lp, **kw: ul.simnpo_loss(x, y, shift=False, **kw),
    }
    for name, fn in losses.items():
        model.zero_grad()
        expected = fn(model(input_ids=forget).logits[:, :-1], aligned, ref_logprobs)
        expected.backward()
        whole = {n: p.grad.clone() for n, p in model.named_parameters()}
        for how in ("sequence_group", "DTensor"):
            model.zero_grad()
            logits = model(input_ids=forget).logits[:, :-1]
            if how == "sequence_group":
                got = fn(
                    logits[:, half],
                    aligned[:, half],
                    ref_logprobs[:, half],
                    sequence_group=mesh.get_group(),
                )
            else:
                sharded = DTensor.from_local(
                    logits[:, half],
                    mesh,
                    [Shard(1)],
                    run_check=False,
                    shape=logits.shape,
                    stride=logits.stride(),
                )
                got = fn(
                    sharded,
                    distribute_tensor(aligned, mesh, [Shard(1)]),
                    distribute_tensor(ref_logprobs, mesh, [Shard(1)]),
                )
            got.backward()
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=RTOL, atol=RTOL)
            for n, p in model.named_parameters():
                summed = p.grad.clone()
                dist.all_reduce(summed)
                # float32 sums in another order: an element 1e5 times smaller than the
                # parameter's largest (SimNPO's, at 1e-17) carries the largest's rounding.
                torch.testing.assert_close(
                    summed,
                    whole[n],
                    rtol=1e-5,
                    atol=1e-5 * whole[n].abs().max().item(),
                    msg=f"context parallel {name} via {how}: {n}",
                )


CHECKS = {
    "fsdp2": (_check_fsdp2, 2),
    "tensor_parallel": (_check_tensor_parallel, 2),
    "context_parallel": (_check_context_parallel, 2),
    "fsdp2_and_tensor_parallel": (_check_fsdp2_and_tensor_parallel, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(CHECKS))
def test_one_step_under_the_engine_equals_one_process(engine, tmp_path):
    check, world = CHECKS[engine]
    run_on_ranks(check, world, tmp_path)
