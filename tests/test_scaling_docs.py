"""The recipes of ``docs/scaling.md`` marked as run by the tests, run on two CPU ranks (gloo) and
checked against the same recipe on one rank with the whole batch.

Each recipe block (``<!-- recipe: NAME -->`` before a Python block) runs as written in a namespace
holding a tiny Llama ``model``, a frozen ``reference`` that differs from it, and this rank's batch:
half of it for the data-parallel recipes, all of it where the ranks share the data (tensor and
context parallel). It leaves a scalar ``loss`` and the model's gradients. On one rank they are
those of the whole batch; on two, the ranks' losses and gradients combine to them as the page
says (``RULES``): each rank's value is the whole one, or the ranks' values sum to it, or average
to it (the engine or the user's data-parallel step then sums or averages them).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks
from torch.distributed.tensor import DTensor

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "scaling.md"
RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", re.DOTALL)
SHARED_BATCH = {"tensor_parallel", "context_parallel", "tensor_parallel_head"}
#: recipe -> (how the ranks' losses make the whole batch's, how their gradients do).
RULES = {
    "ddp": ("sum", "same"),  # shares of the global mean; DDP has reduced the gradients
    "fsdp2": ("sum", "same"),
    "fsdp2_fused_linear": ("sum", "same"),
    "tensor_parallel": ("same", "same"),
    "context_parallel": ("same", "sum"),  # each rank: the gradient of its positions
    "fused_linear": ("same", "mean"),  # each rank: world x the gradient of its sequences
    "tensor_parallel_head": ("same", "same"),
}


def _recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text()))


def _namespace(recipe: str, rank: int, world: int) -> dict:
    spec = importlib.util.spec_from_file_location(
        "hf_trainer_example", ROOT / "examples" / "hf_trainer.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.tiny_llama(vocab=64, seed=0)
    g = torch.Generator().manual_seed(0)
    forget, retain = (
        torch.randint(0, 64, (4, 10), generator=g),
        torch.randint(0, 64, (4, 10), generator=g),
    )
    forget_labels, retain_labels = forget.clone(), retain.clone()
    forget_labels[:, :3] = -100
    retain_labels[:, :2] = -100
    rows = slice(None) if recipe in SHARED_BATCH or world == 1 else slice(2 * rank, 2 * rank + 2)
    return {
        "torch": torch,
        "dist": dist,
        "model": model,
        # Another model: at the model itself NPO's log-ratio and the KL vanish.
        "reference": example.tiny_llama(vocab=64, seed=1).eval().requires_grad_(False),
        "forget_ids": forget[rows],
        "forget_labels": forget_labels[rows],
        "retain_ids": retain[rows],
        "retain_labels": retain_labels[rows],
    }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _results(namespace: dict) -> dict[str, torch.Tensor]:
    """The loss and every gradient the recipe left, whole (DTensors gathered)."""
    found = {"loss": namespace["loss"].detach()}
    for name, p in namespace["model"].named_parameters():
        if p.grad is not None:
            found[name] = _whole(p.grad).detach()
    if isinstance(namespace.get("head"), torch.Tensor):  # a head split outside the model
        found["head"] = _whole(namespace["head"].grad).detach()
    return found


def _run_recipe(recipe: str, out: Path, rank: int) -> None:
    """The recipe on this rank; on one rank its results are saved, on two they are combined
    by the recipe's rules and compared with those."""
    world = dist.get_world_size()
    namespace = _namespace(recipe, rank, world)
    exec(compile(_recipes()[recipe], f"docs/scaling.md:{recipe}", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss), recipe
    found = _results(namespace)
    if world == 1:
        torch.save(found, out)
        return
    whole = torch.load(out)
    assert set(found) == set(whole), f"{recipe}: gradients of {set(found) ^ set(whole)}"
    assert any(g.abs().sum() > 0 for name, g in whole.items() if name != "loss"), recipe
    loss_rule, grad_rule = RULES[recipe]
    for name, value in found.items():
        rule = loss_rule if name == "loss" else grad_rule
        value = value.clone()
        if rule != "same":
            dist.all_reduce(value)
            if rule == "mean":
                value /= world
        expected = whole[name]
        torch.testing.assert_close(
            value,
            expected,
            rtol=1e-5,
            atol=1e-5 * expected.abs().max().item(),
            msg=lambda m, n=name: f"{recipe}: {n} on two ranks against one: {m}",
        )


def test_the_page_has_the_runnable_recipes():
    assert set(_recipes()) == set(RULES)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(_recipes()))
def test_recipe_on_two_ranks_equals_one_rank_with_the_whole_batch(recipe, tmp_path):
    out = tmp_path / "one_rank.pt"
    for world in ("one", "two"):
        (tmp_path / world).mkdir()
    run_on_ranks(functools.partial(_run_recipe, recipe, out), 1, tmp_path / "one")
    run_on_ranks(functools.partial(_run_recipe, recipe, out), 2, tmp_path / "two")
