"""Forward+backward time and peak memory of the fused-linear losses against materialised logits.

For N tokens of hidden size H and vocabulary V (float32), each in a fresh process: ours
(``linear_ga_loss``, ``linear_npo_loss`` with cached reference log-probs, ``linear_kl_divergence``
against a reference's hidden states, ``linear_me_loss``); the materialised path (``F.linear`` to the full logits, then
our logits loss); and for GA ``torch.nn.functional.linear_cross_entropy`` with and without its
chunked options. Peak memory is the resident-set high-water mark of one call beyond the inputs.
The head is trained (its float32 gradient counts in every row) or frozen, as under LoRA.

    python benchmarks/bench_fused_linear.py [--vocabs 32000 128256] [--heads trained frozen]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import unlearning_losses as ul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median_seconds, peak_rss_bytes, ratio, run_worker

SEQUENCES = 4


def providers(loss: str):
    """Implementation name -> fn(hidden, weight, labels, ref_logprobs, ref_hidden)."""
    if loss == "ga":
        return {
            "ours": lambda h, w, y, r, q: ul.linear_ga_loss(h, w, y, shift=False),
            "materialised": lambda h, w, y, r, q: ul.ga_loss(F.linear(h, w), y, shift=False),
            "F.linear_cross_entropy": lambda h, w, y, r, q: (
                -F.linear_cross_entropy(h.view(-1, h.shape[-1]), w, y.view(-1))
            ),
            "F.linear_cross_entropy chunked": lambda h, w, y, r, q: (
                -F.linear_cross_entropy(
                    h.view(-1, h.shape[-1]),
                    w,
                    y.view(-1),
                    options=torch.nn.LinearCrossEntropyOptions(),
                )
            ),
        }
    if loss == "npo":
        return {
            "ours": lambda h, w, y, r, q: ul.linear_npo_loss(h, w, y, ref_logprobs=r, shift=False),
            "materialised": lambda h, w, y, r, q: ul.npo_loss(
                F.linear(h, w), y, ref_logprobs=r, shift=False
            ),
        }
    if loss == "me":
        return {
            "ours": lambda h, w, y, r, q: ul.linear_me_loss(h, w, y, shift=False),
            "materialised": lambda h, w, y, r, q: ul.me_loss(F.linear(h, w), y, shift=False),
        }
    return {
        "ours": lambda h, w, y, r, q: ul.linear_kl_divergence(h, w, q, labels=y, shift=False),
        "materialised": lambda h, w, y, r, q: ul.kl_divergence(
            F.linear(h, w), F.linear(q, w).detach(), y, shift=False
        ),
    }


def worker(loss: str, provider: str, head: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    fn = providers(loss)[provider]

    def inputs(tokens: int, vocab: int):
        h = torch.empty(SEQUENCES, tokens // SEQUENCES, args.hidden).normal_().requires_grad_(True)
        # Filled in place: a temporary would raise the high-water mark the run is measured from.
        w = torch.empty(vocab, args.hidden).normal_(std=args.hidden**-0.5)
        w.requires_grad_(head == "trained")
        y = torch.randint(0, vocab, h.shape[:2])
        r = -torch.rand(h.shape[:2]) * 10
        q = torch.empty_like(h).normal_()
        return h, w, y, r, q

    # A small call first (small head too, so no large buffer raises the high-water mark) pages in
    # the kernels' code and starts the thread pool.
    fn(*inputs(64, 1000)).backward()
    h, w, y, r, q = inputs(args.tokens, args.vocab)

    def step():
        h.grad = w.grad = None
        fn(h, w, y, r, q).backward()

    before = peak_rss_bytes()
    step()
    extra = peak_rss_bytes() - before
    seconds = median_seconds(step, args.repeats)
    return {"seconds": seconds, "extra_bytes": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--losses", nargs="+", default=["ga", "npo", "kl", "me"])
    parser.add_argument("--heads", nargs="+", default=["trained", "frozen"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    script = str(Path(__file__).resolve())
    rows = []
    for vocab, head, loss in itertools.product(args.vocabs, args.heads, args.losses):
        options = [f"--vocab={vocab}", f"--tokens={args.tokens}", f"--hidden={args.hidden}"]
        options.append(f"--repeats={args.repeats}")
        measured = {
            name: run_worker(script, [loss, name, head, *options]) for name in providers(loss)
        }
        base = measured["materialised"]
        for name, m in measured.items():
            rows.append(
                [
                    loss,
                    vocab,
                    head,
                    name,
                    f"{m['seconds']:.2f}",
                    ratio(m["seconds"], base["seconds"]),
                    f"{m['extra_bytes'] / 2**20:.0f}",
                    ratio(m["extra_bytes"], base["extra_bytes"]),
                ]
            )
        print(f"{loss} V={vocab} head {head}: done", file=sys.stderr, flush=True)
    print(
        f"N={args.tokens}, H={args.hidden}, float32; {machine()}; median of "
        f"{args.repeats} forward+backward, each in a fresh process.\n"
    )
    print(
        markdown_table(
            [
                "loss",
                "V",
                "head",
                "implementation",
                "seconds",
                "time / materialised",
                "extra peak MiB",
                "extra peak / materialised",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
