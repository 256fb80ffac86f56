"""The install as users get it: a lean import, a version, type information, and commands that
name the extra they miss."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import unlearning_losses
from unlearning_losses.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("matplotlib", "tqdm", "triton", "transformers", "hypothesis", "accelerate")


def test_importing_the_package_imports_nothing_optional():
    # torch itself imports some of these when they are installed: count only what the package adds.
    code = (
        "import sys, torch; before = set(sys.modules); import unlearning_losses; "
        f"print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {OPTIONAL!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_base_install_needs_only_torch_numpy_and_safetensors():
    requires = importlib.metadata.requires("unlearning_losses") or []
    base = sorted(r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r)
    assert base == ["numpy", "safetensors", "torch"]


def test_version_is_the_metadata_version_and_the_command_prints_it(capsys):
    assert unlearning_losses.__version__ == importlib.metadata.version("unlearning_losses")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"unlearning-losses {unlearning_losses.__version__}"
    assert f"## {unlearning_losses.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_type_information_ships():
    assert (Path(unlearning_losses.__file__).parent / "py.typed").exists()
    assert 'unlearning_losses = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_a_command_without_its_extra_names_the_install_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quiet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert (
        error == 'unlearning-losses demo: needs matplotlib: pip install "unlearning_losses[demo]"'
    )


@pytest.mark.skipif(
    shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None,
    reason="mypy not installed",
)
def test_the_package_type_checks():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "unlearning_losses"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout


def test_the_api_page_documents_every_public_name():
    page = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^        - (\w+)$", page, re.MULTILINE))
    assert set(unlearning_losses.__all__) <= documented


@pytest.mark.parametrize("name", sorted(unlearning_losses.__all__))
def test_every_public_name_documents_each_argument_and_shows_an_example(name):
    """``help()`` shows every argument's meaning (shared descriptions filled in) and an example
    with its output (run as a doctest by the test command)."""
    obj = getattr(unlearning_losses, name)
    doc = obj.__doc__ or ""
    assert doc.count("Example:") == 1
    assert not re.search(r"^ +(\w+): \{\1\}$", doc, re.MULTILINE), "an unfilled shared argument"
    fields = obj._fields if isinstance(obj, type) else inspect.signature(obj).parameters
    for argument in fields:
        assert re.search(rf"^ +\**{argument}:", doc, re.MULTILINE), f"{name}: {argument}"
