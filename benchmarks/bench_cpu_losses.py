"""Forward+backward time and peak memory of GA, NPO and KL: this library against research code.

The baselines are the patterns that unlearning codebases use today: Hugging Face's causal-LM loss
(upcast to float32, a contiguous shifted copy, ``cross_entropy``) for GA; open-unlearning's
per-sequence ``cross_entropy`` sums for NPO; full float32 ``softmax``/``log_softmax`` tensors for
KL. Every (loss, implementation, dtype) runs in a fresh process, so peak memory is its own.

    python benchmarks/bench_cpu_losses.py                  # B=4, T=513, V=32000
    python benchmarks/bench_cpu_losses.py --out results/   # also writes results/cpu_losses.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import unlearning_losses as ul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median_seconds, peak_rss_bytes, run_worker

LOSSES = ("ga", "npo", "kl")
IMPLEMENTATIONS = ("naive", "ours")
BETA = 0.1


def naive_ga(logits, ref_logits, labels):
    vocab = logits.shape[-1]
    shifted = logits.float()[:, :-1].contiguous()
    return -F.cross_entropy(shifted.view(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)


def _naive_sequence_nll(logits, labels):
    shifted = logits.float()[:, :-1].contiguous()
    per_token = F.cross_entropy(shifted.transpose(1, 2), labels[:, 1:], reduction="none")
    return per_token.sum(-1)


def naive_npo(logits, ref_logits, labels):
    with torch.no_grad():
        ref_nll = _naive_sequence_nll(ref_logits, labels)
    log_ratio = -(_naive_sequence_nll(logits, labels) - ref_nll)
    return -F.logsigmoid(-BETA * log_ratio).mean() * 2 / BETA


def naive_kl(logits, ref_logits, labels):
    current = logits.float()[:, :-1]
    with torch.no_grad():
        ref_log_probs = F.log_softmax(ref_logits.float()[:, :-1], dim=-1)
    probs = F.softmax(current, dim=-1)
    kl = (probs * (F.log_softmax(current, dim=-1) - ref_log_probs)).sum(-1)
    mask = labels[:, 1:] != -100
    return -(kl * mask).sum() / mask.sum()


def ours(loss: str):
    return {
        "ga": lambda x, r, y: ul.ga_loss(x, y),
        "npo": lambda x, r, y: ul.npo_loss(x, y, ref_logits=r, beta=BETA),
        "kl": lambda x, r, y: ul.kl_loss(x, r, y),
    }[loss]


def worker(loss: str, implementation: str, dtype_name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    baselines = {"ga": naive_ga, "npo": naive_npo, "kl": naive_kl}
    fn = baselines[loss] if implementation == "naive" else ours(loss)

    def inputs(batch: int, length: int):
        shape = (batch, length, args.vocab)
        # normal_ fills in place: no float32 temporary inflates the high-water mark.
        logits = torch.empty(shape, dtype=dtype).normal_().requires_grad_(True)
        ref_logits = torch.empty(shape, dtype=dtype).normal_()
        labels = torch.randint(0, args.vocab, shape[:2])
        labels[:, : int(length * args.prompt)] = -100
        return logits, ref_logits, labels

    # A small call first pages in the kernels' code and starts the thread pool, so the
    # high-water mark below counts only what the call itself allocates.
    fn(*inputs(1, 16)).backward()
    logits, ref_logits, labels = inputs(args.batch, args.length)

    def step():
        logits.grad = None
        fn(logits, ref_logits, labels).backward()

    before = peak_rss_bytes()
    step()
    extra = peak_rss_bytes() - before
    seconds = median_seconds(step, args.repeats)
    return {"seconds": seconds, "extra_bytes": extra, "logits_bytes": logits.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=513)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=float, default=0.25, help="fraction of ignored labels")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for cpu_losses.md and cpu_losses.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    settings = [
        f"--{name}={getattr(args, name)}"
        for name in ("batch", "length", "vocab", "prompt", "repeats")
    ]
    script = str(Path(__file__).resolve())
    rows, records = [], []
    for dtype in args.dtypes:
        for loss in LOSSES:
            measured = {
                impl: run_worker(script, [loss, impl, dtype, *settings]) for impl in IMPLEMENTATIONS
            }
            records += [{"loss": loss, "impl": i, "dtype": dtype, **m} for i, m in measured.items()]
            naive, mine = measured["naive"], measured["ours"]
            size = mine["logits_bytes"]
            rows.append(
                [
                    loss,
                    dtype,
                    f"{naive['seconds'] * 1e3:.0f}",
                    f"{mine['seconds'] * 1e3:.0f}",
                    f"{mine['seconds'] / naive['seconds']:.2f}",
                    f"{naive['extra_bytes'] / size:.2f}",
                    f"{mine['extra_bytes'] / size:.2f}",
                ]
            )
            print(f"{loss} {dtype}: done", file=sys.stderr, flush=True)
    title = (
        f"B={args.batch}, T={args.length}, V={args.vocab}, {args.prompt:.0%} of labels ignored "
        f"(prompt); {machine()}; median of {args.repeats} forward+backward passes, each "
        "implementation in a fresh process."
    )
    header = [
        "loss",
        "dtype",
        "naive ms",
        "ours ms",
        "time ours/naive",
        "naive extra peak / logits",
        "ours extra peak / logits",
    ]
    report = title + "\n\n" + markdown_table(header, rows) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_losses.md").write_text(report)
        (args.out / "cpu_losses.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
