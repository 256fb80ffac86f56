"""Peak memory and time of the streamed task-vector negation against loading both models whole.

Generates two sharded bfloat16 checkpoints (about ``--gigabytes`` each), then, each in a fresh
process: (a) ``negate_task_vector_checkpoint`` streaming tensor by tensor; (b) the load-everything
path: both models loaded whole with ``safetensors.torch.load_file``, ``negate_task_vector`` in
memory, the result saved in shards of the same size. Reports peak RSS, time and their ratios, and
the memory goal ``max_shard_size + 4 x largest tensor + 300 MB``.

    python benchmarks/bench_task_vector.py --workdir /tmp/tv-bench [--gigabytes 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, peak_rss_bytes, run_worker

ROWS, COLUMNS = 4096, 4096  # one tensor: 32 MiB in bfloat16
SHARD = 500 * 2**20


def generate(folder: Path, tensors: int, seed: int, per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = (tensors + per_shard - 1) // per_shard
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for i in range(s * per_shard, min((s + 1) * per_shard, tensors)):
            part[f"layers.{i}.weight"] = torch.randn(ROWS, COLUMNS, generator=g).bfloat16()
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


def finetune(base: Path, folder: Path) -> None:
    """A copy of ``base`` with every tensor moved a little."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in base.glob("*.safetensors"):
        tensors = load_file(file)
        g = torch.Generator().manual_seed(len(file.name))
        save_file(
            {
                n: (t.float() + 1e-2 * torch.randn(t.shape, generator=g)).bfloat16()
                for n, t in tensors.items()
            },
            folder / file.name,
            metadata={"format": "pt"},
        )
    for name in ("model.safetensors.index.json", "config.json"):
        shutil.copy(base / name, folder / name)


def streamed(workdir: Path) -> None:
    from unlearning_losses.checkpoint import negate_task_vector_checkpoint

    negate_task_vector_checkpoint(
        workdir / "base",
        workdir / "ft",
        workdir / "out-streamed",
        5.0,
        max_shard_size=SHARD,
        overwrite=True,
        progress=False,
    )


def load_everything(workdir: Path) -> None:
    from unlearning_losses import negate_task_vector

    base, ft = {}, {}
    for file in sorted((workdir / "base").glob("*.safetensors")):
        base.update(load_file(file))
        ft.update(load_file(workdir / "ft" / file.name))
    result = negate_task_vector(base, ft, 5.0)
    out = workdir / "out-whole"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shard, used, number = {}, 0, 0
    for name, tensor in result.items():
        if shard and used + tensor.nbytes > SHARD:
            number += 1
            save_file(shard, out / f"model-{number:05d}.safetensors")
            shard, used = {}, 0
        shard[name], used = tensor, used + tensor.nbytes
    save_file(shard, out / f"model-{number + 1:05d}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tv-bench"))
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--worker", choices=("streamed", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        start = time.perf_counter()
        (streamed if args.worker == "streamed" else load_everything)(args.workdir)
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes()}))
        return

    tensors = max(1, int(args.gigabytes * 2**30 / (ROWS * COLUMNS * 2)))
    if not (args.workdir / "ft").exists():
        print(f"generating 2 x {tensors} tensors of {ROWS}x{COLUMNS} bfloat16...", flush=True)
        generate(args.workdir / "base", tensors, 0, per_shard=SHARD // (ROWS * COLUMNS * 2))
        finetune(args.workdir / "base", args.workdir / "ft")
    script = str(Path(__file__).resolve())
    results = {
        kind: run_worker(script, [kind, "--workdir", str(args.workdir)])
        for kind in ("whole", "streamed")
    }
    largest = ROWS * COLUMNS * 2
    goal = SHARD + 4 * largest + 300 * 2**20
    mib = 2**20
    rows = [
        [kind, f"{r['seconds']:.1f}", f"{r['peak_rss'] / mib:.0f}"] for kind, r in results.items()
    ]
    s, w = results["streamed"], results["whole"]
    report = (
        f"{tensors} tensors of {ROWS}x{COLUMNS} bfloat16 per model "
        f"({tensors * largest / 2**30:.2f} GiB), shards of {SHARD // mib} MiB, alpha 5; {machine()}\n\n"
        + markdown_table(["path", "seconds", "peak RSS MiB"], rows)
        + f"\n\nstreamed / whole: time {s['seconds'] / w['seconds']:.2f}, peak RSS "
        f"{s['peak_rss'] / w['peak_rss']:.2f}; memory goal {goal / mib:.0f} MiB "
        f"({'met' if s['peak_rss'] <= goal else 'missed'}).\n"
    )
    print(report)


if __name__ == "__main__":
    main()
