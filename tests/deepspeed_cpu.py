"""Run a Hugging Face Trainer script with DeepSpeed on CPU ranks, under ``torchrun``:
``python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_cpu.py SCRIPT ARGS...``.

accelerate picks its distributed backend from the accelerator it finds; on a machine with none it
picks no backend, and with DeepSpeed every rank then runs as a process of its own
(``num_processes`` 1, the data not sharded over ranks) while DeepSpeed still averages the ranks'
gradients. Here the backend is gloo on CPU, as it is nccl on GPUs; on a machine with an
accelerator nothing changes.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None:
        return "gloo", DistributedType.MULTI_CPU
    return backend, distributed_type


if __name__ == "__main__":  # only there: pytest imports this file too (--doctest-modules)
    PartialState._prepare_backend = _cpu_backend
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
