"""Gradient ascent (the negative NLL, a forget term) and the plain NLL (a retain term)."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, _tokens, ops
from ..reductions import REDUCTIONS, Reduction, token_reduce


def _token_mean_logprob(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    shift: bool,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    backend: str,
    validate: bool,
    inplace_backward: bool,
) -> Tensor:
    tokens = _tokens.align(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend, validate=validate
    )
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_num_items(num_items_in_batch, tokens.logits)
    if num_items is not None and reduction != "mean":
        raise ValueError(
            f'num_items_in_batch applies to reduction="mean" only; got reduction={reduction!r}'
        )
    logprobs = ops.label_logprobs(
        tokens.logits,
        tokens.targets,
        tokens.valid,
        backend=backend,
        inplace_backward=inplace_backward,
    )
    return tokens.unflatten(token_reduce(logprobs, tokens.valid, reduction, num_items))


def ga_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Gradient-ascent forget loss: the mean log-likelihood of the forget tokens, to minimize.

    .. math:: \mathcal{L}_{GA} = \frac{1}{|M|} \sum_{t \in M} \log p_\theta(y_t \mid y_{<t})

    Minimizing it ascends the NLL (Jang et al., 2023, "Knowledge Unlearning"; the GA baseline of
    TOFU, MUSE and SOUL). Its gradient w.r.t. the logits is ``(onehot(y) - softmax(z)) / |M|``.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, any float dtype.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ignore_index: the label value of ignored positions.
        shift: Hugging Face causal-LM shift for 3-D input (``logits[:, t]`` scores ``labels[:, t+1]``).
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"`` (per token, 0 at ignored).
        num_items_in_batch: divide the sum by this instead of the local count (gradient
            accumulation, data parallel; as Hugging Face Trainer passes it). ``"mean"`` only.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check the label range on CUDA too (a host sync).
        inplace_backward: write the gradient into the logits' buffer (see :func:`token_logprobs`
            for the hazard).

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 6, 13, requires_grad=True)
        >>> labels = torch.randint(0, 13, (2, 6)); labels[:, :2] = -100
        >>> ga_loss(logits, labels).backward()
    """
    return _token_mean_logprob(
        logits,
        labels,
        ignore_index,
        shift,
        reduction,
        num_items_in_batch,
        backend,
        validate,
        inplace_backward,
    )


def nll_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Negative log-likelihood (the causal-LM loss), the usual retain term.

    .. math:: \mathcal{L}_{NLL} = -\frac{1}{|M|} \sum_{t \in M} \log p_\theta(y_t \mid y_{<t})

    Equals ``model(..., labels=labels).loss`` of a Hugging Face causal LM, computed in float32
    without a float32 copy of the logits. Arguments as :func:`ga_loss`, of which it is the negative.
    """
    return -_token_mean_logprob(
        logits,
        labels,
        ignore_index,
        shift,
        reduction,
        num_items_in_batch,
        backend,
        validate,
        inplace_backward,
    )
