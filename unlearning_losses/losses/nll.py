"""Gradient ascent (the negative NLL, a forget term) and the plain NLL (a retain term)."""

from __future__ import annotations

from torch import Tensor

from .. import ops
from ..reductions import Reduction
from .common import reduce_weighted_logprobs


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
    vocab_group: object = None,
) -> Tensor:
    r"""Gradient-ascent forget loss: the mean log-likelihood of the forget tokens, to minimize.

    $$
    \mathcal{L}_{GA} = \frac{1}{|M|} \sum_{t \in M} \log p_\theta(y_t \mid y_{<t})
    $$

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
        vocab_group: a ``torch.distributed`` process group over which the vocabulary is sharded
            (tensor parallel): ``logits`` hold this rank's ``V / world`` columns, ``labels``
            index the whole vocabulary, and every rank gets the same loss.

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 6, 13, requires_grad=True)
        >>> labels = torch.randint(0, 13, (2, 6)); labels[:, :2] = -100
        >>> ga_loss(logits, labels).backward()
    """
    return reduce_weighted_logprobs(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
        validate=validate,
        inplace_backward=inplace_backward,
        vocab_group=vocab_group,
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
    vocab_group: object = None,
) -> Tensor:
    r"""Negative log-likelihood (the causal-LM loss), the usual retain term.

    $$
    \mathcal{L}_{NLL} = -\frac{1}{|M|} \sum_{t \in M} \log p_\theta(y_t \mid y_{<t})
    $$

    Equals ``model(..., labels=labels).loss`` of a Hugging Face causal LM, computed in float32
    without a float32 copy of the logits. Arguments as :func:`ga_loss`, of which it is the negative.
    """
    return -reduce_weighted_logprobs(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
        validate=validate,
        inplace_backward=inplace_backward,
        vocab_group=vocab_group,
    )


def idk_loss(
    idk_logits: Tensor,
    idk_labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""IDK forget loss: the NLL of a refusal answer to a forget question, to minimize.

    $$
    \mathcal{L}_{IDK} = -\frac{1}{|M|} \sum_{t \in M} \log p_\theta(a^{idk}_t \mid q, a^{idk}_{<t})
    $$

    The forget questions are paired with a refusal such as "I don't know." and the model is
    fine-tuned on those answers (Maini et al., 2024, "TOFU", the IDK baseline). ``idk_logits`` are
    the model's logits on the question followed by the refusal; ``idk_labels`` mask the question
    with ``ignore_index``. Arguments as :func:`ga_loss`; the value is :func:`nll_loss` of that batch.
    """
    return nll_loss(
        idk_logits,
        idk_labels,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
        validate=validate,
        inplace_backward=inplace_backward,
        vocab_group=vocab_group,
    )
