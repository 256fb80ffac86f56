"""The first eager call of a loss imports no compiler (``torch._dynamo``, inductor, sympy), while
``torch.compile(fullgraph=True)`` still traces the primitives (see ``test_compile.py``). Fresh
processes: the test session itself has imported the compiler. What the first call costs is
measured by ``benchmarks/bench_first_call.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import unlearning_losses as ul

g = torch.Generator().manual_seed(0)
logits = torch.randn(2, 33, 1000, generator=g, requires_grad=True)
ref = torch.randn(2, 33, 1000, generator=g)
labels = torch.randint(0, 1000, (2, 33), generator=g)
losses = {
    "ga": lambda: ul.ga_loss(logits, labels),
    "npo": lambda: ul.npo_loss(logits, labels, ref_logits=ref),
    "kl": lambda: ul.kl_divergence(logits, ref, labels),
    "undial": lambda: ul.undial_loss(logits, ref, labels),
}
loss = losses[sys.argv[1]]
loss().backward()
compiler = [m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules]
print(json.dumps({"compiler": compiler}))
"""


@pytest.mark.parametrize("loss", ["ga", "npo", "kl", "undial"])
def test_first_eager_call_imports_no_compiler(loss):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, loss], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["compiler"] == []
