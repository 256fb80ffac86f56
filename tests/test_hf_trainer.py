"""The Hugging Face Trainer example: its loss is the library's, and it makes the model forget."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearning_losses import combine_with_retain, ga_loss, kl_divergence, nll_loss, npo_loss

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
hf_trainer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_trainer)


@pytest.mark.parametrize("method", hf_trainer.METHODS)
def test_trainer_loss_is_the_librarys_and_forget_nll_rises(method, tmp_path):
    trainer, forget_ids, forget_labels = hf_trainer.build(
        method, steps=10, output_dir=str(tmp_path)
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    # A global count unlike the local one (as with accumulation or data parallel): a
    # compute_loss that ignored it would fail.
    count = 2 * batch["labels"][:, 1:].ne(-100).sum()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch, num_items_in_batch=count)
        forget_logits = model(input_ids=batch["forget_input_ids"]).logits
        retain_logits = model(input_ids=batch["input_ids"]).logits
        if method == "npo":
            reference = hf_trainer.tiny_llama(seed=0)  # the untrained start is the reference
            forget = npo_loss(
                forget_logits,
                batch["forget_labels"],
                ref_logits=reference(input_ids=batch["forget_input_ids"]).logits,
            )
        else:
            forget = ga_loss(forget_logits, batch["forget_labels"])
        if method == "ga+kl":
            ref_logits = trainer.ref_model(input_ids=batch["input_ids"]).logits
            retain = kl_divergence(
                retain_logits, ref_logits, batch["labels"], num_items_in_batch=count
            )
        else:
            retain = nll_loss(retain_logits, batch["labels"], num_items_in_batch=count)
    torch.testing.assert_close(got, combine_with_retain(forget, retain))

    before = hf_trainer.forget_nll(model, forget_ids, forget_labels)
    trainer.train()
    after = hf_trainer.forget_nll(model, forget_ids, forget_labels)
    assert after > before + 0.1


def _train(tmp_path, name: str, ranks: int, method: str, *options: str) -> dict:
    """Run the example for 3 SGD steps on ``ranks`` processes; its parameters after training."""
    params = tmp_path / f"{name}.pt"
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    common = ["--method", method, "--steps=3", "--optim=sgd", "--learning-rate=0.5"]
    files = [f"--output-dir={tmp_path / name}", f"--save-params={params}"]
    subprocess.run(
        [*launcher, str(EXAMPLE), *common, *options, *files],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return torch.load(params)


def _worst_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ga", "npo"])
def test_two_ranks_with_accumulation_equal_one_process_with_the_whole_batch(method, tmp_path):
    one = _train(tmp_path, "one", 1, method, "--batch-size=8")
    two = _train(tmp_path, "two", 2, method, "--batch-size=2", "--grad-accum=2")
    assert _worst_relative_difference(two, one) < 1e-6
    if method == "ga":  # the negative control: per-micro-batch means are not the big batch's
        local = _train(
            tmp_path, "local", 2, method, "--batch-size=2", "--grad-accum=2", "--local-forget-mean"
        )
        assert _worst_relative_difference(local, one) > 1e-4
