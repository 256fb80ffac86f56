"""Static figures of the Triton kernels, compiled ahead of time for NVIDIA GPUs without one.

For each kernel, architecture (sm_80, sm_90a), dtype and the tile size and warp count the
launchers pick for a vocabulary: registers per thread and spills (Triton's bundled ``ptxas -v``),
and the exponentials (``ex2`` instructions of the PTX) per logit element of a tile, to compare
with measured occupancy on the next GPU:

    python benchmarks/triton_static.py                 # every kernel, V = 32000, 128256, 256000
    python benchmarks/triton_static.py --archs 90 --dtypes bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import triton

from unlearning_losses.ops import (
    _triton_common,
    triton_jsd,
    triton_kl,
    triton_logprobs,
    triton_vocab_stats,
)
from unlearning_losses.ops.numerics import KERNEL_MODES
from unlearning_losses.ops.vocab_numerics import KERNEL_VOCAB_MODES

#: (name, kernel, constexpr flags, logit tensors read per element) of every kernel launched.
KERNELS = [
    ("log-prob forward", triton_logprobs._logprobs_forward_kernel, {}, 1),
    ("log-prob backward", triton_logprobs._logprobs_backward_kernel, {}, 1),
    *(
        (f"{kind} ({mode.value.replace('_', ' ')})", kernel, {"MODE": number}, 2)
        for kind, kernel in (
            ("pair forward", triton_kl._pair_forward_kernel),
            ("pair backward", triton_kl._pair_backward_kernel),
        )
        for mode, number in KERNEL_MODES.items()
    ),
    *(
        (f"{kind} ({mode.value.replace('_', ' ')})", kernel, {"MODE": number}, 1)
        for kind, kernel in (
            ("vocab-stats forward", triton_vocab_stats._vocab_stats_forward_kernel),
            ("vocab-stats backward", triton_vocab_stats._vocab_stats_backward_kernel),
        )
        for mode, number in KERNEL_VOCAB_MODES.items()
    ),
    ("jsd forward", triton_jsd._jsd_forward_kernel, {}, 2),
    ("jsd backward", triton_jsd._jsd_backward_kernel, {}, 2),
]


@dataclass(frozen=True)
class Config:
    name: str
    kernel: object
    flags: dict
    arch: int
    dtype: str
    block_v: int
    inputs: int

    @property
    def num_warps(self) -> int:
        return _triton_common.num_warps(self.block_v, self.inputs)

    @property
    def id(self) -> str:
        return f"{self.name}-sm{self.arch}-{self.dtype}-{self.block_v}"


@dataclass(frozen=True)
class Figures:
    registers: int
    spilled_bytes: int
    exps_per_element: float


def configs(
    vocabs=(32000, 128256, 256000), dtypes=("bf16", "fp32"), archs=(80, 90)
) -> Iterator[Config]:
    """One configuration per distinct (kernel, arch, dtype, tile) the launchers would pick."""
    tiles = sorted({_triton_common.block_size(v) for v in vocabs})
    for name, kernel, flags, inputs in KERNELS:
        for arch in archs:
            for dtype in dtypes:
                for block_v in tiles:
                    yield Config(name, kernel, flags, arch, dtype, block_v, inputs)


def _signature(kernel, dtype: str) -> dict[str, str]:
    """Argument types from the kernels' naming: ``*_ptr`` of the logits' dtype for logits and
    gradients, int64 targets and columns, bool masks, float32 elsewhere; int32 sizes, int64
    strides."""
    types = {}
    for arg in kernel.arg_names:
        if arg.isupper():
            types[arg] = "constexpr"
        elif arg in ("logits_ptr", "ref_ptr", "grad_ptr"):
            types[arg] = f"*{dtype}"
        elif arg in ("targets_ptr", "index_ptr"):
            types[arg] = "*i64"
        elif arg == "valid_ptr":
            types[arg] = "*i1"
        elif arg.endswith("_ptr"):
            types[arg] = "*fp32"
        elif arg.startswith("stride_"):
            types[arg] = "i64"
        elif arg in ("length", "vocab", "rows"):
            types[arg] = "i32"
        else:
            types[arg] = "fp32"
    return types


def ptxas() -> str | None:
    """Triton's bundled ptxas that reads the PTX it emits (``ptxas-blackwell`` where present)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def static_figures(config: Config) -> Figures:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=config.kernel,
        signature=_signature(config.kernel, config.dtype),
        constexprs={"BLOCK_V": config.block_v, **config.flags},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", config.arch, 32), options={"num_warps": config.num_warps}
    )
    ptx = compiled.asm["ptx"]
    gpu = f"sm_{config.arch}a" if config.arch == 90 else f"sm_{config.arch}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [ptxas(), "-v", "--gpu-name", gpu, path, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr))
    elements_per_thread = config.block_v / (32 * config.num_warps)
    exps = len(re.findall(r"\bex2\.approx", ptx)) / elements_per_thread
    return Figures(registers, spills, exps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 256000])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead")
    args = parser.parse_args()
    if args.json:
        for config in configs(args.vocabs, args.dtypes, args.archs):
            record = {"id": config.id, **dataclasses.asdict(static_figures(config))}
            print(json.dumps(record), flush=True)
        return
    print(f"Triton {triton.__version__}, {os.path.basename(ptxas() or 'no ptxas')}\n")
    print("| kernel | arch | dtype | BLOCK_V | warps | registers | spilled bytes | ex2 per logit |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs(args.vocabs, args.dtypes, args.archs):
        f = static_figures(config)
        arch = f"sm_{config.arch}a" if config.arch == 90 else f"sm_{config.arch}"
        print(
            f"| {config.name} | {arch} | {config.dtype} | {config.block_v} | {config.num_warps} | "
            f"{f.registers} | {f.spilled_bytes} | {f.exps_per_element:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
