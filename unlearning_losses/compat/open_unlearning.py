"""open-unlearning's trainers' losses, computed from logits (or activations for RMU).

GradDiff, NPO, SimNPO, DPO, WGA, SatImp, UNDIAL, CE-U, RMU and PDU. Each trainer but CE-U returns
``gamma * forget + alpha * retain``, the retain term being the Hugging Face NLL
(``retain_loss_type="NLL"``) or :func:`retain_kl_loss` against a frozen reference (``"KL"``); RMU's
is its activation-matching term. Defaults are those of the trainer classes. Every quirk that moves
a number is kept and named; where open-unlearning gives NaN (an empty selection), these give 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _tokens
from ..losses.kl import kl_divergence
from ..losses.nll import ga_loss, nll_loss
from ..losses.pdu import logit_margin_loss
from ..losses.pdu import pdu_loss as _pdu_loss
from ..losses.rmu import checked_rmu_inputs
from ..losses.soft_targets import ceu_loss as _ceu_loss
from ..losses.weighted import satimp_loss as _satimp_loss
from ..losses.weighted import wga_loss as _wga_loss
from ..ops import Backend, soft_target_cross_entropy
from ..ops.numerics import accumulation_dtype
from ..reductions import sequence_sums
from .arguments import (
    check_backend,
    check_compared,
    check_reference,
    check_scored,
    check_scored_compared,
    refuse_dtensor,
)

RetainLossType = Literal["NLL", "KL"]


def retain_kl_loss(logits: Tensor, ref_logits: Tensor, *, backend: Backend = "auto") -> Tensor:
    r"""open-unlearning's retain KL: ``kl_div(log p_theta, log p_ref, log_target=True, "batchmean")``.

    That is $\mathrm{KL}(P_{ref} \| P_\theta)$ averaged over **every** row of the flattened
    ``B x T`` logits. Quirk kept: prompt and padding positions count, and there is no shift; use
    :func:`unlearning_losses.kl_divergence` with ``labels`` and ``direction="reverse"`` to count
    only answer tokens.
    """
    check_compared(logits, ref_logits, "logits")
    check_backend(backend)
    return kl_divergence(logits, ref_logits, direction="reverse", backend=backend)


@dataclass(frozen=True)
class _Retain:
    """A trainer's retain term: the Hugging Face NLL (``"NLL"``) or :func:`retain_kl_loss` against
    a frozen reference (``"KL"``); every argument checked on construction, before any heavy work.
    The fields are the trainers' own parameters, which :meth:`of` reads by name."""

    retain_logits: Tensor
    retain_labels: Tensor
    retain_loss_type: str
    ref_retain_logits: Tensor | None
    ignore_index: int
    backend: Backend

    @classmethod
    def of(cls, trainer_arguments: Mapping[str, Any]) -> _Retain:
        """The retain term of a trainer's call, from its arguments (its ``locals()``)."""
        return cls(**{name: trainer_arguments[name] for name in _RETAIN_ARGUMENTS})

    def __post_init__(self) -> None:
        _checks.check_choice(self.retain_loss_type, ("NLL", "KL"), "retain_loss_type")
        logits = check_scored(
            self.retain_logits, self.retain_labels, self.ignore_index, "retain_logits"
        )
        if self.ref_retain_logits is not None:
            check_reference(self.ref_retain_logits, logits, "retain_logits")
        elif self.retain_loss_type == "KL":
            raise ValueError('retain_loss_type="KL" needs ref_retain_logits; got None')
        check_backend(self.backend)

    def term(self) -> Tensor:
        logits, labels, ref_logits = self.retain_logits, self.retain_labels, self.ref_retain_logits
        if ref_logits is None or self.retain_loss_type == "NLL":
            return nll_loss(logits, labels, ignore_index=self.ignore_index, backend=self.backend)
        return retain_kl_loss(logits, ref_logits, backend=self.backend)


# Named once at import: ``torch.compile`` traces the trainers but not ``dataclasses.fields``.
_RETAIN_ARGUMENTS = tuple(field.name for field in fields(_Retain))


def _weighted_sum(
    gamma: float, forget: Callable[[], Tensor], alpha: float, retain: _Retain
) -> Tensor:
    """open-unlearning's combination ``gamma * forget + alpha * retain``, the weights checked,
    as the terms' arguments are, before either term is computed."""
    gamma = _checks.check_finite_number(gamma, "gamma")
    alpha = _checks.check_finite_number(alpha, "alpha")
    return gamma * forget() + alpha * retain.term()


def _sequence_log_ratio_sums(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, ignore_index: int, backend: str
) -> Tensor:
    """Per sequence, the summed shifted log-ratio of model to reference (``compute_batch_nll``),
    of arguments checked by :func:`check_scored_compared`."""
    tokens = _tokens.align(logits, labels, ignore_index=ignore_index, shift=True, backend=backend)
    logprobs = tokens.label_logprobs(backend)
    with torch.no_grad():
        ref_logprobs = tokens.label_logprobs(backend, logits=tokens.batched(ref_logits))
    return (logprobs - ref_logprobs).sum(-1)


def _sequence_count(logits: Tensor) -> int:
    """Sequences in ``(B, T, V)`` logits; ``(N, V)`` logits are one."""
    return logits.shape[0] if logits.dim() == 3 else 1


def grad_diff_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's GradDiff: $-\gamma L_f + \alpha\,\text{retain}$, HF token-mean NLLs."""
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        return ga_loss(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)

    return _weighted_sum(gamma, forget, alpha, retain)


def npo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's NPO: $\gamma \frac{2}{\beta}\operatorname{softplus}(\beta\Delta_i)$
    averaged over sequences, $\Delta_i$ the summed log-ratio of sequence *i*, plus
    $\alpha\,\text{retain}$.

    Quirk kept: a sequence without a valid label enters the mean with $\Delta_i = 0$, adding
    $2\log 2/\beta$; :func:`unlearning_losses.npo_loss` leaves it out.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        delta = _sequence_log_ratio_sums(
            forget_logits, ref_forget, forget_labels, ignore_index, backend
        )
        return (F.softplus(beta * delta) * (2.0 / beta)).mean()

    return _weighted_sum(gamma, forget, alpha, retain)


def simnpo_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    delta: float = 0.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's SimNPO: $-\gamma\frac{2}{\beta}\log\sigma(\beta(S_i / n_i - \delta))$
    averaged over all sequences, plus $\alpha\,\text{retain}$.

    Quirks kept: $S_i$ is the summed NLL over the shifted labels, but $n_i$ counts the
    *unshifted* labels, so a first label that is not ``ignore_index`` is counted without being
    scored; every sequence enters the mean. Difference: a sequence with $n_i = 0$ divides 0 by
    0 (NaN) there; here $n_i$ is taken as 1.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    delta = _checks.check_finite_number(delta, "delta")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        tokens = _tokens.align(
            forget_logits, forget_labels, ignore_index=ignore_index, shift=True, backend=backend
        )
        logprobs = tokens.label_logprobs(backend)
        unshifted_count = (tokens.batched(forget_labels) != ignore_index).sum(-1).clamp(min=1)
        mean_nll = -logprobs.sum(-1) / unshifted_count
        return (F.logsigmoid(beta * (mean_nll - delta)) * (-2.0 / beta)).mean()

    return _weighted_sum(gamma, forget, alpha, retain)


def dpo_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    alternate_logits: Tensor,
    ref_alternate_logits: Tensor,
    alternate_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's DPO (IdkDPO with an "I don't know" alternate answer):
    $-\gamma\frac{2}{\beta}\log\sigma(\beta(\Delta^{alt}_i - \Delta^{forget}_i))$ averaged
    over all pairs, plus $\alpha\,\text{retain}$.

    Quirks kept: the $2/\beta$ factor (the DPO paper and
    :func:`unlearning_losses.dpo_loss` have none), and pairs without a valid label enter the mean
    with $\Delta = 0$. $\Delta$ is the summed log-ratio to the reference.
    """
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    ref_alternate = check_scored_compared(
        alternate_logits, ref_alternate_logits, alternate_labels, ignore_index, "alternate_logits"
    )
    forget_count, alternate_count = (
        _sequence_count(forget_logits),
        _sequence_count(alternate_logits),
    )
    if alternate_count != forget_count:
        raise ValueError(
            f"alternate_logits must hold as many sequences as forget_logits ({forget_count}); "
            f"got {alternate_count}"
        )
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        lose = _sequence_log_ratio_sums(
            forget_logits, ref_forget, forget_labels, ignore_index, backend
        )
        win = _sequence_log_ratio_sums(
            alternate_logits, ref_alternate, alternate_labels, ignore_index, backend
        )
        return (F.logsigmoid(beta * (win - lose)) * (-2.0 / beta)).mean()

    return _weighted_sum(gamma, forget, alpha, retain)


def wga_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's WGA: $\gamma\,$ :func:`unlearning_losses.wga_loss`
    $+\ \alpha\,\text{retain}$; its forget term is the same token mean of
    $\operatorname{sg}[p^\beta]\,\ell$. No quirk in the forget term."""
    beta = _checks.check_finite_number(beta, "beta", nonnegative=True)
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        return _wga_loss(
            forget_logits, forget_labels, beta=beta, ignore_index=ignore_index, backend=backend
        )

    return _weighted_sum(gamma, forget, alpha, retain)


def satimp_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta1: float = 5.0,
    beta2: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 0.1,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's SatImp: $\gamma\,$ :func:`unlearning_losses.satimp_loss`
    $+\ \alpha\,\text{retain}$ (note its default $\alpha = 0.1$). No quirk in the
    forget term."""
    beta1 = _checks.check_finite_number(beta1, "beta1", nonnegative=True)
    beta2 = _checks.check_finite_number(beta2, "beta2", nonnegative=True)
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        return _satimp_loss(
            forget_logits,
            forget_labels,
            beta1=beta1,
            beta2=beta2,
            ignore_index=ignore_index,
            backend=backend,
        )

    return _weighted_sum(gamma, forget, alpha, retain)


def undial_loss(
    forget_logits: Tensor,
    ref_forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's UNDIAL: $\gamma\,\mathrm{CE}(q, p_\theta)$ with
    $q = \operatorname{softmax}(z^{ref} - \beta e_y)$, plus $\alpha\,\text{retain}$.

    Quirks kept: the mean runs over **every** shifted position, prompt and padding included, and
    at an ignored position the label ``-100`` indexes the vocabulary from the end, lowering the
    logit of token ``V - 100`` (so ``V >= 100`` is required, as there).
    :func:`unlearning_losses.undial_loss` counts answer tokens only. The class default
    $\beta = 1$ is kept; open-unlearning's config sets 10.
    """
    beta = _checks.check_finite_number(beta, "beta", nonnegative=True)
    ref_forget = check_scored_compared(
        forget_logits, ref_forget_logits, forget_labels, ignore_index, "forget_logits"
    )
    vocab = forget_logits.shape[-1]
    # Decided from ignore_index alone, without reading the labels: no device sync.
    if ignore_index < -vocab:
        raise ValueError(
            f"forget_labels: open-unlearning's UNDIAL indexes the vocabulary with the ignored "
            f"label {ignore_index}, which needs a vocabulary of at least {-ignore_index}; got {vocab}"
        )
    retain = _Retain.of(locals())

    def forget() -> Tensor:
        tokens = _tokens.align(
            forget_logits, forget_labels, ignore_index=ignore_index, shift=True, backend=backend
        )
        wrapped = torch.where(tokens.targets < 0, tokens.targets + vocab, tokens.targets)
        per_token = soft_target_cross_entropy(
            tokens.logits,
            tokens.batched(ref_forget),
            wrapped,
            torch.ones_like(tokens.valid),
            label_shift=beta,
            backend=backend,
        )
        return per_token.mean()

    return _weighted_sum(gamma, forget, alpha, retain)


def ceu_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    *,
    ignore_first_n_answer_tokens: int = 1,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's CE-U: :func:`unlearning_losses.ceu_loss` after masking the first
    ``ignore_first_n_answer_tokens`` valid labels of every sequence (the CE-U paper's footnote).
    No retain term. Difference: a batch with nothing left gives 0 here, NaN there."""
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    check_backend(backend)
    first_n = _checks.check_int(ignore_first_n_answer_tokens, "ignore_first_n_answer_tokens")
    if first_n < 0:
        raise ValueError(f"ignore_first_n_answer_tokens must be >= 0; got {first_n}")
    valid = forget_labels != ignore_index
    leading = valid & (valid.cumsum(-1) <= first_n)
    return _ceu_loss(
        forget_logits,
        forget_labels.masked_fill(leading, ignore_index),
        ignore_index=ignore_index,
        backend=backend,
    )


def _broadcast_activation_loss(hidden: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """open-unlearning's ``compute_activation_loss``: per sequence, ``S_i`` the sum over valid
    positions of ``mean_H (h - target)^2`` and ``N_i`` their count; ``S / N`` divides a ``[B]``
    by a ``[B, 1]``, which broadcasts to ``[B, B]``, so its mean is ``mean(S) * mean(1 / N)``."""
    acc = accumulation_dtype(hidden.dtype)
    per_position = (hidden.to(acc) - target.detach().to(acc)).square().mean(-1)
    sums, counts = sequence_sums(per_position, valid)
    inverse_counts = torch.where(counts > 0, 1.0 / counts.clamp(min=1).to(sums.dtype), 0.0)
    return sums.mean() * inverse_counts.mean()


def rmu_loss(
    forget_hidden: Tensor,
    forget_labels: Tensor,
    retain_hidden: Tensor,
    ref_retain_hidden: Tensor,
    retain_labels: Tensor,
    control_vector: Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""open-unlearning's RMU with ``retain_loss_type="EMBED_DIFF"``: $\gamma\,F + \alpha\,R$.

    Quirk kept: each term is what ``compute_activation_loss`` computes,
    $\overline{S}\cdot\overline{1/N}$ (the mean over sequences of $S_i$ times the mean of
    $1/N_i$), where the intended value is $\overline{S/N}$: $S_i$ is sequence *i*'s sum over
    its valid positions of $\frac{1}{H}\lVert h - \text{target}\rVert^2$ and $N_i$ their
    count, and dividing the ``[B]`` sums by ``[B, 1]`` counts broadcasts to ``[B, B]``. The two
    agree only when every sequence has as many valid positions; :func:`unlearning_losses.rmu_loss`
    averages over tokens. Difference: a sequence without a valid position makes their value
    ``inf`` or NaN; here its $1/N_i$ counts as 0. ``control_vector`` is ``(H,)``.
    """
    tensors = {
        "forget_hidden": forget_hidden,
        "forget_labels": forget_labels,
        "retain_hidden": retain_hidden,
        "ref_retain_hidden": ref_retain_hidden,
        "retain_labels": retain_labels,
        "control_vector": control_vector,
    }
    for name, value in tensors.items():
        refuse_dtensor(value, name)
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
    gamma = _checks.check_finite_number(gamma, "gamma")
    alpha = _checks.check_finite_number(alpha, "alpha")
    forget = _broadcast_activation_loss(forget_hidden, control_vector, forget_valid)
    retain = _broadcast_activation_loss(retain_hidden, ref_retain_hidden, retain_valid)
    return gamma * forget + alpha * retain


def _float32_rounded(number: float) -> float:
    return float(torch.tensor(number, dtype=torch.float32))


def pdu_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    *,
    dual: float = 1.0,
    gamma: float = 1.0,
    retain_loss_eps: float = 0.0,
    retain_loss_type: RetainLossType = "NLL",
    ref_retain_logits: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> Tensor:
    r"""open-unlearning's PDU: $\gamma F + \lambda\,(\text{retain} - \epsilon)$ with
    $F$ the squared margin of the largest logit over the mean logit,
    :func:`unlearning_losses.pdu_loss` around :func:`unlearning_losses.logit_margin_loss`.

    ``dual`` is the trainer's ``preferences[1]`` ($\lambda$, its ``alpha`` at the start), which it
    raises after each step with :func:`unlearning_losses.pdu_dual_update` (``primal_dual=True``,
    after ``dual_warmup_epochs``).

    Quirks kept: the forget mask is not shifted against the logits: position ``t``'s logits count
    where ``labels[t]`` is not ignored (the logits that predict ``labels[t + 1]``), so the last
    answer position's logits count and the prompt's last position's do not
    (:func:`unlearning_losses.logit_margin_loss` shifts, ``shift=True``); and the two weights are
    rounded to float32 (``torch.tensor(preferences)``) before they scale the losses.
    """
    gamma = _float32_rounded(_checks.check_finite_number(gamma, "gamma"))
    dual = _float32_rounded(_checks.check_finite_number(dual, "dual", nonnegative=True))
    retain_loss_eps = _checks.check_finite_number(retain_loss_eps, "retain_loss_eps")
    check_scored(forget_logits, forget_labels, ignore_index, "forget_logits")
    retain = _Retain.of(locals())
    forget = logit_margin_loss(forget_logits, forget_labels, ignore_index=ignore_index, shift=False)
    return _pdu_loss(forget, retain.term(), dual=dual, retain_epsilon=retain_loss_eps, gamma=gamma)
