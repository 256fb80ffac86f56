"""The Lightning recipes of ``docs/scaling.md``: Fabric and the Trainer, each with
``strategy="ddp"`` and with ``ModelParallelStrategy`` (FSDP2), on two CPU processes (gloo).

Lightning starts its processes itself unless a launcher did (it would re-run pytest), so each
check runs this file under ``torchrun --nproc_per_node 2``: every rank executes the recipe's
blocks as written, on a tiny ``LlamaForCausalLM`` and a four-example batch of which the sampler
gives each rank two, with unequal token counts. One SGD step must leave the parameters equal to
one process's step on the whole batch (1e-6 relative); the negative control runs the same blocks
with each rank counting only its own tokens (per-rank means), and must not.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import unlearning_losses as ul

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "scaling.md"
RECIPE = re.compile(
    r"<!-- recipe for tests/test_lightning\.py: (\w+) -->\n```python\n(.*?)```", re.DOTALL
)
BLOCKS = {
    "fabric_ddp": ("loss", "fabric_ddp"),
    "fabric_fsdp2": ("loss", "fabric_fsdp2"),
    "trainer_ddp": ("loss", "trainer_module", "trainer_ddp"),
    "trainer_fsdp2": ("loss", "trainer_module", "trainer_fsdp2"),
}
VOCAB, LR = 64, 0.5


def _recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text()))


def _tiny_llama():
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.tiny_llama(vocab=VOCAB, seed=0)


def _dataset() -> list[dict[str, torch.Tensor]]:
    """Four examples; a distributed sampler gives rank 0 examples 0 and 2, rank 1 examples 1 and
    3: rank 0 holds fewer forget tokens (a long prompt), rank 1 fewer retain tokens."""
    g = torch.Generator().manual_seed(1)
    forget = torch.randint(0, VOCAB, (4, 12), generator=g)
    retain = torch.randint(0, VOCAB, (4, 12), generator=g)
    forget_labels, retain_labels = forget.clone(), retain.clone()
    forget_labels[:, :3] = -100
    forget_labels[0, :9] = -100
    retain_labels[:, :2] = -100
    retain_labels[3, -4:] = -100
    return [
        {
            "forget_ids": forget[i],
            "forget_labels": forget_labels[i],
            "retain_ids": retain[i],
            "retain_labels": retain_labels[i],
        }
        for i in range(4)
    ]


def _one_process_step(model) -> dict[str, torch.Tensor]:
    """The parameters after one SGD step on the whole batch, in one process."""
    model = copy.deepcopy(model)
    batch = {k: torch.stack([e[k] for e in _dataset()]) for k in _dataset()[0]}
    ul.combine_with_retain(
        ul.ga_loss(model(input_ids=batch["forget_ids"]).logits, batch["forget_labels"]),
        ul.nll_loss(model(input_ids=batch["retain_ids"]).logits, batch["retain_labels"]),
    ).backward()
    with torch.no_grad():
        return {n: p - LR * p.grad for n, p in model.named_parameters()}


def _per_rank_counts() -> None:
    """The negative control: every rank counts its own tokens, times the number of ranks. The
    recipes' ``loss * world size`` then leaves each rank its local mean, and the engine's average
    is the mean of the ranks' means: the whole batch's only when the ranks' counts are equal."""
    counts, own = ul.global_counts, {}

    def local(labels, *, group=None, **kwargs):
        if "group" not in own:  # made at the first count, when every rank counts
            own["group"], _ = dist.new_subgroups(group_size=1)
        mine = counts(labels, group=own["group"], **kwargs)
        return type(mine)(*(count * dist.get_world_size(group) for count in mine))

    ul.global_counts = local


def _run_on_this_rank(check: str, per_rank_means: bool) -> float:
    """Run the recipe's blocks; the worst relative difference from one process's step."""
    model = _tiny_llama()
    expected = _one_process_step(model)
    if per_rank_means:
        _per_rank_counts()
    namespace = {"torch": torch, "model": model, "dataset": _dataset()}
    recipes = _recipes()
    for block in BLOCKS[check]:
        exec(compile(recipes[block], f"docs/scaling.md:{block}", "exec"), namespace)
    worst = 0.0
    for name, p in model.named_parameters():  # the recipe's model, whatever wraps it now
        full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        worst = max(
            worst, ((full - expected[name]).abs().max() / expected[name].abs().max()).item()
        )
    return worst


def _launch(check: str, tmp_path: Path, *options: str) -> float:
    out = tmp_path / f"{check}{''.join(options)}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            check,
            str(out),
            *options,
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,  # where the Trainer would write anything
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    return json.loads(out.read_text())["worst"]


def test_the_page_has_the_lightning_recipes():
    assert set(_recipes()) == {block for blocks in BLOCKS.values() for block in blocks}


@pytest.mark.parametrize("api", ["Trainer", "Fabric"])
def test_fsdp1_and_deepspeed_refuse_a_cpu_accelerator(api):
    """What the page says of them: FSDP1 when the Trainer or Fabric is made, DeepSpeed when its
    processes set up (``fit``, ``launch``)."""
    lightning = pytest.importorskip("lightning")
    quiet = {"logger": False} if api == "Trainer" else {}  # no warning about its default logger
    make = functools.partial(getattr(lightning, api), accelerator="cpu", devices=2, **quiet)
    with pytest.raises(ValueError, match="GPU"):
        make(strategy="fsdp")
    made = make(strategy="deepspeed_stage_3")
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        made.strategy.setup_environment()


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(BLOCKS))
def test_one_step_on_two_processes_equals_one_process(check, tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    assert _launch(check, tmp_path) < 1e-6
    assert _launch(check, tmp_path, "--per-rank-means") > 1e-4


if __name__ == "__main__":  # one rank, under torchrun (see _launch)
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=sorted(BLOCKS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-rank-means", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worst = _run_on_this_rank(args.check, args.per_rank_means)
    if int(os.environ["RANK"]) == 0:
        args.out.write_text(json.dumps({"worst": worst}))
