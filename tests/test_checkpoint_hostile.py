"""Checkpoints that try to reach outside their folder, or that are broken, reserved, tied
inconsistently or of dtypes the arithmetic does not take: each refused before anything is
written, with the file (and tensor) named; the command line reports them in one line."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint import finetuned_from, read_folder, state, write_sharded

from unlearning_losses.__main__ import main
from unlearning_losses.checkpoint import negate_task_vector_checkpoint
from unlearning_losses.task_vector import apply_task_vector, negate_task_vector, task_vector


def _negate(base: Path, finetuned: Path, out: Path, **options):
    return negate_task_vector_checkpoint(base, finetuned, out, 5.0, progress=False, **options)


def _with_index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_entries_must_stay_inside_the_folder(tmp_path):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    index = json.loads((tmp_path / "ft" / "model.safetensors.index.json").read_text())
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tmp_path / "ft" / "model-00001-of-00002.safetensors", outside)
    for entry in (
        "../outside.safetensors",
        str(outside),
        "/dev/zero",
        "sub/../../outside.safetensors",
    ):
        weight_map = dict(index["weight_map"])
        weight_map["model.embed_tokens.weight"] = entry
        _with_index(tmp_path / "ft", weight_map)
        with pytest.raises(
            ValueError, match=r"model.safetensors.index.json: the entry .* must be a relative"
        ):
            _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    # A shard in a subfolder is inside: allowed, as is a shard that is itself a symlink.
    (tmp_path / "ft" / "sub").mkdir()
    os.replace(
        tmp_path / "ft" / "model-00001-of-00002.safetensors",
        tmp_path / "ft" / "sub" / "a.safetensors",
    )
    (tmp_path / "ft" / "b.safetensors").symlink_to(
        tmp_path / "ft" / "model-00002-of-00002.safetensors"
    )
    renamed = {
        name: "sub/a.safetensors"
        if file.endswith("00001-of-00002.safetensors")
        else "b.safetensors"
        for name, file in index["weight_map"].items()
    }
    _with_index(tmp_path / "ft", renamed)
    _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert set(read_folder(tmp_path / "out")[0]) == set(base)


def test_malformed_indexes_and_missing_shards_are_named(tmp_path):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    index = tmp_path / "ft" / "model.safetensors.index.json"
    for content, message in (
        ("{not json", r"not a readable JSON shard index"),
        ('{"metadata": {}}', r'expected \{"weight_map"'),
        ('{"weight_map": {"a": 3}}', r'expected \{"weight_map"'),
        (
            '{"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}',
            r"names the shard 'gone.safetensors', which is missing",
        ),
    ):
        index.write_text(content)
        with pytest.raises(ValueError, match=rf"{index}: " + message):
            _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out")


def test_reserved_tensor_names_are_refused_before_writing(tmp_path):
    for folder, tensors in (
        ("base", {"__metadata__": torch.ones(3), "w": torch.ones(3)}),
        ("ft", {"__metadata__": torch.ones(3), "w": torch.zeros(3)}),
    ):
        (tmp_path / folder).mkdir()
        torch.save(tensors, tmp_path / folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: a tensor is named '__metadata__'"):
        _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_tied_in_base_but_not_in_finetuned_are_refused(tmp_path):
    base = state(0, torch.float32)
    base["lm_head.weight"] = base["model.embed_tokens.weight"]
    finetuned = finetuned_from(base)  # the two names now hold different values
    message = r"'model.embed_tokens.weight' and 'lm_head.weight' are tied"
    with pytest.raises(ValueError, match=message):
        negate_task_vector(base, finetuned, 5.0)
    with pytest.raises(ValueError, match=message):
        apply_task_vector(base, task_vector(base, finetuned), 1.0)
    for folder, tensors in (("base", base), ("ft", finetuned)):
        (tmp_path / folder).mkdir()
        torch.save(tensors, tmp_path / folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=message):
        _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _fp8_file(path: Path) -> None:
    """A safetensors file holding one F8_E4M3 tensor, written by hand."""
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))


def test_broken_files_are_named_in_one_error(tmp_path):
    base = state(0)
    write_sharded(tmp_path / "base", base, shards=1)

    def folder(name: str, make) -> Path:
        target = tmp_path / name
        target.mkdir()
        make(target)
        return target

    truncated = folder(
        "truncated",
        lambda f: (
            save_file(
                {n: t.contiguous() for n, t in finetuned_from(base).items()},
                f / "model.safetensors",
            ),
            _truncate(f / "model.safetensors"),
        ),
    )
    fp8 = folder("fp8", lambda f: _fp8_file(f / "model.safetensors"))
    not_a_dict = folder("list", lambda f: torch.save([torch.ones(2)], f / "pytorch_model.bin"))
    nested = folder(
        "nested", lambda f: torch.save({"a": {"b": torch.ones(2)}}, f / "pytorch_model.bin")
    )
    cases = {
        truncated: r"truncated/model.safetensors: not a readable safetensors file",
        fp8: r"fp8/model.safetensors: tensor 'w' has dtype F8_E4M3, which task-vector arithmetic does not take",
        not_a_dict: r"list/pytorch_model.bin: expected a flat dict of tensor name -> tensor; got list",
        nested: r"nested/pytorch_model.bin: .* the entry 'a' holds dict",
    }
    for finetuned, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _negate(tmp_path / "base", finetuned, tmp_path / "out")
    write_sharded(tmp_path / "ft", finetuned_from(base), shards=1)
    with pytest.raises(TypeError, match=r"out_dtype must be None or one of"):
        _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out", out_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"out_dtype must be None or one of"):
        _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out", out_dtype="bf16")
    assert not (tmp_path / "out").exists()


def test_command_line_prints_user_errors_in_one_line(tmp_path, capsys):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    (tmp_path / "ft" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
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
                "--quiet",
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("unlearning-losses task-vector: error: ") and "\n" not in error
    assert "Traceback" not in error


def test_out_may_not_be_the_working_directory(tmp_path, monkeypatch):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path / "work")):
        with pytest.raises(
            ValueError, match=r"out must not be the current directory or contain it"
        ):
            _negate(tmp_path / "base", tmp_path / "ft", Path(out), overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    base = state(0)
    write_sharded(tmp_path / "base", base)
    write_sharded(tmp_path / "ft", finetuned_from(base))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("kept")
    real_replace = os.replace

    def failing_replace(source, target):
        if ".partial-" in str(source):
            raise OSError("disk gone")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        _negate(tmp_path / "base", tmp_path / "ft", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "previous.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
