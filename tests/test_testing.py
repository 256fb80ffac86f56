"""``unlearning_losses.testing`` as users take it: the docs' example passes, broken losses are
caught, the reference math stands apart from the package, and the package never needs it."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor

import unlearning_losses as ul
from unlearning_losses.testing import (
    assert_close_to_reference,
    batches,
    check_loss,
    reference,
    state_dict_pairs,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"<!-- example: custom_loss -->\n```python\n(.*?)```", re.DOTALL)


def _docs_example() -> dict:
    namespace: dict = {}
    code = EXAMPLE.search((ROOT / "docs" / "testing.md").read_text()).group(1)
    exec(compile(code, "docs/testing.md", "exec"), namespace)  # runs check_loss once
    return namespace


def test_the_docs_registry_example_runs():
    pattern = r"<!-- example: registry -->\n```python\n(.*?)```"
    code = re.search(pattern, (ROOT / "docs" / "testing.md").read_text(), re.DOTALL).group(1)
    exec(compile(code, "docs/testing.md", "exec"), {})


def test_the_docs_example_passes_its_own_check():
    namespace = _docs_example()
    assert "confidence_weighted_ga" in namespace


def test_a_gradient_leak_at_ignored_positions_is_caught():
    namespace = _docs_example()
    loss, ref = namespace["confidence_weighted_ga"], namespace["confidence_weighted_ga_reference"]

    def leaky(logits, labels):
        ignored = logits[labels == -100].sum()
        return loss(logits, labels) + 0.1 * (ignored - ignored.detach())

    with pytest.raises(AssertionError, match=r"property .(reference|empty).: .*gradient"):
        check_loss(leaky, ref)


def test_nan_on_an_empty_batch_is_caught():
    namespace = _docs_example()
    ref = namespace["confidence_weighted_ga_reference"]

    def no_clamp(logits, labels):
        logp = torch.log_softmax(
            logits.double() if logits.dtype == torch.float64 else logits.float(), -1
        )
        valid = labels != -100
        picked = torch.where(valid, logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
        return ((1 - picked.exp()).detach() * picked).sum() / valid.sum()

    with pytest.raises(AssertionError, match=r"property '(empty|reference)'"):
        check_loss(no_clamp, ref)


def test_a_small_bias_in_bfloat16_is_caught():
    def biased(logits, labels):
        return ul.ga_loss(logits, labels) + 1e-3

    def ga_reference(logits, labels):
        return reference.ga_loss(logits, labels, shift=False)

    check_loss(ul.ga_loss, ga_reference, dtypes=[torch.bfloat16], empty=False)
    with pytest.raises(AssertionError, match=r"property 'reference': value differs"):
        check_loss(biased, ga_reference, dtypes=[torch.bfloat16], empty=False)


def test_token_sums_split_into_halves_add_up():
    def ga_sum(logits, labels):
        return ul.ga_loss(logits, labels, reduction="sum")

    def ga_sum_reference(logits, labels):
        valid = labels != -100
        return reference.token_logprobs(logits, labels, shift=False)[valid].sum()

    check_loss(ga_sum, ga_sum_reference, properties=("reference", "empty", "masking", "additive"))
    with pytest.raises(AssertionError, match=r"halves add to"):  # a mean is not additive
        check_loss(
            ul.ga_loss,
            lambda x, y: reference.ga_loss(x, y, shift=False),
            properties=("additive",),
            empty=False,
        )


@settings(max_examples=5)
@given(batches(three_d=False, dtypes=[torch.float32], empty=False))
def test_failures_name_the_worst_element(case):
    with pytest.raises(AssertionError) as failure:
        assert_close_to_reference(
            lambda x: ul.ga_loss(x, case.labels) + 1.0,
            lambda x: reference.ga_loss(x, case.labels, shift=False),
            case,
        )
    message = str(failure.value)
    assert re.search(
        r"value differs from the float64 reference at index \(\): got .*, reference .*, tolerance",
        message,
    )


@given(state_dict_pairs())
def test_task_vector_matches_its_reference(pair):
    base, finetuned = pair
    ours = ul.negate_task_vector(base, finetuned, 5.0)
    expected = reference.negate_task_vector(base, finetuned, 5.0)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_the_reference_imports_nothing_from_the_package():
    tree = ast.parse((ROOT / "unlearning_losses" / "testing" / "reference.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "torch"}


def test_importing_the_package_does_not_import_hypothesis():
    code = "import sys, unlearning_losses; print('hypothesis' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def _ga_reference(logits: Tensor, labels: Tensor) -> Tensor:
    return reference.ga_loss(logits, labels, shift=False)


def _never_called(logits: Tensor, labels: Tensor) -> Tensor:
    raise AssertionError("check_loss ran an example before refusing its options")


@pytest.mark.parametrize("returned", [0.5, None])
@pytest.mark.parametrize("culprit", ["fn", "ref_fn"])
def test_a_callable_that_returns_no_tensor_is_named(culprit: str, returned: object) -> None:
    def no_tensor(logits: Tensor, labels: Tensor) -> object:
        return returned

    callables = {"fn": ul.ga_loss, "ref_fn": _ga_reference} | {culprit: no_tensor}
    kind = type(returned).__name__
    with pytest.raises(TypeError, match=rf"^{culprit} \(.*\) returned {kind}; expected a torch"):
        check_loss(**callables, max_examples=5)


def test_a_constant_zero_on_an_all_ignored_batch_is_accepted() -> None:
    def ga_or_constant(logits: Tensor, labels: Tensor) -> Tensor:
        if (labels == -100).all():  # no token: a constant 0, with no autograd graph
            return torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        return ul.ga_loss(logits, labels)

    check_loss(ga_or_constant, _ga_reference)


def test_a_loss_without_a_gradient_still_fails_the_reference() -> None:
    def detached(logits: Tensor, labels: Tensor) -> Tensor:
        return ul.ga_loss(logits, labels).detach()

    with pytest.raises(AssertionError, match=r"property 'reference': gradient of the logits"):
        check_loss(detached, _ga_reference)


BAD_OPTIONS: list[tuple[dict[str, object], type[Exception], str]] = [
    ({"fn": None}, TypeError, r"^fn \(the loss under test\) must be callable; got None"),
    ({"ref_fn": 1.0}, TypeError, r"^ref_fn \(the reference\) must be callable; got 1\.0"),
    ({"properties": "reference"}, TypeError, r"^properties must be .*; got 'reference'"),
    ({"properties": ()}, ValueError, r"^properties must be a non-empty sequence"),
    ({"properties": ["refernce"]}, ValueError, r"^properties must be .*'empty'.*; got 'refernce'"),
    ({"sensitivity": "high"}, TypeError, r"^sensitivity must be a finite number >= 0; got 'high'"),
    ({"sensitivity": -1.0}, ValueError, r"^sensitivity must be .*; got -1\.0"),
    ({"sensitivity": float("nan")}, ValueError, r"^sensitivity must be .*; got nan"),
    ({"max_examples": 0}, ValueError, r"^max_examples must be an int >= 1 or None; got 0"),
    ({"max_examples": 10.0}, TypeError, r"^max_examples must be an int >= 1 or None; got 10\.0"),
    ({"dtypes": ["float32"]}, TypeError, r"^dtypes must be torch\.dtype values among \(torch\."),
    ({"dtypes": torch.float32}, TypeError, r"^dtypes must be a non-empty sequence of torch\.dtype"),
    ({"dtypes": [torch.int64]}, ValueError, r"^dtypes must be .*; got torch\.int64"),
    ({"dtypes": []}, ValueError, r"^dtypes must be a non-empty sequence .*; got \[\]"),
    ({"references": ["nearby"]}, ValueError, r"^references must be .*'underflow'.*; got 'nearby'"),
    ({"references": "near"}, TypeError, r"^references must be a non-empty sequence .*; got 'near'"),
    ({"min_vocab": 0}, ValueError, r"^min_vocab must be an int >= 1; got 0"),
    ({"min_vocab": 2.5}, TypeError, r"^min_vocab must be an int >= 1; got 2\.5"),
    ({"max_vocab": 0}, ValueError, r"^max_vocab must be an int >= 1; got 0"),
    ({"max_batch": True}, TypeError, r"^max_batch must be an int >= 1; got True"),
    ({"max_length": -2}, ValueError, r"^max_length must be an int >= 1; got -2"),
    ({"batch": 0}, ValueError, r"^batch must be an int >= 1 or None; got 0"),
    ({"three_d": "yes"}, TypeError, r"^three_d must be True, False or None; got 'yes'"),
    ({"shift": True}, ValueError, r"^shift=True needs three_d=True .*; got three_d=False"),
    ({"scales": (1.0, float("inf"))}, ValueError, r"^scales must be finite numbers >= 0; got inf"),
    ({"scales": 1.0}, TypeError, r"^scales must be a non-empty sequence .*; got 1\.0"),
    ({"masked_vocab": 1}, TypeError, r"^masked_vocab must be True, False or None; got 1"),
    ({"empty": None}, TypeError, r"^empty must be True or False; got None"),
    ({"device": 0}, TypeError, r"^device must be a str or a torch\.device; got 0"),
    ({"device": "gpu0"}, ValueError, r"^device must name a device usable here; got 'gpu0'"),
    ({"dtype": torch.float32}, ValueError, r"^unknown option\(s\) \['dtype'\]; .* dtypes"),
]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    BAD_OPTIONS,
    ids=[", ".join(f"{k}={v!r}" for k, v in options.items()) for options, _, _ in BAD_OPTIONS],
)
def test_a_bad_option_is_refused_by_name_before_any_example(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    arguments = {"fn": _never_called, "ref_fn": _never_called, **options}
    with pytest.raises(error, match=message):
        check_loss(**arguments)


@pytest.mark.parametrize("name", list(inspect.signature(batches).parameters))
def test_every_option_of_batches_is_checked(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        check_loss(_never_called, _never_called, **{name: object()})
