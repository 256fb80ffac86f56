"""Reading a Hugging Face checkpoint folder: its shard index, its files' headers, its tensors.

Single or sharded safetensors (``model.safetensors.index.json``), or pickled ``.bin`` files (read
with ``weights_only=True``). Names from an index are checked before any file is opened, so a
hostile index cannot make the reader open a file outside the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .task_vector import Header, tied_names

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
        return Header.of(tensor)

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


def is_weights_file(path: Path) -> bool:
    """A shard or an index; every other file of a checkpoint folder (config, tokenizer) is not."""
    return path.suffix in (".safetensors", ".bin") or path.name in (SAFETENSORS_INDEX, BIN_INDEX)


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
