"""``python -m unlearning_losses demo``: learn facts, unlearn some, compare the methods.

A small causal transformer learns every question-answer fact of a generated corpus; then each
method starts from that trained model and unlearns the forget set for the same number of steps.
Forget-set and retain-set answer accuracy and NLL are measured before, along the way and after.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import negate_task_vector
from .data import REFUSAL, Corpus, Split, make_corpus
from .methods import LOSSES, REINFORCED, TASK_VECTOR, Reference
from .model import TinyCausalLM

EVAL_EVERY = 5
#: Training goes on past 100% accuracy for a while, so the facts are held with a margin.
MIN_TRAIN_STEPS = 300
#: A method whose retain accuracy falls by more than this (in points) has collapsed the model.
COLLAPSE_POINTS = 10.0


@dataclass
class Quality:
    accuracy: float  # percent of answers predicted exactly (greedy)
    nll: float  # mean negative log-likelihood of the answer token


@dataclass
class MethodResult:
    method: str
    steps: int
    seconds: float
    forget: Quality
    retain: Quality
    curve: list[dict] = field(default_factory=list)


def evaluate(model: TinyCausalLM, split: Split) -> Quality:
    with torch.no_grad():
        logits = model(split.input_ids)
    rows = torch.arange(len(split.answers))
    # Under the shift, the answer at position p is scored by the logits at p - 1.
    scores = logits[rows, split.answer_position - 1].float().log_softmax(-1)
    accuracy = (scores.argmax(-1) == split.answers).float().mean().item() * 100
    return Quality(accuracy, -scores[rows, split.answers].mean().item())


def train(model: TinyCausalLM, corpus: Corpus, max_steps: int, progress: tqdm) -> int:
    """Fit every fact (retain and forget); stops once all answers are right. Returns the steps."""
    ids = torch.cat([corpus.retain.input_ids, corpus.forget.input_ids])
    labels = torch.cat([corpus.retain.labels, corpus.forget.labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    from .. import nll_loss

    for step in range(1, max_steps + 1):
        optimizer.zero_grad()
        nll_loss(model(ids), labels).backward()
        optimizer.step()
        progress.update()
        if (
            step % 25 == 0
            and step >= MIN_TRAIN_STEPS
            and all(evaluate(model, s).accuracy == 100.0 for s in (corpus.retain, corpus.forget))
        ):
            progress.update(max_steps - step)
            return step
    return max_steps


@dataclass
class Reinforced:
    """The trained model fine-tuned further on the forget set, once for every method using it."""

    model: TinyCausalLM
    seconds: float


def reinforce(
    trained: TinyCausalLM, corpus: Corpus, args: argparse.Namespace, progress: tqdm
) -> Reinforced:
    model = copy.deepcopy(trained)
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    from .. import nll_loss

    for _ in range(args.steps):
        optimizer.zero_grad()
        nll_loss(model(corpus.forget.input_ids), corpus.forget.labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.update()
    return Reinforced(model.requires_grad_(False), time.perf_counter() - start)


def unlearn(
    trained: TinyCausalLM,
    corpus: Corpus,
    reference: Reference,
    method: str,
    args: argparse.Namespace,
    progress: tqdm,
) -> MethodResult:
    model = copy.deepcopy(trained)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    curve = [_point(0, model, corpus)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(corpus.retain.answers), (args.retain_batch,), generator=generator)
        optimizer.zero_grad()
        LOSSES[method](model, corpus, reference, rows).backward()
        # As Hugging Face Trainer does by default (max_grad_norm=1).
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.update()
        if step % EVAL_EVERY == 0:
            curve.append(_point(step, model, corpus))
    return MethodResult(
        method,
        args.steps,
        time.perf_counter() - start,
        evaluate(model, corpus.forget),
        evaluate(model, corpus.retain),
        curve,
    )


def negate(
    trained: TinyCausalLM, corpus: Corpus, reinforced: Reinforced, args: argparse.Namespace
) -> MethodResult:
    """The task vector: the trained model moved against its fine-tuning on the forget set."""
    start = time.perf_counter()
    model = copy.deepcopy(trained)
    model.load_state_dict(negate_task_vector(trained, reinforced.model, alpha=args.alpha))
    return MethodResult(
        TASK_VECTOR,
        args.steps,
        reinforced.seconds + time.perf_counter() - start,
        evaluate(model, corpus.forget),
        evaluate(model, corpus.retain),
        [_point(0, trained, corpus), _point(args.steps, model, corpus)],
    )


def _point(step: int, model: TinyCausalLM, corpus: Corpus) -> dict:
    forget, retain = evaluate(model, corpus.forget), evaluate(model, corpus.retain)
    return {
        "step": step,
        "forget_accuracy": forget.accuracy,
        "retain_accuracy": retain.accuracy,
        "forget_nll": forget.nll,
        "retain_nll": retain.nll,
    }


def verdict(before: MethodResult, result: MethodResult) -> str:
    forgot = result.forget.accuracy <= before.forget.accuracy / 2
    kept = before.retain.accuracy - result.retain.accuracy <= COLLAPSE_POINTS
    if forgot and kept:
        return "forgot, utility kept"
    if forgot:
        return f"collapsed: retain accuracy fell {before.retain.accuracy - result.retain.accuracy:.0f} points"
    return "did not forget" if kept else "neither"


def report(before: MethodResult, results: list[MethodResult]) -> str:
    lines = [
        "| method | forget acc % | forget NLL | retain acc % | retain NLL | steps | seconds | verdict |",
        "|---|---|---|---|---|---|---|---|",
        f"| trained model | {before.forget.accuracy:.0f} | {before.forget.nll:.2f} | "
        f"{before.retain.accuracy:.0f} | {before.retain.nll:.2f} | {before.steps} | "
        f"{before.seconds:.1f} | |",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {before.forget.accuracy:.0f} → {r.forget.accuracy:.0f} | "
            f"{before.forget.nll:.2f} → {r.forget.nll:.2f} | "
            f"{before.retain.accuracy:.0f} → {r.retain.accuracy:.0f} | "
            f"{before.retain.nll:.2f} → {r.retain.nll:.2f} | {r.steps} | {r.seconds:.1f} | "
            f"{verdict(before, r)} |"
        )
    return "\n".join(lines)


def plot(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    # Twenty distinct colours, the ten strong ones first.
    tab20 = plt.colormaps["tab20"]
    colors = itertools.cycle([tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))])
    for r, color in zip(results, colors, strict=False):
        steps = [p["step"] for p in r.curve]
        forget = [p["forget_accuracy"] for p in r.curve]
        retain = [p["retain_accuracy"] for p in r.curve]
        style = "o--" if r.method == TASK_VECTOR else "-"
        left.plot(steps, forget, style, color=color, label=r.method)
        middle.plot(steps, retain, style, color=color, label=r.method)
        right.plot(
            forget,
            retain,
            style + ("" if r.method == TASK_VECTOR else "o"),
            color=color,
            markersize=3,
            label=r.method,
        )
        right.annotate(
            "",
            xy=(forget[-1], retain[-1]),
            xytext=(forget[-2], retain[-2]),
            arrowprops={"arrowstyle": "->", "alpha": 0.6},
        )
    left.set(title="Forget set: answer accuracy", xlabel="unlearning step", ylabel="%")
    middle.set(title="Retain set: answer accuracy", xlabel="unlearning step", ylabel="%")
    right.set(
        title="Trade-off (start top right; best is top left)",
        xlabel="forget accuracy %",
        ylabel="retain accuracy %",
    )
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        axis.set_ylim(-5, 105)
    right.set_xlim(-5, 105)
    figure.legend(*right.get_legend_handles_labels(), fontsize=8, loc="center right")
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    corpus = make_corpus(args.people, args.forget_people, args.seed)
    model = TinyCausalLM(corpus.vocab_size)
    reinforcing = any(method in REINFORCED for method in args.methods)
    losses = [method for method in args.methods if method in LOSSES]
    total = args.train_steps + args.steps * (len(losses) + reinforcing)
    with tqdm(total=total, desc="demo", unit="step", disable=args.quiet) as progress:
        start = time.perf_counter()
        progress.set_postfix_str("training")
        trained_steps = train(model, corpus, args.train_steps, progress)
        before = MethodResult(
            "trained model",
            trained_steps,
            time.perf_counter() - start,
            evaluate(model, corpus.forget),
            evaluate(model, corpus.retain),
        )
        reinforced = None
        if reinforcing:
            progress.set_postfix_str("fine-tuning on the forget set")
            reinforced = reinforce(model, corpus, args, progress)
        reference = Reference.of(model, corpus, None if reinforced is None else reinforced.model)
        results = []
        for method in args.methods:
            progress.set_postfix_str(method)
            if method == TASK_VECTOR:
                assert reinforced is not None
                results.append(negate(model, corpus, reinforced, args))
            else:
                results.append(unlearn(model, corpus, reference, method, args, progress))

    table = report(before, results)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "forget_questions": len(corpus.forget.answers),
        "retain_questions": len(corpus.retain.answers),
        "trained": asdict(before),
        "methods": [asdict(r) | {"verdict": verdict(before, r)} for r in results],
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "results.md").write_text(table + "\n")
    plot(results, args.out / "unlearning.png")
    print(
        f"\n{len(corpus.forget.answers)} forget and {len(corpus.retain.answers)} retain questions; "
        f"every method ran {args.steps} steps from the trained model.\n\n{table}\n\n"
        "GA and NPO alone have no retain term: they are expected to collapse the model, the "
        "known result.\nKL+retain KL starts where the model equals its reference, where the "
        "KL's gradient is exactly zero, so its forget term cannot move on its own (SOUL's \"KL\" "
        "method is really a cross-entropy, which can).\nJensUn's pull toward the refusal "
        f'"{REFUSAL}" scales with the refusal\'s probability, which the trained model puts near '
        "0; WHP and RKLD need a reinforced model that knows the forget set better, and the "
        "trained model already gives each forget answer a probability near 1.\n"
        f"Wrote {args.out / 'results.json'}, {args.out / 'results.md'} and "
        f"{args.out / 'unlearning.png'}."
    )
    return summary
