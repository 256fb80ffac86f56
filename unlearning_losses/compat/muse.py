"""MUSE's unlearning baselines, computed from logits, and its task vector.

MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models";
github.com/swj0419/muse_bench, ``baselines/baselines/iterative.py`` and ``task_vector.py``) names
its iterative methods ``ga``, ``ga_gdr``, ``ga_klr``, ``npo``, ``npo_gdr`` and ``npo_klr``;
Unlearn-Simple's copy of it (github.com/OPTML-Group/Unlearn-Simple, ``MUSE/``) adds ``simnpo``,
``simnpo_gdr`` and ``simnpo_klr``. One function here per name, equal to what
``IterativeUnlearner.compute_loss`` computes from the model's outputs. Their quirks, kept (see
jaechan-repo/muse_bench#2 and OPTML-Group/Unlearn-Simple#5):

- **NPO and SimNPO read raw logits as log-probabilities.** The "log-ratio" is ``ref_logits -
  logits`` (SimNPO: ``-logits - gamma``) entry by entry, and ``-(2/beta) logsigmoid(beta * x)``
  is averaged over every position and every vocabulary entry of the batch (``B * T * V`` terms):
  no softmax, no label, no shift, padding included. It is not the NPO of the paper (one
  log-ratio of label log-probabilities per sequence, :func:`unlearning_losses.npo_loss`).
- **KLR is ``F.kl_div`` on raw logits.** ``kl_div(logits, ref_logits, reduction="batchmean",
  log_target=True)`` without ``log_softmax`` is ``sum(exp(ref) * (ref - logits))`` over every
  entry, divided by the batch size ``B`` (the first dimension), not a KL divergence; the
  intended term is :func:`unlearning_losses.kl_divergence` with ``direction="reverse"``.
- **GA and GDR** are Hugging Face's token-mean NLL. MUSE's collator sets ``labels = input_ids``
  (every token counts, padding included); pass its labels as they are.
- **Weights.** MUSE adds the terms with weight 1. Unlearn-Simple weighs them:
  ``npo_coeff * forget + coeff * retain`` with GDR, but ``forget + coeff * KLR`` with KLR (its
  ``npo_coeff`` is not read there); the functions take those names, 1 by default (MUSE).

Differences: the raw-logit terms accumulate in float32 (float64 for float64 logits), where MUSE's
bfloat16 training rounds each entry; an empty batch gives 0, not NaN. Every argument is checked
first, under the names here; DTensors are refused (pass ``.to_local()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..losses.nll import ga_loss as _ga_loss
from ..losses.nll import nll_loss
from ..ops import Backend
from ..ops.chunked import CHUNK_BYTES
from ..ops.numerics import accumulation_dtype
from ..task_vector import (
    _check_compatible,
    _state,
    check_ties,
    elementwise,
    tied_names,
)
from ..task_vector import negate_task_vector as _negate_task_vector
from .arguments import check_backend, check_compared, check_logits, check_scored


class _LogSigmoidTerm:
    """MUSE's NPO entry ``-logsigmoid(beta * (ref - z))``, or Unlearn-Simple's SimNPO entry
    ``-logsigmoid(beta * (-z - gamma))`` without a reference."""

    def __init__(self, beta: float, gamma: float = 0.0) -> None:
        self.beta, self.gamma = beta, gamma

    def argument(self, z: Tensor, ref: Tensor | None) -> Tensor:
        return self.beta * ((ref - z) if ref is not None else (-z - self.gamma))

    def value(self, z: Tensor, ref: Tensor | None) -> Tensor:
        return -F.logsigmoid(self.argument(z, ref))

    def derivative(self, z: Tensor, ref: Tensor | None) -> Tensor:
        """``d value / dz = beta * sigmoid(-argument)``."""
        return self.beta * torch.sigmoid(-self.argument(z, ref))


class _KlDivTerm:
    """``F.kl_div(z, ref, log_target=True)``'s entry ``exp(ref) * (ref - z)``."""

    def value(self, z: Tensor, ref: Tensor | None) -> Tensor:
        assert ref is not None
        return ref.exp() * (ref - z)

    def derivative(self, z: Tensor, ref: Tensor | None) -> Tensor:
        assert ref is not None
        return -ref.exp()


_Term = _LogSigmoidTerm | _KlDivTerm


def _row_chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // (4 * max(1, vocab)))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _EntrySum(torch.autograd.Function):
    """The sum of ``term`` over every entry of ``(N, V)`` logits, row chunk by row chunk in the
    accumulation dtype: no ``(N, V)`` temporary but the gradient, in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: Tensor, ref: Tensor | None, term: _Term) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        total = torch.zeros((), dtype=acc, device=logits.device)
        for rows in _row_chunks(logits.shape[0], logits.shape[1]):
            chunk_ref = None if ref is None else ref[rows].to(acc)
            total = total + term.value(logits[rows].to(acc), chunk_ref).sum()
        ctx.term = term
        ctx.save_for_backward(logits, ref)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, ref = ctx.saved_tensors
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], logits.shape[1]):
            chunk_ref = None if ref is None else ref[rows].to(acc)
            out[rows] = ctx.term.derivative(logits[rows].to(acc), chunk_ref) * grad
        return out, None, None


def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _raw_npo_mean(logits: Tensor, ref_logits: Tensor | None, term: _LogSigmoidTerm) -> Tensor:
    """``-(2/beta) logsigmoid(...)`` averaged over every entry (MUSE's ``.mean() * 2 / beta``)."""
    ref = None if ref_logits is None else _rows(ref_logits)
    total = _EntrySum.apply(_rows(logits), ref, term)
    return total * (2.0 / term.beta) / max(1, logits.numel())


def _raw_kl_div(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """``F.kl_div(logits, ref_logits, reduction="batchmean", log_target=True)`` on raw logits:
    the sum over every entry divided by ``logits.shape[0]``."""
    total = _EntrySum.apply(_rows(logits), _rows(ref_logits), _KlDivTerm())
    return total / max(1, logits.shape[0])


def _weight(value: float, name: str) -> float:
    return _checks.check_finite_number(value, name)


def ga_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    *,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""MUSE's ``ga``: $-L_f$, the negative Hugging Face token-mean NLL of the forget batch.

    The same number as :func:`unlearning_losses.ga_loss` (no quirk in the loss; MUSE's labels
    are the input ids, padding included). Difference: a batch without a valid label gives 0
    here, NaN there.
    """
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_backend(backend)
    return _ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)


def ga_gdr_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    npo_coeff: float = 1.0,
    coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""MUSE's ``ga_gdr``: $-L_f + L_r$, both Hugging Face token-mean NLLs (Unlearn-Simple:
    $-\text{npo\_coeff}\,L_f + \text{coeff}\,L_r$).

    :func:`unlearning_losses.combine_with_retain` of :func:`unlearning_losses.ga_loss` and
    :func:`unlearning_losses.nll_loss` gives the same number.
    """
    npo_coeff, coeff = _weight(npo_coeff, "npo_coeff"), _weight(coeff, "coeff")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return npo_coeff * forget + coeff * retain


def ga_klr_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""MUSE's ``ga_klr``: $-L_f + \text{coeff}\cdot K_r$, $K$ MUSE's KLR on raw logits.

    Quirk kept: $K = \frac{1}{B}\sum_{b,t,v} e^{z^{ref}_{btv}}(z^{ref}_{btv} - z_{btv})$, the
    ``F.kl_div`` of raw logits (no ``log_softmax``) over every entry, divided by the batch size.
    Its gradient $-e^{z^{ref}}/B$ does not depend on the model: it raises every logit by the
    exponential of the reference's. The intended retain term is
    ``kl_divergence(retain_logits, ref_retain_logits, retain_labels, direction="reverse")``.
    """
    coeff = _weight(coeff, "coeff")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    check_backend(backend)
    forget = _ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    return forget + coeff * _raw_kl_div(retain_logits, ref_retain)


def npo_loss(forget_logits: Tensor, ref_forget_logits: Tensor, *, beta: float = 0.1) -> Tensor:
    r"""MUSE's ``npo``: $-\frac{2}{\beta}\,\mathrm{mean}_{b,t,v}\log\sigma\big(\beta
    (z^{ref}_{btv} - z_{btv})\big)$ over every entry of the forget batch's raw logits.

    Quirk kept: the logits stand in for log-probabilities, entry by entry, and the mean runs
    over all ``B * T * V`` of them (prompt, padding and every vocabulary entry, no labels, no
    shift). Each logit's gradient is $2\sigma(\beta(z - z^{ref}))/(BTV)$: every logit is pushed
    down, whatever the token. The paper's NPO, one log-ratio of label log-probabilities per
    sequence, is :func:`unlearning_losses.npo_loss` (``ref_logits=`` or cached
    ``ref_logprobs=``).
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    ref_forget = check_compared(forget_logits, ref_forget_logits, "forget_logits")
    return _raw_npo_mean(forget_logits, ref_forget, _LogSigmoidTerm(beta))


def npo_gdr_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 0.1,
    npo_coeff: float = 1.0,
    coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""MUSE's ``npo_gdr``: :func:`npo_loss` $+ L_r$, the retain batch's Hugging Face NLL
    (Unlearn-Simple: $\text{npo\_coeff}\cdot$ NPO $+ \text{coeff}\cdot L_r$). The NPO term
    keeps :func:`npo_loss`'s raw-logit quirk."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    npo_coeff, coeff = _weight(npo_coeff, "npo_coeff"), _weight(coeff, "coeff")
    ref_forget = check_compared(forget_logits, ref_forget_logits, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _raw_npo_mean(forget_logits, ref_forget, _LogSigmoidTerm(beta))
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return npo_coeff * forget + coeff * retain


def npo_klr_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    beta: float = 0.1,
    coeff: float = 1.0,
) -> Tensor:
    r"""MUSE's ``npo_klr``: :func:`npo_loss` $+ \text{coeff}\cdot K_r$, both on raw logits
    (:func:`npo_loss` and :func:`ga_klr_loss` name the quirks)."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    coeff = _weight(coeff, "coeff")
    ref_forget = check_compared(forget_logits, ref_forget_logits, "forget_logits")
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    forget = _raw_npo_mean(forget_logits, ref_forget, _LogSigmoidTerm(beta))
    return forget + coeff * _raw_kl_div(retain_logits, ref_retain)


def simnpo_loss(forget_logits: Tensor, *, beta: float = 0.1, gamma: float = 0.0) -> Tensor:
    r"""Unlearn-Simple's ``simnpo`` for MUSE: $-\frac{2}{\beta}\,\mathrm{mean}_{b,t,v}
    \log\sigma\big(\beta(-z_{btv} - \gamma)\big)$ over every entry of the raw logits.

    Quirk kept: as :func:`npo_loss`, the raw logits stand in for log-probabilities (here for
    $-$NLL) and the mean runs over all ``B * T * V`` entries; there is no length normalisation,
    no label and no shift. The SimNPO of the paper is :func:`unlearning_losses.simnpo_loss`
    with ``delta=gamma``: this ``gamma`` is subtracted from the (would-be) NLL itself, as the
    library's ``delta`` is (the paper's $\gamma$ is $\beta\delta$).
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    gamma = _checks.check_finite_number(gamma, "gamma")
    check_logits(forget_logits, "forget_logits")
    return _raw_npo_mean(forget_logits, None, _LogSigmoidTerm(beta, gamma))


def simnpo_gdr_loss(
    forget_logits: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.0,
    npo_coeff: float = 1.0,
    coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""Unlearn-Simple's ``simnpo_gdr`` for MUSE: $\text{npo\_coeff}\cdot$ :func:`simnpo_loss`
    $+ \text{coeff}\cdot L_r$, $L_r$ the retain batch's Hugging Face NLL."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    gamma = _checks.check_finite_number(gamma, "gamma")
    npo_coeff, coeff = _weight(npo_coeff, "npo_coeff"), _weight(coeff, "coeff")
    check_logits(forget_logits, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _raw_npo_mean(forget_logits, None, _LogSigmoidTerm(beta, gamma))
    retain = nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)
    return npo_coeff * forget + coeff * retain


def simnpo_klr_loss(
    forget_logits: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.0,
    coeff: float = 1.0,
) -> Tensor:
    r"""Unlearn-Simple's ``simnpo_klr`` for MUSE: :func:`simnpo_loss`
    $+ \text{coeff}\cdot K_r$, $K$ MUSE's KLR on raw logits (see :func:`ga_klr_loss`)."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    gamma = _checks.check_finite_number(gamma, "gamma")
    coeff = _weight(coeff, "coeff")
    check_logits(forget_logits, "forget_logits")
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    forget = _raw_npo_mean(forget_logits, None, _LogSigmoidTerm(beta, gamma))
    return forget + coeff * _raw_kl_div(retain_logits, ref_retain)


Rounding = Literal["per_operation", "once"]


def negate_task_vector(
    base: Mapping[str, Tensor] | nn.Module,
    finetuned: Mapping[str, Tensor] | nn.Module,
    alpha: float,
    *,
    rounding: Rounding = "per_operation",
) -> dict[str, Tensor]:
    r"""MUSE's ``tv``: $\theta_c + \alpha\cdot(-(\theta_* - \theta_c))$, tensor by tensor.

    MUSE's ``TaskVector`` loads both models in bfloat16 and computes in the stored dtype:
    ``vector = finetuned - base``, ``-vector``, then ``base + alpha * (-vector)``, each operation
    rounded to bfloat16. ``rounding="per_operation"`` (default) does exactly that, bit for bit;
    ``rounding="once"`` is :func:`unlearning_losses.negate_task_vector`, the float64 result
    rounded once (measured at a tiny random Llama in bfloat16, fine-tuning noise 0.01 and
    ``alpha = 5``: 2.5% of the elements differ, by 1 to 16 ulp of the result).

    Differences, all on input MUSE would take silently: keys, shapes and dtypes must match,
    integer tensors must be equal (they are copied; MUSE drops them and reloads the base's), tied
    tensors must be tied in both, and a result that overflows the dtype is refused by name.

    Args:
        base: $\theta_c$, the model to clean (state dict or module).
        finetuned: $\theta_*$, that model fine-tuned further on the forget set.
        alpha: MUSE's ``alpha`` (its ``scaling_coef``), finite.
        rounding: ``"per_operation"`` (MUSE) or ``"once"`` (the library's).

    Returns:
        A new state dict with the keys and dtypes of ``base``.

    Example:
        >>> import torch
        >>> base = {"w": torch.tensor([1.0, 1.0], dtype=torch.bfloat16)}
        >>> tuned = {"w": torch.tensor([1.0078125, 1.0], dtype=torch.bfloat16)}
        >>> negate_task_vector(base, tuned, 5.0)["w"]  # 1 - 5 * 2**-7
        tensor([0.9609, 1.0000], dtype=torch.bfloat16)
    """
    _checks.check_choice(rounding, ("per_operation", "once"), "rounding")
    if rounding == "once":
        return _negate_task_vector(base, finetuned, alpha)
    base, finetuned = _state(base, "base"), _state(finetuned, "finetuned")
    alpha = _checks.check_finite_number(alpha, "alpha")
    _check_compatible(base, finetuned, allow_dtype_mismatch=False)
    check_ties(tied_names(base), finetuned.__getitem__)
    if all(torch.equal(t, finetuned[n]) for n, t in base.items() if t.is_floating_point()):
        raise ValueError("finetuned equals base: the task vector is all zero")

    def muse(name: str, part: slice, b: Tensor) -> Tensor:
        vector = finetuned[name].reshape(-1)[part] - b
        return b + alpha * -vector

    return elementwise(base, muse, compute_dtype=None)


__all__ = [
    "ga_gdr_loss",
    "ga_klr_loss",
    "ga_loss",
    "negate_task_vector",
    "npo_gdr_loss",
    "npo_klr_loss",
    "npo_loss",
    "simnpo_gdr_loss",
    "simnpo_klr_loss",
    "simnpo_loss",
]
