"""Argument validation: one helper per kind of check, each raising before any heavy work.

Every message names the argument, what was expected and what arrived (docs/conventions.md §6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_logits(logits: object, name: str = "logits", *, vocab_slice: bool = False) -> Tensor:
    """Logits: a floating tensor of shape (B, T, V) or (N, V) with V >= 1; V >= 0 for a rank's
    ``vocab_slice`` (a vocabulary smaller than its group leaves some ranks without a column)."""
    return _check_per_token(logits, name, "V", "a vocabulary size", 0 if vocab_slice else 1)


def check_hidden(hidden: object, name: str = "hidden") -> Tensor:
    """Hidden states (activations): a floating tensor of shape (B, T, H) or (N, H) with H >= 1."""
    return _check_per_token(hidden, name, "H", "a hidden size")


def _check_per_token(value: object, name: str, axis: str, size: str, minimum: int = 1) -> Tensor:
    tensor = check_tensor(value, name)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {tensor.dtype}")
    if tensor.dim() not in (2, 3):
        raise ValueError(
            f"{name} must have shape (B, T, {axis}) or (N, {axis}); got {tensor.dim()} "
            f"dimensions {_shape(tensor)}"
        )
    if tensor.shape[-1] < minimum:
        raise ValueError(f"{name} must have {size} of at least {minimum}; got {_shape(tensor)}")
    return tensor


def check_labels(
    labels: object, logits: Tensor, name: str = "labels", ref_name: str = "logits"
) -> Tensor:
    """Labels are an integer tensor shaped like logits (or hidden states) without the last axis."""
    labels = check_tensor(labels, name)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor; got {labels.dtype}")
    expected = _shape(logits)[:-1]
    if _shape(labels) != expected:
        raise ValueError(
            f"{name} must have shape {expected} to match {ref_name} {_shape(logits)}; "
            f"got {_shape(labels)}"
        )
    check_same_device(labels, logits, name, ref_name)
    # Compared as int64 whatever the storage type, so that -100 never wraps (uint8) and every
    # comparison is defined (uint16): a copy of B x T integers, never of the logits.
    return autograd_constant(labels.to(torch.int64, copy=torch.compiler.is_compiling()))


def autograd_constant(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or for a tensor made under ``torch.inference_mode()`` an alias of its
    memory (no copy) that autograd may save for the backward, as for any other constant."""
    if torch.compiler.is_compiling() or not tensor.is_inference():
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride()
    )


def check_label_range(
    labels: Tensor,
    vocab_size: int | Tensor,
    ignore_index: int,
    validate: bool,
    name: str = "labels",
) -> None:
    """Labels outside [0, V) other than ignore_index are refused on CPU, and on CUDA when asked.

    On CUDA the check would synchronise with the host, so it runs only with ``validate=True``; under
    ``torch.compile`` it is skipped (the chunked path's ``gather`` still refuses such a label).
    """
    if torch.compiler.is_compiling() or (labels.device.type != "cpu" and not validate):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{name} must lie in [0, {int(vocab_size)}) or equal ignore_index={ignore_index}; "
            f"got {int(bad.sum())} value(s) outside, e.g. {first}"
        )


def check_same_device(
    tensor: Tensor, reference: Tensor, name: str, ref_name: str = "logits"
) -> None:
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({reference.device}); "
            f"got {tensor.device}"
        )


def check_like(tensor: object, reference: Tensor, name: str, ref_name: str = "logits") -> Tensor:
    """``tensor`` must match ``reference`` in shape, dtype and device; returned usable as an
    autograd constant."""
    tensor = check_tensor(tensor, name)
    if _shape(tensor) != _shape(reference):
        raise ValueError(
            f"{name} must have shape {_shape(reference)} to match {ref_name}; got {_shape(tensor)}"
        )
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"{name} must have dtype {reference.dtype} to match {ref_name}; got {tensor.dtype}"
        )
    check_same_device(tensor, reference, name, ref_name)
    return autograd_constant(tensor)


def check_token_values(
    values: object, shape: tuple[int, ...], reference: Tensor, name: str
) -> Tensor:
    """Per-token float values (e.g. reference log-probs) of a given shape on the logits' device."""
    values = check_tensor(values, name)
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {values.dtype}")
    if _shape(values) != shape:
        raise ValueError(
            f"{name} must have shape {shape} (one value per shifted label of logits "
            f"{_shape(reference)}); got {_shape(values)}"
        )
    check_same_device(values, reference, name)
    return autograd_constant(values)


def check_choice(value: object, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value  # type: ignore[return-value]


def check_finite_number(
    value: object, name: str, *, positive: bool = False, nonnegative: bool = False
) -> float:
    """A finite real Python number (or a 0-d tensor on the CPU), optionally > 0 or >= 0."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar; got a tensor of shape {_shape(value)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {number}")
    if positive and number <= 0:
        raise ValueError(f"{name} must be > 0; got {number}")
    if nonnegative and number < 0:
        raise ValueError(f"{name} must be >= 0; got {number}")
    return number


def check_num_items(
    num_items: object, reference: Tensor, name: str = "num_items_in_batch"
) -> int | Tensor | None:
    """A global count as Hugging Face Trainer passes ``num_items_in_batch``: None, an int >= 0 or
    a 0-d tensor (moved to the reference's device)."""
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.dim() != 0:
            raise ValueError(
                f"{name} must be an int or a 0-d tensor; got a tensor of shape {_shape(num_items)}"
            )
        if num_items.is_complex() or num_items.dtype == torch.bool:
            raise TypeError(f"{name} must be numeric; got {num_items.dtype}")
        if num_items.device.type == "cpu" and not torch.compiler.is_compiling():
            # Reading a CPU tensor costs no device sync; CUDA counts are taken as they are.
            count = num_items.item()
            if count < 0 or count != int(count):
                raise ValueError(f"{name} must be a count (an integer >= 0); got {count}")
        return num_items.to(reference.device)
    if isinstance(num_items, bool) or not isinstance(num_items, int):
        raise TypeError(f"{name} must be an int or a 0-d tensor; got {type(num_items).__name__}")
    if num_items < 0:
        raise ValueError(f"{name} must be >= 0; got {num_items}")
    return num_items


def check_mean_count(
    num_items: object, reference: Tensor, reduction: str, name: str = "num_items_in_batch"
) -> int | Tensor | None:
    """A global count replaces the local one in ``reduction="mean"``, and only there."""
    count = check_num_items(num_items, reference, name)
    if count is not None and reduction != "mean":
        raise ValueError(f'{name} applies to reduction="mean" only; got reduction={reduction!r}')
    return count


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__}")
    return value


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return value


def _check_not_zero3_placeholder(tensor: Tensor, name: str) -> None:
    """A DeepSpeed ZeRO-3 parameter read outside its module's forward is this rank's empty
    placeholder: say how to gather it, rather than that its shape is wrong."""
    if tensor.numel() == 0 and hasattr(tensor, "ds_id"):
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 parameter outside its module's forward (this rank's "
            "empty placeholder, shape (0,)): compute the loss with "
            "unlearning_losses.zero3.head_loss(model.lm_head, loss, hidden, labels, ...) "
            "(ref_head= for a reference's head) inside "
            "unlearning_losses.zero3.engine_forward(engine, ...); see docs/scaling.md"
        )


def check_head(
    weight: object,
    bias: object,
    hidden: Tensor,
    name: str = "weight",
    bias_name: str = "bias",
    *,
    rows_of_group: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """An output head: ``weight (V, H)`` and optional ``bias (V,)`` matching ``hidden (..., H)``;
    V >= 1, or V >= 0 for this rank's ``rows_of_group`` (a vocabulary smaller than its group)."""
    weight = check_tensor(weight, name)
    _check_not_zero3_placeholder(weight, name)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name} must have dtype {hidden.dtype} to match hidden; got {weight.dtype}"
        )
    if (
        weight.dim() != 2
        or weight.shape[1] != hidden.shape[-1]
        or weight.shape[0] < 1 - rows_of_group
    ):
        raise ValueError(
            f"{name} must have shape (V, {hidden.shape[-1]}) to match hidden {_shape(hidden)}; "
            f"got {_shape(weight)}"
        )
    check_same_device(weight, hidden, name, "hidden")
    if bias is not None:
        bias = check_tensor(bias, bias_name)
        _check_not_zero3_placeholder(bias, bias_name)
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"{bias_name} must have dtype {hidden.dtype} to match hidden; got {bias.dtype}"
            )
        if _shape(bias) != (weight.shape[0],):
            raise ValueError(
                f"{bias_name} must have shape ({weight.shape[0]},) to match {name}; "
                f"got {_shape(bias)}"
            )
        check_same_device(bias, hidden, bias_name, "hidden")
    return weight, bias
