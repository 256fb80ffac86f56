"""The recipes of ``docs/scaling.md`` marked as run by the tests, run on two CPU ranks (gloo).

Each recipe block (``<!-- recipe: NAME -->`` before a Python block) runs as written in a namespace
holding a tiny Llama ``model``, its frozen copy ``reference`` and this rank's batch: half of it
for the data-parallel recipes, all of it where the ranks share the data (tensor and context
parallel). It must leave a finite scalar ``loss`` whose backward reached the model.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "scaling.md"
RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", re.DOTALL)
SHARED_BATCH = {"tensor_parallel", "context_parallel", "tensor_parallel_head"}


def _recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text()))


def _namespace(recipe: str, rank: int) -> dict:
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
    rows = slice(None) if recipe in SHARED_BATCH else slice(2 * rank, 2 * rank + 2)
    return {
        "torch": torch,
        "dist": dist,
        "model": model,
        "reference": copy.deepcopy(model).eval().requires_grad_(False),
        "forget_ids": forget[rows],
        "forget_labels": forget_labels[rows],
        "retain_ids": retain[rows],
        "retain_labels": retain_labels[rows],
    }


def _run_recipe(recipe: str, rank: int) -> None:
    namespace = _namespace(recipe, rank)
    exec(compile(_recipes()[recipe], f"docs/scaling.md:{recipe}", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss), recipe
    grads = [p.grad for p in namespace["model"].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), recipe


def test_the_page_has_the_runnable_recipes():
    assert set(_recipes()) == {
        "ddp",
        "fsdp2",
        "tensor_parallel",
        "context_parallel",
        "fused_linear",
        "tensor_parallel_head",
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(_recipes()))
def test_recipe_runs_on_two_ranks(recipe, tmp_path):
    run_on_ranks(functools.partial(_run_recipe, recipe), 2, tmp_path)
