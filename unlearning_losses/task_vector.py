"""Task vectors over state dicts: theta_unlearned = theta_c - alpha * (theta_* - theta_c).

theta_c is the model to clean and theta_* that model fine-tuned further on the forget set (Ilharco
et al., 2023, "Editing Models with Task Arithmetic"; MUSE uses alpha = 5). Every result is
computed tensor by tensor in float64, in bounded slices, and rounded once to the stored dtype (or
the ``dtype`` asked for), so it is the exact result correctly rounded; MUSE's own arithmetic, which
rounds after each operation, is ``compat.muse.negate_task_vector``. Integer and bool tensors (step counters, position ids)
are never part of the arithmetic: they are copied when equal in both models, an error otherwise.
Tensors that share storage (tied embeddings) are computed once and share storage in the result.
Inputs are never modified.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _checks

StateDict = Mapping[str, Tensor]

#: Elements per float64 slice: bounds the temporary memory of one tensor's arithmetic.
SLICE_ELEMENTS = 1 << 20


def task_vector(
    base: StateDict | nn.Module,
    finetuned: StateDict | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The task vector ``finetuned - base`` of every floating tensor, in ``dtype``.

    Each difference is computed in float64 and rounded once to ``dtype``. The float32 default
    holds the difference of two bfloat16 or float16 weights exactly; pass ``torch.float64`` to
    add or scale vectors of float32 weights without a rounding per vector (summing two float32
    vectors of float32 weights is off by up to an ulp of float32, 6e-8 relative).

    Args:
        base: the model before fine-tuning (state dict or module).
        finetuned: the same model fine-tuned further (same keys, shapes and float dtypes).
        dtype: the vector's floating dtype (float16, bfloat16, float32 or float64).

    Returns:
        ``{name: finetuned - base}`` for the floating tensors; integer and bool tensors (which
        must be equal) are left out.

    Raises:
        ValueError: keys, shapes or integer tensors differ, the vector is all zero, or a
            difference is not finite in ``dtype`` (named).
        TypeError: float dtypes differ, or ``dtype`` is not a floating dtype.

    Example:
        >>> import torch
        >>> base, tuned = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 1.0])}
        >>> task_vector(base, tuned)
        {'w': tensor([ 0.5000, -1.0000])}
        >>> task_vector(base, tuned, dtype=torch.float64)["w"].dtype
        torch.float64
    """
    base, finetuned = _state(base, "base"), _state(finetuned, "finetuned")
    dtype = _check_float_dtype(dtype, "dtype")
    _check_compatible(base, finetuned, allow_dtype_mismatch=False)
    floating = {name: tensor for name, tensor in base.items() if tensor.is_floating_point()}
    if all(torch.equal(tensor, finetuned[name]) for name, tensor in floating.items()):
        raise ValueError("finetuned equals base: the task vector is all zero")
    return {
        name: combine_tensor(
            name, tensor, functools.partial(_difference, finetuned, name), out_dtype=dtype
        )
        for name, tensor in floating.items()
    }


def _difference(finetuned: Mapping[str, Tensor], name: str, part: slice, base: Tensor) -> Tensor:
    return _other(finetuned, name, part) - base


def _check_float_dtype(dtype: object, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in _checks.FLOAT_DTYPES:
        shown = dtype if isinstance(dtype, torch.dtype) else type(dtype).__name__
        raise TypeError(
            f"{name} must be torch.float16, torch.bfloat16, torch.float32 or torch.float64; "
            f"got {shown}"
        )
    return dtype


def apply_task_vector(
    base: StateDict | nn.Module,
    vector: StateDict,
    scale: float,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """``base + scale * vector`` for every floating tensor, computed in float64 and rounded once
    to ``dtype`` (default: each tensor's dtype in the base).

    ``apply_task_vector(base, task_vector(base, finetuned), 1.0)`` gives back ``finetuned`` up to
    the rounding of the vector. Tensors absent from ``vector`` must be integer or bool and are
    copied.

    Args:
        base: the base model or its state dict.
        vector: a task vector, as :func:`task_vector` returns it (any floating dtype).
        scale: its multiplier: -1 to forget what the fine-tuning taught (negation), 1 to add it.
        dtype: the floating dtype of the result's floating tensors (float16, bfloat16, float32
            or float64); ``None`` keeps the base's.

    Returns:
        A new state dict, in the base's dtypes or ``dtype``.

    Example:
        >>> import torch
        >>> base, vector = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, -1.0])}
        >>> apply_task_vector(base, vector, scale=-1.0)  # forgetting: subtract the vector
        {'w': tensor([0.5000, 3.0000])}
    """
    base = _state(base, "base")
    scale = _checks.check_finite_number(scale, "scale")
    if dtype is not None:
        dtype = _check_float_dtype(dtype, "dtype")
    missing = sorted(n for n, t in base.items() if t.is_floating_point() and n not in vector)
    extra = sorted(set(vector) - set(base))
    if missing or extra:
        raise ValueError(
            f"vector must have a tensor for every floating tensor of base; missing {missing}, "
            f"unknown {extra}"
        )
    for name, delta in vector.items():
        if tuple(delta.shape) != tuple(base[name].shape):
            raise ValueError(
                f"vector[{name!r}] must have shape {tuple(base[name].shape)}; got {tuple(delta.shape)}"
            )
    check_ties({n: f for n, f in tied_names(base).items() if n in vector}, vector.__getitem__)
    return elementwise(
        base, lambda name, part, b: b + scale * _other(vector, name, part), out_dtype=dtype
    )


def negate_task_vector(
    base: StateDict | nn.Module,
    finetuned: StateDict | nn.Module,
    alpha: float,
    *,
    allow_dtype_mismatch: bool = False,
) -> dict[str, Tensor]:
    r"""The unlearned weights $\theta_c - \alpha(\theta_* - \theta_c)$, tensor by tensor.

    Never builds the difference dict: each result tensor is computed from the two inputs in
    float64 slices and rounded once to the base's dtype.

    Args:
        base: $\theta_c$, the model to clean (state dict or module).
        finetuned: $\theta_*$, that model fine-tuned further on the forget set.
        alpha: the step, finite (MUSE uses 5; 0 gives back ``base``).
        allow_dtype_mismatch: accept floating tensors whose dtypes differ (the result takes the
            base's dtype).

    Returns:
        A new state dict with the keys of ``base``.

    Raises:
        ValueError: keys or shapes differ (a vocabulary mismatch names ``resize_token_embeddings``),
            integer tensors differ, alpha or a result is not finite, or the task vector is all zero.
        TypeError: float dtypes differ without ``allow_dtype_mismatch``.

    Example:
        >>> import torch
        >>> base = {"w": torch.tensor([1.0, 2.0])}
        >>> negate_task_vector(base, {"w": torch.tensor([1.5, 2.0])}, alpha=2.0)["w"]
        tensor([0., 2.])
    """
    base, finetuned = _state(base, "base"), _state(finetuned, "finetuned")
    alpha = _checks.check_finite_number(alpha, "alpha")
    _check_compatible(base, finetuned, allow_dtype_mismatch=allow_dtype_mismatch)
    check_ties(tied_names(base), finetuned.__getitem__)
    if all(
        torch.equal(t, finetuned[n].to(t.dtype)) for n, t in base.items() if t.is_floating_point()
    ):
        raise ValueError("finetuned equals base: the task vector is all zero")
    return elementwise(base, lambda name, part, b: b - alpha * (_other(finetuned, name, part) - b))


def _state(model: StateDict | nn.Module, name: str) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    if not isinstance(model, Mapping):
        raise TypeError(f"{name} must be a state dict or an nn.Module; got {type(model).__name__}")
    for key, value in model.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor; got {type(value).__name__}")
    return dict(model)


class Header(NamedTuple):
    """A tensor's shape and dtype: all that the checks of two models need, read from a tensor in
    memory or from a checkpoint file's header without loading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor) -> Header:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * self.dtype.itemsize


def check_headers(
    base: Mapping[str, Header],
    finetuned: Mapping[str, Header],
    *,
    allow_dtype_mismatch: bool,
    differing_integers: tuple[str, ...] = (),
) -> None:
    """Report every mismatch between two models' (shape, dtype) headers at once.

    ``differing_integers`` names integer/bool tensors already known to differ in value.
    """
    problems = []
    only_base, only_finetuned = (
        sorted(set(base) - set(finetuned)),
        sorted(set(finetuned) - set(base)),
    )
    if only_base:
        problems.append(f"keys only in base: {only_base}")
    if only_finetuned:
        problems.append(f"keys only in finetuned: {only_finetuned}")
    dtype_problems = []
    for name in sorted(set(base) & set(finetuned)):
        (b_shape, b_dtype), (f_shape, f_dtype) = base[name], finetuned[name]
        if b_shape != f_shape:
            hint = (
                " (a vocabulary-size mismatch: call resize_token_embeddings on one model first)"
                if len(b_shape) >= 2 and b_shape[1:] == f_shape[1:]
                else ""
            )
            problems.append(
                f"{name!r} has shape {b_shape} in base and {f_shape} in finetuned{hint}"
            )
        elif b_dtype.is_floating_point != f_dtype.is_floating_point:
            problems.append(f"{name!r} is {b_dtype} in base and {f_dtype} in finetuned")
        elif name in differing_integers:
            problems.append(
                f"{name!r} is an integer/bool tensor that differs between base and finetuned"
            )
        elif b_dtype != f_dtype and not allow_dtype_mismatch:
            dtype_problems.append(f"{name!r} is {b_dtype} in base and {f_dtype} in finetuned")
    if problems:
        raise ValueError("base and finetuned do not match: " + "; ".join(problems))
    if dtype_problems:
        raise TypeError(
            "base and finetuned float dtypes differ (pass allow_dtype_mismatch=True to accept): "
            + "; ".join(dtype_problems)
        )


def _check_compatible(
    base: dict[str, Tensor], finetuned: dict[str, Tensor], *, allow_dtype_mismatch: bool
) -> None:
    def headers(state: dict[str, Tensor]) -> dict[str, Header]:
        return {name: Header.of(t) for name, t in state.items()}

    differing = tuple(
        name
        for name, b in base.items()
        if name in finetuned
        and not b.is_floating_point()
        and b.shape == finetuned[name].shape
        and not torch.equal(b, finetuned[name])
    )
    check_headers(
        headers(base),
        headers(finetuned),
        allow_dtype_mismatch=allow_dtype_mismatch,
        differing_integers=differing,
    )


Formula = Callable[[str, slice, Tensor], Tensor]


def _other(state: Mapping[str, Tensor], name: str, part: slice) -> Tensor:
    """Elements ``part`` of the flattened ``state[name]``, in float64."""
    return state[name].reshape(-1)[part].double()


def combine_tensor(
    name: str,
    tensor: Tensor,
    formula: Callable[[slice, Tensor], Tensor],
    out_dtype: torch.dtype | None = None,
    *,
    compute_dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """``formula(part, tensor_part)`` over slices of the flattened ``tensor``, the part in
    ``compute_dtype`` (``None``: the tensor's own dtype, for arithmetic that rounds after each
    operation), rounded once to ``out_dtype`` (default: the tensor's dtype).

    Raises:
        ValueError: a result is NaN, infinite or beyond the range of ``out_dtype`` (named).
    """
    out_dtype = out_dtype or tensor.dtype
    out = torch.empty(tensor.shape, dtype=out_dtype, device=tensor.device)
    flat_in, flat_out = tensor.reshape(-1), out.view(-1)
    limit = torch.finfo(out_dtype).max
    for start in range(0, flat_in.numel(), SLICE_ELEMENTS):
        part = slice(start, min(start + SLICE_ELEMENTS, flat_in.numel()))
        values = formula(part, flat_in[part].to(compute_dtype or tensor.dtype))
        if not bool((values.abs() <= limit).all()):  # also false for NaN and inf
            raise ValueError(
                f"the result for {name!r} is not finite in {out_dtype} (overflow or non-finite "
                "weights)"
            )
        flat_out[part] = values
    return out


def tied_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Each tensor that is the same view of the same storage as an earlier one (tied weights),
    mapped to that earlier name."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, tensor in state.items():
        key = storage_key(tensor)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def check_ties(tied: Mapping[str, str], other: Callable[[str], Tensor]) -> None:
    """Tensors tied in the base are computed once: the other model must hold equal values under
    both names, or one of its values would be silently dropped."""
    for name, first in tied.items():
        if not torch.equal(other(name), other(first)):
            raise ValueError(
                f"{first!r} and {name!r} are tied (one storage) in base but differ in the other "
                "model: tie them there too, or untie them in base (clone one) first"
            )


def storage_key(tensor: Tensor) -> tuple:
    """Equal for tensors that are the same view of the same storage (tied weights)."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def elementwise(
    base: dict[str, Tensor],
    formula: Formula,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
) -> dict[str, Tensor]:
    """Apply ``formula`` to every floating tensor (see :func:`combine_tensor`); copy the others.
    Shared storage is computed once and stays shared."""
    result: dict[str, Tensor] = {}
    computed: dict[tuple, Tensor] = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            result[name] = tensor.clone()
            continue
        key = storage_key(tensor)
        if key not in computed:
            computed[key] = combine_tensor(
                name,
                tensor,
                functools.partial(formula, name),
                out_dtype,
                compute_dtype=compute_dtype,
            )
        result[name] = computed[key]
    return result


__all__ = ["apply_task_vector", "negate_task_vector", "task_vector"]
