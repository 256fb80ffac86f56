"""Atomic output folders: everything is written into a hidden folder beside ``out`` that is
renamed into place only when complete, so an interrupted run leaves no ``out``.

The hidden folder records its owner (pid and host) so that a later run can remove the partial
folders of runs that died (SIGKILL, power loss) without touching those of runs still going.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from .checkpoint_write import sync_to_disk

OWNER_FILE = ".owner.json"


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``out`` that becomes ``out`` when the block succeeds; removed when
    it fails. Partial folders of runs that died (SIGKILL, power loss) are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (folder / OWNER_FILE).write_text(json.dumps(owner))
    try:
        yield folder
        (folder / OWNER_FILE).unlink()
        sync_to_disk(folder)
        _move_into_place(folder, out, overwrite)
        sync_to_disk(out.parent)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
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


def _move_into_place(folder: Path, out: Path, overwrite: bool) -> None:
    """Rename ``folder`` to ``out``; with ``overwrite`` the previous ``out`` is set aside
    first and put back if the rename fails."""
    if not (out.exists() and overwrite):
        os.replace(folder, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    try:
        os.replace(folder, out)
    except BaseException:
        os.replace(retired / out.name, out)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
