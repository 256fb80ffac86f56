"""RMU: unlearning in activation space, by steering one layer's hidden states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .._doc import shared_arguments
from ..ops.numerics import accumulation_dtype
from ..reductions import sequence_sums, token_reduce
from ..sharding import is_dtensor


def rmu_control_vector(
    hidden_size: int,
    *,
    steering_coeff: float = 6.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""RMU's fixed random direction $c\,u/\lVert u \rVert$, ``u`` uniform in ``[0, 1)^H``.

    Draw it once per unlearning run (pass a seeded ``generator`` to reproduce it) and reuse it for
    every step. ``steering_coeff`` $c$ is 6.5 in the WMDP paper's Zephyr-7B run;
    open-unlearning's config uses 300 for its models: it must be large relative to the layer's
    activation norms.

    Args:
        hidden_size: the layer's width ``H``.
        steering_coeff: the vector's norm $c$.
        generator: the random generator to draw from (seed it to reproduce the vector).
        device: where to create it.
        dtype: its dtype.

    Returns:
        A ``(H,)`` tensor ``c u`` with ``u`` uniform in ``[0, 1)`` per coordinate, normalized.

    Example:
        >>> import torch
        >>> vector = rmu_control_vector(16, steering_coeff=6.5, generator=torch.Generator().manual_seed(0))
        >>> vector.shape, round(vector.norm().item(), 4)
        (torch.Size([16]), 6.5)
    """
    hidden_size = _checks.check_int(hidden_size, "hidden_size")
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1; got {hidden_size}")
    coeff = _checks.check_finite_number(steering_coeff, "steering_coeff", positive=True)
    direction = torch.rand(hidden_size, generator=generator, dtype=torch.float64)
    return (direction / direction.norm() * coeff).to(device=device, dtype=dtype)


def _check_activations(hidden: object, name: str, like: Tensor | None = None) -> Tensor:
    hidden = _checks.check_hidden(hidden, name)
    if like is not None:
        _checks.check_like(hidden, like, name, "retain_hidden")
    return hidden


def _positions(hidden: Tensor, labels: object, name: str, ignore_index: int) -> Tensor:
    """The positions that count: every one without labels, else ``labels != ignore_index``."""
    if labels is None:
        if is_dtensor(hidden):
            return _every_position(hidden)
        return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    labels = _checks.check_labels(labels, hidden, name, ref_name=name.replace("labels", "hidden"))
    return labels != ignore_index


def _every_position(hidden: Any) -> Any:
    """A mask of every position of DTensor activations, placed as they are but for the hidden
    dimension (replicated there)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    last = hidden.dim() - 1
    placements = [
        Replicate() if isinstance(p, Shard) and p.dim % hidden.dim() == last else p
        for p in hidden.placements
    ]
    local = hidden.to_local()
    shape = hidden.shape[:-1]
    return DTensor.from_local(
        torch.ones(local.shape[:-1], dtype=torch.bool, device=local.device),
        hidden.device_mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def _on_the_activations_mesh(control_vector: Any, *others: Any) -> Tensor:
    """With DTensor activations every input must be a DTensor on their mesh (labels included,
    with the activations' placements); the control vector, the same on every rank, may be a plain
    tensor and is then replicated. Plain activations take plain tensors only."""
    names = (
        "forget_hidden",
        "retain_hidden",
        "ref_retain_hidden",
        "forget_labels",
        "retain_labels",
    )
    meshes = {
        name: value.device_mesh
        for name, value in zip(names, others, strict=True)
        if is_dtensor(value)
    }
    if not meshes:
        if is_dtensor(control_vector):
            raise ValueError(
                "control_vector is a DTensor but the activations are plain tensors; pass "
                "control_vector.full_tensor()"
            )
        return control_vector
    plain = [name for name, value in zip(names, others, strict=True) if not is_dtensor(value)]
    if plain or len(set(meshes.values())) > 1:
        raise ValueError(
            f"{', '.join(plain) or 'the inputs'} must be DTensors on one mesh with the other "
            f"activations (got DTensors for {', '.join(meshes)}): pass every activation and "
            "label tensor as a DTensor, or every one as this rank's plain tensor"
        )
    from torch.distributed.tensor import DTensor, Replicate

    mesh = next(iter(meshes.values()))
    if is_dtensor(control_vector):
        return control_vector.redistribute(mesh, [Replicate()] * mesh.ndim)
    return DTensor.from_local(control_vector, mesh, [Replicate()] * mesh.ndim, run_check=False)


def checked_rmu_inputs(
    forget_hidden: object,
    retain_hidden: object,
    ref_retain_hidden: object,
    control_vector: object,
    forget_labels: object,
    retain_labels: object,
    ignore_index: object,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validated activations and control vector, and the forget and retain position masks."""
    forget_hidden = _check_activations(forget_hidden, "forget_hidden")
    retain_hidden = _check_activations(retain_hidden, "retain_hidden")
    ref_retain_hidden = _check_activations(ref_retain_hidden, "ref_retain_hidden", retain_hidden)
    control_vector = _checks.check_tensor(control_vector, "control_vector")
    if not control_vector.is_floating_point():
        raise TypeError(f"control_vector must be a floating tensor; got {control_vector.dtype}")
    if tuple(control_vector.shape) != (forget_hidden.shape[-1],):
        raise ValueError(
            f"control_vector must have shape ({forget_hidden.shape[-1]},) to match forget_hidden "
            f"{tuple(forget_hidden.shape)}; got {tuple(control_vector.shape)}"
        )
    if retain_hidden.shape[-1] != forget_hidden.shape[-1]:
        raise ValueError(
            f"retain_hidden must have hidden size {forget_hidden.shape[-1]} to match "
            f"forget_hidden; got {tuple(retain_hidden.shape)}"
        )
    _checks.check_same_device(control_vector, forget_hidden, "control_vector", "forget_hidden")
    ignore_index = _checks.check_int(ignore_index, "ignore_index")
    forget_valid = _positions(forget_hidden, forget_labels, "forget_labels", ignore_index)
    retain_valid = _positions(retain_hidden, retain_labels, "retain_labels", ignore_index)
    control_vector = _on_the_activations_mesh(
        control_vector, forget_hidden, retain_hidden, ref_retain_hidden, forget_valid, retain_valid
    )
    return (
        forget_hidden,
        retain_hidden,
        ref_retain_hidden,
        control_vector,
        forget_valid,
        retain_valid,
    )


def activation_distance(
    hidden: Tensor,
    target: Tensor,
    valid: Tensor,
    count: int | Tensor | None = None,
    *,
    per_sequence: bool = False,
) -> Tensor:
    """Mean over valid positions of ``mean_H (hidden - target)^2`` (float32 accumulation; the
    target is a constant), or the mean over sequences of their own position means."""
    acc = accumulation_dtype(hidden.dtype)
    per_position = (hidden.to(acc) - target.detach().to(acc)).square().mean(-1)
    if not per_sequence:
        return token_reduce(per_position, valid, "mean", count)
    sums, counts = sequence_sums(per_position, valid)
    return (sums / counts.clamp(min=1)).mean()


@shared_arguments
def rmu_loss(
    forget_hidden: Tensor,
    retain_hidden: Tensor,
    ref_retain_hidden: Tensor,
    control_vector: Tensor,
    *,
    forget_labels: Tensor | None = None,
    retain_labels: Tensor | None = None,
    alpha: float = 1200.0,
    ignore_index: int = -100,
    num_forget_items: int | Tensor | None = None,
    num_retain_items: int | Tensor | None = None,
) -> Tensor:
    r"""RMU (Representation Misdirection for Unlearning) loss, to minimize.

    With $h_t$ the chosen layer's hidden state at forget position *t*, $h'_s$ at retain
    position *s*, $h^{ref}_s$ the frozen model's at the same layer, and $c\,u$ the
    control vector (:func:`rmu_control_vector`),

    $$
    \mathcal{L}_{RMU} = \frac{1}{|M_f|}\sum_{t\in M_f} \frac{1}{H}\lVert h_t - c\,u\rVert^2
    + \alpha\,\frac{1}{|M_r|}\sum_{s\in M_r} \frac{1}{H}\lVert h'_s - h^{ref}_s\rVert^2
    $$

    (Li et al., 2024, "The WMDP Benchmark", whose Zephyr-7B run uses α = 1200, c = 6.5 at layer
    7). The forget term scrambles the layer's representation of the forget text; the retain term
    keeps it where the frozen model had it. Positions are counted, not padded: the mean runs over
    valid positions only (the original code averages over every position, padding included).

    Args:
        forget_hidden: ``(B, T, H)`` or ``(N, H)`` activations of the trained model on the forget
            batch (e.g. from a forward hook on the layer's output).
        retain_hidden: the trained model's activations on the retain batch.
        ref_retain_hidden: the frozen model's, same shape, dtype and device (a constant).
        control_vector: ``(H,)`` (a constant).
        forget_labels: ``(B, T)`` or ``(N,)``; positions equal to ``ignore_index`` do not count. No
            shift: activation *t* belongs to token *t*. ``None`` counts every position.
        retain_labels: ``(B, T)`` or ``(N,)``; positions equal to ``ignore_index`` do not count. No
            shift: activation *t* belongs to token *t*. ``None`` counts every position.
        alpha: weight of the retain term, finite.
        ignore_index: {ignore_index}
        num_forget_items: global counts of valid positions (data parallel), as
            ``num_items_in_batch`` elsewhere.
        num_retain_items: global counts of valid positions (data parallel), as
            ``num_items_in_batch`` elsewhere.

    Returns:
        A float32 scalar (float64 for float64 activations); an empty side contributes 0.

    Example:
        >>> import torch
        >>> forget, retain = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
        >>> control = torch.tensor([3.0, 4.0])  # forget: mean over H of (0 - c)^2 = (9 + 16) / 2
        >>> rmu_loss(forget, retain, retain, control)  # the retain side matches its reference
        tensor(12.5000)
    """
    forget_hidden, retain_hidden, ref_retain_hidden, control_vector, forget_valid, retain_valid = (
        checked_rmu_inputs(
            forget_hidden,
            retain_hidden,
            ref_retain_hidden,
            control_vector,
            forget_labels,
            retain_labels,
            ignore_index,
        )
    )
    alpha = _checks.check_finite_number(alpha, "alpha")
    forget_count = _checks.check_num_items(num_forget_items, forget_hidden, "num_forget_items")
    retain_count = _checks.check_num_items(num_retain_items, retain_hidden, "num_retain_items")
    forget = activation_distance(forget_hidden, control_vector, forget_valid, forget_count)
    retain = activation_distance(retain_hidden, ref_retain_hidden, retain_valid, retain_count)
    loss = forget + alpha * retain
    # DTensor activations reduce through DTensor's own ops; the loss is the same on every rank.
    return loss.full_tensor() if is_dtensor(loss) else loss  # type: ignore[attr-defined]
