"""The registry of ``unlearning_losses.testing``: every public loss is in it, and every entry
calls its loss as its float64 reference says. The tests of "every loss" build their tables from
it, so a loss missing here would be missing from all of them, silently."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

import unlearning_losses as ul
from unlearning_losses.testing import Batch, entries, entry, reference, registry
from unlearning_losses.testing.compare import value_and_grad


def _public_losses(names: list[str]) -> set[str]:
    """The public names the registry must hold: losses, the KL, the log-probs, the fused ones."""
    return {
        name
        for name in names
        if name.endswith("_loss")
        or name in ("kl_divergence", "token_logprobs")
        or name.startswith("linear_")
    }


def _unregistered(names: list[str]) -> set[str]:
    registered = {e.function.__name__ for e in registry.REGISTRY}
    return _public_losses(names) - registered - set(registry.NOT_REGISTERED)


def test_every_public_loss_is_registered():
    assert not _unregistered(ul.__all__), "register these in unlearning_losses/testing/registry.py"


def test_a_loss_missing_from_the_registry_is_found():
    assert _unregistered([*ul.__all__, "new_loss", "linear_new"]) == {"new_loss", "linear_new"}


def test_only_combinations_of_losses_stay_out():
    """An exemption is a function of losses already computed, never of logits or states."""
    for name in registry.NOT_REGISTERED:
        assert name in ul.__all__, name
        first = list(inspect.signature(getattr(ul, name)).parameters)[:2]
        assert first == ["forget_loss", "retain_loss"], name


def test_entries_call_public_functions_and_bind_real_parameters():
    names = [e.name for e in registry.REGISTRY]
    assert len(names) == len(set(names)), "entry names must be unique"
    for e in registry.REGISTRY:
        assert getattr(ul, e.function.__name__) is e.function, e.name
        assert e.name.split("[")[0] == e.function.__name__, e.name
        parameters = set(inspect.signature(e.function).parameters)
        assert e.bound <= parameters, f"{e.name} binds {sorted(e.bound - parameters)}"
        if e.kind == "hidden":
            twin = entry(e.on_logits)
            assert twin.kind == "logits", e.name
            assert e.function.__name__ == "linear_" + twin.function.__name__, e.name


def _positional_non_tensors(function) -> list[str]:
    """The parameters ``function`` takes by position whose annotation names no tensor."""
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and "Tensor" not in str(p.annotation)
    ]


def test_losses_take_only_tensors_by_position():
    """docs/api.md's rule: options and numbers are keyword-only."""
    for function in {e.function for e in registry.REGISTRY}:
        assert not _positional_non_tensors(function), function.__name__

    def beta_by_position(logits: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
        return logits

    assert _positional_non_tensors(beta_by_position) == ["beta"]  # the check can fail


def test_filters_select_by_kind_and_option_and_refuse_typos():
    vocab_parallel = entries("logits", takes="vocab_group")
    assert vocab_parallel and all("vocab_group" in e.takes for e in vocab_parallel)
    # The margin over the mean logit has no vocabulary split.
    assert "logit_margin_loss" not in {e.name for e in vocab_parallel}
    both = entries(takes=("num_sequences", "beta"))
    assert {e.kind for e in both} == {"logits", "hidden"}
    assert {e.count for e in both} == {"num_sequences"}
    assert [e.name for e in entries("activations")] == ["rmu_loss"]
    with pytest.raises(ValueError, match=r"no registered loss takes \['vocab_gruop'\]"):
        entries(takes="vocab_gruop")
    with pytest.raises(ValueError, match=r"kind must be one of"):
        entries("weights")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"no entry 'npo'; registered: token_logprobs, ga_loss"):
        entry("npo")


def _standard(kind: str, three_d: bool) -> tuple[torch.Tensor, Batch, bool]:
    """A float64 input of ``kind`` and its batch: a prompt, an empty sequence (3-D), ignored
    labels; the reference near the model, its log-probs from the reference math."""
    g = torch.Generator().manual_seed(0)
    shape, vocab, hidden_size = ((3, 5) if three_d else (8,)), 7, 4
    shift = three_d and kind != "activations"

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64)

    labels = torch.randint(0, vocab, shape, generator=g)
    if three_d:
        labels[0, :2] = -100
        labels[2] = -100
    else:
        labels[::3] = -100
    if kind == "activations":
        control = ul.rmu_control_vector(hidden_size, generator=g, dtype=torch.float64)
        return (
            randn(*shape, hidden_size),
            Batch(labels, ref_hidden=randn(*shape, hidden_size), control_vector=control),
            shift,
        )
    if kind == "logits":
        logits = 3 * randn(*shape, vocab)
        return (
            logits,
            Batch.with_reference(labels, logits + randn(*shape, vocab), shift=shift),
            shift,
        )
    hidden = randn(*shape, hidden_size)
    ref_hidden = hidden + 0.3 * randn(*shape, hidden_size)
    batch = Batch(
        labels, weight=randn(vocab, hidden_size), bias=randn(vocab), ref_hidden=ref_hidden
    )
    ref_logprobs = reference.token_logprobs(batch.logits_of(ref_hidden), labels, shift)
    return hidden, replace(batch, ref_logprobs=ref_logprobs), shift


@pytest.mark.parametrize("three_d", [True, False], ids=["(B, T)", "(N,)"])
@pytest.mark.parametrize("name", [e.name for e in registry.REGISTRY])
def test_every_entry_equals_its_float64_reference(name, three_d):
    e = entry(name)
    x, batch, shift = _standard(e.kind, three_d)
    options = {"shift": shift} if "shift" in e.takes else {}
    value, grad = value_and_grad(lambda t: e(t, batch, **options), x, 0.7)
    expected, expected_grad = value_and_grad(lambda t: e.reference(t, batch, **options), x, 0.7)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0, "the standard batch must move every loss"


def test_domains_follow_the_finite_entries_each_loss_needs():
    logits = torch.zeros(2, 3)
    labels = torch.tensor([0, -100])
    logits[0, 1:] = float("-inf")  # the label is the only finite entry of a scored row
    assert entry("ga_loss").defined_on(logits, labels, shift=False)
    assert not entry("ceu_loss").defined_on(logits, labels, shift=False)
    assert not entry("logit_margin_loss").defined_on(logits, labels, shift=False)
    assert entry("ceu_loss").defined_on(logits, torch.tensor([-100, 0]), shift=False)


def test_a_batch_splits_by_sequence_and_keeps_its_head():
    _, batch, _ = _standard("hidden", three_d=True)
    half = batch.rows(slice(0, 2))
    assert half.labels.shape == (2, 5) and half.ref_hidden.shape == (2, 5, 4)
    assert half.ref_logprobs.shape == (2, 4) and half.weight is batch.weight
    assert torch.equal(half.on_logits().ref_logits, batch.on_logits().ref_logits[:2])
