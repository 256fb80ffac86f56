"""The generalised Jensen-Shannon divergence to a target distribution (JensUn)."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..ops import vocab_stats
from ..ops.vocab_numerics import jsd_of_label
from ..reductions import REDUCTIONS, Reduction, token_reduce


@shared_arguments
def jsd_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logits: Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
    vocab_group: object = None,
) -> Tensor:
    r"""The generalised Jensen-Shannon divergence from the model to a target, to minimize.

    $$
    \mathrm{JSD}_\beta(P \,\|\, Q) = \beta\,\mathrm{KL}(P \,\|\, M) + (1 - \beta)\,\mathrm{KL}(Q
    \,\|\, M), \quad M = \beta P + (1 - \beta) Q, \qquad
    \mathcal{L} = \frac{1}{|M|} \sum_{t \in M} \mathrm{JSD}_\beta(P_t \,\|\, Q_t)
    $$

    with $P_t$ the model's next-token distribution and $Q_t$ the target: the one-hot
    distribution of the label (without ``ref_logits``) or the reference model's distribution
    (``ref_logits``, a constant). JensUn (Singh et al., 2025, "Unlearning That Lasts:
    Utility-Preserving, Robust, and Almost Irreversible Forgetting in LLMs", arXiv 2509.02820)
    minimizes it at $\beta = 1/2$ on the forget set toward a refusal such as "No idea" and on the
    retain set toward the reference model; both terms are bounded by the entropy of the weights,
    $\log 2$ at $\beta = 1/2$ (the JSD proper), so neither can run away. It is 0 exactly where
    $P = Q$, with a zero gradient.

    The authors' code (``nmndeep/JensUn-Unlearning``, ``src/trainer/utils.py``) runs the model
    on the forget question and its true answer and targets, at the answer's positions, the
    refusal's tokens repeated cyclically ("No", " Idea", "No", ...): pass those as ``labels``
    at the answer's positions, with the logits of that run. It fixes $\beta = 1/2$, clamps both
    distributions at ``1e-9`` without renormalising (a token's value moves by about ``1e-4`` at
    $V$ = 32k), averages over the valid tokens of the batch and weighs forget and retain terms 1;
    its retain term is this loss with ``ref_logits`` (the mixture's logarithm floored at
    ``1e-10``). Its first release (September 2025) read no labels: it averaged both terms over
    every position of the batch, prompt and padding included, and gave its forget target mass 1
    on every refusal token at every position.

    Gradient w.r.t. the logits: $\beta\,p_j\big(\log(p_j / m_j) - \mathrm{KL}(P \,\|\,
    M)\big)$. The mixture's logarithm is never taken (its probabilities may underflow where the
    model's and the target's do not: the NaN of Liger-Kernel's issue 769); with
    $d = \log q - \log p$, $\log(m / p) = \log(\beta + (1 - \beta) e^d)$ is formed as
    ``log1p((1 - beta) * expm1(d))``, finite for any $d$ and exactly 0 at $d = 0$, with $d$
    centred on the logits and the divergence summed in second-order terms, so that nothing
    cancels near the reference (``docs/losses.md`` has the details). Against a one-hot
    target the value depends on $p_y$ alone,
    $-\beta (1 - p_y) \log \beta + \beta p_y \log p_y - m_y \log m_y$ with
    $m_y = 1 - \beta (1 - p_y)$, and runs on the label log-probability primitive.

    $\beta$ weights the model's distribution, as in GKD's $\mathrm{JSD}(\beta)$ written with the
    model first; Liger-Kernel's ``LigerJSD`` and TRL's ``generalized_jsd_loss`` weight the
    teacher's (target's) by their ``beta``: theirs is $1 - \beta$ here. At the default $1/2$ the
    two agree.

    Args:
        logits: {logits}
        labels: {labels} Without ``ref_logits`` they are the target tokens.
        ref_logits: the reference's logits, the shape, dtype and device of ``logits`` (with
            ``vocab_group``, sharded like them): the target is their softmax, and ``labels`` only
            select the positions. ``None``: the target is the label's one-hot distribution.
        beta: the model's weight in the mixture, in (0, 1) (default 1/2: the symmetric JSD).
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
        >>> jsd_loss(logits, labels, ref_logits=logits)  # a distribution against itself
        tensor(0.)
        >>> m = 0.5 * 0.25 + 0.5  # the mixture's probability of the label
        >>> expected = 0.5 * (0.75 * math.log(2) + 0.25 * math.log(0.25 / m)) - 0.5 * math.log(m)
        >>> jsd_loss(logits, labels), expected  # to the label's one-hot distribution
        (tensor(0.3804), 0.38039566584857787)
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
    if ref_logits is not None:
        ref_logits = tokens.like_logits(ref_logits, "ref_logits")
    beta = _checks.check_finite_number(beta, "beta", positive=True)
    if beta >= 1.0:
        raise ValueError(f"beta must be < 1 (the mixture's weight of the model); got {beta}")
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    if ref_logits is None:
        logprobs = ops.label_logprobs(
            tokens.logits,
            tokens.targets,
            tokens.valid,
            backend=backend,
            inplace_backward=inplace_backward,
            vocab=tokens.sharding.vocab,
        )
        per_token = jsd_of_label(logprobs, beta)
    else:
        per_token = vocab_stats.token_jsd(
            tokens.logits,
            ref_logits,
            tokens.valid,
            beta=beta,
            backend=backend,
            inplace_backward=inplace_backward,
            vocab=tokens.sharding.vocab,
        )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )
