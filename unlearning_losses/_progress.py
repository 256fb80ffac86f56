"""A progress bar for long work: tqdm's when it is installed, else a plain counter on stderr."""

from __future__ import annotations

import importlib.util
import sys
import time
from types import TracebackType
from typing import Any


class _Counter:
    """``desc: done/total unit`` rewritten in place, at most twice a second."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done, self.shown = total, desc, unit, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= 0.5 or self.done == self.total:
            self.shown = now
            print(f"\r{self.desc}: {self.done}/{self.total} {self.unit}", end="", file=sys.stderr)

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        print(file=sys.stderr)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A context manager with ``update(n)``: nothing when not ``enabled``."""
    if not enabled:
        return _Silent()
    if importlib.util.find_spec("tqdm") is not None:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Counter(total, desc, unit)
