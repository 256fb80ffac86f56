"""Every refused input raises TypeError or ValueError naming the argument (SPEC §6)."""

from __future__ import annotations

import math

import pytest
import torch

from unlearning_losses import (
    combine_with_retain,
    ga_loss,
    kl_divergence,
    kl_loss,
    nll_loss,
    npo_loss,
    simnpo_loss,
    token_logprobs,
)
from unlearning_losses.compat import open_unlearning, soul

LOGITS = torch.randn(4, 6, 10)
LABELS = torch.randint(0, 10, (4, 6))
REF = torch.randn(4, 6, 10)
META = torch.empty(4, 6, 10, device="meta")

LABEL_FUNCTIONS = {
    "token_logprobs": lambda x, y, **kw: token_logprobs(x, y, **kw),
    "ga_loss": lambda x, y, **kw: ga_loss(x, y, **kw),
    "nll_loss": lambda x, y, **kw: nll_loss(x, y, **kw),
    "npo_loss": lambda x, y, **kw: npo_loss(x, y, ref_logprobs=torch.zeros(y.shape[0], 5), **kw),
    "simnpo_loss": lambda x, y, **kw: simnpo_loss(x, y, **kw),
    "kl_divergence": lambda x, y, **kw: kl_divergence(x, REF, y, **kw),
    "kl_loss": lambda x, y, **kw: kl_loss(x, REF, y, **kw),
}

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
        call(LABEL_FUNCTIONS[function])


REDUCED = ["ga_loss", "nll_loss", "npo_loss", "simnpo_loss", "kl_divergence", "kl_loss"]


@pytest.mark.parametrize("function", REDUCED)
def test_unknown_reduction(function):
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        LABEL_FUNCTIONS[function](LOGITS, LABELS, reduction="avg")


@pytest.mark.parametrize("function", ["ga_loss", "nll_loss", "kl_divergence", "kl_loss"])
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
        LABEL_FUNCTIONS[function](LOGITS, LABELS, num_items_in_batch=value)


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
    logits, labels = LOGITS.clone(), LABELS.clone()
    with pytest.raises(ValueError):
        ga_loss(logits, labels.masked_fill(labels == labels[0, 0], 99))
    assert torch.equal(logits, LOGITS) and torch.equal(labels, LABELS)
