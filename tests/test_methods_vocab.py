"""ME, IHL and JSD (the losses that reduce whole rows of the vocabulary): both backends against
the float64 reference in every dtype, the Triton kernels against the chunked path, and the
properties each loss promises (the registry's tests run them through bad input, hostile input,
data, vocabulary and DTensor parallelism)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import run_on_ranks

from unlearning_losses import ihl_loss, jsd_loss, me_loss
from unlearning_losses.ops import _triton_common
from unlearning_losses.testing import reference as ref
from unlearning_losses.testing.compare import assert_close_to_reference, value_and_grad
from unlearning_losses.testing.strategies import DTYPES, REFERENCES, batches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-wide Triton tiles, so that the test vocabularies span one or several tiles."""
    monkeypatch.setattr(_triton_common, "MAX_BLOCK_V", 16)


def _on_device(case):
    case.logits, case.ref_logits = case.logits.to(DEVICE), case.ref_logits.to(DEVICE)
    case.labels = case.labels.to(DEVICE)
    return case


# (name, loss(logits, case, **options), reference(float64 logits, case)): JSD to the reference
# with a beta other than 1/2, where the model's and the reference's weights differ.
LOSSES = {
    "me": (
        lambda x, c, **kw: me_loss(x, c.labels, shift=c.shift, **kw),
        lambda x, c: ref.me_loss(x, c.labels, shift=c.shift),
    ),
    "ihl": (
        lambda x, c, **kw: ihl_loss(x, c.labels, shift=c.shift, **kw),
        lambda x, c: ref.ihl_loss(x, c.labels, shift=c.shift),
    ),
    "jsd[one-hot]": (
        lambda x, c, **kw: jsd_loss(x, c.labels, shift=c.shift, beta=0.3, **kw),
        lambda x, c: ref.jsd_loss(x, c.labels, shift=c.shift, beta=0.3),
    ),
    "jsd[ref_logits]": (
        lambda x, c, **kw: jsd_loss(
            x, c.labels, ref_logits=c.ref_logits, shift=c.shift, beta=0.3, **kw
        ),
        lambda x, c: ref.jsd_loss(
            x, c.labels, ref_logits=c.ref_logits.double(), shift=c.shift, beta=0.3
        ),
    ),
}


def _check_against_reference(case, name: str, backend: str) -> None:
    loss, expected = LOSSES[name]
    assert_close_to_reference(
        lambda x: loss(x, case, backend=backend), lambda x: expected(x, case), case
    )


@settings(max_examples=30)
@given(batches(dtypes=DTYPES, references=REFERENCES), st.sampled_from(sorted(LOSSES)))
def test_chunked_path_matches_the_float64_reference_in_every_dtype(case, name):
    _check_against_reference(case, name, "torch")


@pytest.mark.triton
@settings(max_examples=15)
@given(batches(dtypes=LOW_PRECISION, references=REFERENCES), st.sampled_from(sorted(LOSSES)))
def test_triton_kernels_match_the_float64_reference(case, name):
    _check_against_reference(_on_device(case), name, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("vocab", [1, 13, 50])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_triton_equals_the_chunked_path(name, vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    ref_logits = (torch.randn(2, 7, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (2, 7), generator=g).to(DEVICE)
    labels[0, :3] = -100
    labels[1, 4] = -100
    upstream = torch.randn(2, 6, generator=g).to(DEVICE)
    loss = LOSSES[name][0]

    class Case:  # the fields the table's losses read
        pass

    case = Case()
    case.labels, case.ref_logits, case.shift = labels, ref_logits, True

    def run(backend):
        return value_and_grad(
            lambda x: loss(x, case, reduction="none", backend=backend) * upstream, logits, 1.0
        )

    (value_t, grad_t), (value_c, grad_c) = run("triton"), run("torch")
    torch.testing.assert_close(value_t, value_c, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad_t.float(), grad_c.float(), rtol=tol, atol=tol)
    assert (grad_t[:, -1] == 0).all()  # the shifted-out position


# --- ME -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_me_of_a_uniform_distribution_is_zero_with_zero_gradient(backend):
    logits = torch.full((2, 5, 37), 3.5, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 37, (2, 5), device=DEVICE)
    value = me_loss(logits, labels, backend=backend)
    value.backward()
    assert abs(value.item()) < 1e-6  # log-sum-exp less the mean logit, log 37, less log 37
    assert logits.grad.abs().max().item() < 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_me_of_a_masked_vocabulary_is_me_of_the_columns_left(backend):
    """A -inf column lies outside the uniform distribution's support: masking columns equals
    dropping them, value and gradient (0 at the masked columns), where the paper's KL over every
    column would be infinite."""
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(2, 6, 40, generator=g)).to(DEVICE)
    labels = torch.randint(0, 26, (2, 6), generator=g).to(DEVICE)  # within both vocabularies
    kept = torch.arange(40, device=DEVICE) % 3 != 0
    masked = logits.masked_fill(~kept, float("-inf"))
    value, grad = value_and_grad(lambda x: me_loss(x, labels, backend=backend), masked, 0.7)
    dropped, dropped_grad = value_and_grad(
        lambda x: me_loss(x, labels, backend=backend), logits[..., kept], 0.7
    )
    assert torch.isfinite(value)
    torch.testing.assert_close(value, dropped)
    torch.testing.assert_close(grad[..., kept], dropped_grad)
    assert (grad[..., ~kept] == 0).all()


def _float64_me_per_token(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || P) per row in float64, U uniform over the row's finite logits."""
    z = logits.double()
    finite = z > -math.inf
    count = finite.sum(-1)
    logp = torch.where(finite, z.log_softmax(-1), 0.0)
    return -torch.log(count.double()) - logp.sum(-1) / count


def _assert_me_keeps_float32_rounding(value: torch.Tensor, expected: torch.Tensor, vocab: int):
    """Within 4 float32 units of ``eps log V`` of the float64 value, and never negative."""
    error = (value.double() - expected.to(value.device)).abs().max().item()
    assert error <= 4 * torch.finfo(torch.float32).eps * math.log(vocab)
    assert (value >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [50, 32000])
@pytest.mark.parametrize("offset", [0.0, 30.0, 1e3, 1e4])
def test_me_value_keeps_float32_rounding_at_any_logit_offset(offset, vocab, backend, monkeypatch):
    """Near-uniform float32 rows ``offset + 0.01 N(0, 1)``, KL about 5e-5: the value is formed
    about the row's largest logit, so an offset costs no precision. The log-sum-exp less the
    mean logit, each rounded at the offset's scale, was 2000 units off at 1e4 (V = 50) and
    negative (V = 32000)."""
    if vocab > 2048:  # 16 tiles, each joined to the running partials (2000 take minutes here)
        monkeypatch.setattr(_triton_common, "MAX_BLOCK_V", 2048)
    g = torch.Generator().manual_seed(vocab)
    logits = (offset + 0.01 * torch.randn(2, 3, vocab, generator=g)).to(DEVICE)
    labels = torch.tensor([[-100, 1, 2], [3, 4, 5]], device=DEVICE)
    value = me_loss(logits, labels, reduction="none", backend=backend)
    _assert_me_keeps_float32_rounding(value, _float64_me_per_token(logits[:, :-1].cpu()), vocab)


def _check_me_at_an_offset_across_ranks(rank: int) -> None:
    """V = 50 split 30 + 20, rows near-uniform about 1e4, -1e4 and 30; at one row rank 1 holds
    only masked columns (its partials, 0, must stay 0 when moved to the centre -1e4)."""
    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([1e4, -1e4, 30.0])[:, None, None]
    logits = offsets + 0.01 * torch.randn(3, 5, 50, generator=g)
    logits[1, 2, 30:] = float("-inf")
    labels = torch.zeros(3, 5, dtype=torch.long)
    columns = slice(0, 30) if rank == 0 else slice(30, 50)
    value = me_loss(logits[..., columns], labels, reduction="none", vocab_group=dist.group.WORLD)
    _assert_me_keeps_float32_rounding(value, _float64_me_per_token(logits[:, :-1]), 50)


def test_vocabulary_parallel_me_keeps_float32_rounding_at_any_logit_offset(tmp_path):
    run_on_ranks(_check_me_at_an_offset_across_ranks, 2, tmp_path)


# --- IHL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ihl_gradient_goes_to_the_first_of_tied_runners_up(backend):
    """Columns 3 and 20 (tiles apart) tie for the largest logit after the label's: the
    runner-up's entry goes to column 3 only."""
    logits = torch.zeros(1, 37, device=DEVICE)
    logits[0, 5], logits[0, 3], logits[0, 20] = 4.0, 2.0, 2.0
    labels = torch.tensor([5], device=DEVICE)
    value, grad = value_and_grad(lambda x: ihl_loss(x, labels, backend=backend), logits, 1.0)
    expected, expected_grad = value_and_grad(
        lambda x: ref.ihl_loss(x, labels), logits.double(), 1.0
    )
    torch.testing.assert_close(value.double(), expected)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    assert grad[0, 3] < grad[0, 20] < 0  # the runner-up pushed up more than every other column


@pytest.mark.parametrize("backend", BACKENDS)
def test_ihl_without_a_runner_up_is_two_with_zero_gradient(backend):
    """A vocabulary of one, or a label that is its row's only finite logit: p_y = 1, p_a = 0."""
    one = torch.randn(3, 1, device=DEVICE)
    masked = torch.full((3, 9), float("-inf"), device=DEVICE)
    masked[:, 4] = torch.randn(3, device=DEVICE)
    for logits, label in ((one, 0), (masked, 4)):
        labels = torch.full((3,), label, device=DEVICE)
        value, grad = value_and_grad(
            lambda x, y=labels: ihl_loss(x, y, backend=backend), logits, 1.0
        )
        assert value.item() == 2.0
        assert (grad == 0).all()


# --- JSD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_jsd_of_a_model_equal_to_its_reference_is_exactly_zero(beta, dtype, backend):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 4, 70, generator=g) * 4).to(dtype).to(DEVICE)
    logits[0, 1, :20] = float("-inf")  # a masked vocabulary
    labels = torch.randint(20, 70, (2, 4), generator=g).to(DEVICE)
    x = logits.clone().requires_grad_()
    value = jsd_loss(x, labels, ref_logits=logits, beta=beta, backend=backend)
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == 0.0
    assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_stays_finite_where_the_mixture_underflows(backend):
    """Entries of probability 0 on both sides (a shared masked vocabulary), or tiny on one side
    and 0 on the other (logits 1e4 apart), put log 0 into the mixture's logarithm of a direct
    implementation (Liger-Kernel issue 769); here they contribute 0."""
    logits = torch.tensor([[[1e4, -1e4, float("-inf"), 0.0] * 5] * 3], device=DEVICE)
    ref_logits = torch.tensor([[[-1e4, 1e4, float("-inf"), 3.0] * 5] * 3], device=DEVICE)
    labels = torch.tensor([[0, 1, 3]], device=DEVICE)
    for dtype in LOW_PRECISION:
        x = logits.to(dtype).detach().requires_grad_()
        total = jsd_loss(x, labels, backend=backend) + jsd_loss(
            x, labels, ref_logits=ref_logits.to(dtype), beta=0.2, backend=backend
        )
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(x.grad).all(), dtype
    # The negative control: the mixture's logarithm taken directly is NaN here.
    p, q = logits.softmax(-1), ref_logits.softmax(-1)
    direct = p * (p.log() - (0.5 * p + 0.5 * q).log())
    assert direct.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["logits", "ref_logits"])
def test_jsd_of_a_nan_logit_at_a_scored_row_is_nan_there_only(side, backend):
    """NaN in, NaN out: a clamp that drops NaN (a max at the lowest finite value) would read the
    row's log-probabilities as 0 probability, a finite wrong value with a zero gradient."""
    g = torch.Generator().manual_seed(2)
    inputs = {
        "logits": torch.randn(1, 4, 9, generator=g),
        "ref_logits": torch.randn(1, 4, 9, generator=g),
    }
    inputs[side][0, 1, 4] = float("nan")
    x = inputs["logits"].to(DEVICE).requires_grad_()
    labels = torch.tensor([[-100, 2, 5, 1]], device=DEVICE)
    ref_logits = inputs["ref_logits"].to(DEVICE)
    per_token = jsd_loss(x, labels, ref_logits=ref_logits, reduction="none", backend=backend)
    per_token.sum().backward()
    assert torch.isnan(per_token[0, 1]) and torch.isnan(x.grad[0, 1]).all()
    assert torch.isfinite(per_token[0, 2]) and torch.isfinite(x.grad[0, 2]).all()


@given(batches(dtypes=[torch.float64], masked_vocab=False), st.sampled_from([0.5, 0.2, 0.9]))
def test_jsd_to_a_one_hot_reference_equals_jsd_to_the_label(case, beta):
    """The two paths agree: the pair kernel's mixture against reference logits whose softmax
    is the label's one-hot distribution, and the label's closed form on its log-probability."""
    one_hot = torch.full_like(case.logits, float("-inf"))
    rows, targets = one_hot, case.labels
    if case.shift:  # row t scores label t + 1
        rows, targets = one_hot[:, :-1], case.labels[:, 1:]
    rows.scatter_(-1, targets.clamp(min=0)[..., None], 0.0)

    def to_label(t):
        return jsd_loss(t, case.labels, shift=case.shift, beta=beta, reduction="none")

    def to_reference(t):
        return jsd_loss(
            t, case.labels, ref_logits=one_hot, shift=case.shift, beta=beta, reduction="none"
        )

    value, grad = value_and_grad(to_label, case.logits, case.upstream)
    pair_value, pair_grad = value_and_grad(to_reference, case.logits, case.upstream)
    torch.testing.assert_close(value, pair_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, pair_grad, rtol=1e-9, atol=1e-12)


def test_jsd_is_bounded_by_the_entropy_of_its_weights():
    """beta KL(P || M) + (1 - beta) KL(Q || M) <= H(beta): reached where P and Q are disjoint."""
    logits = torch.tensor([[0.0, -1e30, -1e30], [-1e30, 0.0, 0.0]], dtype=torch.float64)
    for beta in (0.5, 0.2):
        entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        far = jsd_loss(logits[:1], torch.tensor([1]), beta=beta, shift=False)
        torch.testing.assert_close(far.item(), entropy)
        disjoint = jsd_loss(logits[:1], torch.tensor([0]), ref_logits=logits[1:], beta=beta)
        torch.testing.assert_close(disjoint.item(), entropy)


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.5, -0.2, float("nan"), True, "0.5"])
def test_jsd_refuses_a_beta_outside_the_open_unit_interval(beta):
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    error = TypeError if isinstance(beta, bool | str) else ValueError
    with pytest.raises(error, match=r"beta must be"):
        jsd_loss(logits, labels, beta=beta)


def test_jsd_refuses_reference_logits_of_another_shape():
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    with pytest.raises(ValueError, match=r"ref_logits must have shape \(2, 4, 5\)"):
        jsd_loss(logits, labels, ref_logits=torch.randn(2, 4, 6))


# --- every loss: in-place backward, compilation, a vocabulary split with tied runners-up ------

CALLS = {
    "me": lambda x, r, y, **kw: me_loss(x, y, **kw),
    "ihl": lambda x, r, y, **kw: ihl_loss(x, y, **kw),
    "jsd[one-hot]": lambda x, r, y, **kw: jsd_loss(x, y, **kw),
    "jsd[ref_logits]": lambda x, r, y, **kw: jsd_loss(x, y, ref_logits=r, beta=0.3, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_inplace_backward_writes_the_same_gradient_into_the_logits(name, backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 6, 37, generator=g).to(DEVICE)
    ref_logits = torch.randn(2, 6, 37, generator=g).to(DEVICE)
    labels = torch.randint(0, 37, (2, 6), generator=g).to(DEVICE)
    labels[1, :2] = -100
    loss = CALLS[name]

    leaf = base.clone().requires_grad_(True)
    loss(leaf, ref_logits, labels, backend=backend).backward()
    expected = leaf.grad

    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, as a model's output is
    captured = {}
    logits.register_hook(lambda grad: captured.setdefault("grad", grad))
    loss(logits, ref_logits, labels, backend=backend, inplace_backward=True).backward()
    assert captured["grad"].data_ptr() == logits.data_ptr()
    torch.testing.assert_close(leaf.grad, expected)


def test_compiled_losses_equal_eager_values_and_gradients():
    """torch.compile(fullgraph=True) traces the new custom ops without graph breaks."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 31, generator=g)
    ref_logits = torch.randn(2, 9, 31, generator=g)
    labels = torch.randint(0, 31, (2, 9), generator=g)
    labels[:, :3] = -100

    def objective(x, r, y):
        return sum(call(x, r, y) for call in CALLS.values())

    def run(fn):
        x = logits.clone().requires_grad_(True)
        value = fn(x, ref_logits, labels)
        value.backward()
        return value.detach(), x.grad

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    for got, expected in zip(run(compiled), run(objective), strict=True):
        torch.testing.assert_close(got, expected)


def _check_runner_up_tied_across_ranks(rank: int) -> None:
    """V = 9 split 5 + 4: the runner-up's logit appears in both slices; the first column, on
    rank 0, takes its gradient entry, as in one process."""
    logits = torch.zeros(2, 9, dtype=torch.float64)
    logits[:, 7] = 3.0  # the label's, on rank 1
    logits[:, 2] = logits[:, 6] = 1.5  # tied runners-up, one on each rank
    labels = torch.tensor([7, 7])
    full, full_grad = value_and_grad(lambda x: ihl_loss(x, labels, reduction="sum"), logits, 1.0)
    columns = slice(0, 5) if rank == 0 else slice(5, 9)

    def sharded(x):
        return ihl_loss(x, labels, reduction="sum", vocab_group=dist.group.WORLD)

    value, grad = value_and_grad(sharded, logits[:, columns], 1.0)
    torch.testing.assert_close(value, full)
    torch.testing.assert_close(grad, full_grad[:, columns])
    if rank == 0:
        assert (grad[:, 2] < 0).all()  # the runner-up, pushed up


def test_vocabulary_parallel_ihl_takes_the_first_tied_runner_up(tmp_path):
    run_on_ranks(_check_runner_up_tied_across_ranks, 2, tmp_path)
