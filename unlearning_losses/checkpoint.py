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

import contextlib
import glob
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from . import _checks
from ._progress import progress as progress_bar
from .task_vector import check_headers, check_ties, combine_tensor, tied_names

#: Names the safetensors header keeps for itself.
RESERVED_NAMES = frozenset({"__metadata__"})
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
SUPPORTED_DTYPES = frozenset(SAFETENSORS_DTYPES.values())


@dataclass(frozen=True)
class Header:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointReader:
    """Names, headers and lazily read tensors of a checkpoint folder.

    Every file it opens lies inside ``folder``: names from a shard index must be relative and
    stay inside (the files themselves may be symlinks, as in the Hugging Face cache). Every
    problem with a file is a ``ValueError`` that names it (and the tensor).
    """

    def __init__(self, folder: Path, argument: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{argument} must be a checkpoint folder; got {str(folder)!r}")
        self._pickled: dict[str, dict[str, Tensor]] = {}
        self.files = self._weight_map(argument)
        for name, path in self.files.items():
            if name in RESERVED_NAMES:
                raise ValueError(
                    f"{path}: a tensor is named {name!r}, a name the safetensors format reserves "
                    "for its metadata; rename it before computing a task vector"
                )
        self.headers = {name: self._header(name) for name in self.files}

    def _weight_map(self, argument: str) -> dict[str, Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.folder / index_name
            if index.exists():
                return self._read_index(index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = self.folder / single
            if path.exists():
                return {name: path for name in self._names(path)}
        raise ValueError(
            f"{argument} holds no model.safetensors, pytorch_model.bin or shard index: "
            f"{str(self.folder)!r}"
        )

    def _read_index(self, index: Path) -> dict[str, Path]:
        """The index's ``weight_map``, every entry a file inside the folder."""
        try:
            content = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{index}: not a readable JSON shard index ({error})") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
        ):
            raise ValueError(
                f'{index}: expected {{"weight_map": {{tensor name: shard file name}}}}'
            )
        for name, file in weight_map.items():
            if not _stays_inside(file):
                raise ValueError(
                    f"{index}: the entry {name!r} -> {file!r} must be a relative file name inside "
                    "the checkpoint folder (no '..', not absolute)"
                )
        files = {name: self.folder / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ValueError(f"{index}: names the shard {path.name!r}, which is missing")
        return files

    def _names(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with _safetensors(path) as f:
                return list(f.keys())
        return list(self._load_pickled(path))

    def _load_pickled(self, path: Path) -> dict[str, Tensor]:
        key = str(path)
        if key not in self._pickled:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # an unsafe or broken pickle: refused, never run
                raise ValueError(
                    f"{path}: not a weights-only PyTorch checkpoint ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''})"
                ) from None
            if not isinstance(loaded, dict):
                raise ValueError(
                    f"{path}: expected a flat dict of tensor name -> tensor; got "
                    f"{type(loaded).__name__}"
                )
            for name, value in loaded.items():
                if not isinstance(name, str) or not isinstance(value, Tensor):
                    raise ValueError(
                        f"{path}: expected a flat dict of tensor name -> tensor; the entry "
                        f"{name!r} holds {type(value).__name__}"
                    )
            self._pickled[key] = loaded
        return self._pickled[key]

    def _header(self, name: str) -> Header:
        path = self.files[name]
        if path.suffix == ".safetensors":
            with _safetensors(path) as f:
                try:
                    tensor_slice = f.get_slice(name)
                except Exception as error:
                    raise ValueError(
                        f"{path}: holds no readable tensor {name!r} ({error})"
                    ) from None
                shape, code = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
            if code not in SAFETENSORS_DTYPES:
                raise ValueError(_unsupported(path, name, code))
            return Header(shape, SAFETENSORS_DTYPES[code])
        tensor = self._load_pickled(path).get(name)
        if tensor is None:
            raise ValueError(f"{path}: holds no tensor {name!r}, which its index names")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(_unsupported(path, name, str(tensor.dtype)))
        return Header(tuple(tensor.shape), tensor.dtype)

    def tensor(self, name: str) -> Tensor:
        path = self.files[name]
        if path.suffix == ".safetensors":
            with _safetensors(path) as f:
                try:
                    return f.get_tensor(name)
                except Exception as error:
                    raise ValueError(f"{path}: cannot read {name!r} ({error})") from None
        return self._load_pickled(path)[name]

    def tied_to(self) -> dict[str, str]:
        """For pickled checkpoints, each tensor that shares storage with an earlier one
        (safetensors files cannot share storage)."""
        pickled = {n: self._load_pickled(p)[n] for n, p in self.files.items() if p.suffix == ".bin"}
        return tied_names(pickled)


def _stays_inside(file: str) -> bool:
    """A relative name without ``..`` (checked on the name, not on where a symlink points)."""
    parts = re.split(r"[/\\]", file)
    return (
        bool(file)
        and "\0" not in file
        and not os.path.isabs(file)
        and parts[0] != ""
        and ":" not in parts[0]
        and ".." not in parts
    )


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failures (truncated or corrupt files) name the file."""
    try:
        handle = safe_open(path, framework="pt")
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    with handle as f:
        yield f


def _unsupported(path: Path, name: str, dtype: str) -> str:
    supported = ", ".join(sorted(SAFETENSORS_DTYPES))
    return (
        f"{path}: tensor {name!r} has dtype {dtype}, which task-vector arithmetic does not take "
        f"(supported: {supported}; FP8 checkpoints carry scales that plain arithmetic would "
        "ignore: dequantize first)"
    )


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
    shard_bytes = _parse_size(max_shard_size)
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
    with _staging(out_dir.resolve(), overwrite) as staging:
        weight_map = _write_shards(staging, plan, alpha, metadata, report, progress)
        if report.changed and report.max_abs == 0.0:
            raise ValueError("finetuned equals base: the task vector is all zero")
        if len(report.shards) > 1:
            _write_index(staging, plan, weight_map, metadata)
        _copy_side_files(base_dir, staging)
    return report


@dataclass
class _Plan:
    """What to write: the tensors (tied ones once), their output dtypes, and the shards."""

    base: CheckpointReader
    finetuned: CheckpointReader
    tied: dict[str, str]
    dtypes: dict[str, torch.dtype]
    shards: list[list[str]]

    def nbytes(self, name: str) -> int:
        return _nbytes(self.base.headers[name], self.dtypes[name])


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
    check_headers(
        {n: (h.shape, h.dtype) for n, h in base.headers.items()},
        {n: (h.shape, h.dtype) for n, h in finetuned.headers.items()},
        allow_dtype_mismatch=allow_dtype_mismatch,
    )
    tied = base.tied_to()
    check_ties(tied, finetuned.tensor)
    names = [n for n in base.files if n not in tied]
    dtypes = {n: _output_dtype(base.headers[n].dtype, out_dtype) for n in names}
    sizes = {n: _nbytes(base.headers[n], dtypes[n]) for n in names}
    return _Plan(base, finetuned, tied, dtypes, _plan_shards(names, sizes, shard_bytes))


def _write_shards(
    staging: Path,
    plan: _Plan,
    alpha: float,
    metadata: dict[str, str],
    report: Report,
    progress: bool,
) -> dict[str, str]:
    """Every shard, each tensor computed as it is written; the weight map."""
    weight_map = {}
    count = len(plan.shards)
    total = sum(len(shard) for shard in plan.shards)
    with progress_bar(total, "task vector", "tensor", progress) as bar:

        def produce(name: str) -> Tensor:
            result = _negated(name, plan.base, plan.finetuned, alpha, plan.dtypes[name], report)
            bar.update()
            return result

        for number, shard in enumerate(plan.shards, start=1):
            file = (
                f"model-{number:05d}-of-{count:05d}.safetensors"
                if count > 1
                else "model.safetensors"
            )
            headers = {n: Header(plan.base.headers[n].shape, plan.dtypes[n]) for n in shard}
            write_safetensors(staging / file, headers, produce, metadata)
            weight_map.update(dict.fromkeys(shard, file))
            report.shards.append(file)
    return weight_map


def _write_index(
    staging: Path, plan: _Plan, weight_map: dict[str, str], metadata: dict[str, str]
) -> None:
    total = sum(plan.nbytes(name) for name in weight_map)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    _write_durably(staging / SAFETENSORS_INDEX, json.dumps(index, indent=2).encode())


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
        f.flush()
        os.fsync(f.fileno())


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Make the folder's entries (new files, renames) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
            with open(staging / path.name, "rb") as copy:
                os.fsync(copy.fileno())


OWNER_FILE = ".owner.json"


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``out`` that becomes ``out`` when the block succeeds; removed when
    it fails. Partial folders of runs that died (SIGKILL, power loss) are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (staging / OWNER_FILE).write_text(json.dumps(owner))
    try:
        yield staging
        (staging / OWNER_FILE).unlink()
        _sync_folder(staging)
        _move_into_place(staging, out, overwrite)
        _sync_folder(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stale_partials(out: Path) -> None:
    for partial in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        try:
            owner = json.loads((partial / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
            shutil.rmtree(partial, ignore_errors=True)
            warnings.warn(
                f"removed {partial}, the partial output of an earlier run (pid {owner.get('pid')}) "
                "that did not finish",
                stacklevel=4,
            )


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out``; with ``overwrite`` the previous ``out`` is set aside
    first and put back if the rename fails."""
    if not (out.exists() and overwrite):
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired / out.name, out)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
