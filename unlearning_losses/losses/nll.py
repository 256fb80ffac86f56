"""Gradient ascent (the negative NLL, a forget term) and the plain NLL (a retain term)."""

from __future__ import annotations

from torch import Tensor

from .. import ops
from .._doc import shared_arguments
from ..reductions import Reduction
from .common import LogprobMean


@shared_arguments
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
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> ga_loss(logits, labels), math.log(1 / 4)
        (tensor(-1.3863), -1.3862943611198906)
    """
    return LogprobMean.of(locals())(logits, labels)


@shared_arguments
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
    without a float32 copy of the logits; the negative of :func:`ga_loss`.

    Args:
        logits: {logits}
        labels: {labels}
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values for ``"none"``.
        No valid token gives 0.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> nll_loss(logits, labels), math.log(4)
        (tensor(1.3863), 1.3862943611198906)
    """
    return -LogprobMean.of(locals())(logits, labels)


@shared_arguments
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
    with ``ignore_index``; the value is :func:`nll_loss` of that batch.

    Args:
        idk_logits: the model's logits on question + refusal, as ``logits`` of :func:`nll_loss`.
        idk_labels: their labels, the question masked with ``ignore_index``.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}
        vocab_group: {vocab_group}

    Returns:
        As :func:`nll_loss`.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> idk_loss(logits, labels), math.log(4)  # the refusal's NLL
        (tensor(1.3863), 1.3862943611198906)
    """
    return -LogprobMean.of(locals())(idk_logits, idk_labels)
