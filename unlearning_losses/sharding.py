"""How a loss's inputs are spread over ranks, and the collectives its reductions need.

A :class:`Sharding` names up to three process groups:

- the **vocabulary** (tensor parallel): each rank holds a contiguous slice of the columns;
- the **batch** (data parallel): each rank holds whole sequences;
- the **sequence** (context parallel): each rank holds a slice of every sequence's positions.

It comes from explicit ``vocab_group=`` / ``sequence_group=`` arguments, or from the placements of
DTensor inputs. The reductions use it so that every rank returns the value of the whole batch
while the gradient each rank gets is that of its own piece: sums and counts cross the batch and
sequence groups through ``all_reduce`` whose backward is the identity (every rank computes the
same function of the same reduced values, so the local gradient is already the global one).
Only collectives communicate; nothing waits on the host (docs/conventions.md §7).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor, without importing ``torch.distributed.tensor``: if that
    module was never imported, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def check_group(group: object, name: str) -> Any:
    """``None`` or a ``torch.distributed`` process group."""
    if group is None:
        return None
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"{name} must be a torch.distributed ProcessGroup (e.g. mesh.get_group(...)) or None; "
            f"got {type(group).__name__}"
        )
    return group


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns ``[offset, offset + local size)`` of a vocabulary of ``size``.

    From explicit groups on an accelerator both are 0-d tensors on the logits' device (the ranks'
    widths arrive through a collective; reading them on the host would wait for it).
    """

    group: Any
    offset: int | Tensor
    size: int | Tensor
    #: The widest rank's number of columns: work chunked by rows is sized by it, so that every
    #: rank takes the same chunks and the collectives inside each chunk pair up.
    widest: int | Tensor


@dataclass(frozen=True)
class Sharding:
    """The groups over which a loss's inputs are split; all ``None`` for one process.

    ``mesh``, ``placements`` and ``logits_dim`` describe DTensor logits (``None`` for plain
    tensors): other DTensor inputs must match them, and per-token outputs return as DTensors.
    """

    vocab: VocabShard | None = None
    batch_group: Any = None
    sequence_group: Any = None
    mesh: Any = None
    placements: tuple | None = None
    logits_dim: int = 3

    @property
    def token_groups(self) -> tuple:
        """The groups over which the valid tokens of the batch are split."""
        return tuple(g for g in (self.batch_group, self.sequence_group) if g is not None)

    def sum_over_tokens(self, value: Tensor) -> Tensor:
        """A sum over this rank's tokens made the sum over every rank's."""
        return reduced_sum(value, self.token_groups)

    def sum_over_sequences(self, value: Tensor) -> Tensor:
        """A sum over this rank's sequences (already whole) made the sum over the batch."""
        return reduced_sum(value, (self.batch_group,) if self.batch_group is not None else ())

    def sequence_parts(self, value: Tensor) -> Tensor:
        """Per-sequence partial sums ``(B,)`` made whole over the sequence group."""
        groups = (self.sequence_group,) if self.sequence_group is not None else ()
        return reduced_sum(value, groups)


LOCAL = Sharding()


def reduced_sum(value: Tensor, groups: tuple) -> Tensor:
    """``value`` summed over ``groups``; the backward passes the gradient through unchanged."""
    if not groups:
        return value
    total = value.detach().clone()
    for group in groups:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if not value.requires_grad:
        return total
    return value + (total - value.detach())


def from_groups(logits: Tensor, vocab_group: Any, sequence_group: Any) -> Sharding:
    """The sharding given by explicit groups: the ranks of ``vocab_group`` hold contiguous slices
    of the vocabulary in rank order, of any widths (see :func:`group_vocab_shard`)."""
    vocab_group = check_group(vocab_group, "vocab_group")
    sequence_group = check_group(sequence_group, "sequence_group")
    vocab = None
    if vocab_group is not None:
        vocab = group_vocab_shard(logits.shape[-1], logits.device, vocab_group)
    return Sharding(vocab=vocab, sequence_group=sequence_group)


def group_vocab_shard(width: int, device: torch.device, group: Any) -> VocabShard:
    """This rank's slice, ``width`` columns, of a vocabulary split over ``group``: the ranks'
    widths are summed into their slots of one vector with a single ``all_reduce`` on ``device``,
    so slices may differ in width (V = 11 over 2 ranks is 6 + 5; a rank may hold none) and each
    offset is the lower ranks' total."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    widths = torch.zeros(world, dtype=torch.int64, device=device)
    widths[rank] = width
    dist.all_reduce(widths, op=dist.ReduceOp.SUM, group=group)
    offset, size, widest = widths[:rank].sum(), widths.sum(), widths.max()
    if device.type == "cpu":  # no device to wait for: plain integers
        return VocabShard(group, int(offset), int(size), int(widest))
    return VocabShard(group, offset, size, widest)


def check_same_on_group(hidden: Tensor, targets: Tensor, group: Any, name: str) -> None:
    """Refuse hidden states or targets that differ between the ranks of a vocabulary group.

    A head split over a group multiplies the same tokens on every rank; ranks holding different
    batches (a data-parallel group, such as the mesh of a head FSDP2 leaves sharded between
    forwards, which looks like a tensor-parallel ``Shard(0)``) would join unrelated rows into one
    softmax, silently. One ``all_reduce`` of a few sums tells them apart; on an accelerator the
    comparison is a device-side assertion, so nothing waits on the host.
    """
    finite = torch.nan_to_num(hidden.detach(), nan=0.0, posinf=0.0, neginf=0.0).double()
    summary = torch.stack(
        [
            torch.tensor(float(hidden.numel()), dtype=torch.float64, device=hidden.device),
            finite.sum(),
            finite.square().sum(),
            targets.double().sum(),
        ]
    )
    extremes = torch.cat([summary, -summary])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    agree = (extremes[:4] == -extremes[4:]).all()
    message = (
        f"{name} and labels differ between the ranks of the head's vocabulary group: a head "
        "split by rows needs the same tokens on every rank of its group. A head that FSDP2 "
        "keeps sharded between forwards is split over the data-parallel ranks instead: compute "
        "the loss inside the model's forward (unlearning_losses.fsdp.root_forward), where FSDP2 "
        "has gathered it"
    )
    if hidden.device.type == "cpu":
        if not agree:
            raise ValueError(message)
    else:
        torch._assert_async(agree, message)


def from_dtensor(logits: Any, name: str, *, vocab_parallel: bool = True) -> Sharding:
    """Map the placements of DTensor ``logits`` ``(B, T, V)`` or ``(N, V)`` to groups.

    ``Shard`` of the last dimension is the vocabulary, of the first of a 3-D tensor the batch, of
    the time dimension (the first of a 2-D tensor, one sequence) the sequence; ``Replicate`` is
    local. Anything else (``Partial``, strided shards, two mesh dimensions on one role) is refused.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = logits.device_mesh, tuple(logits.placements)
    last = logits.dim() - 1
    roles: dict[str, int] = {}
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise ValueError(
                f"{name} has placement {placement} on mesh dimension {mesh_dim}; the losses take "
                "Shard or Replicate placements (reduce Partial values first, e.g. with "
                ".redistribute(placements=[Replicate()]))"
            )
        dim = placement.dim % logits.dim()
        role = "vocab" if dim == last else "batch" if logits.dim() == 3 and dim == 0 else "sequence"
        if role in roles:
            raise ValueError(
                f"{name} is sharded on its {role} dimension over mesh dimensions {roles[role]} and "
                f"{mesh_dim} (placements {placements}); the losses map one mesh dimension per role: "
                "flatten those mesh dimensions into one first"
            )
        roles[role] = mesh_dim
    if "vocab" in roles and not vocab_parallel:
        raise ValueError(
            f"{name} is sharded on its last dimension (placements {placements}); this loss has "
            "no path for that: redistribute it to Replicate() on that mesh dimension"
        )
    vocab = None
    if "vocab" in roles:
        mesh_dim = roles["vocab"]
        size, parts = logits.shape[-1], mesh.size(mesh_dim)
        step = -(-size // parts)  # DTensor's Shard splits as torch.chunk does
        offset = min(mesh.get_local_rank(mesh_dim) * step, size)
        vocab = VocabShard(mesh.get_group(mesh_dim), offset, size, min(step, size))
    return Sharding(
        vocab=vocab,
        batch_group=mesh.get_group(roles["batch"]) if "batch" in roles else None,
        sequence_group=mesh.get_group(roles["sequence"]) if "sequence" in roles else None,
        mesh=mesh,
        placements=placements,
        logits_dim=logits.dim(),
    )


def head_shards(weight: Any, name: str) -> int | None:
    """The mesh dimension over which DTensor ``weight`` ``(V, H)`` is split by vocabulary rows
    (``Shard(0)`` there, ``Replicate`` elsewhere: a tensor-parallel head); None when it is whole
    on every rank. Any other placement is refused with what to do."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    placements = tuple(weight.placements)
    rows = [dim for dim, p in enumerate(placements) if not p.is_replicate()]
    if not rows:
        return None
    if len(rows) == 1 and type(placements[rows[0]]) is Shard and placements[rows[0]].dim == 0:
        return rows[0]
    raise ValueError(
        f"{name} is a DTensor with placements {placements}; the fused-linear losses take a whole "
        "head or one split by vocabulary rows (Shard(0) on one mesh dimension, Replicate on the "
        "others). A head that FSDP2 keeps sharded between forwards: compute the loss inside "
        "the model's forward (unlearning_losses.fsdp.root_forward), where FSDP2 has gathered it"
    )


def output_placements(sharding: Sharding, dims: int) -> tuple:
    """The placements of a tensor of the logits' first ``dims`` dimensions (labels, reference
    log-probs, per-token or per-sequence outputs): the logits' shards of those dimensions, and
    Replicate where the logits are sharded on a dimension it lacks (the vocabulary; the time
    dimension of per-sequence values, equal on every rank of the sequence group)."""
    from torch.distributed.tensor import Replicate, Shard

    assert sharding.placements is not None
    out: list[Any] = []
    for placement in sharding.placements:
        if isinstance(placement, Shard) and placement.dim % sharding.logits_dim < dims:
            out.append(Shard(placement.dim % sharding.logits_dim))
        else:
            out.append(Replicate())
    return tuple(out)


def local_like(value: Any, sharding: Sharding, name: str, *, per_token: bool) -> Any:
    """The local piece of ``value``: a DTensor must sit on the logits' mesh with the placements
    that match them (the logits' own, or :func:`output_placements` for ``per_token`` inputs);
    a plain tensor is taken as this rank's piece already. Shapes are checked by the caller."""
    if not is_dtensor(value):
        return value
    if sharding.placements is None:
        raise ValueError(
            f"{name} is a DTensor but the logits are a plain tensor; pass both as DTensors, or "
            f"{name}.to_local() with the groups as arguments"
        )
    expected = output_placements(sharding, value.dim()) if per_token else sharding.placements
    if value.device_mesh != sharding.mesh or tuple(value.placements) != expected:
        raise ValueError(
            f"{name} must be a DTensor on the logits' mesh with placements {expected}; got "
            f"placements {tuple(value.placements)} on mesh {value.device_mesh}"
        )
    return value.to_local()


def as_output(value: Tensor, sharding: Sharding, global_shape: tuple[int, ...]) -> Any:
    """Per-token (or per-sequence) outputs of DTensor logits as DTensors of ``global_shape``;
    anything else unchanged."""
    if sharding.placements is None or value.dim() == 0:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value,
        sharding.mesh,
        output_placements(sharding, value.dim()),
        run_check=False,
        shape=torch.Size(global_shape),
        stride=torch.empty(global_shape, device="meta").stride(),
    )
