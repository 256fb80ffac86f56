"""Task-vector negation over checkpoint folders: exact, sharded, atomic, and its refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unlearning_losses.__main__ import main
from unlearning_losses.checkpoint import negate_task_vector_checkpoint
from unlearning_losses.task_vector import negate_task_vector


def state(seed: int, dtype=torch.bfloat16, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, size, generator=g).to(dtype),
        "model.layers.0.mlp.weight": torch.randn(size, size, generator=g).to(dtype),
        "model.layers.0.norm.weight": torch.randn(size, generator=g).to(dtype),
        "model.position_ids": torch.arange(16),
    }


def finetuned_from(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (t + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype))
        if t.is_floating_point()
        else t.clone()
        for n, t in base.items()
    }


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = {}, {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    return tensors, metadata


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_sharded_round_trip_through_the_command_line(tmp_path, capsys):
    base = state(0)
    finetuned = finetuned_from(base)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned)
    before = digest(tmp_path / "base"), digest(tmp_path / "ft")
    main(
        [
            "task-vector",
            "--base",
            str(tmp_path / "base"),
            "--finetuned",
            str(tmp_path / "ft"),
            "--alpha",
            "5",
            "--out",
            str(tmp_path / "out"),
            "--max-shard-size",
            "10000",
            "--quiet",
        ]
    )
    out = tmp_path / "out"
    result, metadata = read_folder(out)
    expected = negate_task_vector(base, finetuned, 5.0)
    assert set(result) == set(expected)
    for name in expected:
        assert torch.equal(result[name], expected[name]), name
    assert metadata["task_vector_alpha"] == "5.0"
    assert len(list(out.glob("*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "tokenizer.json").exists()
    assert (digest(tmp_path / "base"), digest(tmp_path / "ft")) == before
    printed = capsys.readouterr().out
    assert "3 tensors changed, 1 copied" in printed and "task vector norm" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_pickled_checkpoints_with_tied_weights(tmp_path):
    base = state(0, torch.float32)
    base["lm_head.weight"] = base["model.embed_tokens.weight"]  # tied
    finetuned = finetuned_from(base)
    finetuned["lm_head.weight"] = finetuned["model.embed_tokens.weight"]
    for folder, tensors in (("base", base), ("ft", finetuned)):
        (tmp_path / folder).mkdir()
        torch.save(tensors, tmp_path / folder / "pytorch_model.bin")
    report = negate_task_vector_checkpoint(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", 2.0, progress=False
    )
    result, metadata = read_folder(tmp_path / "out")
    expected = negate_task_vector(base, finetuned, 2.0)
    assert "lm_head.weight" not in result  # saved once, under the first name
    assert json.loads(metadata["tied_weights"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(result["model.embed_tokens.weight"], expected["lm_head.weight"])
    assert report.tied == 1 and report.changed == 3


def test_out_dtype_rounds_once_to_it(tmp_path):
    base = state(0, torch.float32)
    finetuned = finetuned_from(base)
    write_sharded(tmp_path / "base", base, shards=1)
    write_sharded(tmp_path / "ft", finetuned, shards=1)
    negate_task_vector_checkpoint(
        tmp_path / "base",
        tmp_path / "ft",
        tmp_path / "out",
        5.0,
        out_dtype=torch.bfloat16,
        progress=False,
    )
    result, _ = read_folder(tmp_path / "out")
    b, f = (
        base["model.layers.0.mlp.weight"].double(),
        finetuned["model.layers.0.mlp.weight"].double(),
    )
    assert torch.equal(result["model.layers.0.mlp.weight"], (b - 5 * (f - b)).bfloat16())
    assert result["model.position_ids"].dtype == torch.int64


def test_refusals(tmp_path):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    finetuned = finetuned_from(base)
    finetuned.pop("model.layers.0.norm.weight")
    finetuned["model.embed_tokens.weight"] = torch.zeros(51, 64, dtype=torch.bfloat16)
    write_sharded(tmp_path / "bad", finetuned)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    with pytest.raises(
        ValueError,
        match=r"keys only in base: \['model.layers.0.norm.weight'\];"
        r".*resize_token_embeddings",
    ):
        negate_task_vector_checkpoint(tmp_path / "base", tmp_path / "bad", tmp_path / "o", 5.0)
    with pytest.raises(ValueError, match=r"out must not be, contain or lie inside base"):
        negate_task_vector_checkpoint(tmp_path / "base", tmp_path / "ft", tmp_path / "base", 5.0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match=r"out already exists.*overwrite=True"):
        negate_task_vector_checkpoint(tmp_path / "base", tmp_path / "ft", tmp_path / "exists", 5.0)
    with pytest.raises(ValueError, match=r"alpha must be finite"):
        negate_task_vector_checkpoint(
            tmp_path / "base", tmp_path / "ft", tmp_path / "o", float("nan")
        )
    with pytest.raises(ValueError, match=r"finetuned must be a checkpoint folder"):
        negate_task_vector_checkpoint(tmp_path / "base", tmp_path / "nope", tmp_path / "o", 5.0)
    with pytest.raises(ValueError, match=r"task vector is all zero"):
        negate_task_vector_checkpoint(
            tmp_path / "base", tmp_path / "base", tmp_path / "o2", 5.0, progress=False
        )
    with pytest.raises(ValueError, match=r"max_shard_size must be"):
        negate_task_vector_checkpoint(
            tmp_path / "base", tmp_path / "ft", tmp_path / "o", 5.0, max_shard_size="lots"
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_overwrite_replaces_an_existing_output(tmp_path):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    negate_task_vector_checkpoint(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", 5.0, overwrite=True, progress=False
    )
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_sigkill_while_writing_leaves_no_output_and_intact_inputs(tmp_path):
    base = {f"layer{i}.weight": torch.randn(256, 1024) for i in range(24)}  # 24 MiB
    write_sharded(tmp_path / "base", base, shards=3)
    write_sharded(tmp_path / "ft", {n: t + 1 for n, t in base.items()}, shards=3)
    before = digest(tmp_path / "base"), digest(tmp_path / "ft")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unlearning_losses",
            "task-vector",
            "--base",
            str(tmp_path / "base"),
            "--finetuned",
            str(tmp_path / "ft"),
            "--alpha",
            "5",
            "--out",
            str(tmp_path / "out"),
            "--max-shard-size",
            "1MiB",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        if staging and any(staging[0].glob("*.safetensors")):
            break
        time.sleep(0.01)
    else:
        process.kill()
        pytest.fail("the command never started writing")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert (digest(tmp_path / "base"), digest(tmp_path / "ft")) == before
    # The next run on the same output removes the dead run's partial folder, and says so.
    with pytest.warns(
        UserWarning, match=r"removed .*\.out\.partial-.*, the partial output of an earlier run"
    ):
        negate_task_vector_checkpoint(
            tmp_path / "base", tmp_path / "ft", tmp_path / "out", 5.0, progress=False
        )
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
