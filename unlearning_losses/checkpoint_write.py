"""Writing a checkpoint folder: safetensors shards streamed tensor by tensor, the shard plan, the
index, and the side files; every file made durable (fsync) once written."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint_read import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, is_weights_file
from .task_vector import Header


def write_safetensors(
    path: Path,
    headers: Mapping[str, Header],
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
    sync_to_disk(path)


def shard_files(count: int) -> list[str]:
    """The Hugging Face names of ``count`` output shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def plan_shards(headers: Mapping[str, Header], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped so that no shard exceeds ``shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, header in headers.items():
        if shards[-1] and used + header.nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += header.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a string like ``"5GB"`` or ``"500MiB"``."""
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


def write_index(
    folder: Path,
    weight_map: dict[str, str],
    headers: Mapping[str, Header],
    metadata: dict[str, str],
) -> None:
    """``model.safetensors.index.json``: the weight map and the total size of the tensors."""
    total = sum(headers[name].nbytes for name in weight_map)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    path = folder / SAFETENSORS_INDEX
    path.write_bytes(json.dumps(index, indent=2).encode())
    sync_to_disk(path)


def copy_side_files(source: Path, folder: Path) -> None:
    """Config, generation config and tokenizer files travel with the weights."""
    for path in source.iterdir():
        if path.is_file() and not is_weights_file(path):
            shutil.copy2(path, folder / path.name)
            sync_to_disk(folder / path.name)


def sync_to_disk(path: Path) -> None:
    """Make a written file's data, or a folder's entries (new files, renames), durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
