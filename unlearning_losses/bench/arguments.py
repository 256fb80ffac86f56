"""The checks and machine description that ``bench`` and ``bench --step`` share."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda")


def device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA where present, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``, checked against the machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found: torch.device | None = torch.device(name)
    except RuntimeError:  # not a device string at all
        found = None
    if found is None or found.type not in DEVICE_TYPES:
        raise ValueError(f"--device: unknown {name!r}; choose auto, cpu, cuda or cuda:N")
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} GPUs here")
    return found


def at_least(flag: str, values: list[int | None] | None, least: int = 1) -> None:
    """Each given value of ``flag`` is at least ``least`` (a zero was once taken for "default",
    a negative failed mid-run)."""
    for value in values or []:
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, not {value}")


def out_folder(out: Path) -> Path:
    """``out``, created if needed: a wrong path found now, not after minutes of measuring."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out {out}: is a file, not a folder") from None
    except OSError as error:
        raise ValueError(f"--out {out}: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return out


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its cores and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
