"""Per-token log-probabilities of the labels: the primitive under GA, NLL, NPO and SimNPO."""

from __future__ import annotations

from torch import Tensor

from .. import _tokens, ops


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""Log-probability of each label under the softmax of the logits.

    $$
    \ell_t = z_{t, y_t} - \log \sum_v e^{z_{t, v}}
    $$

    Computed in float32 (float64 for float64 logits) without a float32 copy of the logits. This is
    also how to cache a frozen reference model's log-probs once: ``B x T`` floats, not the logits.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, any float dtype.
        labels: ``(B, T)`` or ``(N,)`` integer; ``ignore_index`` marks positions that do not count.
        ignore_index: the label value of ignored positions.
        shift: for 3-D input, ``logits[:, t]`` scores ``labels[:, t + 1]`` (Hugging Face causal LM).
        backend: ``"auto"``, ``"torch"`` (chunked PyTorch) or ``"triton"``.
        validate: check the label range on CUDA too (a host sync); on CPU it is always checked.
        inplace_backward: write the gradient into ``logits``' own buffer instead of a new one,
            halving the peak memory of the backward. Hazard: the logits' values are destroyed by
            the backward, so nothing else may read them afterwards (another loss on the same
            logits, a metric, a second backward); use it only when this loss is the logits' sole
            consumer, as with a model's output that feeds just this loss.
        vocab_group: a ``torch.distributed`` process group over which the vocabulary is sharded
            (tensor parallel). Rank ``r`` passes its columns ``[r * V_local, (r + 1) * V_local)``;
            labels index the whole vocabulary; every rank gets the same log-probs and the
            gradient of its own shard (two all-reduces of ``(B, L)`` floats in the forward, none
            in the backward).

    Returns:
        float32 (float64) ``(B, T - 1)`` under the shift, else ``(B, T)`` or ``(N,)``; 0 at ignored
        positions. Differentiable with respect to ``logits``.

    Raises:
        TypeError, ValueError: bad dtypes, shapes, devices, options or label values.

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])  # two scored tokens after the shift
        >>> token_logprobs(logits, labels)  # per shifted position, 0 where ignored
        tensor([[-1.3863, -1.3863]])
    """
    tokens = _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_group=vocab_group,
    )
    return tokens.unflatten(tokens.label_logprobs(backend, inplace_backward=inplace_backward))
