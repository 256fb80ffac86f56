"""Every refused input raises TypeError or ValueError naming the argument
(docs/conventions.md §6)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from unlearning_losses import (
    ceu_loss,
    combine_with_retain,
    dpo_loss,
    ga_loss,
    global_counts,
    kl_divergence,
    kl_loss,
    npo_loss,
    rmu_control_vector,
    rmu_loss,
    satimp_loss,
    simnpo_loss,
    tnpo_loss,
    undial_loss,
    wga_loss,
)
from unlearning_losses.compat import open_unlearning, soul
from unlearning_losses.testing import Batch, Entry, entries, entry

LOGITS = torch.randn(4, 6, 10)
LABELS = torch.randint(0, 10, (4, 6))
REF = torch.randn(4, 6, 10)
META = torch.empty(4, 6, 10, device="meta")

# Every loss of logits and labels that takes the common options, but DPO: its standard call
# forms the rejected answer's logits as 0.5 * logits (a list fails there), and its messages name
# chosen_logits and chosen_labels; test_dpo_refuses checks its arguments.
LABEL_FUNCTIONS = {
    e.name: e
    for e in entries("logits", takes=("backend", "ignore_index"))
    if e.labelled and e.function is not dpo_loss
}


def _call(e: Entry, logits, labels, **kw):
    """``e`` on ``logits`` and ``labels``, the reference's log-probs of the labels' shape."""
    ref_logprobs = torch.zeros(labels.shape[0], 5)
    return e(logits, Batch(labels, ref_logits=REF, ref_logprobs=ref_logprobs), **kw)


COMMON_CASES = [
    ("int_logits", lambda f: f(LOGITS.long(), LABELS), TypeError, r"logits must be float16"),
    (
        "list_logits",
        lambda f: f(LOGITS.tolist(), LABELS),
        TypeError,
        r"logits must be a torch.Tensor; got list",
    ),
    (
        "float_labels",
        lambda f: f(LOGITS, LABELS.float()),
        TypeError,
        r"labels must be an integer tensor; got torch.float32",
    ),
    ("bool_labels", lambda f: f(LOGITS, LABELS > 3), TypeError, r"labels must be an integer"),
    (
        "rank_1_logits",
        lambda f: f(LOGITS[0, 0], LABELS[0]),
        ValueError,
        r"logits must have shape \(B, T, V\) or \(N, V\); got 1 dimensions",
    ),
    (
        "rank_4_logits",
        lambda f: f(LOGITS[None], LABELS[None]),
        ValueError,
        r"logits must have shape \(B, T, V\) or \(N, V\); got 4 dimensions",
    ),
    (
        "labels_shape",
        lambda f: f(LOGITS, LABELS[:, :5]),
        ValueError,
        r"labels must have shape \(4, 6\) to match logits \(4, 6, 10\); got \(4, 5\)",
    ),
    (
        "label_too_large",
        lambda f: f(LOGITS, LABELS.masked_fill(LABELS == LABELS[0, 3], 10)),
        ValueError,
        r"labels must lie in \[0, 10\) or equal ignore_index=-100; got \d+ value\(s\) "
        r"outside, e.g. 10",
    ),
    (
        "label_negative",
        lambda f: f(LOGITS, torch.full_like(LABELS, -5)),
        ValueError,
        r"labels must lie in \[0, 10\).*e.g. -5",
    ),
    (
        "labels_on_other_device",
        lambda f: f(LOGITS, LABELS.to("meta")),
        ValueError,
        r"labels must be on the same device as logits \(cpu\); got meta",
    ),
    (
        "unknown_backend",
        lambda f: f(LOGITS, LABELS, backend="cuda"),
        ValueError,
        r"backend must be one of 'auto', 'torch', 'triton'; got 'cuda'",
    ),
    (
        "ignore_index_type",
        lambda f: f(LOGITS, LABELS, ignore_index=-100.0),
        TypeError,
        r"ignore_index must be an int; got float",
    ),
]


@pytest.mark.parametrize("function", sorted(LABEL_FUNCTIONS))
@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in COMMON_CASES], ids=[c[0] for c in COMMON_CASES]
)
def test_every_labelled_function_refuses(function, call, error, message):
    with pytest.raises(error, match=message):
        call(partial(_call, LABEL_FUNCTIONS[function]))


REDUCED = sorted(e.name for e in entries("logits", takes="reduction") if e.labelled)


@pytest.mark.parametrize("function", REDUCED)
def test_unknown_reduction(function):
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        _call(entry(function), LOGITS, LABELS, reduction="avg")


TOKEN_MEANS = sorted(e.name for e in entries("logits", takes="num_items_in_batch") if e.labelled)


@pytest.mark.parametrize("function", TOKEN_MEANS)
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, r"num_items_in_batch must be >= 0; got -1"),
        (2.5, TypeError, r"num_items_in_batch must be an int or a 0-d tensor; got float"),
        (
            torch.tensor([3, 4]),
            ValueError,
            r"num_items_in_batch must be an int or a 0-d tensor; got a "
            r"tensor of shape \(2,\)",
        ),
    ],
)
def test_bad_num_items_in_batch(function, value, error, message):
    with pytest.raises(error, match=message):
        _call(entry(function), LOGITS, LABELS, num_items_in_batch=value)


def test_num_items_in_batch_needs_mean_reduction():
    with pytest.raises(ValueError, match=r'num_items_in_batch applies to reduction="mean" only'):
        ga_loss(LOGITS, LABELS, reduction="sum", num_items_in_batch=7)


@pytest.mark.parametrize(
    ("ref_logits", "error", "message"),
    [
        (
            REF[:, :5],
            ValueError,
            r"ref_logits must have shape \(4, 6, 10\) to match logits; got \(4, 5, 10\)",
        ),
        (
            REF.double(),
            TypeError,
            r"ref_logits must have dtype torch.float32 to match logits; got torch.float64",
        ),
        (META, ValueError, r"ref_logits must be on the same device as logits \(cpu\); got meta"),
        ("logits", TypeError, r"ref_logits must be a torch.Tensor; got str"),
    ],
)
@pytest.mark.parametrize("function", ["npo", "kl_divergence", "kl_loss"])
def test_bad_ref_logits(function, ref_logits, error, message):
    call = {
        "npo": lambda: npo_loss(LOGITS, LABELS, ref_logits=ref_logits),
        "kl_divergence": lambda: kl_divergence(LOGITS, ref_logits, LABELS),
        "kl_loss": lambda: kl_loss(LOGITS, ref_logits),
    }[function]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, r"give exactly one of ref_logprobs or ref_logits; got neither"),
        (
            {"ref_logprobs": torch.zeros(4, 5), "ref_logits": REF},
            ValueError,
            r"give exactly one of ref_logprobs or ref_logits; got both",
        ),
        (
            {"ref_logprobs": torch.zeros(4, 6)},
            ValueError,
            r"ref_logprobs must have shape \(4, 5\) \(one value per shifted label of logits \(4, 6, 10\)\); got \(4, 6\)",
        ),
        (
            {"ref_logprobs": torch.zeros(4, 5, dtype=torch.long)},
            TypeError,
            r"ref_logprobs must be a floating tensor; got torch.int64",
        ),
        (
            {"ref_logprobs": torch.zeros(4, 5, device="meta")},
            ValueError,
            r"ref_logprobs must be on the same device as logits",
        ),
        ({"ref_logits": REF, "beta": 0.0}, ValueError, r"beta must be > 0; got 0.0"),
        ({"ref_logits": REF, "beta": -1}, ValueError, r"beta must be > 0; got -1.0"),
        ({"ref_logits": REF, "beta": math.inf}, ValueError, r"beta must be finite; got inf"),
        ({"ref_logits": REF, "beta": math.nan}, ValueError, r"beta must be finite; got nan"),
        ({"ref_logits": REF, "beta": "0.1"}, TypeError, r"beta must be a real number; got str"),
        (
            {"ref_logits": REF, "granularity": "seq"},
            ValueError,
            r"granularity must be one of 'sequence', 'sequence_mean', 'token', 'batch'; got 'seq'",
        ),
    ],
)
def test_npo_refuses(kwargs, error, message):
    with pytest.raises(error, match=message):
        npo_loss(LOGITS, LABELS, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0}, r"beta must be > 0; got 0.0"),
        ({"beta": math.nan}, r"beta must be finite; got nan"),
        ({"delta": math.inf}, r"delta must be finite; got inf"),
    ],
)
def test_simnpo_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simnpo_loss(LOGITS, LABELS, **kwargs)


def test_unknown_direction():
    with pytest.raises(
        ValueError, match=r"direction must be one of 'forward', 'reverse'; got 'js'"
    ):
        kl_divergence(LOGITS, REF, LABELS, direction="js")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"forget_weight": math.nan}, ValueError, r"forget_weight must be finite; got nan"),
        ({"retain_weight": math.inf}, ValueError, r"retain_weight must be finite; got inf"),
        ({"retain_weight": None}, TypeError, r"retain_weight must be a real number; got NoneType"),
    ],
)
def test_combine_with_retain_refuses_bad_weights(kwargs, error, message):
    with pytest.raises(error, match=message):
        combine_with_retain(torch.tensor(1.0), torch.tensor(2.0), **kwargs)


def test_combine_with_retain_refuses_losses_on_different_devices():
    with pytest.raises(ValueError, match=r"retain_loss must be on the same device as forget_loss"):
        combine_with_retain(torch.tensor(1.0), torch.tensor(2.0, device="meta"))


def test_compat_refuses_non_finite_weights():
    with pytest.raises(ValueError, match=r"gamma must be finite"):
        soul.ga_ft_loss(LOGITS, LABELS, LOGITS, LABELS, gamma=math.nan)
    with pytest.raises(ValueError, match=r"alpha must be finite"):
        open_unlearning.grad_diff_loss(LOGITS, LABELS, LOGITS, LABELS, alpha=math.inf)
    with pytest.raises(ValueError, match=r"retain_loss_type must be one of 'NLL', 'KL'"):
        open_unlearning.npo_loss(LOGITS, REF, LABELS, LOGITS, LABELS, retain_loss_type="kl")


def test_triton_backend_on_cpu_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r'backend="triton" needs'):
        ga_loss(LOGITS, LABELS, backend="triton")


def test_bad_input_leaves_the_inputs_untouched():
    logits = LOGITS.clone()
    bad_labels = LABELS.masked_fill(LABELS == LABELS[0, 0], 99)  # 99 is outside the vocabulary
    passed = bad_labels.clone()
    with pytest.raises(ValueError):
        ga_loss(logits, passed)
    assert torch.equal(logits, LOGITS) and torch.equal(passed, bad_labels)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: wga_loss(LOGITS, LABELS, beta=-1.0), ValueError, r"beta must be >= 0; got -1.0"),
        (
            lambda: satimp_loss(LOGITS, LABELS, beta1=math.nan),
            ValueError,
            r"beta1 must be finite; got nan",
        ),
        (lambda: satimp_loss(LOGITS, LABELS, beta2="1"), TypeError, r"beta2 must be a real"),
        (
            lambda: tnpo_loss(LOGITS, LABELS),
            ValueError,
            r"give exactly one of ref_logprobs or ref_logits; got neither",
        ),
        (
            lambda: tnpo_loss(LOGITS, LABELS, ref_logits=REF, beta=0.0),
            ValueError,
            r"beta must be > 0",
        ),
        (
            lambda: undial_loss(LOGITS, REF[:, :5], LABELS),
            ValueError,
            r"ref_logits must have shape \(4, 6, 10\) to match logits; got \(4, 5, 10\)",
        ),
        (lambda: undial_loss(LOGITS, REF, LABELS, beta=-2.0), ValueError, r"beta must be >= 0"),
        (
            lambda: ceu_loss(LOGITS[..., :1], torch.zeros_like(LABELS)),
            ValueError,
            r"logits must have a vocabulary of at least 2 entries",
        ),
        (
            lambda: npo_loss(LOGITS, LABELS, ref_logits=REF, num_sequences=2, granularity="token"),
            ValueError,
            r'num_sequences applies to granularity="sequence" or "sequence_mean" only',
        ),
        (
            lambda: npo_loss(LOGITS, LABELS, ref_logits=REF, num_items_in_batch=9),
            ValueError,
            r'num_items_in_batch applies to granularity="token" only',
        ),
        (
            lambda: simnpo_loss(LOGITS, LABELS, num_sequences=2, reduction="sum"),
            ValueError,
            r'num_sequences applies to reduction="mean" only',
        ),
        (
            lambda: simnpo_loss(LOGITS, LABELS, num_sequences=-3),
            ValueError,
            r"num_sequences must be >= 0; got -3",
        ),
    ],
)
def test_new_losses_refuse(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _dpo(**kwargs):
    args = dict(
        chosen_logits=LOGITS,
        chosen_labels=LABELS,
        rejected_logits=REF,
        rejected_labels=LABELS,
        ref_chosen_logits=REF,
        ref_rejected_logits=LOGITS,
    )
    args.update(kwargs)
    return dpo_loss(
        args.pop("chosen_logits"),
        args.pop("chosen_labels"),
        args.pop("rejected_logits"),
        args.pop("rejected_labels"),
        **args,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"rejected_logits": REF[:3], "rejected_labels": LABELS[:3]},
            ValueError,
            r"rejected_logits must hold as many sequences as chosen_logits",
        ),
        (
            {"chosen_labels": LABELS[:, :4]},
            ValueError,
            r"chosen_labels must have shape \(4, 6\) to match chosen_logits \(4, 6, 10\)",
        ),
        (
            {"rejected_logits": REF.long()},
            TypeError,
            r"rejected_logits must be float16, bfloat16, float32 or float64",
        ),
        (
            {"ref_chosen_logits": None},
            ValueError,
            r"give exactly one of ref_chosen_logprobs or ref_chosen_logits; got neither",
        ),
        (
            {"ref_rejected_logprobs": torch.zeros(4, 5)},
            ValueError,
            r"give exactly one of ref_rejected_logprobs or ref_rejected_logits; got both",
        ),
        (
            {"ref_rejected_logits": LOGITS.double()},
            TypeError,
            r"ref_rejected_logits must have dtype torch.float32 to match rejected_logits",
        ),
        ({"beta": 0}, ValueError, r"beta must be > 0; got 0.0"),
    ],
)
def test_dpo_refuses(kwargs, error, message):
    with pytest.raises(error, match=message):
        _dpo(**kwargs)


HIDDEN = torch.randn(2, 5, 8)
CONTROL = torch.ones(8)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN, torch.ones(7)),
            ValueError,
            r"control_vector must have shape \(8,\) to match forget_hidden \(2, 5, 8\); got \(7,\)",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN, torch.ones(8, dtype=torch.long)),
            TypeError,
            r"control_vector must be a floating tensor",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN[:, :4], CONTROL),
            ValueError,
            r"ref_retain_hidden must have shape \(2, 5, 8\) to match retain_hidden",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN[..., :6], HIDDEN[..., :6], CONTROL),
            ValueError,
            r"retain_hidden must have hidden size 8 to match forget_hidden",
        ),
        (
            lambda: rmu_loss(HIDDEN[0, 0], HIDDEN, HIDDEN, CONTROL),
            ValueError,
            r"forget_hidden must have shape \(B, T, H\) or \(N, H\)",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN, CONTROL, forget_labels=LABELS),
            ValueError,
            r"forget_labels must have shape \(2, 5\) to match forget_hidden \(2, 5, 8\)",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN, CONTROL, alpha=math.inf),
            ValueError,
            r"alpha must be finite",
        ),
        (
            lambda: rmu_loss(HIDDEN, HIDDEN, HIDDEN, CONTROL, num_forget_items=-1),
            ValueError,
            r"num_forget_items must be >= 0",
        ),
        (lambda: rmu_control_vector(0), ValueError, r"hidden_size must be >= 1; got 0"),
        (
            lambda: rmu_control_vector(8, steering_coeff=-1.0),
            ValueError,
            r"steering_coeff must be > 0",
        ),
        (lambda: global_counts(LABELS.float()), TypeError, r"labels must be an integer tensor"),
        (
            lambda: global_counts(LABELS[None]),
            ValueError,
            r"labels must have shape \(B, T\) or \(N,\); got \(1, 4, 6\)",
        ),
    ],
)
def test_rmu_and_counts_refuse(call, error, message):
    with pytest.raises(error, match=message):
        call()
