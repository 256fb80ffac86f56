"""The full unlearning objective from a forget term and a retain term."""

from __future__ import annotations

from torch import Tensor

from .. import _checks


def combine_with_retain(
    forget_loss: Tensor,
    retain_loss: Tensor,
    *,
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
) -> Tensor:
    r"""The unlearning objective, to minimize.

    $$
    \mathcal{L} = w_f\,\mathcal{L}_{forget} + w_r\,\mathcal{L}_{retain}
    $$

    Every forget loss of this library is already a value to minimize (e.g. :func:`ga_loss` is the
    negative NLL), so the weights are plain trade-offs, normally non-negative: SOUL's GA+FT is
    ``combine_with_retain(ga_loss(...), nll_loss(...), retain_weight=gamma)``. A negative weight
    is accepted (a schedule may pass through 0 and below) and turns that term's direction.

    Args:
        forget_loss: a tensor, usually a scalar from a forget loss.
        retain_loss: a tensor broadcastable with it, usually :func:`nll_loss` or
            :func:`kl_divergence` on the retain set.
        forget_weight: a finite real number (negative turns the forget term around).
        retain_weight: a finite real number (negative turns the retain term around).

    Returns:
        ``forget_weight * forget_loss + retain_weight * retain_loss``.

    Example:
        >>> import torch
        >>> combine_with_retain(torch.tensor(-2.0), torch.tensor(1.5), retain_weight=2.0)
        tensor(1.)
    """
    forget_loss = _checks.check_tensor(forget_loss, "forget_loss")
    retain_loss = _checks.check_tensor(retain_loss, "retain_loss")
    forget_weight = _checks.check_finite_number(forget_weight, "forget_weight")
    retain_weight = _checks.check_finite_number(retain_weight, "retain_weight")
    _checks.check_same_device(retain_loss, forget_loss, "retain_loss", "forget_loss")
    return forget_weight * forget_loss + retain_weight * retain_loss
