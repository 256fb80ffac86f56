r"""Forget losses whose target is built from helper models' logits: WHP, RKLD and ELM.

Each combines the logits of frozen helper models (the original model and one fine-tuned further
on the forget set; or the original model under two prompts) into target logits, and trains the
model toward them:

- WHP: $z^* = z^{ref} - \alpha\,\mathrm{ReLU}(z^{reinf} - z^{ref})$, cross-entropy to
  $\arg\max z^*$;
- RKLD: the same $z^*$, $\mathrm{KL}(p_\theta \,\|\, \mathrm{softmax}(z^*))$;
- ELM: $q = \mathrm{softmax}(\log p + \eta(\log p^{+} - \log p^{-}))$, cross-entropy to $q$.

The targets are built inside the reduction, one chunk of rows at a time in float32 (float64 for
float64 logits), and never held whole: no ``(N, V)`` float32 tensor beside the inputs. WHP's
argmax labels feed the label log-prob primitive; RKLD and ELM run the two-distribution
primitive (KL, soft-target cross-entropy; Triton kernels or the chunked path) chunk by chunk in
an ``autograd.Function`` whose backward rebuilds each chunk's target. None of them has a
vocabulary-parallel path: a vocabulary shard (a DTensor sharded on its last dimension) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .. import _checks, _tokens, ops
from .._doc import shared_arguments
from ..ops import chunked
from ..ops.autocast import without_autocast
from ..ops.numerics import PairMode, accumulation_dtype
from ..reductions import REDUCTIONS, Reduction, token_reduce

#: Bytes of float32 rows per target chunk on an accelerator: large chunks keep the launches few
#: (on the CPU, ``chunked.CHUNK_BYTES``, which keeps a chunk in cache).
ACCELERATOR_CHUNK_BYTES = 64 * 1024 * 1024

#: Writes one chunk's target logits into its first argument (a float buffer of the chunk's
#: shape; the second is scratch of the same shape) from the helpers' rows of that chunk, and
#: returns it.
TargetOf = Callable[[Tensor, Tensor, list[Tensor]], Tensor]


def _budget(logits: Tensor) -> int:
    return chunked.CHUNK_BYTES if logits.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


def _finite_on_cpu(target: Tensor) -> bool:
    """Whether ``target`` is known to be finite everywhere: checked on the CPU, where reading it
    costs no device sync (then no entry needs the masking rules); never elsewhere."""
    return (
        target.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and bool(torch.isfinite(target).all())
    )


def whp_target_logits(
    out: Tensor,
    ref_logits: Tensor,
    reinforced_logits: Tensor,
    alpha: float,
    work: Tensor | None = None,
) -> Tensor:
    r"""$z^{ref} - \alpha\,\mathrm{ReLU}(z^{reinf} - z^{ref})$ into ``out`` (any float dtype;
    ``work``: scratch of its shape and dtype).

    An entry masked in the reference (``-inf``) stays masked, whatever the reinforced model
    holds there (``-inf - -inf`` would be NaN); NaN stays NaN.
    """
    target = out.copy_(ref_logits)
    if alpha == 0.0:
        return target
    boost = torch.empty_like(out) if work is None else work
    boost.copy_(reinforced_logits).sub_(target).relu_().mul_(alpha)
    target.sub_(boost)
    if _finite_on_cpu(target):  # no masked entry (a masked one ends -inf or NaN)
        return target
    masked = torch.isneginf(ref_logits) & ~torch.isnan(reinforced_logits)
    return target.masked_fill_(masked, float("-inf"))


def elm_target_logits(
    out: Tensor,
    ref_logits: Tensor,
    positive_logits: Tensor,
    negative_logits: Tensor,
    eta: float,
    work: Tensor | None = None,
) -> Tensor:
    r"""$z + \eta\,(z^{+} - z^{-})$ into ``out`` (``work``: scratch of its shape and dtype):
    ELM's target logits, equal to $\log p + \eta(\log p^{+} - \log p^{-})$ up to a per-row
    constant that the softmax removes.

    An entry masked (``-inf``) in any of the three stays masked (``-inf - -inf`` would be NaN,
    and a masked negative would give it infinite weight); NaN stays NaN.
    """
    target = out.copy_(ref_logits)
    if eta == 0.0:
        return target
    steer = torch.empty_like(out) if work is None else work
    target.add_(steer.copy_(positive_logits).sub_(negative_logits), alpha=eta)
    if _finite_on_cpu(target):  # no masked entry (a masked one ends infinite or NaN)
        return target
    masked = torch.isneginf(ref_logits)
    masked |= torch.isneginf(positive_logits)
    masked |= torch.isneginf(negative_logits)
    given_nan = torch.isnan(ref_logits)
    given_nan |= torch.isnan(positive_logits)
    given_nan |= torch.isnan(negative_logits)
    return target.masked_fill_(masked & ~given_nan, float("-inf"))


def _align(logits: Any, labels: Any, ignore_index: int, shift: bool, backend: str, validate: bool):
    """The tokens of a loss without a vocabulary-parallel path (every position without labels)."""
    if labels is None:
        _checks.check_choice(backend, ops.BACKENDS, "backend")
        return _tokens.align_all_positions(logits, vocab_parallel=False)
    return _tokens.align(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        validate=validate,
        vocab_parallel=False,
    )


@shared_arguments
def whp_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logits: Tensor,
    reinforced_logits: Tensor,
    alpha: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Who's Harry Potter (WHP) forget loss: fine-tuning on the generic predictions.

    $$
    z^*_t = z^{ref}_t - \alpha\,\mathrm{ReLU}\big(z^{reinf}_t - z^{ref}_t\big), \qquad
    \mathcal{L}_{WHP} = -\frac{1}{|M|}\sum_{t \in M} \log p_\theta\big(\arg\max_v z^*_{t,v}\big)
    $$

    (Eldan & Russinovich, 2023, "Who's Harry Potter? Approximate Unlearning in LLMs"). The
    reinforced model is the reference (baseline) model fine-tuned further on the forget text:
    tokens it likes more than the baseline are the ones the text makes likely, and lowering them
    leaves the generic prediction $z^*$. The model is trained with cross-entropy to its argmax
    (ties: the first), at the forget text's positions; the labels only select positions.
    Gradient $(p_t - e_{\arg\max z^*_t})/|M|$. The paper also replaces idiosyncratic terms in
    the input by generic ones ("anchored terms"): that is data preparation, before the loss.

    MUSE (``baselines/whos_harry_potter.py``) builds the same $z^*$ (``baseline`` is
    ``ref_logits``, ``reinforced`` is ``reinforced_logits``, ``alpha`` its default 1) but
    serves it as the unlearned model's logits at inference, without fine-tuning; its targets
    equal :func:`whp_target_logits`' (tested against its file).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being unlearned.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ref_logits: the baseline (original) model's logits, same shape, dtype and device; a
            constant.
        reinforced_logits: the reinforced model's logits, the same.
        alpha: how far the reinforced model's excess is subtracted, >= 0 (default 1.0, MUSE's).
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values.

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: shapes that do not match, a negative or non-finite ``alpha``, a vocabulary
            shard (this loss has no vocabulary-parallel path).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> ref = torch.tensor([0.0, 2.0, 1.0, 0.0]).expand(1, 3, 4)
        >>> reinforced = torch.tensor([0.0, 4.0, 1.0, 0.0]).expand(1, 3, 4)  # likes token 1 more
        >>> whp_loss(logits, labels, ref_logits=ref, reinforced_logits=reinforced)  # -log(1/4)
        tensor(1.3863)
    """
    tokens = _align(logits, labels, ignore_index, shift, backend, validate)
    ref = tokens.like_logits(ref_logits, "ref_logits")
    reinforced = tokens.like_logits(reinforced_logits, "reinforced_logits")
    alpha = _checks.check_finite_number(alpha, "alpha", nonnegative=True)
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    with torch.no_grad():
        targets, undefined = _argmax_targets(
            tokens.logits,
            tokens.valid,
            lambda out, work, rows: whp_target_logits(out, rows[0], rows[1], alpha, work),
            (ref, reinforced),
        )
    logprobs = ops.label_logprobs(
        tokens.logits, targets, tokens.valid, backend=backend, inplace_backward=inplace_backward
    )
    per_token = torch.where(undefined, float("nan"), -logprobs)  # NaN in a helper: NaN out
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )


def _argmax_targets(
    logits: Tensor, valid: Tensor, target_of: TargetOf, helpers: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Per row of ``[:, :L]``, the argmax of the chunk-built target logits (0 where not valid),
    and whether the row's target holds a NaN: ``argmax`` takes a NaN for the largest entry, so
    such a row would otherwise train toward the NaN's column, silently."""
    targets = torch.zeros(valid.shape, dtype=torch.long, device=logits.device)
    undefined = torch.zeros(valid.shape, dtype=torch.bool, device=logits.device)
    for b, t, target in _chunks(logits, valid, target_of, helpers):
        targets[b, t] = torch.where(valid[b, t], target.argmax(-1), 0)
        undefined[b, t] = valid[b, t] & torch.isnan(target).any(-1)
    return targets, undefined


@shared_arguments
def rkld_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logits: Tensor,
    reinforced_logits: Tensor,
    alpha: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""RKLD forget loss: reverse-KL distillation toward an unlearning teacher.

    $$
    z^*_t = z^{ref}_t - \alpha\,\mathrm{ReLU}\big(z^{reinf}_t - z^{ref}_t\big), \qquad
    \mathcal{L}_{RKLD} = \frac{1}{|M|}\sum_{t \in M}
        \sum_v p_\theta(v)\,\big(\log p_\theta(v) - \log \mathrm{softmax}(z^*_t)_v\big)
    $$

    (Wang et al., 2024, "RKLD: Reverse KL-Divergence-based Knowledge Distillation for
    Unlearning Personal Information in Large Language Models", arXiv 2406.01983; published at
    NAACL 2025 as "Balancing Forget Quality and Model Utility: A Reverse KL-Divergence Knowledge
    Distillation Approach for Better Unlearning in LLMs", where the method is named RKLU). The
    teacher is WHP's generic prediction (see :func:`whp_loss`), kept as a distribution;
    "reverse" is the distillation sense, student first: $\mathrm{KL}(p_\theta \| q)$,
    mode-seeking, so the student drops the teacher's lowered tokens rather than spreading mass
    over them. In this library's naming that is the ``"forward"`` direction of
    :func:`kl_divergence` (model first). Gradient $p_j(\log p_j - \log q_j - \mathrm{KL}_t)/|M|$.
    No code from the authors was found to compare with. Tokens with $q = 0$ (masked in the
    reference) are treated as :func:`kl_divergence` treats them.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being unlearned.
        labels: ``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.
        ref_logits: the original model's logits, same shape, dtype and device; a constant.
        reinforced_logits: the logits of the original model fine-tuned further on the forget
            set, the same.
        alpha: how far the reinforced model's excess is subtracted, >= 0.
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values.

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: shapes that do not match, a negative or non-finite ``alpha``, a vocabulary
            shard (this loss has no vocabulary-parallel path).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> # no excess anywhere: the teacher is the reference, here the model itself
        >>> rkld_loss(logits, labels, ref_logits=logits, reinforced_logits=logits - 1)
        tensor(0.)
    """
    tokens = _align(logits, labels, ignore_index, shift, backend, validate)
    ref = tokens.like_logits(ref_logits, "ref_logits")
    reinforced = tokens.like_logits(reinforced_logits, "reinforced_logits")
    alpha = _checks.check_finite_number(alpha, "alpha", nonnegative=True)
    return _pair_reduce(
        tokens,
        PairMode.KL_FORWARD,
        lambda out, work, rows: whp_target_logits(out, rows[0], rows[1], alpha, work),
        (ref, reinforced),
        reduction,
        num_items_in_batch,
        backend,
        inplace_backward,
    )


@shared_arguments
def elm_loss(
    logits: Tensor,
    labels: Tensor | None = None,
    *,
    ref_logits: Tensor,
    positive_logits: Tensor,
    negative_logits: Tensor,
    eta: float,
    ignore_index: int = -100,
    shift: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: ops.Backend = "auto",
    validate: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    r"""ELM's erasing loss (Erasure of Language Memory): cross-entropy to the model's own
    distribution steered away from the concept.

    $$
    q_t = \mathrm{softmax}\big(\log p_t + \eta\,(\log p^{+}_t - \log p^{-}_t)\big), \qquad
    \mathcal{L}_{ELM} = \frac{1}{|M|}\sum_{t \in M} -\sum_v q_{t,v} \log p_\theta(v)
    $$

    (Gandikota et al., 2024, "Erasing Conceptual Knowledge from Language Models", arXiv
    2410.02760). $p$ is the original model on the text, $p^{+}$ the original model with a
    prefix for the concept to promote ($c_+$, e.g. "written by a novice") and $p^{-}$ with one
    for the concept to erase ($c_-$, "written by an expert"): by Bayes' rule
    $q \propto p\,\big(p(c_+ \mid x)/p(c_- \mid x)\big)^\eta$. All three are frozen; slice the
    prefixed runs so that row *t* of each scores the same next token as ``logits[:, t]``.
    Gradient $(p_t - q_t)/|M|$. This is the erasing term only; ELM's objective adds a retain
    term and a conditional-fluency term.

    The authors' code (``rohitgandikota/erasing-llm``, ``trainscripts/erase.py``) takes the
    same soft-target cross-entropy (``--loss cross``; ``kld`` gives $\mathrm{KL}(q \| p)$, the
    same gradient) but builds $q$ differently: its ``positive_concept_prompt`` is the expert
    prompt, the one to erase ($c_-$ here); it ramps $\eta$ linearly from 1 to ``--eta``
    (default 1000) along the positions of each text; it divides the three models' logits by a
    temperature (default 1.2: divide ``ref_logits``, ``positive_logits``, ``negative_logits`` by
    it to match) before the log-softmax; and it keeps only the 50 largest target logits of each
    position (``--topk``), masking the rest. It averages over every position of the unpadded
    text (``labels=None``). With a constant $\eta$ and no top-k its erasing term is this
    function's value. Its other terms, weight 1 each: on retain text, the cross-entropy to the
    original model's most likely token at each position (``nll_loss`` of those argmax labels,
    ``shift=False``); and, for fluency, the NLL of a continuation that the original model
    samples under the same steering after the erased text and a change-of-topic phrase.

    An entry masked (``-inf``) in any of the three helpers is masked in $q$; a row where every
    entry is masked has no target and gives NaN.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, the model being trained (on the plain text).
        labels: selects positions as in :func:`ga_loss` (with the shift); ``None`` counts every
            position of the logits (shift then does not apply).
        ref_logits: the original model on the plain text, same shape, dtype and device; a
            constant.
        positive_logits: the original model on the text after the $c_+$ prefix, aligned.
        negative_logits: the original model on the text after the $c_-$ prefix, aligned.
        eta: the erasing strength $\eta$, finite (0: distillation to the original model).
        ignore_index: {ignore_index}
        shift: {shift}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        backend: {backend}
        validate: {validate}
        inplace_backward: {inplace_backward}

    Returns:
        A float32 scalar (float64 for float64 logits), or per-token values.

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: shapes that do not match, a non-finite ``eta``, a vocabulary shard (this
            loss has no vocabulary-parallel path).

    Example:
        >>> import math, torch
        >>> logits = torch.zeros(1, 3, 4)  # every token 1/4
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> ref = torch.randn(1, 3, 4)
        >>> # the cross-entropy to any target from a uniform model is log V
        >>> elm_loss(logits, labels, ref_logits=ref, positive_logits=ref, negative_logits=-ref,
        ...          eta=2.0), math.log(4)
        (tensor(1.3863), 1.3862943611198906)
    """
    tokens = _align(logits, labels, ignore_index, shift, backend, validate)
    helpers = tuple(
        tokens.like_logits(value, name)
        for value, name in (
            (ref_logits, "ref_logits"),
            (positive_logits, "positive_logits"),
            (negative_logits, "negative_logits"),
        )
    )
    eta = _checks.check_finite_number(eta, "eta")
    return _pair_reduce(
        tokens,
        PairMode.SOFT_TARGET,
        lambda out, work, rows: elm_target_logits(out, rows[0], rows[1], rows[2], eta, work),
        helpers,
        reduction,
        num_items_in_batch,
        backend,
        inplace_backward,
    )


def _pair_reduce(
    tokens: _tokens.Tokens,
    mode: PairMode,
    target_of: TargetOf,
    helpers: tuple[Tensor, ...],
    reduction: str,
    num_items_in_batch: object,
    backend: str,
    inplace_backward: bool,
) -> Tensor:
    """The token reduction of ``mode``'s per-token value against the chunk-built target."""
    _checks.check_choice(reduction, REDUCTIONS, "reduction")
    num_items = _checks.check_mean_count(num_items_in_batch, tokens.logits, reduction)
    which = ops.resolve_backend(backend, tokens.logits)
    per_token = _HelperTargetPair.apply(
        tokens.logits,
        tokens.valid,
        mode,
        target_of,
        which,
        inplace_backward,
        *helpers,
    )
    return tokens.unflatten(
        token_reduce(per_token, tokens.valid, reduction, num_items, tokens.sharding)
    )


class _HelperTargetPair(torch.autograd.Function):
    """Per-token value of a ``PairMode`` (KL or soft-target cross-entropy) between the logits and
    a target that ``target_of`` builds from the helpers, chunk by chunk of rows, forward and
    backward: the target is never held whole, and the backward rebuilds each chunk's."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: Any,
        logits: Tensor,
        valid: Tensor,
        mode: PairMode,
        target_of: TargetOf,
        backend: str,
        inplace_backward: bool,
        *helpers: Tensor,
    ) -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        out = torch.zeros(valid.shape, dtype=acc, device=logits.device)
        # The Triton backward reads the forward's log-sum-exp and row constant.
        stats: tuple[Tensor, ...] = ()
        if backend == "triton":
            stats = (torch.zeros_like(out), torch.zeros_like(out))
        unread = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        for b, t, target in _chunks(logits, valid, target_of, helpers):
            if backend == "triton":
                from ..ops import triton_kl

                value, lse, aux = triton_kl.pair_forward(
                    logits[b, t], target, unread[b, t], valid[b, t], mode, 0.0
                )
                stats[0][b, t], stats[1][b, t] = lse, aux
            else:
                value = chunked.pair_forward(
                    logits[b, t], target, unread[b, t], valid[b, t], mode, 0.0
                )
            out[b, t] = value
        ctx.save_for_backward(logits, valid, out, *stats, *helpers)
        ctx.mode, ctx.target_of, ctx.backend = mode, target_of, backend
        ctx.inplace_backward, ctx.helpers = inplace_backward, len(helpers)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor) -> tuple:  # type: ignore[override]
        logits, valid, out, *rest = ctx.saved_tensors
        helpers = tuple(rest[len(rest) - ctx.helpers :])
        stats = rest[: len(rest) - ctx.helpers]
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        vocab, budget = logits.shape[-1], _budget(logits)
        chunked.zero_outside(grad, chunked.row_groups(valid, vocab, budget))
        unread = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        for b, t, target in _chunks(logits, valid, ctx.target_of, helpers):
            if ctx.backend == "triton":
                from ..ops import triton_kl

                lse, aux = (s[b, t].contiguous() for s in stats)
                triton_kl.pair_backward(
                    grad_out[b, t],
                    logits[b, t],
                    target,
                    unread[b, t],
                    valid[b, t],
                    lse,
                    aux,
                    out[b, t].contiguous(),
                    ctx.mode,
                    0.0,
                    grad[b, t],
                )
            else:
                chunked.pair_backward(
                    grad_out[b, t],
                    logits[b, t],
                    target,
                    unread[b, t],
                    valid[b, t],
                    out[b, t],
                    ctx.mode,
                    0.0,
                    grad[b, t],
                )
        return (grad, None, None, None, None, None, *(None for _ in helpers))


def _chunks(
    logits: Tensor, valid: Tensor, target_of: TargetOf, helpers: tuple[Tensor, ...]
) -> Iterator[tuple[slice, slice, Tensor]]:
    """``(batch slice, time slice, target logits)`` of each chunk of rows; the target lives in
    one reused buffer, valid until the next chunk."""
    vocab, budget = logits.shape[-1], _budget(logits)
    acc = accumulation_dtype(logits.dtype)
    out, work = chunked.Scratch(logits, acc, budget), chunked.Scratch(logits, acc, budget)
    for b, t in chunked.row_chunks(chunked.row_groups(valid, vocab, budget), vocab, budget):
        rows = [h[b, t] for h in helpers]
        yield b, t, target_of(out(rows[0].shape), work(rows[0].shape), rows)
