"""The losses straight from hidden states and the output head: the logits are never materialised.

Each function takes ``hidden (B, T, H)`` or ``(N, H)``, the head ``weight (V, H)`` and an optional
``bias (V,)`` where its logits version takes ``logits = hidden @ weight.T + bias``, with the same
semantics, options and errors. Work proceeds in chunks of rows whose float32 logits take at most
128 MiB (or ``chunk_rows`` rows): computed, reduced and dropped. Scalar token means form their
gradients in that same pass; per-token and sequence-level results recompute each chunk in the
backward, unless the head is frozen. For a 128k vocabulary that turns gigabytes of logits (and
their float32 softmax) into one chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _tokens, sharding
from .._doc import shared_arguments
from ..ops.linear import LinearKLSum, LinearLogprobs, LinearTokenKL, LinearTokenSum
from ..ops.linear_parallel import vocab_parallel_kl, vocab_parallel_logprobs
from ..ops.logit_map import LogitMap
from ..ops.numerics import PairMode
from ..reductions import REDUCTIONS, Reduction, token_reduce
from .common import cached_or_computed_reference
from .kl import DIRECTIONS, Direction
from .npo import GRANULARITIES, Granularity, check_npo_count, npo_from_logprobs
from .simnpo import simnpo_from_logprobs


def _head(weight, bias, hidden, vocab_group=None, names=("weight", "bias")):
    """The head as this rank's tensors, checked against ``hidden`` (local or a DTensor), and the
    group over which its rows (the vocabulary) are split: ``vocab_group``, or the mesh dimension
    of a DTensor ``Shard(0)`` weight; None for a whole head."""
    vocab_group = sharding.check_group(vocab_group, "vocab_group")
    mesh_dim = sharding.head_shards(weight, names[0])
    if mesh_dim is not None:
        if vocab_group is not None:
            raise ValueError(
                f"{names[0]} is a DTensor, whose placements give its group; pass vocab_group "
                "only with a plain tensor holding this rank's rows of the head"
            )
        vocab_group = weight.device_mesh.get_group(mesh_dim)
        weight, bias = _local_rows(weight, bias, names)
    elif sharding.is_dtensor(weight):  # replicated on every mesh dimension
        weight, bias = _local_rows(weight, bias, names)
    weight, bias = _checks.check_head(
        weight, bias, hidden, *names, rows_of_group=vocab_group is not None
    )
    return weight, bias, vocab_group


def _local_rows(weight, bias, names):
    """This rank's rows of a DTensor head; its bias must be placed as the weight's rows are."""
    if sharding.is_dtensor(bias):
        expected = tuple(p if p.is_replicate() else type(p)(0) for p in weight.placements)
        if bias.device_mesh != weight.device_mesh or tuple(bias.placements) != expected:
            raise ValueError(
                f"{names[1]} must be a DTensor on {names[0]}'s mesh with placements {expected}; "
                f"got {tuple(bias.placements)}"
            )
        bias = bias.to_local()
    elif bias is not None:
        raise ValueError(f"{names[1]} must be a DTensor like {names[0]}; got a plain tensor")
    return weight.to_local(), bias


def _align(hidden, head, labels, ignore_index, shift, validate, chunk_rows, scale, softcap):
    """Checked inputs: the tokens, the head (this rank's rows of it under tensor parallelism),
    what the model does to its logits, and the vocabulary shard (None for a whole head)."""
    hidden = _checks.check_hidden(hidden, "hidden")
    weight, bias, vocab_group = _head(head[0], head[1], hidden, head[2])
    vocab = None
    if vocab_group is not None:
        vocab = sharding.group_vocab_shard(weight.shape[0], weight.device, vocab_group)
    tokens = _tokens.align(
        hidden,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend="torch",
        validate=validate,
        name="hidden",
        vocab_size=weight.shape[0] if vocab is None else vocab.size,
        vocab_parallel=False,
        hidden=True,
    )
    _check_chunk_rows(chunk_rows)
    if vocab is not None:
        sharding.check_same_on_group(tokens.hidden, tokens.targets, vocab.group, "hidden")
    return tokens, weight, bias, _logit_map(scale, softcap), vocab


def _logit_map(scale: object, softcap: object) -> LogitMap:
    """What the model does to its head's output, checked: a positive finite scale and cap."""
    scale = _checks.check_finite_number(scale, "logit_scale", positive=True)
    if softcap is not None:
        softcap = _checks.check_finite_number(softcap, "logit_softcap", positive=True)
    return LogitMap(scale, softcap)


def _check_chunk_rows(chunk_rows: object) -> None:
    if chunk_rows is not None and (_checks.check_int(chunk_rows, "chunk_rows") < 1):
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")


def _logprobs(hidden, tokens, weight, bias, chunk_rows, logit_map, vocab) -> Tensor:
    """Per-token log-probs of ``tokens``' targets from ``hidden`` (the model's or the
    reference's), through the whole head or this rank's rows of it (``vocab``)."""
    if vocab is not None:
        head = (weight, bias)
        return vocab_parallel_logprobs(
            hidden, head, tokens.targets, tokens.valid, vocab, logit_map, chunk_rows
        )
    return LinearLogprobs.apply(
        hidden,
        weight,
        bias,
        tokens.targets,
        tokens.valid,
        chunk_rows,
        logit_map,
        torch.is_grad_enabled(),
    )


def _scalar_scale(tokens, reduction: str, num_items) -> Tensor:
    """Each valid token's weight in a scalar reduction: 1 for ``sum``, 1 / count for ``mean``."""
    device = tokens.hidden.device
    if reduction == "sum":
        return torch.ones((), dtype=torch.float64, device=device)
    if num_items is None:
        count = tokens.sharding.sum_over_tokens(tokens.valid.sum())
    else:
        count = torch.as_tensor(num_items, device=device)
    return 1.0 / count.clamp(min=1).to(torch.float64)


@shared_arguments
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    r""":func:`~unlearning_losses.token_logprobs` of ``hidden @ weight.T + bias``, chunk by chunk.

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        ignore_index: {ignore_index}
        shift: {shift}
        validate: {validate}

    Returns:
        float32 per-token log-probs, differentiable in ``hidden``, ``weight`` and ``bias`` (weight
        and bias gradients accumulated in float32; a head with ``requires_grad=False`` is skipped).

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> linear_token_logprobs(hidden, head, labels)
        tensor([[-1.3863, -1.3863]])
    """
    tokens, weight, bias, logit_map, vocab = _align(
        hidden,
        (weight, bias, vocab_group),
        labels,
        ignore_index,
        shift,
        validate,
        chunk_rows,
        logit_scale,
        logit_softcap,
    )
    return tokens.unflatten(
        _logprobs(tokens.hidden, tokens, weight, bias, chunk_rows, logit_map, vocab)
    )


@shared_arguments
def linear_ga_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """:func:`~unlearning_losses.ga_loss` of ``hidden @ weight.T + bias``, the logits never
    materialised; the gradient is formed in the forward pass.

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        A float32 scalar (float64 for a float64 head), or per-token values for ``"none"``;
        differentiable in ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> linear_ga_loss(hidden, head, labels), math.log(1 / 4)
        (tensor(-1.3863), -1.3862943611198906)
    """
    tokens, weight, bias, logit_map, vocab = _align(
        hidden,
        (weight, bias, vocab_group),
        labels,
        ignore_index,
        shift,
        validate,
        chunk_rows,
        logit_scale,
        logit_softcap,
    )
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.hidden, reduction)
    if reduction == "none" or vocab is not None:
        logprobs = _logprobs(tokens.hidden, tokens, weight, bias, chunk_rows, logit_map, vocab)
        reduced = token_reduce(logprobs, tokens.valid, reduction, num_items, tokens.sharding)
        return tokens.unflatten(reduced)
    # A scalar: every token's coefficient is known now, so the gradient is formed in this pass.
    scale = _scalar_scale(tokens, reduction, num_items)
    total = LinearTokenSum.apply(
        tokens.hidden,
        weight,
        bias,
        tokens.targets,
        tokens.valid,
        scale,
        chunk_rows,
        logit_map,
        torch.is_grad_enabled(),
    )
    return tokens.sharding.sum_over_tokens(total)


@shared_arguments
def linear_nll_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """:func:`~unlearning_losses.nll_loss` of ``hidden @ weight.T + bias``, the negative of
    :func:`linear_ga_loss`.

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        A float32 scalar (float64 for a float64 head), or per-token values for ``"none"``;
        differentiable in ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> linear_nll_loss(hidden, head, labels), math.log(4)
        (tensor(1.3863), 1.3862943611198906)
    """
    return -linear_ga_loss(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        chunk_rows=chunk_rows,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        vocab_group=vocab_group,
        validate=validate,
    )


@shared_arguments
def linear_npo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    beta: float = 0.1,
    granularity: Granularity = "sequence",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    num_sequences: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """:func:`~unlearning_losses.npo_loss` of ``hidden @ weight.T + bias``.

    The reference is ``ref_logprobs`` (per token, as ``token_logprobs`` returns them) or the
    reference model's ``ref_hidden`` with its head ``ref_weight`` (default: ``weight``, for a
    frozen shared head) and ``ref_bias``; give exactly one of ``ref_logprobs`` / ``ref_hidden``.
    The per-token log-probs are gathered first; autograd then hands each token its closed-form NPO
    coefficient, and the backward forms the gradient chunk by chunk.

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        ref_logprobs: the reference's per-token log-probs (one of the two references).
        ref_hidden: the reference model's hidden states, shaped like ``hidden`` (the other).
        ref_weight: the reference's head (default: ``weight``).
        ref_bias: the reference's optional bias (default: ``bias`` when ``ref_weight`` is
            omitted: a shared head shares its bias).
        beta: inverse temperature, > 0.
        granularity: where the log-ratio is taken, as in :func:`~unlearning_losses.npo_loss`.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in :func:`~unlearning_losses.npo_loss`.
        num_items_in_batch: the global count of valid tokens, for ``"token"`` granularity.
        num_sequences: the global count of sequences with a valid token, for the sequence
            granularities.
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        As :func:`~unlearning_losses.npo_loss`; differentiable in ``hidden``, ``weight`` and
        ``bias``.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> reference = torch.full((1, 2), math.log(1 / 4))  # cached: the model equals its reference
        >>> linear_npo_loss(hidden, head, labels, ref_logprobs=reference), 2 / 0.1 * math.log(2)
        (tensor(13.8629), 13.862943611198906)
    """
    tokens, weight, bias, logit_map, vocab = _align(
        hidden,
        (weight, bias, vocab_group),
        labels,
        ignore_index,
        shift,
        validate,
        chunk_rows,
        logit_scale,
        logit_softcap,
    )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    _checks.check_choice(granularity, GRANULARITIES, "granularity")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = check_npo_count(num_items_in_batch, num_sequences, granularity, reduction, tokens)

    def from_hidden(ref_hidden: Tensor) -> Tensor:
        ref_tokens, ref_w, ref_b = _reference(
            weight, bias, ref_hidden, ref_weight, ref_bias, tokens, vocab
        )
        return _logprobs(ref_tokens, tokens, ref_w, ref_b, chunk_rows, logit_map, vocab)

    names = ("ref_logprobs", "ref_hidden")
    ref = cached_or_computed_reference(tokens, ref_logprobs, ref_hidden, from_hidden, names)
    logprobs = _logprobs(tokens.hidden, tokens, weight, bias, chunk_rows, logit_map, vocab)
    result = npo_from_logprobs(
        logprobs, ref, tokens.valid, beta, granularity, reduction, count, tokens.sharding
    )
    return tokens.unflatten(result) if granularity == "token" else tokens.per_sequence(result)


@shared_arguments
def linear_simnpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    beta: float = 4.5,
    delta: float = 0.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_sequences: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """:func:`~unlearning_losses.simnpo_loss` of ``hidden @ weight.T + bias``.

    Args:
        hidden: {hidden}
        weight: {weight}
        labels: {labels}
        bias: {bias}
        beta: inverse temperature, > 0.
        delta: the margin subtracted from each sequence's mean NLL.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: ``"mean"`` over sequences with a valid token, ``"sum"``, or ``"none"``.
        num_sequences: the global count of sequences with a valid token (data parallel).
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        As :func:`~unlearning_losses.simnpo_loss`; differentiable in ``hidden``, ``weight`` and
        ``bias``.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> expected = -2 / 4.5 * math.log(1 / (1 + math.exp(-4.5 * math.log(4))))
        >>> linear_simnpo_loss(hidden, head, labels), expected
        (tensor(0.0009), 0.0008672089472274687)
    """
    tokens, weight, bias, logit_map, vocab = _align(
        hidden,
        (weight, bias, vocab_group),
        labels,
        ignore_index,
        shift,
        validate,
        chunk_rows,
        logit_scale,
        logit_softcap,
    )
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    delta = _checks.check_finite_number(delta, "delta")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    count = _checks.check_mean_count(num_sequences, tokens.hidden, reduction, "num_sequences")
    logprobs = _logprobs(tokens.hidden, tokens, weight, bias, chunk_rows, logit_map, vocab)
    return tokens.per_sequence(
        simnpo_from_logprobs(logprobs, tokens.valid, beta, delta, reduction, count, tokens.sharding)
    )


@shared_arguments
def linear_kl_divergence(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    direction: Direction = "forward",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """:func:`~unlearning_losses.kl_divergence` between the heads' distributions on ``hidden``
    and ``ref_hidden``. Only the model side is differentiated.

    Args:
        hidden: {hidden}
        weight: {weight}
        ref_hidden: the reference model's hidden states, shaped like ``hidden``.
        ref_weight: the reference's head (default: ``weight``).
        labels: selects positions as in :func:`~unlearning_losses.ga_loss` (with the shift);
            ``None`` counts every position.
        bias: {bias}
        ref_bias: the reference's optional bias (default: ``bias`` when ``ref_weight`` is
            omitted: a shared head shares its bias).
        direction: ``"forward"`` (KL(P_theta || P_ref)) or ``"reverse"``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        A float32 scalar (float64 for a float64 head), or per-token values for ``"none"``.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> # against itself; direction="forward" is KL(P || P_ref)
        >>> linear_kl_divergence(hidden, head, hidden, labels=labels)
        tensor(0.)
    """
    if labels is None:
        hidden = _checks.check_hidden(hidden, "hidden")
        weight, bias, vocab_group = _head(weight, bias, hidden, vocab_group)
        vocab = None
        if vocab_group is not None:
            vocab = sharding.group_vocab_shard(weight.shape[0], weight.device, vocab_group)
        tokens = _tokens.align_all_positions(
            hidden, name="hidden", vocab_parallel=False, hidden=True
        )
        _check_chunk_rows(chunk_rows)
        if vocab is not None:
            sharding.check_same_on_group(tokens.hidden, tokens.targets, vocab.group, "hidden")
        logit_map = _logit_map(logit_scale, logit_softcap)
    else:
        tokens, weight, bias, logit_map, vocab = _align(
            hidden,
            (weight, bias, vocab_group),
            labels,
            ignore_index,
            shift,
            validate,
            chunk_rows,
            logit_scale,
            logit_softcap,
        )
    ref_tokens, ref_w, ref_b = _reference(
        weight, bias, ref_hidden, ref_weight, ref_bias, tokens, vocab
    )
    _checks.check_choice(direction, DIRECTIONS, "direction")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.hidden, reduction)
    mode = PairMode.kl(direction)
    if vocab is not None:
        per_token = vocab_parallel_kl(
            tokens.hidden,
            (weight, bias),
            ref_tokens,
            (ref_w, ref_b),
            tokens.valid,
            mode,
            vocab,
            logit_map,
            chunk_rows,
        )
        reduced = token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
        return tokens.unflatten(reduced)
    if reduction == "none":
        per_token = LinearTokenKL.apply(
            tokens.hidden,
            weight,
            bias,
            ref_tokens,
            ref_w,
            ref_b,
            tokens.valid,
            mode,
            chunk_rows,
            logit_map,
        )
        return tokens.unflatten(token_reduce(per_token, tokens.valid, reduction, num_items))
    scale = _scalar_scale(tokens, reduction, num_items)
    total = LinearKLSum.apply(
        tokens.hidden,
        weight,
        bias,
        ref_tokens,
        ref_w,
        ref_b,
        tokens.valid,
        scale,
        mode,
        chunk_rows,
        logit_map,
        torch.is_grad_enabled(),
    )
    return tokens.sharding.sum_over_tokens(total)


@shared_arguments
def linear_kl_loss(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    direction: Direction = "forward",
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    vocab_group: object = None,
    validate: bool = False,
) -> Tensor:
    """The KL forget term: the negative of :func:`linear_kl_divergence`, with its arguments.

    Args:
        hidden: {hidden}
        weight: {weight}
        ref_hidden: the reference model's hidden states, shaped like ``hidden``.
        ref_weight: the reference's head (default: ``weight``).
        labels: selects positions, as in :func:`linear_kl_divergence`.
        bias: {bias}
        ref_bias: the reference's optional bias (default: ``bias`` when ``ref_weight`` is
            omitted: a shared head shares its bias).
        direction: ``"forward"`` (KL(P_theta || P_ref)) or ``"reverse"``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_rows: {chunk_rows}
        logit_scale: {logit_scale}
        logit_softcap: {logit_softcap}
        vocab_group: {head_vocab_group}
        validate: {validate}

    Returns:
        Minus :func:`linear_kl_divergence`.

    Example:
        >>> import math, torch
        >>> hidden, head = torch.randn(1, 3, 2), torch.zeros(4, 2)  # logits 0: every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> linear_kl_loss(hidden, head, hidden, labels=labels)  # minus the KL, here of P to itself
        tensor(-0.)
    """
    return -linear_kl_divergence(
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        labels,
        bias=bias,
        ref_bias=ref_bias,
        direction=direction,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        chunk_rows=chunk_rows,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        vocab_group=vocab_group,
        validate=validate,
    )


def _reference(weight, bias, ref_hidden, ref_weight, ref_bias, tokens, vocab):
    """The reference side, validated, detached and laid out like ``tokens.hidden``.

    A reference that shares the model's head (``ref_weight`` omitted) shares its bias too, unless
    ``ref_bias`` says otherwise. A model's head split over the vocabulary needs the reference's
    split the same way (a plain tensor is taken as this rank's rows)."""
    ref_hidden = tokens.like_logits(ref_hidden, "ref_hidden")
    if ref_weight is None:
        ref_weight = weight
        ref_bias = bias if ref_bias is None else ref_bias
    group = None if vocab is None or sharding.is_dtensor(ref_weight) else vocab.group
    names = ("ref_weight", "ref_bias")
    ref_weight, ref_bias, ref_group = _head(ref_weight, ref_bias, ref_hidden, group, names)
    if (ref_group is None) != (vocab is None):
        raise ValueError(
            "ref_weight must be split over the vocabulary as weight is (both whole, or both this "
            "rank's rows of the head)"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must have shape ({weight.shape[0]}, {weight.shape[1]}) to match weight "
            f"(the same vocabulary); got {tuple(ref_weight.shape)}"
        )
    detach = [t.detach() if t is not None else None for t in (ref_hidden, ref_weight, ref_bias)]
    return detach[0], detach[1], detach[2]
