"""Task-vector negation streamed over Hugging Face checkpoint folders on disk.

``negate_task_vector_checkpoint`` reads the two folders' headers, checks every key, shape and dtype
(reporting all problems at once), then computes the result tensor by tensor from memory-mapped
reads and writes each one to its shard as soon as it is computed (memory holds a few tensors,
never a shard), into a temporary folder beside ``out`` that is renamed into place only at the end:
an interrupted run leaves no ``out`` and never touches the inputs. Inputs: single or sharded
safetensors (``model.safetensors.index.json``), or pickled ``.bin`` files (read with
``weights_only=True``). Output: safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from . import _checks
from .task_vector import check_headers, combine_tensor, storage_key

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Header:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointReader:
    """Names, headers and lazily read tensors of a checkpoint folder."""

    def __init__(self, folder: Path, argument: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{argument} must be a checkpoint folder; got {str(folder)!r}")
        self._pickled: dict[str, dict[str, Tensor]] = {}
        self.files = self._weight_map(argument)
        self.headers = {name: self._header(name) for name in self.files}

    def _weight_map(self, argument: str) -> dict[str, Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.folder / index_name
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.folder / file for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = self.folder / single
            if path.exists():
                return {name: path for name in self._names(path)}
        raise ValueError(
            f"{argument} holds no model.safetensors, pytorch_model.bin or shard index: "
            f"{str(self.folder)!r}"
        )

    def _names(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        return list(self._load_pickled(path))

    def _load_pickled(self, path: Path) -> dict[str, Tensor]:
        key = str(path)
        if key not in self._pickled:
            self._pickled[key] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._pickled[key]

    def _header(self, name: str) -> Header:
        path = self.files[name]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                tensor_slice = f.get_slice(name)
                return Header(
                    tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[tensor_slice.get_dtype()]
                )
        tensor = self._load_pickled(path)[name]
        return Header(tuple(tensor.shape), tensor.dtype)

    def tensor(self, name: str) -> Tensor:
        path = self.files[name]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        return self._load_pickled(path)[name]

    def tied_to(self) -> dict[str, str]:
        """For pickled checkpoints, each tensor that shares storage with an earlier one."""
        first: dict[tuple, str] = {}
        tied = {}
        for name, path in self.files.items():
            if path.suffix != ".bin":
                continue
            key = (str(path), *storage_key(self._load_pickled(path)[name]))
            if key in first:
                tied[name] = first[key]
            else:
                first[key] = name
        return tied


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
    r"""Write :math:`\theta_c - \alpha(\theta_* - \theta_c)` from two checkpoint folders to ``out``.

    Args:
        base: folder of :math:`\theta_c`, the model to clean.
        finetuned: folder of :math:`\theta_*`, that model fine-tuned further on the forget set.
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
    shard_bytes = _parse_size(max_shard_size)
    base_dir, finetuned_dir, out_dir = Path(base), Path(finetuned), Path(out)
    _check_output(out_dir, (base_dir, finetuned_dir), overwrite)
    base_ckpt = CheckpointReader(base_dir, "base")
    finetuned_ckpt = CheckpointReader(finetuned_dir, "finetuned")
    check_headers(
        {n: (h.shape, h.dtype) for n, h in base_ckpt.headers.items()},
        {n: (h.shape, h.dtype) for n, h in finetuned_ckpt.headers.items()},
        allow_dtype_mismatch=allow_dtype_mismatch,
    )
    tied = base_ckpt.tied_to()
    names = [n for n in base_ckpt.files if n not in tied]
    dtypes = {n: _output_dtype(base_ckpt.headers[n].dtype, out_dtype) for n in names}
    plan = _plan_shards(
        names, {n: _nbytes(base_ckpt.headers[n], dtypes[n]) for n in names}, shard_bytes
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    report = Report(tied=len(tied))
    metadata = {
        "format": "pt",
        "task_vector_alpha": repr(alpha),
        "task_vector_base": str(base_dir.resolve()),
        "task_vector_finetuned": str(finetuned_dir.resolve()),
    }
    if tied:
        metadata["tied_weights"] = json.dumps(tied)
    try:
        with tqdm(total=len(names), desc="task vector", unit="tensor", disable=not progress) as bar:
            weight_map = {}

            def produce(name: str) -> Tensor:
                result = _negated(name, base_ckpt, finetuned_ckpt, alpha, dtypes[name], report)
                bar.update()
                return result

            for number, shard in enumerate(plan, start=1):
                file = (
                    f"model-{number:05d}-of-{len(plan):05d}.safetensors"
                    if len(plan) > 1
                    else "model.safetensors"
                )
                headers = {n: Header(base_ckpt.headers[n].shape, dtypes[n]) for n in shard}
                write_safetensors(staging / file, headers, produce, metadata)
                weight_map.update(dict.fromkeys(shard, file))
                report.shards.append(file)
            if report.changed and report.max_abs == 0.0:
                raise ValueError("finetuned equals base: the task vector is all zero")
            if len(plan) > 1:
                total = sum(_nbytes(base_ckpt.headers[n], dtypes[n]) for n in names)
                index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
                (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
            _copy_side_files(base_dir, staging)
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def write_safetensors(
    path: Path,
    headers: dict[str, Header],
    produce: Callable[[str], Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in ``headers``' order.

    The header is known in advance (shapes and dtypes), so each tensor's bytes go straight to the
    file and are dropped: memory holds one tensor, not the shard.
    """
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, h in headers.items():
        header[name] = {
            "dtype": codes[h.dtype],
            "shape": list(h.shape),
            "data_offsets": [offset, offset + h.nbytes],
        }
        offset += h.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, h in headers.items():
            tensor = produce(name)
            if tuple(tensor.shape) != h.shape or tensor.dtype != h.dtype:
                raise AssertionError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


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
    if out.exists() and not overwrite:
        raise ValueError(f"out already exists: {str(out)!r} (pass overwrite=True to replace it)")


def _output_dtype(stored: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if out_dtype is not None and stored.is_floating_point else stored


def _nbytes(header: Header, dtype: torch.dtype) -> int:
    return math.prod(header.shape) * dtype.itemsize


def _plan_shards(names: list[str], sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped so that no shard exceeds ``shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be > 0; got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' or '500MB'; got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }[unit]
    return max(1, int(number * scale))


def _copy_side_files(base: Path, staging: Path) -> None:
    """Config, generation config and tokenizer files travel with the weights."""
    for path in base.iterdir():
        weights = path.suffix in (".safetensors", ".bin") or path.name in (
            SAFETENSORS_INDEX,
            BIN_INDEX,
        )
        if path.is_file() and not weights:
            shutil.copy2(path, staging / path.name)


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and overwrite:
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
