"""The compat functions against transcriptions of the published trainers' semantics.

Each transcription below restates, in plain float32 PyTorch, what the trainer code computes from
its model outputs (SOUL's trainer code, arXiv 2404.18239; docs/conventions.md §4 for
open-unlearning).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.overrides import TorchFunctionMode

from unlearning_losses.compat import muse, npo, open_unlearning, soul

RTOL = 1e-6


def hf_causal_lm_loss(logits, labels):
    """What ``model(..., labels=labels).loss`` returns: shifted token-mean cross-entropy."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def summed_sequence_nll(logits, labels):
    """open-unlearning's per-sequence NLL: shifted, ignore_index, summed over each sequence."""
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    return per_token.sum(-1)


def batchmean_reverse_kl(logits, ref_logits):
    vocab = logits.shape[-1]
    current = F.log_softmax(logits, -1).view(-1, vocab)
    reference = F.log_softmax(ref_logits, -1).view(-1, vocab)
    return F.kl_div(current, reference, reduction="batchmean", log_target=True)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    shape = (3, 12, 50)
    forget = torch.randn(shape, generator=g)
    ref_forget = forget + 0.5 * torch.randn(shape, generator=g)
    retain = torch.randn(shape, generator=g)
    ref_retain = retain + 0.5 * torch.randn(shape, generator=g)
    forget_labels = torch.randint(0, 50, shape[:2], generator=g)
    retain_labels = torch.randint(0, 50, shape[:2], generator=g)
    forget_labels[:, :4] = -100  # prompts
    forget_labels[1, 9:] = -100  # padding
    retain_labels[:, :3] = -100
    return forget, ref_forget, forget_labels, retain, ref_retain, retain_labels


def assert_same_value_and_gradient(ours_fn, theirs_fn, logits):
    ours_x = logits.clone().requires_grad_(True)
    theirs_x = logits.clone().requires_grad_(True)
    ours, theirs = ours_fn(ours_x), theirs_fn(theirs_x)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-5, atol=1e-7)


def test_soul_ga_ft(batch):
    forget, _, forget_labels, retain, _, retain_labels = batch
    gamma = 0.7
    assert_same_value_and_gradient(
        lambda x: soul.ga_ft_loss(x, forget_labels, retain, retain_labels, gamma=gamma),
        lambda x: (
            -hf_causal_lm_loss(x, forget_labels) + gamma * hf_causal_lm_loss(retain, retain_labels)
        ),
        forget,
    )


def test_soul_kl_ft_uses_a_cross_entropy_over_all_positions(batch):
    forget, ref_forget, _, retain, _, retain_labels = batch
    gamma = 0.3

    def theirs(x):
        p, q = torch.softmax(x, -1), torch.softmax(ref_forget, -1)
        cross_entropy = -(p * torch.log(q + 1e-12)).sum(-1).mean()
        return -gamma * cross_entropy + hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: soul.kl_ft_loss(x, ref_forget, retain, retain_labels, gamma=gamma), theirs, forget
    )


def test_soul_npo_has_one_log_ratio_per_batch(batch):
    forget, ref_forget, forget_labels, retain, _, retain_labels = batch
    gamma = 2.0

    def theirs(x):
        neg_log_ratios = hf_causal_lm_loss(x, forget_labels) - hf_causal_lm_loss(
            ref_forget, forget_labels
        )
        forget_loss = -F.logsigmoid(0.1 * neg_log_ratios).mean() * 2 / 0.1
        return forget_loss + gamma * hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: soul.npo_loss(x, ref_forget, forget_labels, retain, retain_labels, gamma=gamma),
        theirs,
        forget,
    )


@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_open_unlearning_grad_diff(batch, retain_loss_type):
    forget, _, forget_labels, retain, ref_retain, retain_labels = batch

    def theirs(x):
        retain_term = (
            hf_causal_lm_loss(retain, retain_labels)
            if retain_loss_type == "NLL"
            else batchmean_reverse_kl(retain, ref_retain)
        )
        return 0.5 * -hf_causal_lm_loss(x, forget_labels) + 2.0 * retain_term

    assert_same_value_and_gradient(
        lambda x: open_unlearning.grad_diff_loss(
            x,
            forget_labels,
            retain,
            retain_labels,
            gamma=0.5,
            alpha=2.0,
            retain_loss_type=retain_loss_type,
            ref_retain_logits=ref_retain,
        ),
        theirs,
        forget,
    )


def test_open_unlearning_npo_sums_each_sequence(batch):
    forget, ref_forget, forget_labels, retain, _, retain_labels = batch
    forget_labels = forget_labels.clone()
    forget_labels[2] = -100  # an empty sequence still enters their mean
    beta = 0.1

    def theirs(x):
        lose_log_ratio = -(
            summed_sequence_nll(x, forget_labels) - summed_sequence_nll(ref_forget, forget_labels)
        )
        forget_loss = -F.logsigmoid(-beta * lose_log_ratio).mean() * 2 / beta
        return forget_loss + hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: open_unlearning.npo_loss(
            x, ref_forget, forget_labels, retain, retain_labels, beta=beta
        ),
        theirs,
        forget,
    )


def test_open_unlearning_simnpo_counts_unshifted_labels(batch):
    forget, _, forget_labels, retain, _, retain_labels = batch
    forget_labels = forget_labels.clone()
    forget_labels[0, 0] = 3  # counted by their length, never scored
    beta, delta = 2.5, 0.4

    def theirs(x):
        lengths = (forget_labels != -100).sum(-1)
        mean_nll = summed_sequence_nll(x, forget_labels) / lengths - delta
        forget_loss = -F.logsigmoid(beta * mean_nll).mean() * 2 / beta
        return forget_loss + hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: open_unlearning.simnpo_loss(
            x, forget_labels, retain, retain_labels, beta=beta, delta=delta
        ),
        theirs,
        forget,
    )


def test_open_unlearning_retain_kl_is_reverse_kl_over_every_row(batch):
    _, _, _, retain, ref_retain, _ = batch
    assert_same_value_and_gradient(
        lambda x: open_unlearning.retain_kl_loss(x, ref_retain),
        lambda x: batchmean_reverse_kl(x, ref_retain),
        retain,
    )


def test_open_unlearning_kl_retain_needs_reference_logits(batch):
    forget, _, forget_labels, retain, _, retain_labels = batch
    with pytest.raises(ValueError, match="ref_retain_logits"):
        open_unlearning.grad_diff_loss(
            forget, forget_labels, retain, retain_labels, retain_loss_type="KL"
        )


def shifted_token_nll(logits, labels):
    """Per shifted position, the cross-entropy of the label (0 where ignored), flattened."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    )


def test_open_unlearning_dpo_scales_by_two_over_beta_and_counts_empty_pairs(batch):
    forget, ref_forget, forget_labels, retain, _, retain_labels = batch
    g = torch.Generator().manual_seed(3)
    alternate = torch.randn(forget.shape, generator=g)
    ref_alternate = alternate + 0.3 * torch.randn(forget.shape, generator=g)
    alternate_labels = forget_labels.clone()
    alternate_labels[2] = -100
    forget_labels = forget_labels.clone()
    forget_labels[2] = -100  # pair 2 is empty on both sides: it still enters their mean
    beta = 0.5

    def theirs(x):
        win = -(
            summed_sequence_nll(alternate, alternate_labels)
            - summed_sequence_nll(ref_alternate, alternate_labels)
        )
        lose = -(
            summed_sequence_nll(x, forget_labels) - summed_sequence_nll(ref_forget, forget_labels)
        )
        forget_loss = -2 / beta * F.logsigmoid(beta * (win - lose)).mean()
        return forget_loss + hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: open_unlearning.dpo_loss(
            x,
            ref_forget,
            forget_labels,
            alternate,
            ref_alternate,
            alternate_labels,
            retain,
            retain_labels,
            beta=beta,
        ),
        theirs,
        forget,
    )


@pytest.mark.parametrize("method", ["wga", "satimp"])
def test_open_unlearning_token_weighted_ascent(batch, method):
    forget, _, forget_labels, retain, _, retain_labels = batch

    def theirs(x):
        nll = shifted_token_nll(x, forget_labels)
        p = (-nll).exp().detach()
        weight = p**1.5 if method == "wga" else p**5.0 * (1 - p) ** 1.0
        forget_loss = -(weight * nll)[forget_labels[:, 1:].reshape(-1) != -100].mean()
        alpha = 1.0 if method == "wga" else 0.1
        return forget_loss + alpha * hf_causal_lm_loss(retain, retain_labels)

    def ours(x):
        if method == "wga":
            return open_unlearning.wga_loss(x, forget_labels, retain, retain_labels, beta=1.5)
        return open_unlearning.satimp_loss(x, forget_labels, retain, retain_labels)

    assert_same_value_and_gradient(ours, theirs, forget)


def test_open_unlearning_undial_counts_every_position_and_wraps_the_ignored_label():
    g = torch.Generator().manual_seed(11)
    shape = (2, 6, 128)
    forget = torch.randn(shape, generator=g)
    ref_forget = forget + 0.5 * torch.randn(shape, generator=g)
    labels = torch.randint(0, 128, shape[:2], generator=g)
    labels[:, :3] = -100
    retain = torch.randn(shape, generator=g)
    retain_labels = torch.randint(0, 128, shape[:2], generator=g)
    beta = 4.0

    def theirs(x):
        shifted_labels = labels[:, 1:]
        teacher = ref_forget[:, :-1]
        # -100 indexes the last axis from the end, as plain tensor indexing does.
        lowered = torch.zeros_like(teacher)
        lowered[
            torch.arange(2).view(-1, 1, 1),
            torch.arange(5).view(1, -1, 1),
            shifted_labels[..., None],
        ] = 1.0
        target = F.softmax(teacher - beta * lowered, -1)
        forget_loss = F.cross_entropy(
            x[:, :-1].reshape(-1, 128), target.reshape(-1, 128), reduction="none"
        ).mean()
        return forget_loss + hf_causal_lm_loss(retain, retain_labels)

    assert_same_value_and_gradient(
        lambda x: open_unlearning.undial_loss(
            x, ref_forget, labels, retain, retain_labels, beta=beta
        ),
        theirs,
        forget,
    )


def test_open_unlearning_undial_needs_a_vocabulary_the_ignored_label_can_index(batch):
    forget, ref_forget, forget_labels, retain, _, retain_labels = batch
    with pytest.raises(ValueError, match=r"forget_labels: .* at least 100; got 50"):
        open_unlearning.undial_loss(forget, ref_forget, forget_labels, retain, retain_labels)


def test_open_unlearning_ceu_skips_the_first_answer_token(batch):
    forget, _, forget_labels, _, _, _ = batch

    def theirs(x):
        valid = forget_labels != -100
        first = (valid.cumsum(-1) <= 1) & valid
        labels = forget_labels.masked_fill(first, -100)[:, 1:]
        logits = x[:, :-1]
        kept = labels != -100
        rows, targets = logits[kept], labels[kept]
        target_logits = rows.detach().clone()
        target_logits[torch.arange(len(targets)), targets] = float("-inf")
        return F.cross_entropy(rows, F.softmax(target_logits, -1))

    assert_same_value_and_gradient(
        lambda x: open_unlearning.ceu_loss(x, forget_labels), theirs, forget
    )


def test_open_unlearning_rmu_divides_sums_by_counts_with_a_broadcast():
    g = torch.Generator().manual_seed(5)
    forget = torch.randn(3, 7, 16, generator=g)
    retain = torch.randn(2, 5, 16, generator=g)
    ref_retain = retain + 0.1 * torch.randn(2, 5, 16, generator=g)
    control = torch.rand(16, generator=g)
    control = control / control.norm() * 20
    forget_labels = torch.randint(0, 10, (3, 7), generator=g)
    forget_labels[0, :5] = -100  # unequal lengths: mean(S / N) and mean(S) * mean(1 / N) differ
    retain_labels = torch.randint(0, 10, (2, 5), generator=g)

    def activation_loss(a, b, mask):
        squared = F.mse_loss(a, b, reduction="none")
        per_sequence = (squared * mask[..., None]).mean(2).sum(1)
        return (per_sequence / mask.sum(-1, keepdim=True)).mean()  # [B] / [B, 1]: [B, B]

    def theirs(x):
        forget_term = activation_loss(x, control.expand_as(x), forget_labels != -100)
        retain_term = activation_loss(retain, ref_retain, retain_labels != -100)
        return 1.0 * forget_term + 1000.0 * retain_term

    assert_same_value_and_gradient(
        lambda x: open_unlearning.rmu_loss(
            x, forget_labels, retain, ref_retain, retain_labels, control, alpha=1000.0
        ),
        theirs,
        forget,
    )


@pytest.mark.parametrize(
    ("dtype", "gradient_rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)], ids=str
)
@pytest.mark.parametrize("rows_per_chunk", [None, 2])
def test_muse_raw_logit_terms_match_their_transcription(
    monkeypatch, dtype, gradient_rtol, rows_per_chunk
):
    """MUSE's NPO and KLR on raw logits, in float64 as written there, against ours from float32
    or bfloat16 logits (accumulated in float32), in one chunk or in chunks of two rows."""
    if rows_per_chunk is not None:
        monkeypatch.setattr(muse, "CHUNK_BYTES", 4 * 40 * rows_per_chunk)
    g = torch.Generator().manual_seed(3)
    forget, retain = (torch.randn(3, 5, 40, generator=g).to(dtype) for _ in range(2))
    ref_forget, ref_retain = (
        x + 0.5 * torch.randn(x.shape, generator=g).to(dtype) for x in (forget, retain)
    )

    def theirs(x, y):
        npo_term = -F.logsigmoid(0.5 * (ref_forget.double() - x)).mean() * 2 / 0.5
        klr = F.kl_div(y, ref_retain.double(), reduction="batchmean", log_target=True)
        return npo_term + 0.7 * klr

    x, y = (t.clone().requires_grad_(True) for t in (forget, retain))
    ours = muse.npo_klr_loss(x, ref_forget, y, ref_retain, beta=0.5, coeff=0.7)
    ours.backward()
    x64, y64 = (t.double().requires_grad_(True) for t in (forget, retain))
    expected = theirs(x64, y64)
    expected.backward()
    assert ours.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    for grad, exact in ((x.grad, x64.grad), (y.grad, y64.grad)):
        torch.testing.assert_close(grad.double(), exact, rtol=gradient_rtol, atol=1e-12)


@pytest.mark.parametrize("fn", [muse.npo_klr_loss, muse.simnpo_klr_loss])
def test_muse_raw_logit_terms_of_an_empty_batch_are_zero(fn):
    arguments = {
        name: torch.zeros(0, 4, 8, requires_grad=not name.startswith("ref_"))
        for name in inspect.signature(fn).parameters
        if name.endswith("logits")
    }
    value = fn(**arguments)
    value.backward()
    assert value.item() == 0.0
    assert all(
        t.grad is not None and t.grad.shape == (0, 4, 8)
        for t in arguments.values()
        if t.requires_grad
    )


# Every compat function (each a module's own ``*_loss``), for the checks of its arguments: each
# parameter's name says what it holds.
COMPAT_FUNCTIONS = [
    fn
    for module in (soul, open_unlearning, muse, npo)
    for name, fn in vars(module).items()
    if name.endswith("_loss")
    and not name.startswith("_")
    and inspect.isfunction(fn)
    and fn.__module__ == module.__name__
]
WIDTH = 128  # vocabulary (hidden size for RMU): UNDIAL needs at least -ignore_index


def tensor_parameters(fn) -> list[str]:
    return [
        name
        for name in inspect.signature(fn).parameters
        if name.endswith(("logits", "labels", "hidden", "vector"))
    ]


def valid_arguments(fn) -> dict:
    """Arguments ``fn`` accepts, by name; the retain term against the reference where there is a
    choice, so that ``ref_retain_logits`` is read."""
    g = torch.Generator().manual_seed(0)
    arguments: dict = {}
    for name in tensor_parameters(fn):
        if name.endswith("labels"):
            arguments[name] = torch.randint(0, WIDTH, (2, 6), generator=g)
        elif name == "control_vector":
            arguments[name] = torch.randn(WIDTH, generator=g)
        else:
            arguments[name] = torch.randn(2, 6, WIDTH, generator=g)
    if "retain_loss_type" in inspect.signature(fn).parameters:
        arguments["retain_loss_type"] = "KL"
    return arguments


def case_id(case) -> str:
    fn, name = case
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}-{name}"


TENSOR_ARGUMENTS = [(fn, name) for fn in COMPAT_FUNCTIONS for name in tensor_parameters(fn)]
REFERENCE_LOGITS = [
    (fn, name) for fn, name in TENSOR_ARGUMENTS if name.startswith("ref_") and "logits" in name
]


class LogitsPasses(TorchFunctionMode):
    """Records every torch call that makes a tensor from a floating one of width ``WIDTH``: a pass
    over the logits (or activations). Checking an argument reads only its shape, dtype and device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        if isinstance(result, torch.Tensor) and any(
            isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1:] == (WIDTH,)
            for t in inputs
        ):
            self.calls.append(getattr(func, "__name__", repr(func)))
        return result


@pytest.mark.parametrize("fn", COMPAT_FUNCTIONS, ids=lambda fn: case_id((fn, "valid")))
def test_compat_accepts_the_arguments_the_checks_start_from(fn):
    assert torch.isfinite(fn(**valid_arguments(fn)))


@pytest.mark.parametrize("case", REFERENCE_LOGITS, ids=case_id)
def test_compat_names_its_reference_logits_of_another_vocabulary(case):
    fn, name = case
    arguments = valid_arguments(fn)
    arguments[name] = arguments[name][..., :-1]
    model = name.removeprefix("ref_")
    message = (
        rf"^{name} must have shape \(2, 6, {WIDTH}\) to match {model}; got \(2, 6, {WIDTH - 1}\)$"
    )
    with LogitsPasses() as passes, pytest.raises(ValueError, match=message):
        fn(**arguments)
    assert passes.calls == []


#: Arguments no other argument's shape constrains (MUSE's SimNPO reads only the forget logits).
UNCONSTRAINED = {
    (fn, "forget_logits") for fn in (muse.simnpo_loss, muse.simnpo_gdr_loss, muse.simnpo_klr_loss)
}


@pytest.mark.parametrize(
    "case", [case for case in TENSOR_ARGUMENTS if case not in UNCONSTRAINED], ids=case_id
)
def test_compat_refuses_a_mismatched_argument_by_name_before_any_pass(case):
    fn, name = case
    arguments = valid_arguments(fn)
    value = arguments[name]
    axis = min(1, value.dim() - 1)  # one position fewer (one entry fewer for the control vector)
    arguments[name] = value.narrow(axis, 0, value.shape[axis] - 1)
    with LogitsPasses() as passes, pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(**arguments)
    assert passes.calls == []


@pytest.mark.parametrize(
    ("fn", "option", "message"),
    [
        (
            open_unlearning.pdu_loss,
            {"retain_loss_eps": math.nan},
            r"^retain_loss_eps must be finite",
        ),
        (open_unlearning.pdu_loss, {"dual": -1.0}, r"^dual must be >= 0"),
        (open_unlearning.wga_loss, {"beta": -1.0}, r"^beta must be >= 0"),
        (open_unlearning.satimp_loss, {"beta2": math.inf}, r"^beta2 must be finite"),
        (open_unlearning.grad_diff_loss, {"backend": "cuda"}, r"^backend must be one of"),
        (open_unlearning.undial_loss, {"ignore_index": -200}, r"at least 200; got 128$"),
        (soul.npo_loss, {"beta": 0.0}, r"^beta must be > 0"),
        (soul.kl_loss, {"gamma": math.nan}, r"^gamma must be finite"),
        (muse.npo_loss, {"beta": 0.0}, r"^beta must be > 0"),
        (muse.simnpo_klr_loss, {"gamma": math.inf}, r"^gamma must be finite"),
        (muse.ga_gdr_loss, {"npo_coeff": math.nan}, r"^npo_coeff must be finite"),
        (muse.npo_klr_loss, {"coeff": math.inf}, r"^coeff must be finite"),
        (npo.kto_sigmoid_loss, {"beta": -1.0}, r"^beta must be > 0"),
        (npo.npo_kl_loss, {"kl_coeff": math.nan}, r"^kl_coeff must be finite"),
        (npo.simnpo_grad_diff_loss, {"grad_diff_coeff": math.inf}, r"^grad_diff_coeff must be"),
        (npo.dpo_kl_loss, {"backend": "cuda"}, r"^backend must be one of"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_compat_refuses_a_bad_option_by_name_before_any_pass(fn, option, message):
    with LogitsPasses() as passes, pytest.raises(ValueError, match=message):
        fn(**valid_arguments(fn), **option)
    assert passes.calls == []


def test_open_unlearning_dpo_refuses_unpaired_batches_before_any_pass():
    arguments = valid_arguments(open_unlearning.dpo_loss)
    for name in ("alternate_logits", "ref_alternate_logits", "alternate_labels"):
        arguments[name] = arguments[name][:1]
    message = r"^alternate_logits must hold as many sequences as forget_logits \(2\); got 1$"
    with LogitsPasses() as passes, pytest.raises(ValueError, match=message):
        open_unlearning.dpo_loss(**arguments)
    assert passes.calls == []


@pytest.mark.parametrize("fn", [npo.dpo_loss, npo.dpo_grad_diff_loss, npo.dpo_kl_loss])
def test_npo_dpo_refuses_unpaired_batches_before_any_pass(fn):
    arguments = valid_arguments(fn)
    for name in ("idk_logits", "ref_idk_logits", "idk_labels"):
        arguments[name] = arguments[name][:1]
    message = r"^idk_logits must hold as many sequences as forget_logits \(2\); got 1$"
    with LogitsPasses() as passes, pytest.raises(ValueError, match=message):
        fn(**arguments)
    assert passes.calls == []


def test_muse_task_vector_refuses_an_unknown_rounding():
    base = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match=r"^rounding must be one of 'per_operation', 'once'"):
        muse.negate_task_vector(base, {"w": torch.ones(2, dtype=torch.bfloat16)}, 5.0, rounding="x")


def _check_dtensors_refused(rank: int) -> None:
    mesh = init_device_mesh("cpu", (1,))
    for fn, name in TENSOR_ARGUMENTS:
        arguments = valid_arguments(fn)
        arguments[name] = distribute_tensor(arguments[name], mesh, [Replicate()])
        message = rf"^{name} is a DTensor; .* pass {name}\.to_local\(\)"
        with pytest.raises(ValueError, match=message):
            fn(**arguments)


def test_compat_refuses_dtensors_by_name(tmp_path):
    run_on_ranks(_check_dtensors_refused, 1, tmp_path)
