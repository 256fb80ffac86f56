"""The CPU comparison against research code: ``unlearning-losses bench`` on the CPU.

GA, NPO, KL and SimNPO from 2048 tokens of a 32000-token vocabulary, float32 and bfloat16, median
of 5, ours (with and without ``inplace_backward``) against eager PyTorch as unlearning codebases
write it (a float32 upcast, ``cross_entropy``, ``log_softmax`` tensors). Extra arguments pass
through.

    python benchmarks/bench_cpu_losses.py --out results/
"""

from __future__ import annotations

import sys

from unlearning_losses.__main__ import main

if __name__ == "__main__":
    main(
        [
            "bench",
            "--device",
            "cpu",
            "--tokens",
            "2048",
            "--losses",
            "ga",
            "npo",
            "kl",
            "simnpo",
            "--vocabs",
            "32000",
            "--dtypes",
            "float32",
            "bfloat16",
            "--repeats",
            "5",
            *sys.argv[1:],
        ]
    )
