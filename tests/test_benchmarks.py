"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_loss_benchmark_writes_its_table(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_cpu_losses.py"),
            "--batch=1",
            "--length=9",
            "--vocab=33",
            "--repeats=1",
            "--dtypes",
            "float32",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    table = (tmp_path / "cpu_losses.md").read_text()
    assert "| ga | float32 |" in table and "| kl | float32 |" in table
    records = json.loads((tmp_path / "cpu_losses.json").read_text())
    assert {(r["loss"], r["impl"]) for r in records} == {
        (loss, impl) for loss in ("ga", "npo", "kl") for impl in ("naive", "ours")
    }
    assert all(r["seconds"] > 0 for r in records)


def test_fused_linear_benchmark_compares_each_head_mode():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_fused_linear.py"),
            "--tokens=8",
            "--hidden=4",
            "--vocabs",
            "50",
            "--losses",
            "npo",
            "--heads",
            "trained",
            "frozen",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    for head in ("trained", "frozen"):
        assert f"| npo | 50 | {head} | ours |" in done.stdout
        assert f"| npo | 50 | {head} | materialised |" in done.stdout


def test_dtensor_benchmark_compares_both_paths(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_dtensor.py"),
            "--batch=1",
            "--tokens=6",
            "--vocab=20",
            "--repeats=1",
            "--losses",
            "ga",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    table = (tmp_path / "dtensor.md").read_text()
    assert "| ga |" in table and "peak extra memory" in table
