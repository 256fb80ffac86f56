"""The benchmark's results as a markdown table, CSV, JSON and a plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

COLUMNS = (
    "loss",
    "vocab",
    "dtype",
    "implementation",
    "fwd_ms",
    "bwd_ms",
    "fwd+bwd_ms",
    "time_vs_ours",
    "gb_per_s",
    "copy_fraction",
    "peak_extra_mib",
    "error_vs_float64",
)


def markdown(records: Sequence[dict], header: str) -> str:
    titles = [
        "loss",
        "V",
        "dtype",
        "implementation",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "× ours",
        "GB/s",
        "of copy",
        "peak extra MiB",
        "error vs float64",
    ]
    lines = [header, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in records:
        cells = [
            r["loss"],
            r["vocab"],
            r["dtype"],
            r["implementation"],
            _number(r["fwd_ms"], ".2f"),
            _number(r["bwd_ms"], ".2f"),
            _number(r["fwd+bwd_ms"], ".2f"),
            _number(r["time_vs_ours"], ".2f"),
            _number(r["gb_per_s"], ".1f"),
            _number(r["copy_fraction"], ".0%"),
            _number(r["peak_extra_mib"], ".0f"),
            _number(r["error_vs_float64"], ".1e"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def write(records: Sequence[dict], header: str, out: Path) -> list[Path]:
    """``bench.md``, ``bench.csv``, ``bench.json`` and ``bench.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(records, header))
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    (out / "bench.json").write_text(json.dumps({"machine": header, "records": list(records)}))
    plot(records, out / "bench.png")
    return [out / name for name in ("bench.md", "bench.csv", "bench.json", "bench.png")]


def plot(records: Sequence[dict], path: Path) -> None:
    """Forward+backward time and peak extra memory against the vocabulary size, one line per
    implementation, one row of panels per loss (and dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["loss"], r["dtype"]) for r in records})
    figure, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for (loss, dtype), (time_axis, memory_axis) in zip(groups, axes, strict=True):
        rows = [r for r in records if r["loss"] == loss and r["dtype"] == dtype]
        for name in dict.fromkeys(r["implementation"] for r in rows):
            mine = sorted(
                (r for r in rows if r["implementation"] == name), key=lambda r: r["vocab"]
            )
            vocabs = [r["vocab"] for r in mine]
            time_axis.plot(vocabs, [r["fwd+bwd_ms"] for r in mine], marker="o", label=name)
            memory_axis.plot(vocabs, [r["peak_extra_mib"] for r in mine], marker="o", label=name)
        time_axis.set(title=f"{loss} ({dtype}): forward+backward", xlabel="vocabulary", ylabel="ms")
        memory_axis.set(
            title=f"{loss} ({dtype}): peak extra memory", xlabel="vocabulary", ylabel="MiB"
        )
        time_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


STEP_COLUMNS = (
    "method",
    "model",
    "vocab",
    "dtype",
    "checkpointing",
    "implementation",
    "step_ms",
    "time_vs_model",
    "loss_ms",
    "loss_share",
    "peak_extra_mib",
    "memory_vs_model",
    "compile_s",
    "loss",
    "error_vs_float64",
    "note",
)
#: ``bench --step``'s goals: the largest time and memory ratio to the model loss, by
#: implementation.
STEP_GOALS = {"ours, fused linear": (0.75, 0.6), "ours, logits": (1.0, 1.0)}


def step_markdown(records: Sequence[dict], header: str) -> str:
    """The step table, and for each goal the rows that meet it."""
    titles = [
        "method",
        "V",
        "dtype",
        "checkpointing",
        "implementation",
        "step ms",
        "× model loss",
        "loss part ms",
        "loss share",
        "peak extra MiB",
        "memory × model loss",
        "compile s",
        "error vs float64",
        "note",
    ]
    lines = [header, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in records:
        cells = [
            r["method"],
            r["vocab"],
            r["dtype"],
            r["checkpointing"],
            r["implementation"],
            _number(r["step_ms"], ".0f"),
            _number(r["time_vs_model"], ".2f"),
            _number(r["loss_ms"], ".0f"),
            _number(r["loss_share"], ".0%"),
            _number(r["peak_extra_mib"], ".0f"),
            _number(r["memory_vs_model"], ".2f"),
            _number(r["compile_s"], ".1f"),
            _number(r["error_vs_float64"], ".1e"),
            r["note"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join([*lines, "", *step_goals(records)]) + "\n"


def step_goals(records: Sequence[dict]) -> list[str]:
    """One line per goal: the range of the ratios and the rows that miss it."""
    lines = []
    for name, (time_goal, memory_goal) in STEP_GOALS.items():
        mine = [r for r in records if r["implementation"] == name]
        if not mine:
            continue
        times = [r["time_vs_model"] for r in mine]
        memories = [r["memory_vs_model"] for r in mine]
        missed = [
            f"{r['method']} V={r['vocab']} {r['dtype']} checkpointing {r['checkpointing']} "
            f"({r['time_vs_model']:.2f}×, {r['memory_vs_model']:.2f}×)"
            for r in mine
            if not (r["time_vs_model"] <= time_goal and r["memory_vs_model"] <= memory_goal)
        ]
        lines.append(
            f"- {name}: time {min(times):.2f}–{max(times):.2f}× and peak memory "
            f"{min(memories):.2f}–{max(memories):.2f}× the model loss's (goal ≤ {time_goal}×, "
            f"≤ {memory_goal}×): met in {len(mine) - len(missed)} of {len(mine)} rows"
            + (f"; missed: {'; '.join(missed)}" if missed else "")
        )
    return lines


def write_step(records: Sequence[dict], header: str, out: Path) -> list[Path]:
    """``bench-step.md``, ``.csv``, ``.json`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"bench-step.{suffix}" for suffix in ("md", "csv", "json", "png")]
    paths[0].write_text(step_markdown(records, header))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    paths[2].write_text(json.dumps({"machine": header, "records": list(records)}))
    plot_step(records, paths[3])
    return paths


def plot_step(records: Sequence[dict], path: Path) -> None:
    """Step time and peak extra memory by method, a bar per implementation; one row of panels
    per vocabulary, dtype and checkpointing setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if not math.isnan(r["step_ms"])]
    groups = list(dict.fromkeys((r["vocab"], r["dtype"], r["checkpointing"]) for r in measured))
    figure, axes = plt.subplots(len(groups), 2, figsize=(11, 3.4 * len(groups)), squeeze=False)
    for (vocab, dtype, checkpointing), (time_axis, memory_axis) in zip(groups, axes, strict=True):
        rows = [
            r
            for r in measured
            if (r["vocab"], r["dtype"], r["checkpointing"]) == (vocab, dtype, checkpointing)
        ]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        names = list(dict.fromkeys(r["implementation"] for r in rows))
        width = 0.8 / len(names)
        for n, name in enumerate(names):
            mine = {r["method"]: r for r in rows if r["implementation"] == name}
            at = [m + (n - (len(names) - 1) / 2) * width for m in range(len(methods))]
            for axis, column in ((time_axis, "step_ms"), (memory_axis, "peak_extra_mib")):
                values = [mine[m][column] if m in mine else math.nan for m in methods]
                axis.bar(at, values, width, label=name)
        title = f"V = {vocab}, {dtype}, checkpointing {checkpointing}"
        time_axis.set(title=f"step time, {title}", ylabel="ms")
        memory_axis.set(title=f"peak extra memory, {title}", ylabel="MiB")
        for axis in (time_axis, memory_axis):
            axis.set_xticks(range(len(methods)), methods)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize="small")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.4 * len(groups))))
    figure.savefig(path, dpi=110)
    plt.close(figure)
