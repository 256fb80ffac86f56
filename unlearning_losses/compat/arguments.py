"""The compatibility functions' argument checks: all arguments first, under the compat function's own
parameter names (the library's losses it calls would name theirs, ``ref_logits``, and only after a
forget pass), and no DTensor.
"""

from __future__ import annotations

from torch import Tensor

from .. import _checks
from ..ops import BACKENDS
from ..sharding import is_dtensor


def refuse_dtensor(value: object, name: str) -> None:
    """The peers compute each rank's loss from its own tensors; handed a DTensor, the library's
    losses would compute the global loss instead, a number no peer gives."""
    if is_dtensor(value):
        raise ValueError(
            f"{name} is a DTensor; the compat functions reproduce a peer's per-rank loss and have "
            f"no DTensor or vocabulary-parallel path: pass {name}.to_local()"
        )


def check_logits(logits: object, name: str) -> Tensor:
    refuse_dtensor(logits, name)
    return _checks.check_logits(logits, name)


def check_scored(logits: object, labels: object, ignore_index: int, name: str) -> Tensor:
    """Logits ``name`` (``X_logits``) and their labels ``X_labels``, checked as the library's losses
    check them, the labels' range included."""
    labels_name = name.replace("logits", "labels")
    checked = check_logits(logits, name)
    refuse_dtensor(labels, labels_name)
    labels = _checks.check_labels(labels, checked, labels_name, name)
    ignore_index = _checks.check_int(ignore_index, "ignore_index")
    _checks.check_label_range(labels, checked.shape[-1], ignore_index, False, labels_name)
    return checked


def check_reference(ref_logits: object, logits: Tensor, name: str) -> Tensor:
    """The frozen model's ``ref_<name>``, shaped like the checked logits ``name``; returned
    usable as an autograd constant (see :func:`_checks.check_like`)."""
    refuse_dtensor(ref_logits, f"ref_{name}")
    return _checks.check_like(ref_logits, logits, f"ref_{name}", name)


def check_compared(logits: object, ref_logits: object, name: str) -> Tensor:
    """Logits compared with the frozen model's at every position (no labels); the reference
    returned as :func:`check_reference` returns it."""
    return check_reference(ref_logits, check_logits(logits, name), name)


def check_scored_compared(
    logits: object, ref_logits: object, labels: object, ignore_index: int, name: str
) -> Tensor:
    """Logits with their labels, compared with the frozen model's at the labels; the reference
    returned as :func:`check_reference` returns it."""
    return check_reference(ref_logits, check_scored(logits, labels, ignore_index, name), name)


def check_backend(backend: object) -> None:
    _checks.check_choice(backend, BACKENDS, "backend")
