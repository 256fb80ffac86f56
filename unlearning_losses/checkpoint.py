"""Task-vector negation streamed over Hugging Face checkpoint folders on disk.

``negate_task_vector_checkpoint`` reads the two folders' headers, checks every key, shape and dtype
(reporting all problems at once), then computes the result tensor by tensor from memory-mapped
reads and writes each one to its shard as soon as it is computed (memory holds a few tensors,
never a shard), into a temporary folder beside ``out`` that is renamed into place only at the end:
an interrupted run leaves no ``out`` and never touches the inputs. Inputs: single or sharded
safetensors (``model.safetensors.index.json``), or pickled ``.bin`` files (read with
``weights_only=True``). Output: safetensors.

This module holds the arithmetic and the plan; reading the folders is ``checkpoint_read``, the
safetensors writer and shard planning ``checkpoint_write``, the atomic output folder
``checkpoint_staging``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import _checks
from ._progress import progress as progress_bar
from .checkpoint_read import SUPPORTED_DTYPES, CheckpointReader
from .checkpoint_staging import staging
from .checkpoint_write import (
    copy_side_files,
    parse_size,
    plan_shards,
    shard_files,
    write_index,
    write_safetensors,
)
from .task_vector import Header, check_headers, check_ties, combine_tensor


@dataclass
class Report:
    """What a negation did: counts, and the size of the task vector theta_* - theta_c."""

    changed: int = 0
    copied: int = 0
    tied: int = 0
    squared_norm: float = 0.0
    max_abs: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def norm(self) -> float:
        return math.sqrt(self.squared_norm)

    def summary(self) -> str:
        return (
            f"{self.changed} tensors changed, {self.copied} copied, {self.tied} tied (saved once); "
            f"task vector norm {self.norm:.6g}, max |delta| {self.max_abs:.6g}; "
            f"{len(self.shards)} shard(s)"
        )


def negate_task_vector_checkpoint(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    alpha: float,
    *,
    max_shard_size: int | str = "5GB",
    out_dtype: torch.dtype | None = None,
    allow_dtype_mismatch: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    r"""Write $\theta_c - \alpha(\theta_* - \theta_c)$ from two checkpoint folders to ``out``.

    Args:
        base: folder of $\theta_c$, the model to clean.
        finetuned: folder of $\theta_*$, that model fine-tuned further on the forget set.
        out: the folder to create (safetensors shards, index, the base's config and tokenizer).
        alpha: the step, finite (MUSE uses 5).
        max_shard_size: bytes of one output shard (``"5GB"``, ``"500MB"`` or an int).
        out_dtype: round floating results to this dtype instead of the stored one.
        allow_dtype_mismatch: accept floating tensors whose dtypes differ between the folders.
        overwrite: replace an existing ``out`` (never an input folder).
        progress: show a progress bar.

    Returns:
        A :class:`Report` (tensors changed/copied/tied, task-vector norm and max, shard names).

    Raises:
        ValueError: bad folders, ``out`` existing or being an input, or any mismatch (all listed).
        TypeError: float dtypes differ without ``allow_dtype_mismatch``.
    """
    alpha = _checks.check_finite_number(alpha, "alpha")
    shard_bytes = parse_size(max_shard_size)
    _check_out_dtype(out_dtype)
    base_dir, finetuned_dir, out_dir = Path(base), Path(finetuned), Path(out)
    _check_output(out_dir, (base_dir, finetuned_dir), overwrite)
    plan = _plan(base_dir, finetuned_dir, shard_bytes, out_dtype, allow_dtype_mismatch)
    metadata = {
        "format": "pt",
        "task_vector_alpha": repr(alpha),
        "task_vector_base": str(base_dir.resolve()),
        "task_vector_finetuned": str(finetuned_dir.resolve()),
    }
    if plan.tied:
        metadata["tied_weights"] = json.dumps(plan.tied)
    report = Report(tied=len(plan.tied))
    with staging(out_dir.resolve(), overwrite) as folder:
        weight_map = _write_shards(folder, plan, alpha, metadata, report, progress)
        if report.changed and report.max_abs == 0.0:
            raise ValueError("finetuned equals base: the task vector is all zero")
        if len(report.shards) > 1:
            write_index(folder, weight_map, plan.headers, metadata)
        copy_side_files(base_dir, folder)
    return report


@dataclass
class _Plan:
    """What to write: the tensors (tied ones once), their output headers, and the shards."""

    base: CheckpointReader
    finetuned: CheckpointReader
    tied: dict[str, str]
    headers: dict[str, Header]
    shards: list[list[str]]


def _plan(
    base_dir: Path,
    finetuned_dir: Path,
    shard_bytes: int,
    out_dtype: torch.dtype | None,
    allow_dtype_mismatch: bool,
) -> _Plan:
    """Read both folders' headers, check them all, and lay out the output shards."""
    base = CheckpointReader(base_dir, "base")
    finetuned = CheckpointReader(finetuned_dir, "finetuned")
    check_headers(base.headers, finetuned.headers, allow_dtype_mismatch=allow_dtype_mismatch)
    tied = base.tied_to()
    check_ties(tied, finetuned.tensor)
    headers = {
        name: Header(header.shape, _output_dtype(header.dtype, out_dtype))
        for name, header in base.headers.items()
        if name not in tied
    }
    return _Plan(base, finetuned, tied, headers, plan_shards(headers, shard_bytes))


def _write_shards(
    folder: Path,
    plan: _Plan,
    alpha: float,
    metadata: dict[str, str],
    report: Report,
    progress: bool,
) -> dict[str, str]:
    """Every shard, each tensor computed as it is written; the weight map."""
    weight_map = {}
    total = sum(len(shard) for shard in plan.shards)
    with progress_bar(total, "task vector", "tensor", progress) as bar:

        def produce(name: str) -> Tensor:
            dtype = plan.headers[name].dtype
            result = _negated(name, plan.base, plan.finetuned, alpha, dtype, report)
            bar.update()
            return result

        for file, shard in zip(shard_files(len(plan.shards)), plan.shards, strict=True):
            write_safetensors(folder / file, {n: plan.headers[n] for n in shard}, produce, metadata)
            weight_map.update(dict.fromkeys(shard, file))
            report.shards.append(file)
    return weight_map


def _negated(
    name: str,
    base: CheckpointReader,
    finetuned: CheckpointReader,
    alpha: float,
    out_dtype: torch.dtype,
    report: Report,
) -> Tensor:
    b = base.tensor(name)
    f = finetuned.tensor(name)
    if not b.is_floating_point():
        if not torch.equal(b, f):
            raise ValueError(
                f"{name!r} is an integer/bool tensor that differs between base and finetuned"
            )
        report.copied += 1
        return b.contiguous().clone()
    flat_f = f.reshape(-1)

    def formula(part: slice, b_part: Tensor) -> Tensor:
        delta = flat_f[part].double() - b_part
        if delta.numel():
            low, high = torch.aminmax(delta)
            report.squared_norm += float(torch.dot(delta, delta))
            report.max_abs = max(report.max_abs, float(-low), float(high))
        return b_part - alpha * delta

    report.changed += 1
    return combine_tensor(name, b, formula, out_dtype)


def _check_output(out: Path, inputs: tuple[Path, Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for folder, argument in zip(inputs, ("base", "finetuned"), strict=True):
        source = folder.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(f"out must not be, contain or lie inside {argument}; got {str(out)!r}")
    working = Path.cwd().resolve()
    if resolved == working or resolved in working.parents:
        raise ValueError(
            f"out must not be the current directory or contain it: replacing it would pull the "
            f"folder from under this process; got {str(out)!r}"
        )
    if out.exists() and not overwrite:
        raise ValueError(f"out already exists: {str(out)!r} (pass overwrite=True to replace it)")


def _check_out_dtype(out_dtype: object) -> None:
    floating = sorted(str(d) for d in SUPPORTED_DTYPES if d.is_floating_point)
    if out_dtype is not None and (
        not isinstance(out_dtype, torch.dtype)
        or out_dtype not in SUPPORTED_DTYPES
        or not out_dtype.is_floating_point
    ):
        raise TypeError(
            f"out_dtype must be None or one of {', '.join(floating)}; got {out_dtype!r}"
        )


def _output_dtype(stored: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if out_dtype is not None and stored.is_floating_point else stored
