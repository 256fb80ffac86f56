"""The TOFU trainer ``CustomTrainerForgetting`` as the NPO authors and Unlearn-Simple extended it,
computed from logits.

TOFU (Maini et al., 2024; github.com/locuslab/tofu, ``dataloader.py``) wrote the trainer; the NPO
authors (Zhang et al., 2024; github.com/licong-lin/negative-preference-optimization,
``TOFU/dataloader.py``) added NPO, DPO with a retain term and KTO; Unlearn-Simple (Fan et al.,
2024; github.com/OPTML-Group/Unlearn-Simple, ``TOFU/dataloader.py``) added SimNPO. Each
``forget_loss`` name that the library's own functions do not already give has one function here,
named after it (``npo_KL`` is :func:`npo_kl_loss`), equal to what ``compute_loss`` computes. The
others are the library's functions:

| ``forget_loss`` | call |
|---|---|
| ``grad_ascent`` | ``ga_loss(forget_logits, forget_labels)`` |
| ``grad_diff`` | ``combine_with_retain(ga_loss(f, f_labels), nll_loss(r, r_labels))`` |
| ``KL`` | ``combine_with_retain(ga_loss(f, f_labels), kl_divergence(r, ref_r, direction="reverse"))`` |
| ``grad_ascent_forgetKL`` | ``combine_with_retain(ga_loss(f, f_labels), kl_divergence(f, ref_f, direction="reverse"))`` |
| ``idk``, ``fine_tuned`` | ``nll_loss`` of the refusal and retain batches concatenated; of the retain batch |

Their retain KL, ``kl_div(log_softmax(model), log_softmax(ref), "batchmean", log_target=True)``
over the flattened ``B * T`` rows, is ``kl_divergence(..., direction="reverse")`` without labels:
every position counts, prompt and padding included. TOFU's own ``dpo`` branch cannot run: it
reads ``labels`` before assigning it (``UnboundLocalError``); the NPO authors' ``dpo`` is
:func:`dpo_loss`.

Sequence terms use ``get_batch_loss``: the summed NLL of the shifted labels of each sequence.
Quirks kept: every sequence enters each mean, one without a valid label with a log-ratio of 0;
the weights are read only where the trainer reads them. Arguments are checked first, under the
names here; DTensors are refused (pass ``.to_local()``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens
from ..losses.kl import kl_divergence
from ..losses.nll import nll_loss
from ..ops import Backend, label_logprobs
from .arguments import check_backend, check_compared, check_scored, check_scored_compared


def _logprob_sums(logits: Tensor, labels: Tensor, ignore_index: int, backend: Backend) -> Tensor:
    """``-get_batch_loss(logits, labels)``: per sequence, the summed log-probability of its
    shifted labels (``(1,)`` for ``(N, V)`` logits, one aligned sequence)."""
    tokens = _tokens.align(logits, labels, ignore_index=ignore_index, shift=True, backend=backend)
    return label_logprobs(tokens.logits, tokens.targets, tokens.valid, backend=backend).sum(-1)


def _log_ratios(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, ignore_index: int, backend: Backend
) -> Tensor:
    """Per sequence, the summed log-ratio of the model to the frozen reference."""
    with torch.no_grad():
        reference = _logprob_sums(ref_logits, labels, ignore_index, backend)
    return _logprob_sums(logits, labels, ignore_index, backend) - reference


def _mean(values: Tensor) -> Tensor:
    """``values.mean()``, 0 for no values (NaN there)."""
    return values.sum() / max(1, values.numel())


def _npo(
    forget_logits: Tensor,
    ref_forget: Tensor,
    forget_labels: Tensor,
    beta: float,
    ignore_index: int,
    backend: Backend,
) -> Tensor:
    neg_log_ratios = -_log_ratios(forget_logits, ref_forget, forget_labels, ignore_index, backend)
    return -_mean(F.logsigmoid(beta * neg_log_ratios)) * 2 / beta


def _check_pairs(forget_logits: Tensor, other_logits: Tensor, other: str) -> None:
    def sequences(logits: Tensor) -> int:
        return logits.shape[0] if logits.dim() == 3 else 1

    if sequences(other_logits) != sequences(forget_logits):
        raise ValueError(
            f"{other} must hold as many sequences as forget_logits ({sequences(forget_logits)}); "
            f"got {sequences(other_logits)}"
        )


def _retain_nll(
    retain_logits: Tensor, retain_labels: Tensor, ignore_index: int, backend: Backend
) -> Tensor:
    return nll_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend)


def _retain_kl(retain_logits: Tensor, ref_retain: Tensor, backend: Backend) -> Tensor:
    return kl_divergence(retain_logits, ref_retain, direction="reverse", backend=backend)


def npo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``npo``: $-\frac{2}{\beta}\,\mathrm{mean}_i\log\sigma(-\beta\Delta_i)$,
    $\Delta_i$ the summed log-ratio of sequence *i* to the reference.

    Quirk kept: a sequence without a valid label enters the mean with $\Delta_i = 0$, adding
    $2\log 2/\beta$; :func:`unlearning_losses.npo_loss` leaves it out (otherwise the same number).
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    check_backend(backend)
    return _npo(forget_logits, ref_forget, forget_labels, beta, ignore_index, backend)


def npo_grad_diff_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 0.1,
    npo_coeff: float = 1.0,
    grad_diff_coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``npo_grad_diff``: $\text{npo\_coeff}\cdot$ :func:`npo_loss`
    $+ \text{grad\_diff\_coeff}\cdot L_r$, $L_r$ the retain batch's Hugging Face NLL."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    npo_coeff = _checks.check_finite_number(npo_coeff, "npo_coeff")
    grad_diff_coeff = _checks.check_finite_number(grad_diff_coeff, "grad_diff_coeff")
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _npo(forget_logits, ref_forget, forget_labels, beta, ignore_index, backend)
    retain = _retain_nll(retain_logits, retain_labels, ignore_index, backend)
    return npo_coeff * forget + grad_diff_coeff * retain


def npo_kl_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    beta: float = 0.1,
    npo_coeff: float = 1.0,
    kl_coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``npo_KL``: $\text{npo\_coeff}\cdot$ :func:`npo_loss`
    $+ \text{KL\_coeff}\cdot\mathrm{KL}_r$, $\mathrm{KL}_r$ = KL(reference ‖ model) averaged over
    every position of the retain batch (the module's note). ``kl_coeff`` is their ``KL_coeff``."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    npo_coeff = _checks.check_finite_number(npo_coeff, "npo_coeff")
    kl_coeff = _checks.check_finite_number(kl_coeff, "kl_coeff")
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    check_backend(backend)
    forget = _npo(forget_logits, ref_forget, forget_labels, beta, ignore_index, backend)
    return npo_coeff * forget + kl_coeff * _retain_kl(retain_logits, ref_retain, backend)


@dataclass(frozen=True)
class _Answers:
    """The forget answers and the refusals ("I don't know"), each with the frozen reference's
    logits; checked on construction, before any pass over the logits."""

    forget_logits: Tensor
    ref_forget_logits: Tensor
    forget_labels: Tensor
    idk_logits: Tensor
    ref_idk_logits: Tensor
    idk_labels: Tensor
    ignore_index: int
    backend: Backend
    paired: bool

    @staticmethod
    def of(arguments: dict[str, Any], paired: bool) -> _Answers:
        """From a compat function's ``locals()``, whose argument names are the fields' (a renamed
        argument fails at its first call, which the tests make)."""
        names = [f.name for f in fields(_Answers) if f.name != "paired"]
        return _Answers(**{name: arguments[name] for name in names}, paired=paired)

    def __post_init__(self) -> None:
        ref_forget = check_scored_compared(
            self.forget_logits,
            self.ref_forget_logits,
            self.forget_labels,
            self.ignore_index,
            "forget_logits",
        )
        ref_idk = check_scored_compared(
            self.idk_logits, self.ref_idk_logits, self.idk_labels, self.ignore_index, "idk_logits"
        )
        if self.paired:
            _check_pairs(self.forget_logits, self.idk_logits, "idk_logits")
        check_backend(self.backend)
        object.__setattr__(self, "ref_forget_logits", ref_forget)
        object.__setattr__(self, "ref_idk_logits", ref_idk)

    def forget_log_ratios(self) -> Tensor:
        return _log_ratios(
            self.forget_logits,
            self.ref_forget_logits,
            self.forget_labels,
            self.ignore_index,
            self.backend,
        )

    def idk_log_ratios(self) -> Tensor:
        return _log_ratios(
            self.idk_logits, self.ref_idk_logits, self.idk_labels, self.ignore_index, self.backend
        )

    def dpo(self, beta: float) -> Tensor:
        """``-(2/beta) mean_i logsigmoid(beta (Delta^idk_i - Delta^forget_i))``."""
        win, lose = self.idk_log_ratios(), self.forget_log_ratios()
        return -_mean(F.logsigmoid(beta * (win - lose))) * 2 / beta

    def kto_argument(self, beta: float) -> Tensor:
        """Per forget sequence ``KL - beta * Delta_i``, KL the refusals' mean log-ratio, without
        a gradient (the trainer runs the model on the refusals under ``no_grad``)."""
        with torch.no_grad():
            kl = _mean(self.idk_log_ratios())
        return kl - beta * self.forget_log_ratios()


def dpo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``dpo`` (IdkDPO): $-\frac{2}{\beta}\,\mathrm{mean}_i
    \log\sigma\big(\beta(\Delta^{idk}_i - \Delta^{forget}_i)\big)$, $\Delta$ the summed
    log-ratio to the reference of the refusal ("I don't know") and of the forget answer.

    Quirks kept: the factor $2/\beta$ (:func:`unlearning_losses.dpo_loss`, the DPO paper's loss,
    has none), and a pair without a valid label enters the mean with $\Delta = 0$. TOFU's own
    ``dpo`` branch, which crashes, has no $2/\beta$ and $\beta = 0.1$ hard-coded.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=True)
    return answers.dpo(beta)


def dpo_grad_diff_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``dpo_grad_diff``: :func:`dpo_loss` $+ L_r$, the retain batch's Hugging
    Face NLL, unweighted (the trainer reads no coefficient here)."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=True)
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    forget = answers.dpo(beta)
    return forget + _retain_nll(retain_logits, retain_labels, ignore_index, backend)


def dpo_kl_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    retain_logits: Tensor,
    ref_retain_logits: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``dpo_KL``: :func:`dpo_loss` $+ \mathrm{KL}_r$, KL(reference ‖ model)
    averaged over every position of the retain batch, unweighted."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=True)
    ref_retain = check_compared(retain_logits, ref_retain_logits, "retain_logits")
    forget = answers.dpo(beta)
    return forget + _retain_kl(retain_logits, ref_retain, backend)


def _simnpo(
    forget_logits: Tensor,
    forget_labels: Tensor,
    beta: float,
    gamma: float,
    ignore_index: int,
    backend: Backend,
) -> Tensor:
    nll_sums = -_logprob_sums(forget_logits, forget_labels, ignore_index, backend)
    # Their length counts the unshifted labels; a row without any divides 0 by 0 there.
    lengths = (forget_labels != ignore_index).sum(-1).clamp(min=1)
    return -_mean(F.logsigmoid(beta * (nll_sums / lengths - gamma))) * 2 / beta


def simnpo_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    *,
    beta: float = 4.5,
    gamma: float = 0.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""Unlearn-Simple's ``simnpo`` for TOFU: $-\frac{2}{\beta}\,\mathrm{mean}_i
    \log\sigma\big(\beta(S_i / n_i - \gamma)\big)$, $S_i$ the summed NLL of sequence *i*.

    ``gamma`` is the library's ``delta``: :func:`unlearning_losses.simnpo_loss` with
    ``delta=gamma`` (not the SimNPO paper's $\gamma$, which is $\beta\delta$). Quirks kept:
    $n_i$ counts the *unshifted* labels, so a first label that is not ``ignore_index`` is
    counted without being scored (TOFU's batches always mask it: the question comes first, and
    there the two agree); every sequence enters the mean. Difference: a sequence without a valid
    label divides 0 by 0 there (NaN); here $n_i$ is taken as 1.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    gamma = _checks.check_finite_number(gamma, "gamma")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_backend(backend)
    return _simnpo(forget_logits, forget_labels, beta, gamma, ignore_index, backend)


def simnpo_grad_diff_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 4.5,
    gamma: float = 0.0,
    npo_coeff: float = 1.0,
    grad_diff_coeff: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""Unlearn-Simple's ``simnpo_grad_diff`` for TOFU: $\text{npo\_coeff}\cdot$
    :func:`simnpo_loss` $+ \text{grad\_diff\_coeff}\cdot L_r$, $L_r$ the retain batch's Hugging
    Face NLL. ``gamma`` is the library's ``delta``."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    gamma = _checks.check_finite_number(gamma, "gamma")
    npo_coeff = _checks.check_finite_number(npo_coeff, "npo_coeff")
    grad_diff_coeff = _checks.check_finite_number(grad_diff_coeff, "grad_diff_coeff")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    check_backend(backend)
    forget = _simnpo(forget_logits, forget_labels, beta, gamma, ignore_index, backend)
    retain = _retain_nll(retain_logits, retain_labels, ignore_index, backend)
    return npo_coeff * forget + grad_diff_coeff * retain


def kto_sigmoid_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``kto_sigmoid``:
    $1 - \frac{2}{\beta}\,\mathrm{mean}_i\,\sigma(\mathrm{KL} - \beta\Delta_i)$.

    $\Delta_i$ is the summed log-ratio of forget sequence *i* to the reference and
    $\mathrm{KL} = \mathrm{mean}_j \Delta^{idk}_j$ the mean summed log-ratio of the refusal
    ("I don't know") answers, computed without a gradient. Quirks kept, against KTO (Ethayarajh
    et al., 2024, whose undesirable-answer term is $1 - \sigma(\beta(z_0 - \Delta_i))$): the KL
    estimate is neither multiplied by $\beta$ nor clipped at 0, it comes from the refusals rather
    than from mismatched pairs, and the mean is scaled by $2/\beta$. Every forget sequence enters
    the mean, one without a valid label with $\Delta_i = 0$.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=False)
    return 1.0 - _mean(torch.sigmoid(answers.kto_argument(beta))) * 2 / beta


def kto_logsigmoid_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``kto_logsigmoid``:
    $1 - \frac{2}{\beta}\,\mathrm{mean}_i\log\sigma(\mathrm{KL} - \beta\Delta_i)$, with
    :func:`kto_sigmoid_loss`'s $\mathrm{KL}$, $\Delta_i$ and quirks."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=False)
    return 1.0 - _mean(F.logsigmoid(answers.kto_argument(beta))) * 2 / beta


def kto_logsigmoid_grad_diff_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    idk_logits: Tensor,
    ref_idk_logits: Tensor,
    idk_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""The NPO authors' ``kto_logsigmoid_grad_diff``: :func:`kto_logsigmoid_loss` $+ L_r$, the
    retain batch's Hugging Face NLL, unweighted."""
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    answers = _Answers.of(locals(), paired=False)
    check_scored(retain_logits, retain_labels, ignore_index, "retain_logits")
    forget = 1.0 - _mean(F.logsigmoid(answers.kto_argument(beta))) * 2 / beta
    return forget + _retain_nll(retain_logits, retain_labels, ignore_index, backend)


__all__ = [
    "dpo_grad_diff_loss",
    "dpo_kl_loss",
    "dpo_loss",
    "kto_logsigmoid_grad_diff_loss",
    "kto_logsigmoid_loss",
    "kto_sigmoid_loss",
    "npo_grad_diff_loss",
    "npo_kl_loss",
    "npo_loss",
    "simnpo_grad_diff_loss",
    "simnpo_loss",
]
