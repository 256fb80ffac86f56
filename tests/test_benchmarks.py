"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_command_writes_its_table_csv_json_and_plot(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearning_losses",
            "bench",
            "--device=cpu",
            "--tokens=16",
            "--hidden=8",
            "--vocabs",
            "40",
            "80",
            "--repeats=1",
            "--losses",
            "ga",
            "kl",
            "linear_ga",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    table = (tmp_path / "bench.md").read_text()
    assert table.strip() in done.stdout
    for loss in ("ga", "kl", "linear_ga"):
        for vocab in (40, 80):
            assert f"| {loss} | {vocab} | float32 | ours |" in table
            assert f"| {loss} | {vocab} | float32 | eager |" in table
        if loss != "linear_ga":
            assert f"| {loss} | 40 | float32 | ours, in-place backward |" in table
    assert re.search(
        r"writing 256 MiB takes \d+ ms into a new buffer, \d+ ms into a used one", table
    )
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert all(r["fwd+bwd_ms"] > 0 and r["error_vs_float64"] < 1e-4 for r in records)
    assert (tmp_path / "bench.csv").read_text().startswith("loss,vocab,dtype,implementation")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_scripts_are_callers_of_the_bench_command(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_cpu_losses.py"),
            "--tokens=16",
            "--vocabs",
            "33",
            "--repeats=1",
            "--quiet",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    for loss in ("ga", "npo", "kl", "simnpo"):
        assert f"| {loss} | 33 | bfloat16 | ours |" in done.stdout


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
