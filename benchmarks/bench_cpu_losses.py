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


def worker(
    loss: str,
    implementation: str,
    dtype_name: str,
    batch: int,
    length: int,
    vocab: int,
    repeats: int,
) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    # normal_ fills in place: no float32 temporary inflates the baseline high-water mark.
    logits = torch.empty(batch, length, vocab, dtype=dtype).normal_().requires_grad_(True)
    ref_logits = torch.empty(batch, length, vocab, dtype=dtype).normal_()
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 4] = -100  # a prompt
    fn = {"naive": {"ga": naive_ga, "npo": naive_npo, "kl": naive_kl}[loss], "ours": ours(loss)}[
        implementation
    ]

    def step():
        logits.grad = None
        fn(logits, ref_logits, labels).backward()

    before = peak_rss_bytes()
    step()  # the first call measures memory (and warms up)
    extra = peak_rss_bytes() - before
    seconds = median_seconds(step, repeats)
    return {"seconds": seconds, "extra_bytes": extra, "logits_bytes": logits.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=513)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for cpu_losses.md and cpu_losses.json")
    parser.add_argument(
        "--worker", nargs=3, metavar=("LOSS", "IMPL", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    shape = [str(args.batch), str(args.length), str(args.vocab), str(args.repeats)]
    if args.worker:
        loss, implementation, dtype = args.worker
        result = worker(
            loss, implementation, dtype, args.batch, args.length, args.vocab, args.repeats
        )
        print(json.dumps(result))
        return

    script = str(Path(__file__).resolve())
    rows, records = [], []
    for dtype in args.dtypes:
        for loss in LOSSES:
            measured = {}
            for implementation in IMPLEMENTATIONS:
                measured[implementation] = run_worker(
                    script,
                    [
                        loss,
                        implementation,
                        dtype,
                        "--batch",
                        shape[0],
                        "--length",
                        shape[1],
                        "--vocab",
                        shape[2],
                        "--repeats",
                        shape[3],
                    ],
                )
                records.append(
                    {
                        "loss": loss,
                        "impl": implementation,
                        "dtype": dtype,
                        **measured[implementation],
                    }
                )
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
        f"B={args.batch}, T={args.length}, V={args.vocab}; {machine()}; median of "
        f"{args.repeats} forward+backward passes, each implementation in a fresh process."
    )
    table = markdown_table(
        [
            "loss",
            "dtype",
            "naive ms",
            "ours ms",
            "time ours/naive",
            "naive extra peak / logits",
            "ours extra peak / logits",
        ],
        rows,
    )
    print(title + "\n\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_losses.md").write_text(title + "\n\n" + table + "\n")
        (args.out / "cpu_losses.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
