"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted here)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unlearning_losses import bench
from unlearning_losses.__main__ import main
from unlearning_losses.bench import step, step_providers

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
            "--no-compile",
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
            "--no-compile",
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


# The rows added with the helper-target, KTO and FLAT losses: off by default, run by --losses.
NEW_LOGIT_LOSSES = ("me", "ihl", "jsd", "whp", "rkld", "elm", "kto", "flat")


@pytest.mark.parametrize("loss", bench.LOGIT_LOSSES + bench.LINEAR_LOSSES)
def test_each_eager_baseline_computes_our_loss_and_gradient(loss):
    # Float64 inputs: ours computes in float64, the eager code upcasts to float32 as research
    # code does, so they agree to float32 rounding unless the baseline computes another loss.
    batch = bench._batch(loss, 64, 8, 50, torch.float64, torch.device("cpu"))
    if batch.logits is not None:  # a sequence whose labels are the top tokens (IHL's rival case)
        batch.labels[0] = batch.logits[0].argmax(-1)
    found = bench.providers(loss, torch.device("cpu"), compiled=False)
    ours, eager = found["ours"](batch), found["eager"](batch)
    assert eager.dtype == torch.float32 and ours.dtype == torch.float64
    torch.testing.assert_close(eager.double(), ours, rtol=1e-5, atol=1e-8)
    gradients = (torch.autograd.grad(eager, batch.inputs), torch.autograd.grad(ours, batch.inputs))
    for mine, theirs in zip(*gradients, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-8)


def test_the_error_check_compares_the_registrys_call_on_the_batch_slice():
    batch = bench._batch("elm", 64, 8, 50, torch.float64, torch.device("cpu"))
    check = bench._slice(batch)
    assert check.logits.shape == (1, 8, 50) and not check.logits.requires_grad
    # ELM's registry entry derives its prompted runs from the model's logits: the slice does so.
    torch.testing.assert_close(check.positive_logits, check.logits, rtol=0, atol=0)
    torch.testing.assert_close(check.negative_logits, 0.5 * check.logits, rtol=0, atol=0)
    torch.testing.assert_close(check.ref_logits, batch.ref_logits[:1, :8], rtol=0, atol=0)
    ours = bench.providers("elm", torch.device("cpu"), compiled=False)["ours"](check)
    assert ours.item() == pytest.approx(bench.float64_value("elm", check), rel=1e-12)


def test_the_new_logit_losses_run_only_when_asked_for(capsys, monkeypatch):
    assert not set(NEW_LOGIT_LOSSES) & set(bench.DEFAULT_LOSSES)
    # The header's 256 MiB copies are the command test's; here only the rows are measured.
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device, timer: 1.0)
    monkeypatch.setattr(bench, "first_write_ms", lambda device, timer: (0.0, 0.0))
    argv = ["--device=cpu", "--tokens=16", "--vocabs", "40", "--repeats=1", "--no-compile"]
    settings = bench.check_arguments(
        _bench_arguments([*argv, "--quiet", "--losses", *NEW_LOGIT_LOSSES])
    )
    records = bench.run(settings)
    table = capsys.readouterr().out
    for loss in NEW_LOGIT_LOSSES:
        for name in ("ours", "eager"):
            assert f"| {loss} | 40 | float32 | {name} |" in table
    assert len(records) == 2 * len(NEW_LOGIT_LOSSES)
    for r in records:
        assert r["fwd+bwd_ms"] > 0 and not math.isnan(r["peak_extra_mib"]), r
        assert r["error_vs_float64"] < 1e-5 and r["gb_per_s"] > 0, r


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


def _bench_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_times_torch_compile_on_the_cpu_by_default():
    settings = bench.check_arguments(_bench_arguments(["--device", "cpu"]))
    assert settings.compiled
    assert not bench.check_arguments(_bench_arguments(["--device", "cpu", "--no-compile"])).compiled


# bench --step: a tiny model, so that the step's logic runs in seconds; its speed and memory
# goals are the benchmark's output, not asserted here.
TINY_STEP = [
    "bench",
    "--step",
    "--device=cpu",
    "--layers=1",
    "--hidden=16",
    "--vocabs",
    "48",
    "--seq=9",
    "--batch=2",
    "--repeats=1",
    "--no-compile",
    "--quiet",
]


def test_bench_step_measures_every_method_and_writes_its_table_csv_json_and_plot(tmp_path, capsys):
    main([*TINY_STEP, "--model", "gemma2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = (tmp_path / "bench-step.md").read_text()
    assert table.strip() in out
    records = json.loads((tmp_path / "bench-step.json").read_text())["records"]
    measured = [r for r in records if not r["note"]]
    names = {r["implementation"] for r in measured}
    assert names == {"model loss", "ours, logits", "ours, fused linear"}
    assert {(r["method"], r["checkpointing"]) for r in measured} == {
        (method, checkpointing)
        for method in step_providers.METHODS
        for checkpointing in step.CHECKPOINTING
    }
    for r in measured:
        assert r["step_ms"] > 0 and 0 < r["loss_share"] < 1 and r["peak_extra_mib"] >= 0
        assert r["error_vs_float64"] < 1e-5, r
    # Liger-Kernel's kernels need a GPU: its row says so instead of failing.
    (liger,) = {r["note"] for r in records if r["implementation"] == "Liger-Kernel"}
    assert liger in ("its Triton kernels need a GPU", "not installed (pip install liger-kernel)")
    assert "| ga+nll | 48 | float32 | off | ours, fused linear |" in table
    assert "- ours, fused linear: time " in table and "(goal ≤ 0.75×, ≤ 0.6×)" in table
    assert (tmp_path / "bench-step.csv").read_text().startswith("method,model,vocab,dtype")
    assert (tmp_path / "bench-step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_bench_step_losses_of_ours_equal_the_model_loss(model, capsys):
    records = bench.run(
        bench.check_arguments(
            _bench_arguments([*TINY_STEP[1:], "--model", model, "--checkpointing", "on"])
        )
    )
    capsys.readouterr()
    model_loss = {r["method"]: r["loss"] for r in records if r["implementation"] == "model loss"}
    for r in records:
        if not r["note"]:
            assert math.isclose(r["loss"], model_loss[r["method"]], rel_tol=1e-5, abs_tol=1e-6), r


def _tiny_setup(model: str = "gemma2") -> step.Setup:
    args = _bench_arguments([*TINY_STEP[1:], "--model", model])
    settings = bench.check_arguments(args)
    assert isinstance(settings, step.StepSettings)
    return step.setup(settings, 48, torch.float32)


def test_the_model_loss_is_what_the_model_computes_with_labels():
    s = _tiny_setup("gemma2")  # its head softcaps the logits
    i = s.inputs
    assert i.head.softcap == 30.0
    with torch.no_grad():
        hidden = [s.model.base_model(ids).last_hidden_state for ids in (s.forget_ids, s.retain_ids)]
        ours = step_providers.implementations(torch.device("cpu"), compiled=False)[0].loss(
            "ga+nll", *hidden, i
        )
        model = -s.model(s.forget_ids, labels=i.forget_labels).loss
        model = model + s.model(s.retain_ids, labels=i.retain_labels).loss
    torch.testing.assert_close(ours, model, rtol=0, atol=0)


def _gradients(s: step.Setup, implementation, method: str) -> dict[str, torch.Tensor]:
    s.model.load_state_dict(s.initial)
    inputs = s.inputs
    if method == "ga+kl":
        reference = s.reference.base_model(s.retain_ids).last_hidden_state
        if implementation.reads == "logits":
            reference = inputs.ref_head.logits(reference)
        inputs = dataclasses.replace(inputs, reference=reference.detach())
    hidden = [s.model.base_model(ids).last_hidden_state for ids in (s.forget_ids, s.retain_ids)]
    implementation.loss(method, *hidden, inputs).backward()
    grads = {name: p.grad for name, p in s.model.named_parameters()}
    s.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("method", list(step_providers.METHODS))
def test_every_implementation_gives_the_model_loss_gradients(method):
    s = _tiny_setup("gemma2")  # softcapped: the in-place backward runs through the softcap
    model_loss, *others = step_providers.implementations(torch.device("cpu"), compiled=False)
    expected = _gradients(s, model_loss, method)
    for implementation in others:
        if implementation.available or not implementation.computes(method):
            continue
        grads = _gradients(s, implementation, method)
        for name, grad in expected.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{implementation.name}: {name}"
            )


def test_the_step_times_the_loss_part_inside_the_step():
    s = _tiny_setup("llama")
    (fused,) = step_providers.implementations(torch.device("cpu"), False, ("ours, fused linear",))[
        1:
    ]
    step_ms, loss_ms, loss = step.step(s, fused, "npo+nll")
    assert 0 < loss_ms < step_ms and loss.requires_grad is False
    assert all(p.grad is None for p in s.model.parameters())  # gradients set to None


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_kernels_nll_is_the_token_mean_nll_of_the_shifted_labels():
    # On the CPU through Triton's interpreter (conftest); the benchmark runs it on GPUs only.
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 7, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (2, 7), generator=g)
    labels[:, :2] = -100
    nll = step_providers.liger_mean_nll(hidden, labels, step_providers.Head(weight))
    logits = (hidden @ weight.T)[:, :-1].reshape(-1, 40)
    torch.testing.assert_close(nll, F.cross_entropy(logits, labels[:, 1:].reshape(-1)))


@pytest.fixture
def no_model(monkeypatch):
    """A refused ``--step`` argument must stop the command before a model is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark built a model")

    monkeypatch.setattr(step, "setup", refuse)
    monkeypatch.setattr(step, "build", refuse)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--step", "--layers", "0"], "--layers must be at least 1, not 0"),
        (["--step", "--batch", "-2"], "--batch must be at least 1, not -2"),
        (["--step", "--seq", "1"], "--seq must be at least 2, not 1"),
        (["--step", "--vocabs", "48", "0"], "--vocabs must be at least 1, not 0"),
        (["--step", "--hidden", "15"], "--hidden must be even with --step"),
        (["--step", "--repeats", "0"], "--repeats must be at least 1, not 0"),
        (["--step", "--losses", "ga"], "--losses: not with --step"),
        (["--step", "--tokens", "64"], "--tokens: not with --step"),
        (["--model", "llama"], "--model: only with --step"),
        (["--checkpointing", "on"], "--checkpointing: only with --step"),
    ],
)
def test_bench_step_refuses_bad_arguments_by_name(argv, expected, capsys, no_model, no_measuring):
    err = _refused(["--device", "cpu", *argv], capsys)
    assert expected in err


def test_bench_step_refuses_an_unknown_implementation_and_lists_its_own(capsys, no_model):
    err = _refused(["--step", "--device", "cpu", "--implementations", "eager"], capsys)
    assert "--implementations: unknown 'eager' with --step" in err
    assert all(repr(name) in err for name in step_providers.IMPLEMENTATIONS)


def test_bench_step_refuses_an_unknown_model_by_name(capsys, no_model):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--step", "--model", "gpt2"])
    assert exit_.value.code == 2
    assert "--model: invalid choice: 'gpt2'" in capsys.readouterr().err
