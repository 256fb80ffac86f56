"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a (no GPU needed), in bfloat16 and
float32, at the tiles and warp counts the launchers pick for V = 32000, 128256 and 256000: no
spills, registers that let two programs share an SM (65,536 registers: 128 per thread at 8
warps, 64 at 16), and one exponential per logit in
the log-prob forward (two per logit pair in the KL forward and the reverse KL backward: expm1 by
its series near 0 and from the log-sum-exps' exponentials away from it), plus a scalar rescale
per tile.

The compiler runs in a subprocess: this test session interprets the kernels on the CPU
(``TRITON_INTERPRET=1``), and interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_static.py"
sys.path.insert(0, str(SCRIPT.parent))
import triton_static  # noqa: E402

try:
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401

    REASON = None if triton_static.ptxas() else "this Triton build ships no ptxas"
except ImportError as error:
    REASON = f"this Triton build has no NVIDIA backend ({error})"

EXPS_PER_LOGIT = {
    "log-prob forward": 1.25,
    "pair forward (kl": 2.5,  # both log-sum-exps; expm1 by its series or from those
    "pair backward (kl reverse": 2.0,  # p and q; q expm1(d) by its series
    "pair forward (soft": 2.5,
    "pair forward (reference": 5.0,  # a second pass: p, q and log(q + eps)
    "vocab-stats forward": 1.25,  # the log-prob forward's pass, one more reduction per row
    "jsd forward": 5.5,  # both log-sum-exps, then a second pass: p, q and the exp of expm1
    "vocab-stats backward": 1.0,  # p only
    "jsd backward": 2.0,  # p and the exp of expm1
}
CONFIGS = list(triton_static.configs())


@pytest.fixture(scope="module")
def figures() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env, check=True
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["id"]: r for r in records}


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_kernel_compiles_without_spills_within_registers_and_exps(config, figures):
    found = figures[config.id]
    assert found["spilled_bytes"] == 0
    threads = 32 * config.num_warps
    assert found["registers"] * threads * 2 <= 65536
    for prefix, limit in EXPS_PER_LOGIT.items():
        if config.name.startswith(prefix):
            assert found["exps_per_element"] <= limit
