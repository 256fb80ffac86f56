"""A head split by vocabulary rows: the fused-linear losses on this rank's rows, against gathering
the head whole, and against this rank's materialised logits slice.

Two CPU ranks (gloo) each hold half the rows of a ``(V, H)`` head and the same hidden states.
Per loss and path, forward+backward; each path runs in its own pair of processes so that its
resident-set peak beyond the inputs is its own:

- ``sharded``: ``linear_*(hidden, rows, vocab_group=...)``: the head never gathered;
- ``gathered``: ``all_gather`` of the rows into the whole head, then ``linear_*`` on it (what a
  library without a vocabulary-parallel path makes a user do);
- ``logits``: this rank's logits slice ``hidden @ rows.T`` materialised, then the logits loss
  with ``vocab_group=``.

    python benchmarks/bench_tp_head.py                 # B=2, T=512, H=512, V=128256, float32
    python benchmarks/bench_tp_head.py --out results/  # also writes results/tp_head.md
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import unlearning_losses as ul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    machine,
    markdown_table,
    median_seconds,
    peak_rss_bytes,
    ratio,
    run_on_ranks,
)

WORLD = 2
PATHS = ("sharded", "gathered", "logits")
FUSED = {
    "ga": lambda h, w, y, lp, **kw: ul.linear_ga_loss(h, w, y, **kw),
    "npo": lambda h, w, y, lp, **kw: ul.linear_npo_loss(h, w, y, ref_logprobs=lp, **kw),
}
LOGITS = {
    "ga": lambda z, y, lp, **kw: ul.ga_loss(z, y, **kw),
    "npo": lambda z, y, lp, **kw: ul.npo_loss(z, y, ref_logprobs=lp, **kw),
}


def _step(loss: str, path: str, hidden, rows, labels, ref_logprobs, group) -> None:
    h = hidden.detach().requires_grad_(True)
    w = rows.detach().requires_grad_(True)
    if path == "sharded":
        FUSED[loss](h, w, labels, ref_logprobs, vocab_group=group).backward()
    elif path == "gathered":
        parts = [torch.empty_like(rows) for _ in range(WORLD)]
        dist.all_gather(parts, rows)
        whole = torch.cat(parts).requires_grad_(True)
        FUSED[loss](h, whole, labels, ref_logprobs).backward()
        # This rank's rows of the head's gradient, as the sharded path returns them.
        w.grad = whole.grad.chunk(WORLD)[dist.get_rank()]
    else:
        LOGITS[loss](h @ w.T, labels, ref_logprobs, vocab_group=group).backward()
    dist.barrier()


def _worker(rank: int, args, paths: tuple[str, ...], init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens, args.hidden, generator=g)
    labels = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g)
    ref_logprobs = -torch.rand(args.batch, args.tokens - 1, generator=g)
    rows = torch.randn(
        args.vocab // WORLD, args.hidden, generator=torch.Generator().manual_seed(rank)
    )
    rows /= args.hidden**0.5
    group = dist.group.WORLD
    # Imports and first calls on a few tokens and rows, before the baseline: the whole-size head
    # (gathered) or logits would otherwise sit in the baseline.
    few = labels[:, :3] % (4 * WORLD)
    for loss in args.losses:
        for path in paths:
            _step(loss, path, hidden[:, :3], rows[:4], few, ref_logprobs[:, :2], group)
    baseline = peak_rss_bytes()
    results = {}
    for loss in args.losses:
        for path in paths:
            step = functools.partial(_step, loss, path, hidden, rows, labels, ref_logprobs, group)
            results[f"{loss}/{path}"] = statistics.median(
                median_seconds(step, 1) for _ in range(args.repeats)
            )
    results["extra_bytes"] = peak_rss_bytes() - baseline
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(args, paths: tuple[str, ...]) -> dict:
    return run_on_ranks(_worker, args, paths, WORLD)


def _ratios(by_path: dict[str, float]) -> list[str]:
    return [ratio(by_path["sharded"], by_path[p]) for p in ("gathered", "logits")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--losses", nargs="+", default=list(FUSED), choices=list(FUSED))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runs = {path: _run(args, (path,)) for path in PATHS}
    header = ["loss"] + [f"{p} (ms)" for p in PATHS] + ["sharded / gathered", "sharded / logits"]
    rows = []
    for loss in args.losses:
        ms = {p: runs[p][f"{loss}/{p}"] * 1e3 for p in PATHS}
        rows.append([loss, *(f"{ms[p]:.0f}" for p in PATHS), *_ratios(ms)])
    memory = {p: runs[p]["extra_bytes"] / 2**20 for p in PATHS}
    rows.append(
        ["peak extra memory per rank (MiB)", *(f"{memory[p]:.0f}" for p in PATHS), *_ratios(memory)]
    )
    report = (
        f"B={args.batch}, T={args.tokens}, H={args.hidden}, V={args.vocab} (head rows split over "
        f"{WORLD} CPU ranks, gloo), float32; median of {args.repeats} forward+backward; "
        f"{machine()}\n\n" + markdown_table(header, rows)
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp_head.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
