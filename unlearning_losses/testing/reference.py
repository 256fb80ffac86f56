"""Float64 reference math of every loss, written from the formulas; imports nothing from the package.

Each function has the name and the arguments of the library's function it checks, where that
makes sense (no backends, no chunking, no distributed options). Everything runs in float64 torch,
one row at a time where that is clearest, so that autograd gives the reference gradients too.
Inputs of any dtype are first converted to float64: low-precision inputs are compared on their
rounded values. Slow on purpose: for tests on small inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def align(logits: Tensor, labels: Tensor, shift: bool, ignore_index: int = -100):
    """(rows (N', V) float64 view of the scored logits, targets (N',), valid (N',), batch shape)."""
    if logits.dim() == 3 and shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    shape = labels.shape
    x = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    return x, y, y != ignore_index, shape


def log_softmax(x: Tensor) -> Tensor:
    x = x.double()
    m = x.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return x - m - torch.log(torch.exp(x - m).sum(-1, keepdim=True))


def token_logprobs(logits: Tensor, labels: Tensor, shift: bool = True, ignore_index: int = -100):
    x, y, valid, shape = align(logits, labels, shift, ignore_index)
    logp = log_softmax(x)
    picked = logp.gather(1, torch.where(valid, y, 0).long()[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked)).reshape(shape)


def valid_mask(labels: Tensor, logits: Tensor, shift: bool = True, ignore_index: int = -100):
    return align(logits, labels, shift, ignore_index)[2].reshape(align(logits, labels, shift)[3])


def token_mean(values: Tensor, valid: Tensor) -> Tensor:
    n = int(valid.sum())
    return values[valid].sum() / n if n else values.sum() * 0


def ga_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Mean log-probability of the valid labels (gradient ascent, to minimize)."""
    return token_mean(token_logprobs(logits, labels, shift), valid_mask(labels, logits, shift))


def nll_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    return -ga_loss(logits, labels, shift=shift)


def token_kl(logits: Tensor, ref_logits: Tensor, direction: str) -> Tensor:
    """Per-row KL over the last axis; entries of zero weight contribute zero."""
    logp, logq = log_softmax(logits), log_softmax(ref_logits)
    a, b = (logp, logq) if direction == "forward" else (logq, logp)
    w = a.exp()
    # Zero-weight entries contribute 0; the masked operands keep autograd free of inf - inf.
    a, b = (torch.where(w > 0, t, torch.zeros_like(t)) for t in (a, b))
    terms = w * (a - b)
    return terms.sum(-1)


def kl_divergence(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor | None = None,
    *,
    direction: str = "forward",
    shift: bool = True,
) -> Tensor:
    """Token mean of KL(P || Q) (``"forward"``) or KL(Q || P); every position without labels."""
    if labels is None:
        return token_kl(logits, ref_logits, direction).mean()
    x, _, valid, _ = align(logits, labels, shift)
    xr = align(ref_logits, labels, shift)[0]
    return token_mean(token_kl(x, xr, direction), valid)


def kl_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor | None = None, **options) -> Tensor:
    return -kl_divergence(logits, ref_logits, labels, **options)


def _sequences(logits, labels, shift):
    lp = token_logprobs(logits, labels, shift)
    valid = valid_mask(labels, logits, shift)
    if lp.dim() == 1:
        lp, valid = lp[None], valid[None]
    return lp, valid


def npo_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logprobs: Tensor,
    beta: float = 0.1,
    granularity: str = "sequence",
    shift: bool = True,
) -> Tensor:
    """(2/β)·softplus(β·Δ), Δ the log-ratio to the reference at ``granularity``."""
    lp, valid = _sequences(logits, labels, shift)
    ref = ref_logprobs.double().reshape(lp.shape)
    ratio = torch.where(valid, lp - ref, torch.zeros_like(lp))

    def f(d):
        return 2.0 / beta * softplus(beta * d)

    if granularity == "token":
        return token_mean(f(ratio), valid)
    if granularity == "batch":
        n = int(valid.sum())
        return f(ratio.sum() / n) if n else ratio.sum() * 0
    losses = []
    for i in range(lp.shape[0]):
        n = int(valid[i].sum())
        if n == 0:
            continue
        d = ratio[i].sum() if granularity == "sequence" else ratio[i].sum() / n
        losses.append(f(d))
    return torch.stack(losses).mean() if losses else ratio.sum() * 0


def softplus(x: Tensor) -> Tensor:
    return torch.where(x > 0, x + torch.log1p(torch.exp(-x.abs())), torch.log1p(torch.exp(x)))


def simnpo_loss(
    logits: Tensor, labels: Tensor, *, beta: float = 4.5, delta: float = 0.0, shift: bool = True
) -> Tensor:
    """Mean over non-empty sequences of (2/β)·softplus(-β(mean NLL - δ))."""
    lp, valid = _sequences(logits, labels, shift)
    losses = []
    for i in range(lp.shape[0]):
        n = int(valid[i].sum())
        if n == 0:
            continue
        mean_nll = -lp[i][valid[i]].sum() / n
        # -log sigmoid(x) = softplus(-x)
        losses.append(2.0 / beta * softplus(-beta * (mean_nll - delta)))
    return torch.stack(losses).mean() if losses else lp.sum() * 0


LOG2 = math.log(2.0)


def weighted_ga(logits: Tensor, labels: Tensor, weight, shift: bool = True) -> Tensor:
    """Token mean of sg[weight(log p)] * log p."""
    lp = token_logprobs(logits, labels, shift)
    valid = valid_mask(labels, logits, shift)
    return token_mean(weight(lp.detach()) * lp, valid)


def wga_loss(logits: Tensor, labels: Tensor, *, beta: float = 1.0, shift: bool = True) -> Tensor:
    return weighted_ga(logits, labels, lambda lp: lp.exp() ** beta, shift)


def satimp_loss(
    logits: Tensor, labels: Tensor, *, beta1: float = 5.0, beta2: float = 1.0, shift: bool = True
) -> Tensor:
    return weighted_ga(
        logits, labels, lambda lp: lp.exp() ** beta1 * (1 - lp.exp()) ** beta2, shift
    )


def tnpo_loss(
    logits: Tensor, labels: Tensor, *, ref_logprobs: Tensor, beta: float = 0.1, shift: bool = True
) -> Tensor:
    ref = ref_logprobs.double()
    return weighted_ga(logits, labels, lambda lp: 2 * torch.sigmoid(beta * (lp - ref)), shift)


def dpo_loss(
    chosen: Tensor,
    chosen_labels: Tensor,
    rejected: Tensor,
    rejected_labels: Tensor,
    *,
    ref_chosen_logprobs: Tensor,
    ref_rejected_logprobs: Tensor,
    beta: float = 0.1,
    shift: bool = True,
) -> Tensor:
    """Mean over pairs with a valid token on either side of -log sigmoid(beta (dw - dl))."""
    sides = []
    for logits, labels, ref_lp in (
        (chosen, chosen_labels, ref_chosen_logprobs),
        (rejected, rejected_labels, ref_rejected_logprobs),
    ):
        lp, valid = _sequences(logits, labels, shift)
        ratio = torch.where(valid, lp - ref_lp.double().reshape(lp.shape), torch.zeros_like(lp))
        sides.append((ratio.sum(-1), valid.sum(-1)))
    (dw, nw), (dl, nl) = sides
    losses = [
        softplus(-beta * (dw[i] - dl[i])) for i in range(len(dw)) if int(nw[i]) + int(nl[i]) > 0
    ]
    return torch.stack(losses).mean() if losses else (dw.sum() + dl.sum()) * 0


def soft_target_ce(logits, target_logits, labels, label_shift, shift=True):
    """Token mean of -sum_v q_v log p_v with q = softmax(target - shift * onehot(label))."""
    x, y, valid, _ = align(logits, labels, shift)
    t = align(target_logits, labels, shift)[0].double().detach().clone()
    rows = torch.arange(len(y))[valid]
    t[rows, y[valid]] = t[rows, y[valid]] - label_shift
    q = torch.softmax(t, -1)
    logp = log_softmax(x)
    ce = -torch.where(q > 0, q * logp, torch.zeros_like(q)).sum(-1)
    return token_mean(ce, valid)


def undial_loss(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, *, beta: float = 10.0, shift: bool = True
) -> Tensor:
    return soft_target_ce(logits, ref_logits, labels, beta, shift)


def ceu_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    return soft_target_ce(logits, logits, labels, math.inf, shift)


def rmu_loss(
    forget: Tensor,
    retain: Tensor,
    ref_retain: Tensor,
    control: Tensor,
    forget_valid: Tensor,
    retain_valid: Tensor,
    alpha: float,
) -> Tensor:
    """Token means over valid positions of the per-position mean squared distance."""

    def distance(h, target, valid):
        d = ((h.double() - target.double()) ** 2).mean(-1)
        return token_mean(d, valid)

    return distance(forget, control, forget_valid) + alpha * distance(
        retain, ref_retain, retain_valid
    )


def negate_task_vector(
    base: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """θ_c − α(θ_* − θ_c) of every floating tensor in float64, rounded once; others copied."""
    return {
        name: (t.double() - alpha * (finetuned[name].double() - t.double())).to(t.dtype)
        if t.is_floating_point()
        else t.clone()
        for name, t in base.items()
    }


def logit_margin_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Mean over valid tokens of ``(max_v z - mean_v z)^2``, one row at a time."""
    x, _, valid, _ = align(logits, labels, shift)
    margins = [
        (row.double().max() - row.double().sum() / row.numel()) ** 2
        for row, keep in zip(x, valid, strict=True)
        if keep
    ]
    if not margins:
        return x.double().sum() * 0.0
    return sum(margins) / len(margins)


# --- KTO, FLAT, WHP, RKLD, ELM -----------------------------------------------------------------


def _sequence_log_ratios(logits, labels, ref_logprobs, shift):
    """Per sequence: the summed log-ratio to the reference and the count of valid labels."""
    lp, valid = _sequences(logits, labels, shift)
    ratio = torch.where(valid, lp - ref_logprobs.double().reshape(lp.shape), torch.zeros_like(lp))
    return ratio.sum(-1), valid.sum(-1)


def kto_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logprobs: Tensor,
    reference_point: float,
    beta: float = 0.1,
    variant: str = "sigmoid",
    shift: bool = True,
) -> Tensor:
    """Mean over non-empty sequences of 1 - sigmoid(beta (z0 - D)) or -(2/beta) log sigmoid(.)."""
    deltas, counts = _sequence_log_ratios(logits, labels, ref_logprobs, shift)
    z0 = float(reference_point)
    losses = []
    for delta, count in zip(deltas, counts, strict=True):
        if int(count) == 0:
            continue
        x = beta * (z0 - delta)
        if variant == "sigmoid":
            losses.append(1.0 - 1.0 / (1.0 + torch.exp(-x)))
        else:
            losses.append(2.0 / beta * softplus(-x))  # -log sigmoid(x) = softplus(-x)
    return torch.stack(losses).mean() if losses else deltas.sum() * 0


def kto_reference_point(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: bool = True) -> Tensor:
    """max(0, mean over rows of the summed log-ratio) (no clamp: the mean itself)."""
    rows = logprobs.double().reshape(-1, logprobs.shape[-1])
    ref_rows = ref_logprobs.double().reshape(rows.shape)
    mean = sum((a - b).sum() for a, b in zip(rows, ref_rows, strict=True)) / max(len(rows), 1)
    return torch.clamp(torch.as_tensor(mean, dtype=torch.float64), min=0.0) if clamp else mean


FLAT_VARIATIONAL = {
    # g*(v) and f*(g*(v)) of each f-divergence (f-GAN's Table 2).
    "kl": (lambda v: v, lambda v: torch.exp(v - 1)),
    "jensen_shannon": (
        lambda v: math.log(2) - torch.log1p(torch.exp(-v)),
        lambda v: torch.log1p(torch.exp(v)) - math.log(2),
    ),
    "pearson": (lambda v: v, lambda v: v**2 / 4 + v),
    "total_variation": (lambda v: torch.tanh(v) / 2, lambda v: torch.tanh(v) / 2),
}


def flat_loss(
    logits: Tensor,
    labels: Tensor,
    template_logits: Tensor,
    template_labels: Tensor,
    *,
    divergence: str = "total_variation",
    shift: bool = True,
) -> Tensor:
    """Mean over pairs with a valid token of -g*(mean template p) + f*(g*(mean forget p))."""
    g, conjugate = FLAT_VARIATIONAL[divergence]
    sides = []
    for x, y in ((logits, labels), (template_logits, template_labels)):
        lp, valid = _sequences(x, y, shift)
        sides.append([(lp[i][valid[i]].exp(), int(valid[i].sum())) for i in range(lp.shape[0])])
    losses = []
    for (forget, n_forget), (template, n_template) in zip(*sides, strict=True):
        if n_forget + n_template == 0:
            continue
        loss = torch.zeros((), dtype=torch.float64)
        if n_template:
            loss = loss - g(template.sum() / n_template)
        if n_forget:
            loss = loss + conjugate(forget.sum() / n_forget)
        losses.append(loss)
    # 0 connected to both inputs (a masked -inf logit times 0 would be NaN).
    anchor = logits.double().flatten()[:0].sum() + template_logits.double().flatten()[:0].sum()
    return torch.stack(losses).mean() + anchor if losses else anchor


def whp_targets(ref_logits: Tensor, reinforced_logits: Tensor, alpha: float) -> Tensor:
    """z_ref - alpha relu(z_reinf - z_ref) in float64; an entry masked (-inf) in the reference
    stays masked."""
    ref, reinforced = ref_logits.double(), reinforced_logits.double()
    if alpha == 0:
        return ref.clone()
    target = ref - alpha * torch.relu(reinforced - ref)
    masked = torch.isneginf(ref) & ~torch.isnan(reinforced)
    return torch.where(masked, torch.full_like(ref, -math.inf), target)


def elm_targets(ref_logits: Tensor, positive: Tensor, negative: Tensor, eta: float) -> Tensor:
    """log p + eta (log p+ - log p-) in float64; an entry masked (-inf) in any of the three
    stays masked."""
    helpers = [t.double() for t in (ref_logits, positive, negative)]
    if eta == 0:
        return log_softmax(helpers[0])
    logp, logp_pos, logp_neg = (log_softmax(t) for t in helpers)
    target = logp + eta * (logp_pos - logp_neg)
    masked = torch.stack([torch.isneginf(t) for t in helpers]).any(0)
    masked &= ~torch.stack([torch.isnan(t) for t in helpers]).any(0)
    return torch.where(masked, torch.full_like(target, -math.inf), target)


def _rows_of(logits: Tensor, labels: Tensor | None, shift: bool):
    """(scored rows (N', V), targets, valid) of ``logits``; without labels every row counts."""
    if labels is None:
        rows = logits.reshape(-1, logits.shape[-1])
        return rows, None, torch.ones(rows.shape[0], dtype=torch.bool)
    x, y, valid, _ = align(logits, labels, shift)
    return x, y, valid


def whp_loss(
    logits: Tensor,
    ref_logits: Tensor,
    reinforced_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    shift: bool = True,
) -> Tensor:
    """Token mean of -log p(argmax z*), one row at a time."""
    x, _, valid = _rows_of(logits, labels, shift)
    target = whp_targets(
        _rows_of(ref_logits, labels, shift)[0], _rows_of(reinforced_logits, labels, shift)[0], alpha
    )
    logp = log_softmax(x)
    nll = [-logp[i, int(target[i].argmax())] for i in range(len(x)) if valid[i]]
    return torch.stack(nll).mean() if nll else x.double().flatten()[:0].sum()


def rkld_loss(
    logits: Tensor,
    ref_logits: Tensor,
    reinforced_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    shift: bool = True,
) -> Tensor:
    """Token mean of KL(P_theta || softmax(z*))."""
    x, _, valid = _rows_of(logits, labels, shift)
    target = whp_targets(
        _rows_of(ref_logits, labels, shift)[0], _rows_of(reinforced_logits, labels, shift)[0], alpha
    )
    return token_mean(token_kl(x, target, "forward"), valid)


def elm_loss(
    logits: Tensor,
    ref_logits: Tensor,
    positive_logits: Tensor,
    negative_logits: Tensor,
    labels: Tensor | None = None,
    *,
    eta: float,
    shift: bool = True,
) -> Tensor:
    """Token mean of -sum_v q_v log p_v, q = softmax(log p + eta (log p+ - log p-))."""
    x, _, valid = _rows_of(logits, labels, shift)
    helpers = [
        _rows_of(t, labels, shift)[0] for t in (ref_logits, positive_logits, negative_logits)
    ]
    q = torch.softmax(elm_targets(helpers[0], helpers[1], helpers[2], eta), -1)
    logp = log_softmax(x)
    ce = -torch.where(q > 0, q * logp, torch.zeros_like(q)).sum(-1)
    return token_mean(ce, valid)


# --- ME, IHL and JSD: losses of whole rows of the vocabulary -----------------------------------


def me_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Mean over valid tokens of KL(U || p), U uniform over each row's finite logits, one row at
    a time."""
    x, _, valid, _ = align(logits, labels, shift)
    values = []
    for row, keep in zip(x.double(), valid, strict=True):
        if keep:
            finite = row > -math.inf
            logp = log_softmax(row)[finite]
            values.append(-math.log(logp.numel()) - logp.sum() / logp.numel())
    return torch.stack(values).mean() if values else torch.zeros((), dtype=torch.float64)


def ihl_loss(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Mean over valid tokens of ``1 + p_y - p_a``, ``a`` the first largest logit other than the
    label's (``p_a = 0`` without one), one row at a time."""
    x, y, valid, _ = align(logits, labels, shift)
    values = []
    for row, label, keep in zip(x.double(), y.tolist(), valid, strict=True):
        if not keep:
            continue
        p = log_softmax(row).exp()
        others = [v for v in range(row.numel()) if v != label]
        rival = p[max(others, key=lambda v: row[v].item())] if others else 0.0
        values.append(1.0 + p[label] - rival)
    return torch.stack(values).mean() if values else torch.zeros((), dtype=torch.float64)


def jsd_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logits: Tensor | None = None,
    beta: float = 0.5,
    shift: bool = True,
) -> Tensor:
    """Token mean of beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, Q the
    reference's distribution or the label's one-hot one, from the mixture itself."""
    x, y, valid, _ = align(logits, labels, shift)
    logp = log_softmax(x)
    if ref_logits is None:
        logq = torch.full_like(logp, -math.inf)
        logq[torch.arange(len(y)), torch.where(valid, y, 0).long()] = 0.0
    else:
        logq = log_softmax(align(ref_logits, labels, shift)[0]).detach()
    p, q = logp.exp(), logq.exp()
    mixture = beta * p + (1 - beta) * q
    # Zero-weight entries contribute 0; the masked operands keep autograd free of inf - inf.
    log_mixture = torch.log(torch.where(mixture > 0, mixture, 1.0))

    def kl_to_mixture(w: Tensor, logw: Tensor) -> Tensor:
        logw = torch.where(w > 0, logw, 0.0)
        return torch.where(w > 0, w * (logw - log_mixture), 0.0).sum(-1)

    jsd = beta * kl_to_mixture(p, logp) + (1 - beta) * kl_to_mixture(q, logq)
    return token_mean(jsd, valid)
