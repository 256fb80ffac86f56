"""Unlearning with a Hugging Face ``Trainer``: the library's losses inside ``compute_loss``.

Each batch holds a forget part and a retain part. Methods: ``ga`` (GA + retain NLL), ``npo`` (NPO
against reference log-probs precomputed once, the cheap option with no second model in memory, +
retain NLL) and ``ga+kl`` (GA + KL to a frozen reference model on the retain set). Runs on a tiny
randomly initialised Llama built from a config (no download):

    python examples/hf_trainer.py --method npo --steps 20
    torchrun --nproc_per_node 2 examples/hf_trainer.py --method npo --batch-size 2 --grad-accum 2
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed zero3.json --batch-size 2 ...

Exact across gradient accumulation and ranks: the retain term divides by the Trainer's
``num_items_in_batch`` (every micro-batch of the step, every rank); the forget term by the same
kind of count of the forget labels, made by ``global_counts`` over the step's micro-batches; and
the loss is multiplied by the number of processes, since DDP averages the ranks' gradients.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from unlearning_losses import (
    combine_with_retain,
    ga_loss,
    global_counts,
    kl_divergence,
    nll_loss,
    npo_loss,
    token_logprobs,
)

METHODS = ("ga", "npo", "ga+kl")


class ForgetRetainDataset(Dataset):
    """Pairs of (forget, retain) sequences; labels mask the prompt with -100. ``labels`` is the
    retain labels, so the Trainer counts ``num_items_in_batch`` on the retain set."""

    def __init__(self, forget_ids, retain_ids, prompt: int, forget_ref_logprobs=None):
        self.forget_ids, self.retain_ids, self.prompt = forget_ids, retain_ids, prompt
        self.forget_ref_logprobs = forget_ref_logprobs

    def __len__(self) -> int:
        return len(self.retain_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f = i % len(self.forget_ids)
        item = {
            "forget_input_ids": self.forget_ids[f],
            "forget_labels": _mask_prompt(self.forget_ids[f], self.prompt),
            "input_ids": self.retain_ids[i],
            "labels": _mask_prompt(self.retain_ids[i], self.prompt),
        }
        if self.forget_ref_logprobs is not None:
            item["forget_ref_logprobs"] = self.forget_ref_logprobs[f]
        return item


def _mask_prompt(ids: torch.Tensor, prompt: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:prompt] = -100
    return labels


class UnlearningTrainer(Trainer):
    def __init__(
        self,
        *args,
        method: str,
        ref_model=None,
        retain_weight: float = 1.0,
        global_forget_counts: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.method, self.ref_model, self.retain_weight = method, ref_model, retain_weight
        self.global_forget_counts = global_forget_counts
        self.forget_counts = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the forget tokens and sequences of the whole step (every micro-batch, every
        rank), as the Trainer counts ``num_items_in_batch`` for the retain labels."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and self.global_forget_counts:
            self.forget_counts = global_counts([b["forget_labels"] for b in batches])
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_logits = model(input_ids=inputs["forget_input_ids"]).logits
        forget_labels = inputs["forget_labels"]
        counts = self.forget_counts if model.training else None
        if self.method == "npo":
            forget = npo_loss(
                forget_logits,
                forget_labels,
                ref_logprobs=inputs["forget_ref_logprobs"],
                num_sequences=None if counts is None else counts.sequences,
            )
        else:
            forget = ga_loss(
                forget_logits,
                forget_labels,
                num_items_in_batch=None if counts is None else counts.tokens,
            )
        retain_outputs = model(input_ids=inputs["input_ids"])
        if self.method == "ga+kl":
            with torch.no_grad():
                ref_logits = self.ref_model(input_ids=inputs["input_ids"]).logits
            retain = kl_divergence(
                retain_outputs.logits,
                ref_logits,
                inputs["labels"],
                num_items_in_batch=num_items_in_batch,
            )
        else:
            retain = nll_loss(
                retain_outputs.logits, inputs["labels"], num_items_in_batch=num_items_in_batch
            )
        loss = combine_with_retain(forget, retain, retain_weight=self.retain_weight)
        if counts is not None:  # each rank holds its share of the global mean; DDP averages
            loss = loss * self.accelerator.num_processes
        return (loss, retain_outputs) if return_outputs else loss


def tiny_llama(vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def build(
    method: str,
    steps: int,
    output_dir: str,
    seed: int = 0,
    batch_size: int = 8,
    grad_accum: int = 1,
    optim: str = "adamw_torch",
    learning_rate: float = 1e-3,
    global_forget_counts: bool = True,
    deepspeed: str | None = None,
):
    """A trainer on random forget/retain sequences, and the forget tensors to evaluate with."""
    model = tiny_llama(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    forget_ids = torch.randint(0, 64, (8, 16), generator=generator)
    retain_ids = torch.randint(0, 64, (32, 16), generator=generator)
    prompt = 4
    forget_labels = torch.stack([_mask_prompt(ids, prompt) for ids in forget_ids])
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    ref_logprobs = None
    if method == "npo":  # computed once; the reference model is not needed after this
        with torch.no_grad():
            ref_logprobs = token_logprobs(reference(input_ids=forget_ids).logits, forget_labels)
    dataset = ForgetRetainDataset(forget_ids, retain_ids, prompt, ref_logprobs)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        average_tokens_across_devices=True,
        learning_rate=learning_rate,
        optim=optim,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        remove_unused_columns=False,
        use_cpu=deepspeed is None,  # with use_cpu, accelerate does not run DeepSpeed
        deepspeed=deepspeed,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        method=method,
        ref_model=reference if method == "ga+kl" else None,
        global_forget_counts=global_forget_counts,
    )
    return trainer, forget_ids, forget_labels


def forget_nll(model, forget_ids, forget_labels) -> float:
    with torch.no_grad():
        return nll_loss(model(input_ids=forget_ids).logits, forget_labels).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="npo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optimizer")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--local-forget-mean",
        action="store_true",
        help="average the forget term per micro-batch and rank, as most research code does "
        "(inexact under accumulation and data parallel; for comparison)",
    )
    parser.add_argument("--deepspeed", help="a DeepSpeed config file (JSON), e.g. ZeRO-3")
    parser.add_argument("--output-dir", default="hf-trainer-output")
    parser.add_argument("--save-params", help="also save the trained parameters to this file")
    args = parser.parse_args()
    trainer, forget_ids, forget_labels = build(
        args.method,
        args.steps,
        args.output_dir,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optim=args.optim,
        learning_rate=args.learning_rate,
        global_forget_counts=not args.local_forget_mean,
        deepspeed=args.deepspeed,
    )
    before = forget_nll(trainer.model, forget_ids, forget_labels)
    trainer.train()
    after = forget_nll(trainer.model, forget_ids, forget_labels)
    # On every rank: under ZeRO-3 this gathers the partitioned parameters.
    params = trainer.accelerator.get_state_dict(trainer.model_wrapped) if args.save_params else None
    if trainer.is_world_process_zero():
        print(f"{args.method}: forget-set NLL {before:.3f} -> {after:.3f}")
        if args.save_params:
            torch.save(params, args.save_params)


if __name__ == "__main__":
    main()
