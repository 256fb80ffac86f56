"""DTensor logits against their local shard: the DTensor path must cost nothing extra.

Two CPU ranks (gloo) hold the vocabulary-sharded logits of a tensor-parallel head. Each loss runs
forward+backward on the DTensor (``Shard(-1)``) and on ``.to_local()`` with ``vocab_group=``, in
alternation in the same processes; the table gives the median times, their ratio, and the extra
resident memory each path adds on top of the inputs (each path in its own pair of processes).

    python benchmarks/bench_dtensor.py                 # B=4, T=512, V=32000, float32
    python benchmarks/bench_dtensor.py --out results/  # also writes results/dtensor.md
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
LOSSES = {
    "ga": lambda x, r, y, **kw: ul.ga_loss(x, y, **kw),
    "npo": lambda x, r, y, **kw: ul.npo_loss(x, y, ref_logits=r, **kw),
    "kl": lambda x, r, y, **kw: ul.kl_divergence(x, r, y, **kw),
}
PATHS = ("dtensor", "local")


def _inputs(args, mesh, rank: int):
    """This rank's shards, made in place: no full tensor raises the memory baseline."""
    from torch.distributed.tensor import DTensor, Shard

    g = torch.Generator().manual_seed(rank)
    local = (args.batch, args.tokens, args.vocab // WORLD)

    def shard() -> DTensor:
        return DTensor.from_local(torch.randn(local, generator=g), mesh, [Shard(2)])

    labels = torch.randint(0, args.vocab, local[:2], generator=torch.Generator().manual_seed(0))
    return shard(), shard(), labels


def _worker(rank: int, args, paths: tuple[str, ...], init_file: str, result_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    logits, ref_logits, labels = _inputs(args, mesh, rank)
    baseline = peak_rss_bytes()
    group = mesh.get_group()

    def step(loss: str, path: str) -> None:
        x = logits.detach().requires_grad_(True)
        if path == "dtensor":
            LOSSES[loss](x, ref_logits, labels).backward()
        else:
            local = x.to_local()
            LOSSES[loss](local, ref_logits.to_local(), labels, vocab_group=group).backward()
        dist.barrier()

    results = {}
    for loss in args.losses:
        for path in paths:
            step(loss, path)  # warm-up
        times: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(args.repeats):  # alternating, so drifts of the machine hit both paths
            for path in paths:
                times[path].append(median_seconds(functools.partial(step, loss, path), 1))
        for path in paths:
            results[f"{loss}/{path}"] = statistics.median(times[path])
    results["extra_bytes"] = peak_rss_bytes() - baseline
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(args, paths: tuple[str, ...]) -> dict:
    return run_on_ranks(_worker, args, paths, WORLD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    times = _run(args, PATHS)
    memory = {path: _run(args, (path,))["extra_bytes"] for path in PATHS}
    rows = []
    for loss in args.losses:
        dtensor, local = times[f"{loss}/dtensor"], times[f"{loss}/local"]
        rows.append([loss, f"{dtensor * 1e3:.0f}", f"{local * 1e3:.0f}", ratio(dtensor, local)])
    rows.append(
        ["peak extra memory (MiB), all losses"]
        + [f"{memory[p] / 2**20:.0f}" for p in PATHS]
        + [ratio(memory["dtensor"], memory["local"])]
    )
    report = (
        f"B={args.batch}, T={args.tokens}, V={args.vocab} sharded over {WORLD} CPU ranks (gloo), "
        f"float32; median of {args.repeats} forward+backward; {machine()}\n\n"
        + markdown_table(["loss", "DTensor (ms)", ".to_local() + vocab_group (ms)", "ratio"], rows)
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dtensor.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
