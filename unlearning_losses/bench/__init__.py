"""``unlearning-losses bench``: the losses' microbenchmarks, on the device you have.

For each loss (GA, NPO, KL, SimNPO, UNDIAL, ME, IHL, JSD, WHP, RKLD, ELM, KTO and FLAT from
logits; GA, NPO, KL from hidden states) and each implementation that can run here (ours; ours with
``inplace_backward`` for GA, NPO, KL and SimNPO; eager PyTorch as research code writes it;
``torch.compile`` of that; Liger-Kernel's and Cut Cross-Entropy's kernels and PyTorch's
``linear_cross_entropy`` where available), it measures
forward, backward and forward+backward (median after a warm-up; CUDA events on a GPU), the achieved
GB/s of the logits' traffic and its fraction of the measured copy bandwidth, the peak memory beyond
the inputs, and the error against the float64 evaluation of the same loss on a slice of the batch.
The header also gives the time to write a new buffer against a used one: the page faults that a
backward returning a fresh gradient pays on a CPU. It prints a markdown table; ``--out DIR`` also
writes CSV, JSON and a PNG of time and memory against the vocabulary.

``bench --step`` measures one whole unlearning step of a Hugging Face model instead (see
:mod:`.step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .._progress import progress
from . import report, step
from .arguments import DTYPES, at_least, device, machine, out_folder
from .measure import Timer, copy_bandwidth, first_write_ms, peak_extra_bytes
from .providers import (
    HELPER_LOGITS,
    LINEAR_LOSSES,
    LOGIT_LOSSES,
    Batch,
    float64_value,
    providers,
    traffic,
    with_registry_helpers,
)

DEFAULT_LOSSES = ("ga", "npo", "kl", "simnpo", "linear_ga")
#: Defaults per device: about a minute on a GPU, a few minutes on two CPU cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {
        "tokens": 8192,
        "hidden": 4096,
        "vocabs": [32000, 128256],
        "dtypes": ["bfloat16"],
        "repeats": 10,
    },
    "cpu": {"tokens": 1024, "hidden": 1024, "vocabs": [32000], "dtypes": ["float32"], "repeats": 3},
}
#: Every name ``providers`` can return, for ``--implementations`` (where installed and runnable).
IMPLEMENTATIONS = (
    "ours",
    "ours, in-place backward",
    "eager",
    "torch.compile(eager)",
    "F.linear_cross_entropy",
    "Liger-Kernel",
    "Cut Cross-Entropy",
)
SEQUENCES = 8
CHECK_ROWS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    losses = LOGIT_LOSSES + LINEAR_LOSSES
    parser.add_argument(
        "--losses", nargs="+", choices=losses, help=f"default: {' '.join(DEFAULT_LOSSES)}"
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        help="only these and ours (with --step: and the model loss) (default: all found)",
    )
    parser.add_argument("--tokens", type=int, help="tokens per batch (cuda 8192, cpu 1024)")
    parser.add_argument(
        "--hidden", type=int, help="hidden size: of the fused-linear losses, or --step's model"
    )
    parser.add_argument("--vocabs", type=int, nargs="+", help="vocabulary sizes")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, help="timed runs per pass (cuda 10, cpu 3)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="also time torch.compile of the eager code (default: on)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, help="also write bench.md/.csv/.json/.png here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    step.add_arguments(parser)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command's arguments, checked and with the device's defaults filled in."""

    device: torch.device
    losses: tuple[str, ...]
    implementations: tuple[str, ...] | None
    tokens: int
    hidden: int
    vocabs: tuple[int, ...]
    dtypes: tuple[str, ...]
    repeats: int
    compiled: bool
    out: Path | None
    quiet: bool


def check_arguments(args: argparse.Namespace) -> Settings | step.StepSettings:
    """The arguments checked before any measurement, a ValueError naming the first bad one, and
    the device's defaults filled in; ``--out`` is created and must be a writable folder. With
    ``--step``, the settings of :mod:`.step`."""
    if args.step:
        return step.check_arguments(args)
    step.refuse_step_arguments(args)
    found = device(args.device)
    _check_sizes(args)
    unknown = [name for name in args.implementations or [] if name not in IMPLEMENTATIONS]
    if unknown:
        known = ", ".join(map(repr, IMPLEMENTATIONS))
        raise ValueError(
            f"--implementations: unknown {', '.join(map(repr, unknown))}; known: {known}"
        )
    defaults = DEFAULTS[found.type]
    return Settings(
        device=found,
        losses=tuple(args.losses or DEFAULT_LOSSES),
        implementations=tuple(args.implementations) if args.implementations else None,
        tokens=defaults["tokens"] if args.tokens is None else args.tokens,
        hidden=defaults["hidden"] if args.hidden is None else args.hidden,
        vocabs=tuple(args.vocabs or defaults["vocabs"]),
        dtypes=tuple(args.dtypes or defaults["dtypes"]),
        repeats=defaults["repeats"] if args.repeats is None else args.repeats,
        compiled=True if args.compile is None else args.compile,
        out=None if args.out is None else out_folder(args.out),
        quiet=args.quiet,
    )


def _check_sizes(args: argparse.Namespace) -> None:
    for flag, values in {
        "--tokens": [args.tokens],
        "--hidden": [args.hidden],
        "--vocabs": args.vocabs,
        "--repeats": [args.repeats],
    }.items():
        at_least(flag, values)


def run(settings: Settings | step.StepSettings) -> list[dict]:
    """Measure, print the table, write the files; the records."""
    if isinstance(settings, step.StepSettings):
        return step.run(settings)
    device = settings.device
    timer = Timer(device)
    bandwidth = copy_bandwidth(device, timer)
    first_write = first_write_ms(device, timer)
    plan = [
        (loss, v, d) for loss in settings.losses for v in settings.vocabs for d in settings.dtypes
    ]
    found = {loss: providers(loss, device, settings.compiled) for loss in settings.losses}
    if settings.implementations:
        found = {
            loss: {n: f for n, f in impls.items() if n in settings.implementations or n == "ours"}
            for loss, impls in found.items()
        }
    total = sum(len(found[loss]) for loss, _, _ in plan)
    records = []
    with progress(total, "bench", "measurement", not settings.quiet) as bar:
        for loss, vocab, dtype_name in plan:
            batch = _batch(
                loss, settings.tokens, settings.hidden, vocab, DTYPES[dtype_name], device
            )
            check = _slice(batch)
            reference = float64_value(loss, check)
            ours_ms = math.nan
            for name, fn in found[loss].items():
                mine = _private(batch) if "in-place" in name else batch
                record = _measure(fn, mine, timer, settings.repeats, device)
                ours_ms = record["fwd+bwd_ms"] if name == "ours" else ours_ms
                value = fn(_private(check) if "in-place" in name else check).item()
                record.update(
                    loss=loss,
                    vocab=vocab,
                    dtype=dtype_name,
                    implementation=name,
                    time_vs_ours=record["fwd+bwd_ms"] / ours_ms,
                    error_vs_float64=abs(value - reference),
                    **_bandwidth(loss, batch, record["fwd+bwd_ms"], bandwidth),
                )
                records.append({column: record[column] for column in report.COLUMNS})
                bar.update()
    header = _header(
        device, settings.tokens, settings.hidden, settings.repeats, bandwidth, first_write
    )
    print(report.markdown(records, header))
    if settings.out:
        for path in report.write(records, header, settings.out):
            print(f"wrote {path}")
    return records


def _batch(loss: str, tokens: int, hidden: int, vocab: int, dtype, device) -> Batch:
    g = torch.Generator(device=device).manual_seed(0)
    sequences = min(SEQUENCES, tokens)
    shape = (sequences, max(1, tokens // sequences))
    kw = {"generator": g, "device": device}
    labels = torch.randint(0, vocab, shape, **kw)
    ref_logprobs = -torch.rand(shape, **kw) * 10
    if loss in LINEAR_LOSSES:
        h = torch.randn(*shape, hidden, dtype=dtype, **kw)
        w = torch.randn(vocab, hidden, dtype=dtype, **kw) * hidden**-0.5
        ref = torch.randn(*shape, hidden, dtype=dtype, **kw) if loss == "linear_kl" else None
        return Batch(
            labels,
            ref_logprobs,
            hidden=h.requires_grad_(),
            weight=w.requires_grad_(),
            ref_hidden=ref,
        )
    logits = torch.randn(*shape, vocab, dtype=dtype, **kw).requires_grad_()
    helpers = {
        name: torch.randn(*shape, vocab, dtype=dtype, **kw) for name in HELPER_LOGITS.get(loss, ())
    }
    template = None
    if loss == "flat":  # the template answers as long as the forget answers
        template = torch.randn(*shape, vocab, dtype=dtype, **kw).requires_grad_()
    return Batch(labels, ref_logprobs, logits=logits, template_logits=template, **helpers)


def _slice(batch: Batch) -> Batch:
    """The first sequence's first rows, with the helpers that the registry's float64 reference
    derives from the logits: the batch for the error check."""
    rows = (slice(0, 1), slice(0, CHECK_ROWS))

    def cut(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or name == "weight":  # the head serves every row
            return None if t is None else t.detach()
        return t.detach()[rows].clone()

    cuts: dict[str, Any] = {
        f.name: cut(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)
    }
    return with_registry_helpers(dataclasses.replace(batch, **cuts))


def _private(batch: Batch) -> Batch:
    """A copy of the logits for an implementation whose backward overwrites them."""
    assert batch.logits is not None
    copy = batch.logits.detach().clone().requires_grad_(batch.logits.requires_grad)
    return dataclasses.replace(batch, logits=copy)


def _measure(fn, batch: Batch, timer: Timer, repeats: int, device) -> dict:
    inputs = batch.inputs

    def both() -> None:
        torch.autograd.grad(fn(batch), inputs)

    backward: list[float] = []
    for _ in range(repeats + 1):
        loss = fn(batch)
        backward.append(timer(functools.partial(torch.autograd.grad, loss, inputs)))
    return {
        "fwd_ms": timer.median(lambda: fn(batch), repeats),
        "bwd_ms": sorted(backward[1:])[len(backward[1:]) // 2],
        "fwd+bwd_ms": timer.median(both, repeats),
        "peak_extra_mib": peak_extra_bytes(both, device) / 2**20,
    }


def _bandwidth(loss: str, batch: Batch, ms: float, copy_gbps: float) -> dict:
    per_element = traffic(loss)
    if per_element is None or batch.logits is None:
        return {"gb_per_s": math.nan, "copy_fraction": math.nan}
    moved = batch.logits.numel() * batch.logits.element_size() * per_element["fwd+bwd"]
    gbps = moved / (ms / 1e3) / 1e9
    return {"gb_per_s": gbps, "copy_fraction": gbps / copy_gbps}


def _header(
    device, tokens: int, hidden: int, repeats: int, bandwidth: float, first_write: tuple
) -> str:
    name = machine(device)
    thp = ""
    if os.environ.get("THP_MEM_ALLOC_ENABLE"):
        thp = f" (THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']})"
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    return (
        f"{name}; torch {torch.__version__}, Triton {triton_version}, Python "
        f"{platform.python_version()}; {tokens} tokens in {SEQUENCES} sequences, H = {hidden}; "
        f"median of {repeats}; copy bandwidth {bandwidth:.1f} GB/s; writing 256 MiB takes "
        f"{first_write[0]:.0f} ms into a new buffer, {first_write[1]:.0f} ms into a used one"
        f"{thp}; {datetime.date.today().isoformat()}"
    )
