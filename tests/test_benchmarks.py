"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearning_losses import bench
from unlearning_losses.__main__ import main

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


@pytest.fixture
def no_measuring(monkeypatch):
    """A refused argument must stop the command before its first measurement."""

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started measuring")

    monkeypatch.setattr(bench, "Timer", refuse)


def _refused(argv: list[str], capsys) -> str:
    """The one-line error of ``bench argv`` (exit 2, nothing printed to stdout)."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--quiet", *argv])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("unlearning-losses bench: error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens", "-5"],
        ["--tokens", "0"],
        ["--hidden", "-1"],
        ["--vocabs", "40", "0"],
        ["--repeats", "0"],
    ],
)
def test_bench_refuses_sizes_below_one(argv, capsys, no_measuring):
    err = _refused(argv, capsys)
    assert argv[0] in err and argv[-1] in err


def test_bench_refuses_an_unknown_implementation_and_lists_the_known(capsys, no_measuring):
    err = _refused(["--device", "cpu", "--implementations", "eager", "nonesuch"], capsys)
    assert "--implementations" in err and "'nonesuch'" in err
    assert all(repr(name) in err for name in bench.IMPLEMENTATIONS)


def test_bench_knows_every_implementation_it_measures():
    for loss in bench.LOGIT_LOSSES + bench.LINEAR_LOSSES:
        assert set(bench.providers(loss, torch.device("cpu"), compiled=True)) <= set(
            bench.IMPLEMENTATIONS
        )


def test_bench_refuses_an_unknown_device_naming_the_choices(capsys, no_measuring):
    err = _refused(["--device", "gpu"], capsys)
    assert "--device" in err and "'gpu'" in err and "auto, cpu, cuda" in err


def test_bench_refuses_cuda_where_there_is_none(capsys, monkeypatch, no_measuring):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _refused(["--device", "cuda"], capsys)
    assert "--device cuda" in err and "CUDA is not available here" in err


def test_bench_refuses_an_out_that_is_a_file_or_below_one(tmp_path, capsys, no_measuring):
    file = tmp_path / "results"
    file.write_text("mine")
    for out in (file, file / "below"):
        err = _refused(["--out", str(out)], capsys)
        assert f"--out {out}" in err
    assert file.read_text() == "mine"


def test_bench_refuses_an_unwritable_out_folder(tmp_path, capsys, monkeypatch, no_measuring):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: stand in for a user's refusal
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)
    err = _refused(["--out", str(locked)], capsys)
    assert f"--out {locked}: the folder is not writable" in err
    assert list(locked.iterdir()) == []


def test_bench_creates_its_out_folder_before_measuring(tmp_path, capsys, no_measuring):
    out = tmp_path / "new" / "results"
    with pytest.raises(AssertionError, match="started measuring"):
        main(["bench", "--quiet", "--device", "cpu", "--out", str(out)])
    assert out.is_dir()
