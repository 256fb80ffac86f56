"""What the first eager call of a loss costs over the second, in fresh processes: the library's
eager path (a plain ``autograd.Function``) against calling the same primitive through its
registered custom op, which imports the compiler stack on first use.

    python benchmarks/bench_first_call.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SCRIPT = r"""
import json, sys, time
import torch
import unlearning_losses as ul
from unlearning_losses.ops import custom_ops

g = torch.Generator().manual_seed(0)
logits = torch.randn(4, 257, 32000, generator=g, requires_grad=True)
labels = torch.randint(0, 32000, (4, 257), generator=g)
valid = torch.ones(4, 256, dtype=torch.bool)


def eager():
    ul.ga_loss(logits, labels).backward()


def custom_op():
    out, _ = custom_ops._logprobs_op(logits, labels[:, 1:], valid, "torch", False)
    out.sum().backward()


call = {"eager": eager, "custom_op": custom_op}[sys.argv[1]]
times = []
for _ in range(2):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
print(json.dumps({"extra": times[0] - times[1], "modules": len(sys.modules)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"eager": [], "custom_op": []}
    for _ in range(args.repeats):
        for path in results:  # alternating, each in a fresh process
            done = subprocess.run(
                [sys.executable, "-c", SCRIPT, path], capture_output=True, text=True, check=True
            )
            results[path].append(json.loads(done.stdout.splitlines()[-1]))
    extra = {p: statistics.median(r["extra"] for r in rs) for p, rs in results.items()}
    modules = {p: rs[0]["modules"] for p, rs in results.items()}
    print("| path | first call minus second (median) | modules loaded after it |")
    print("|---|---|---|")
    for path in results:
        print(f"| {path} | {extra[path] * 1e3:.0f} ms | {modules[path]} |")
    print(f"\nratio eager / custom op: {extra['eager'] / extra['custom_op']:.3f}")


if __name__ == "__main__":
    main()
