"""One registry of the public losses: how to call each on a standard batch, which options it
takes, and its float64 reference.

A test that runs "every loss" builds its table from :func:`entries` instead of keeping its own:
a loss registered here reaches every such test, and ``tests/test_registry.py`` fails when a
public loss is missing. An :class:`Entry` is one way of calling a loss (NPO at each granularity,
from cached reference log-probs or from reference logits, KL in each direction); its input is
the model's own tensor, logits, hidden states or activations by its ``kind``, and everything else
comes from a :class:`Batch`.

Example:
    >>> import torch
    >>> from unlearning_losses.testing import Batch, entry, entries
    >>> logits = torch.zeros(1, 3, 4)
    >>> batch = Batch(torch.tensor([[-100, 1, 2]]), ref_logits=torch.zeros(1, 3, 4))
    >>> entry("kl_divergence[reverse]")(logits, batch)
    tensor(0.)
    >>> "npo_loss" in [e.name for e in entries("logits", takes="num_sequences")]
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import unlearning_losses as ul

from . import reference

Kind = Literal["logits", "hidden", "activations"]
KINDS: tuple[Kind, ...] = ("logits", "hidden", "activations")
#: Public functions ending in ``_loss`` that are no loss of an input, with the reason: the
#: completeness test accepts these and no other gap.
NOT_REGISTERED: Mapping[str, str] = {
    "pdu_loss": "the Lagrangian of two scalar losses already computed, like combine_with_retain",
}


@dataclass(frozen=True)
class Batch:
    """Everything a loss reads besides the model's own tensor.

    Losses of logits read ``labels`` and, by entry, ``ref_logits`` or ``ref_logprobs`` (one per
    scored label, as :func:`~unlearning_losses.token_logprobs` gives); losses of hidden states add
    the output head (``weight``, ``bias``) and the reference's ``ref_hidden``; RMU reads
    ``ref_hidden`` as the reference's retain activations and ``control_vector``. A field an entry
    does not read may stay None.
    """

    labels: Tensor
    ref_logits: Tensor | None = None
    ref_logprobs: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    ref_hidden: Tensor | None = None
    control_vector: Tensor | None = None

    @classmethod
    def with_reference(cls, labels: Tensor, ref_logits: Tensor, *, shift: bool = True) -> Batch:
        """Labels and reference logits, with the reference's log-probs from the float64
        reference math: the cached and the uncached reference then agree to float64."""
        return cls(labels, ref_logits, reference.token_logprobs(ref_logits, labels, shift))

    def rows(self, index: slice | Tensor) -> Batch:
        """The sequences ``index`` of every per-sequence field; the head is shared."""
        per_sequence = ("labels", "ref_logits", "ref_logprobs", "ref_hidden")
        return replace(
            self,
            **{
                name: getattr(self, name)[index]
                for name in per_sequence
                if getattr(self, name) is not None
            },
        )

    def logits_of(self, hidden: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``hidden @ weight.T + bias`` with this batch's head, in ``dtype`` if given."""
        assert self.weight is not None, "a batch of hidden states needs its head (weight)"
        weight, bias = self.weight, self.bias
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return F.linear(hidden, weight, bias)

    def on_logits(self, dtype: torch.dtype | None = None) -> Batch:
        """What the logits version of a loss of hidden states reads: the reference's logits are
        ``ref_hidden`` through the model's head (a constant, as the fused losses take it)."""
        ref_logits = None
        if self.ref_hidden is not None:
            ref_logits = self.logits_of(self.ref_hidden, dtype).detach()
        return Batch(self.labels, ref_logits, self.ref_logprobs)


Call = Callable[..., Tensor]


@dataclass(frozen=True)
class Entry:
    """One way of calling one public loss.

    Attributes:
        name: the function's name, with the variant in brackets (``"npo_loss[token]"``).
        kind: what the input is: ``"logits"``, ``"hidden"`` states with a head, ``"activations"``.
        function: the public function.
        call: ``call(input, batch, **options)``, the loss; :meth:`__call__` is the same.
        reference: the float64 reference of ``call`` with the same arguments (of the options,
            it models ``shift`` and the loss's own parameters).
        bound: keyword arguments the call fills in itself, or that this variant refuses (the
            granularity of an NPO variant, ``num_sequences`` for token NPO).
        labelled: the loss counts only positions whose label is not ignored.
        min_finite: finite logits each scored row needs (CE-U's target drops the label: 2).
        all_finite: every logit must be finite, ignored rows' too (the margin over the mean
            logit; a ``-inf`` of a masked vocabulary gives a NaN gradient even where ignored).
        on_logits: for a loss of hidden states, the entry of its logits version.
    """

    name: str
    kind: Kind
    function: Callable[..., Tensor]
    call: Call
    reference: Call
    bound: frozenset[str] = frozenset()
    labelled: bool = True
    min_finite: int = 1
    all_finite: bool = False
    on_logits: str | None = None

    def __call__(self, input: Tensor, batch: Batch, **options: Any) -> Tensor:
        return self.call(input, batch, **options)

    @property
    def takes(self) -> frozenset[str]:
        """The options a test may pass: the function's keyword-only parameters, less ``bound``."""
        parameters = inspect.signature(self.function).parameters.values()
        return frozenset(p.name for p in parameters if p.kind == p.KEYWORD_ONLY) - self.bound

    @property
    def count(self) -> str | None:
        """The option that takes a global count (data parallel): ``"num_items_in_batch"`` for a
        token mean, ``"num_sequences"`` for a mean over sequences, None for neither."""
        for option in ("num_items_in_batch", "num_sequences"):
            if option in self.takes:
                return option
        return None

    def defined_on(self, logits: Tensor, labels: Tensor, shift: bool = True) -> bool:
        """Whether the loss is defined on these logits: they hold the finite entries the loss
        needs (a masked vocabulary may leave fewer)."""
        if self.all_finite and not torch.isfinite(logits).all():
            return False
        rows, _, valid, _ = reference.align(logits, labels, shift)
        if rows.shape[-1] < self.min_finite:
            return False  # refused whatever the labels: no row could hold them
        return bool((torch.isfinite(rows).sum(-1)[valid] >= self.min_finite).all())


def _ref_logprobs(batch: Batch, via: str, shift: bool) -> Tensor:
    """The reference's log-probs as a call ``via`` ``ref_logits`` or ``ref_logprobs`` sees them."""
    if via == "ref_logprobs":
        assert batch.ref_logprobs is not None, "this entry reads batch.ref_logprobs"
        return batch.ref_logprobs
    assert batch.ref_logits is not None, "this entry reads batch.ref_logits"
    return reference.token_logprobs(batch.ref_logits, batch.labels, shift)


def _labelled(function: Call, ref_fn: Call) -> Entry:
    """``function(logits, labels)``."""
    return Entry(
        function.__name__,
        "logits",
        function,
        lambda x, b, **kw: function(x, b.labels, **kw),
        lambda x, b, **kw: ref_fn(x, b.labels, **kw),
    )


def _against(
    function: Call,
    ref_fn: Call,
    via: Literal["ref_logprobs", "ref_logits"],
    variant: str = "",
    refuses: Iterable[str] = (),
    **fixed: Any,
) -> Entry:
    """``function(logits, labels, ref_logprobs= | ref_logits=, **fixed)``: NPO and TNPO, which
    refuse the other reference and, by granularity, the count that does not apply."""

    def reference_call(x: Tensor, b: Batch, *, shift: bool = True, **kw: Any) -> Tensor:
        ref_logprobs = _ref_logprobs(b, via, shift)
        return ref_fn(x, b.labels, ref_logprobs=ref_logprobs, shift=shift, **fixed, **kw)

    def call(x: Tensor, b: Batch, **kw: Any) -> Tensor:
        given: dict[str, Any] = {via: getattr(b, via)}
        return function(x, b.labels, **given, **fixed, **kw)

    return Entry(
        function.__name__ + variant,
        "logits",
        function,
        call,
        reference_call,
        frozenset({"ref_logprobs", "ref_logits", *fixed, *refuses}),
    )


def _paired(
    function: Call, ref_fn: Call, variant: str = "", labelled: bool = True, **fixed: Any
) -> Entry:
    """``function(logits, ref_logits, labels, **fixed)``: KL and UNDIAL; without labels every
    position counts."""

    def labels(b: Batch) -> Tensor | None:
        return b.labels if labelled else None

    return Entry(
        function.__name__ + variant,
        "logits",
        function,
        lambda x, b, **kw: function(x, b.ref_logits, labels(b), **fixed, **kw),
        lambda x, b, **kw: ref_fn(x, b.ref_logits, labels(b), **fixed, **kw),
        frozenset(fixed),
        labelled=labelled,
    )


def _dpo_reference(x: Tensor, b: Batch, *, shift: bool = True, **kw: Any) -> Tensor:
    return reference.dpo_loss(
        x,
        b.labels,
        0.5 * x,
        b.labels,
        ref_chosen_logprobs=_ref_logprobs(b, "ref_logits", shift),
        ref_rejected_logprobs=_ref_logprobs(b, "ref_logprobs", shift),
        shift=shift,
        **kw,
    )


# The input is the chosen answer's logits and half of it the rejected answer's, so the gradient
# flows through both sides; each side takes its reference another way.
_DPO = Entry(
    "dpo_loss",
    "logits",
    ul.dpo_loss,
    lambda x, b, **kw: ul.dpo_loss(
        x,
        b.labels,
        0.5 * x,
        b.labels,
        ref_chosen_logits=b.ref_logits,
        ref_rejected_logprobs=b.ref_logprobs,
        **kw,
    ),
    _dpo_reference,
    frozenset(
        {"ref_chosen_logprobs", "ref_chosen_logits", "ref_rejected_logprobs", "ref_rejected_logits"}
    ),
)


def _model_constant(x: Any, scale: float = 1.0) -> Any:
    """``scale`` times the model's own logits as a constant (a helper model's logits in the
    standard calls of WHP, RKLD and ELM); a non-tensor passes through to be refused by name."""
    return scale * x.detach() if isinstance(x, Tensor) else x


# KTO's own option ``variant`` is bound here (``_against`` names the entry's variant so).
_logsigmoid_kto = replace(
    _against(ul.kto_loss, reference.kto_loss, "ref_logprobs", "[logsigmoid]", reference_point=0.5),
    call=lambda x, b, **kw: ul.kto_loss(
        x, b.labels, ref_logprobs=b.ref_logprobs, reference_point=0.5, variant="logsigmoid", **kw
    ),
    reference=lambda x, b, *, shift=True, **kw: reference.kto_loss(
        x,
        b.labels,
        ref_logprobs=_ref_logprobs(b, "ref_logprobs", shift),
        reference_point=0.5,
        variant="logsigmoid",
        shift=shift,
        **kw,
    ),
)
_logsigmoid_kto = replace(_logsigmoid_kto, bound=_logsigmoid_kto.bound | {"variant"})


def _flat(variant: str = "", **fixed: Any) -> Entry:
    """``flat_loss(logits, labels, 0.5 * logits, labels)``: the template answers' logits are half
    the forget answers', so the gradient flows through both sides."""

    def template(x: Any) -> Any:
        return 0.5 * x if isinstance(x, Tensor) else x

    return Entry(
        "flat_loss" + variant,
        "logits",
        ul.flat_loss,
        lambda x, b, **kw: ul.flat_loss(x, b.labels, template(x), b.labels, **fixed, **kw),
        lambda x, b, **kw: reference.flat_loss(x, b.labels, template(x), b.labels, **fixed, **kw),
        frozenset(fixed),
    )


_WHP_ALPHA = 2.0


def _excess(function: Call, ref_fn: Call) -> Entry:
    """WHP and RKLD: the reference's logits are the baseline, the model's own (a constant) the
    reinforced model's."""
    return Entry(
        function.__name__,
        "logits",
        function,
        lambda x, b, **kw: function(
            x,
            b.labels,
            ref_logits=b.ref_logits,
            reinforced_logits=_model_constant(x),
            alpha=_WHP_ALPHA,
            **kw,
        ),
        lambda x, b, **kw: ref_fn(
            x, b.ref_logits, _model_constant(x), b.labels, alpha=_WHP_ALPHA, **kw
        ),
        frozenset({"ref_logits", "reinforced_logits", "alpha"}),
    )


def _elm(variant: str = "", labelled: bool = True) -> Entry:
    """ELM with the reference as the original model and the model's own logits (a constant) and
    half of them as the prompted runs; without labels every position counts."""

    def helpers(x: Any, b: Batch) -> dict[str, Any]:
        return {
            "ref_logits": b.ref_logits,
            "positive_logits": _model_constant(x),
            "negative_logits": _model_constant(x, 0.5),
        }

    def labels(b: Batch) -> Tensor | None:
        return b.labels if labelled else None

    return Entry(
        "elm_loss" + variant,
        "logits",
        ul.elm_loss,
        lambda x, b, **kw: ul.elm_loss(x, labels(b), **helpers(x, b), eta=2.0, **kw),
        lambda x, b, **kw: reference.elm_loss(x, **helpers(x, b), labels=labels(b), eta=2.0, **kw),
        frozenset({"ref_logits", "positive_logits", "negative_logits", "eta"}),
        labelled=labelled,
    )


def _toward_reference(function: Call, ref_fn: Call) -> Entry:
    """``function(logits, labels, ref_logits=)``: JSD to the reference's distribution, the labels
    selecting the positions."""
    return Entry(
        function.__name__ + "[ref_logits]",
        "logits",
        function,
        lambda x, b, **kw: function(x, b.labels, ref_logits=b.ref_logits, **kw),
        lambda x, b, **kw: ref_fn(x, b.labels, ref_logits=b.ref_logits, **kw),
        frozenset({"ref_logits"}),
    )


_TOKEN_COUNT = ("num_items_in_batch",)  # refused where NPO averages over sequences
LOGITS: tuple[Entry, ...] = (
    _labelled(ul.token_logprobs, reference.token_logprobs),
    _labelled(ul.ga_loss, reference.ga_loss),
    _labelled(ul.nll_loss, reference.nll_loss),
    _labelled(ul.idk_loss, reference.nll_loss),  # the NLL of the refusal
    _against(
        ul.npo_loss,
        reference.npo_loss,
        "ref_logprobs",
        refuses=_TOKEN_COUNT,
        granularity="sequence",
    ),
    _against(
        ul.npo_loss,
        reference.npo_loss,
        "ref_logits",
        "[ref_logits]",
        refuses=_TOKEN_COUNT,
        granularity="sequence",
    ),
    _against(
        ul.npo_loss,
        reference.npo_loss,
        "ref_logprobs",
        "[sequence_mean]",
        refuses=_TOKEN_COUNT,
        granularity="sequence_mean",
    ),
    _against(
        ul.npo_loss,
        reference.npo_loss,
        "ref_logprobs",
        "[token]",
        refuses=("num_sequences",),
        granularity="token",
    ),
    _against(
        ul.npo_loss,
        reference.npo_loss,
        "ref_logprobs",
        "[batch]",
        refuses=("num_items_in_batch", "num_sequences"),
        granularity="batch",
    ),
    _labelled(ul.simnpo_loss, reference.simnpo_loss),
    _paired(ul.kl_divergence, reference.kl_divergence, direction="forward"),
    _paired(ul.kl_divergence, reference.kl_divergence, "[reverse]", direction="reverse"),
    _paired(ul.kl_divergence, reference.kl_divergence, "[labels=None]", False, direction="forward"),
    _paired(ul.kl_loss, reference.kl_loss, direction="forward"),
    _paired(ul.kl_loss, reference.kl_loss, "[reverse]", direction="reverse"),
    _DPO,
    _labelled(ul.wga_loss, reference.wga_loss),
    _labelled(ul.satimp_loss, reference.satimp_loss),
    _against(ul.tnpo_loss, reference.tnpo_loss, "ref_logprobs"),
    _against(ul.tnpo_loss, reference.tnpo_loss, "ref_logits", "[ref_logits]"),
    _paired(ul.undial_loss, reference.undial_loss),
    replace(_labelled(ul.ceu_loss, reference.ceu_loss), min_finite=2),
    replace(_labelled(ul.logit_margin_loss, reference.logit_margin_loss), all_finite=True),
    _labelled(ul.me_loss, reference.me_loss),
    _labelled(ul.ihl_loss, reference.ihl_loss),
    _labelled(ul.jsd_loss, reference.jsd_loss),  # to the label's one-hot distribution
    _toward_reference(ul.jsd_loss, reference.jsd_loss),
    _against(ul.kto_loss, reference.kto_loss, "ref_logprobs", reference_point=0.5),
    _against(ul.kto_loss, reference.kto_loss, "ref_logits", "[ref_logits]", reference_point=0.5),
    _logsigmoid_kto,
    _flat(),
    _flat("[kl]", divergence="kl"),
    _excess(ul.whp_loss, reference.whp_loss),
    _excess(ul.rkld_loss, reference.rkld_loss),
    _elm(),
    _elm("[labels=None]", labelled=False),
)


def _hidden(
    function: Call,
    on_logits: str,
    inputs: Callable[[Batch], dict[str, Any]] = lambda b: {"labels": b.labels},
    bound: Iterable[str] = (),
    variant: str | None = None,
    **fixed: Any,
) -> Entry:
    """``function(hidden, weight, bias=, **inputs(batch), **fixed)``, named and checked as its
    logits version ``on_logits`` (its variant unless ``variant`` is given), whose reference on
    the head's float64 logits is its reference."""
    (twin,) = (e for e in LOGITS if e.name == on_logits)

    def reference_call(h: Tensor, b: Batch, **kw: Any) -> Tensor:
        double = torch.float64
        return twin.reference(b.logits_of(h, double), b.on_logits(double), **kw)

    if variant is None:
        variant = on_logits.removeprefix(twin.function.__name__)
    return Entry(
        function.__name__ + variant,
        "hidden",
        function,
        lambda h, b, **kw: function(h, b.weight, bias=b.bias, **inputs(b), **fixed, **kw),
        reference_call,
        frozenset({"bias", *fixed, *bound}),
        labelled=twin.labelled,
        on_logits=on_logits,
    )


def _detached(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach()


def _with_ref_logprobs(b: Batch) -> dict[str, Any]:
    return {"labels": b.labels, "ref_logprobs": b.ref_logprobs}


def _with_ref_hidden(b: Batch) -> dict[str, Any]:
    # The reference shares the model's head as a constant: its bias too (test_linear's way).
    return {"labels": b.labels, "ref_hidden": b.ref_hidden, "ref_bias": _detached(b.bias)}


def _kl_inputs(labelled: bool) -> Callable[[Batch], dict[str, Any]]:
    def inputs(b: Batch) -> dict[str, Any]:
        labels = b.labels if labelled else None
        return {"ref_hidden": b.ref_hidden, "labels": labels, "ref_bias": _detached(b.bias)}

    return inputs


_NPO_INPUTS = ("ref_logprobs", "ref_hidden", "ref_weight", "ref_bias")
HIDDEN: tuple[Entry, ...] = (
    _hidden(ul.linear_token_logprobs, "token_logprobs"),
    _hidden(ul.linear_ga_loss, "ga_loss"),
    _hidden(ul.linear_nll_loss, "nll_loss"),
    _hidden(
        ul.linear_npo_loss,
        "npo_loss",
        _with_ref_logprobs,
        (*_NPO_INPUTS, *_TOKEN_COUNT),
        granularity="sequence",
    ),
    _hidden(
        ul.linear_npo_loss,
        "npo_loss[ref_logits]",
        _with_ref_hidden,
        (*_NPO_INPUTS, *_TOKEN_COUNT),
        variant="[ref_hidden]",
        granularity="sequence",
    ),
    _hidden(
        ul.linear_npo_loss,
        "npo_loss[token]",
        _with_ref_logprobs,
        (*_NPO_INPUTS, "num_sequences"),
        granularity="token",
    ),
    _hidden(ul.linear_simnpo_loss, "simnpo_loss"),
    _hidden(ul.linear_me_loss, "me_loss"),
    *(
        _hidden(function, name, _kl_inputs(labelled), ("ref_bias",), direction=direction)
        for function, name, labelled, direction in (
            (ul.linear_kl_divergence, "kl_divergence", True, "forward"),
            (ul.linear_kl_divergence, "kl_divergence[reverse]", True, "reverse"),
            (ul.linear_kl_divergence, "kl_divergence[labels=None]", False, "forward"),
            (ul.linear_kl_loss, "kl_loss", True, "forward"),
            (ul.linear_kl_loss, "kl_loss[reverse]", True, "reverse"),
        )
    ),
)


def _rmu_targets(b: Batch) -> tuple[Tensor, Tensor]:
    assert b.ref_hidden is not None and b.control_vector is not None, (
        "RMU reads batch.ref_hidden and batch.control_vector"
    )
    return b.ref_hidden, b.control_vector


def _rmu(a: Tensor, b: Batch, **kw: Any) -> Tensor:
    return ul.rmu_loss(a, a, *_rmu_targets(b), forget_labels=b.labels, retain_labels=b.labels, **kw)


def _rmu_reference(a: Tensor, b: Batch, *, alpha: float | None = None) -> Tensor:
    if alpha is None:
        alpha = inspect.signature(ul.rmu_loss).parameters["alpha"].default
    valid = b.labels != -100  # activations are not shifted: position t is token t's
    return reference.rmu_loss(a, a, *_rmu_targets(b), valid, valid, alpha)


# The input is both the forget and the retain activations (one layer's output on either set), so
# each half's gradient reaches it; the reference's retain activations are ``ref_hidden``.
ACTIVATIONS: tuple[Entry, ...] = (
    Entry(
        "rmu_loss",
        "activations",
        ul.rmu_loss,
        _rmu,
        _rmu_reference,
        frozenset({"forget_labels", "retain_labels"}),
    ),
)

REGISTRY: tuple[Entry, ...] = LOGITS + HIDDEN + ACTIVATIONS


def entries(kind: Kind | None = None, *, takes: str | Iterable[str] = ()) -> list[Entry]:
    """The registered entries of ``kind`` (every kind for None) that take every option in
    ``takes``, in registration order.

    Raises:
        ValueError: an unknown kind, or an option no entry takes (a misspelt option would
            otherwise select nothing, and a test over nothing passes).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None; got {kind!r}")
    wanted = {takes} if isinstance(takes, str) else set(takes)
    unknown = wanted - frozenset().union(*(e.takes for e in REGISTRY))
    if unknown:
        raise ValueError(f"no registered loss takes {sorted(unknown)}")
    return [e for e in REGISTRY if kind in (None, e.kind) and wanted <= e.takes]


def entry(name: str) -> Entry:
    """The entry called ``name``.

    Raises:
        KeyError: naming the registered entries.
    """
    for e in REGISTRY:
        if e.name == name:
            return e
    raise KeyError(f"no entry {name!r}; registered: {', '.join(e.name for e in REGISTRY)}")
