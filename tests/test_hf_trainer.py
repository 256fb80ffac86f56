"""The Hugging Face Trainer example: its loss is the library's, and it makes the model forget."""

from __future__ import annotations

import importlib.util
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
    count = batch["labels"][:, 1:].ne(-100).sum()
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
            retain = kl_divergence(retain_logits, ref_logits, batch["labels"])
        else:
            retain = nll_loss(retain_logits, batch["labels"])
    torch.testing.assert_close(got, combine_with_retain(forget, retain))

    before = hf_trainer.forget_nll(model, forget_ids, forget_labels)
    trainer.train()
    after = hf_trainer.forget_nll(model, forget_ids, forget_labels)
    assert after > before + 0.1
