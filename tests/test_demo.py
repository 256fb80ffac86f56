"""The demo, at a reduced size: the methods move the model in the directions the table claims."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import Tensor

from unlearning_losses.__main__ import main
from unlearning_losses.demo.data import REFUSAL, make_corpus
from unlearning_losses.demo.methods import LOSSES, TASK_VECTOR, Reference
from unlearning_losses.demo.model import TinyCausalLM

#: Methods that forget (answer accuracy at most half) with retain accuracy kept.
FORGET_AND_KEEP_UTILITY = ("GA+retain NLL", "NPO+retain NLL", "ME+retain NLL", "IHL+retain NLL")
#: Methods that lower the forget answers' probability with retain accuracy kept, short of the
#: forgetting threshold at this size: KTO is near it after 60 steps; WHP and RKLD would need a
#: reinforced model that knows more than the trained one.
LOWER_FORGET_PROBABILITY = ("KTO+retain NLL", "WHP+retain NLL", "RKLD+retain NLL")
#: Methods without a retain term.
WITHOUT_RETAIN = ("GA", "FLAT")
#: JensUn barely moves from the trained model in so few steps (its gradient toward the refusal
#: scales with the refusal's probability, near 0 there); test_refusal_methods_* checks its aim.
METHODS = (*FORGET_AND_KEEP_UTILITY, *LOWER_FORGET_PROBABILITY, *WITHOUT_RETAIN, "JensUn")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One reduced run of every method under test (the model is trained once)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            [
                "demo",
                "--quiet",
                "--people",
                "16",
                "--forget-people",
                "4",
                "--steps",
                "60",
                "--methods",
                *METHODS,
                TASK_VECTOR,
                "--out",
                str(out),
            ]
        )
    summary = json.loads((out / "results.json").read_text())
    return summary, {m["method"]: m for m in summary["methods"]}, out, printed.getvalue()


def test_demo_trains_every_fact_and_writes_its_results(demo):
    summary, methods, out, printed = demo
    trained = summary["trained"]
    assert trained["forget"]["accuracy"] == 100 and trained["retain"]["accuracy"] == 100
    assert list(methods) == [*METHODS, TASK_VECTOR]
    assert (out / "unlearning.png").stat().st_size > 10_000
    assert "| GA+retain NLL |" in printed and "| JensUn |" in printed


@pytest.mark.parametrize("name", FORGET_AND_KEEP_UTILITY)
def test_methods_with_a_retain_term_forget_and_keep_utility(demo, name):
    summary, methods, _, _ = demo
    trained, result = summary["trained"], methods[name]
    assert result["forget"]["accuracy"] <= trained["forget"]["accuracy"] / 2
    assert result["retain"]["accuracy"] >= trained["retain"]["accuracy"] - 10
    assert result["forget"]["nll"] > trained["forget"]["nll"] + 1
    assert result["verdict"] == "forgot, utility kept"


@pytest.mark.parametrize("name", LOWER_FORGET_PROBABILITY)
def test_methods_lower_the_forget_answers_probability_and_keep_utility(demo, name):
    summary, methods, _, _ = demo
    trained, result = summary["trained"], methods[name]
    assert result["forget"]["accuracy"] < trained["forget"]["accuracy"]
    assert result["forget"]["nll"] > trained["forget"]["nll"] + 1
    assert result["retain"]["accuracy"] >= trained["retain"]["accuracy"] - 10


@pytest.mark.parametrize("name", WITHOUT_RETAIN)
def test_methods_without_a_retain_term_forget_and_collapse(demo, name):
    _, methods, _, _ = demo
    assert methods[name]["forget"]["accuracy"] <= 50
    assert methods[name]["verdict"].startswith("collapsed")


def test_jensun_keeps_utility(demo):
    summary, methods, _, _ = demo
    assert methods["JensUn"]["retain"]["accuracy"] >= summary["trained"]["retain"]["accuracy"] - 10


def test_the_task_vector_forgets(demo):
    _, methods, _, _ = demo
    assert methods[TASK_VECTOR]["forget"]["accuracy"] <= 50


@pytest.mark.parametrize("name", ["JensUn", "FLAT"])
def test_refusal_methods_make_the_refusal_the_forget_questions_answer(name):
    """Where the refusal is not yet improbable (a model whose next-token distribution starts
    near uniform), a few steps of JensUn or FLAT make it every forget question's answer."""
    torch.manual_seed(0)
    corpus = make_corpus(people=8, forget_people=2, seed=0)
    model = TinyCausalLM(corpus.vocab_size)
    with torch.no_grad():
        model.embed.weight.mul_(0.01)  # the tied head: every logit near 0
    reference = Reference.of(model, corpus)
    forget = corpus.forget
    questions = torch.arange(len(forget.answers))
    refusal = corpus.vocab.index(REFUSAL)

    def refusal_is_the_answer() -> Tensor:
        with torch.no_grad():
            logits = model(forget.input_ids)[questions, forget.answer_position - 1]
        return logits.argmax(-1) == refusal

    assert not refusal_is_the_answer().any()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rows = torch.arange(len(corpus.retain.answers))
    for _ in range(10):
        optimizer.zero_grad()
        LOSSES[name](model, corpus, reference, rows).backward()
        optimizer.step()
    assert refusal_is_the_answer().all()
