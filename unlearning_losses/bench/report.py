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
