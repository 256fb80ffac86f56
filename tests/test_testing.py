"""``unlearning_losses.testing`` as users take it: the docs' example passes, broken losses are
caught, the reference math stands apart from the package, and the package never needs it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

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
