"""The GPU check: ``unlearning-losses bench`` with the set the GPU issue asks for.

One command on a lent GPU (torch + Triton; Liger-Kernel and Cut Cross-Entropy used when
importable):

    python benchmarks/gpu_check.py OUT_DIR

GA, NPO, KL, SimNPO and UNDIAL from logits and GA, NPO and KL from hidden states (H = 4096), at
V = 32000, 128256 and 256000 in bfloat16 and float32, 8192 tokens: every implementation against
ours, the achieved GB/s as a fraction of the measured copy bandwidth, peak memory and the error
against float64. Extra arguments pass through (e.g. ``--repeats 5``, ``--no-compile``).
"""

from __future__ import annotations

import sys

from unlearning_losses.__main__ import main

if __name__ == "__main__":
    out, *extra = sys.argv[1:] or ["benchmark-results"]
    main(
        [
            "bench",
            "--device",
            "cuda",
            "--losses",
            "ga",
            "npo",
            "kl",
            "simnpo",
            "undial",
            "linear_ga",
            "linear_npo",
            "linear_kl",
            "--vocabs",
            "32000",
            "128256",
            "256000",
            "--dtypes",
            "bfloat16",
            "float32",
            "--out",
            out,
            *extra,
        ]
    )
