"""The demo, at a reduced size: the methods move the model in the directions the table claims."""

from __future__ import annotations

import json

from unlearning_losses.__main__ import main


def test_demo_forgets_with_retain_terms_and_collapses_without(tmp_path, capsys):
    main(
        [
            "demo",
            "--quiet",
            "--people",
            "16",
            "--forget-people",
            "4",
            "--steps",
            "60",
            "--methods",
            "GA",
            "GA+retain NLL",
            "NPO+retain NLL",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "results.json").read_text())
    trained = summary["trained"]
    assert trained["forget"]["accuracy"] == 100 and trained["retain"]["accuracy"] == 100
    methods = {m["method"]: m for m in summary["methods"]}
    for name in ("GA+retain NLL", "NPO+retain NLL"):
        result = methods[name]
        assert result["forget"]["accuracy"] <= trained["forget"]["accuracy"] / 2, name
        assert result["retain"]["accuracy"] >= trained["retain"]["accuracy"] - 10, name
        assert result["forget"]["nll"] > trained["forget"]["nll"] + 1, name
        assert result["verdict"] == "forgot, utility kept"
    assert methods["GA"]["forget"]["accuracy"] <= 50
    assert methods["GA"]["verdict"].startswith("collapsed")
    assert (tmp_path / "unlearning.png").stat().st_size > 10_000
    assert "| GA+retain NLL |" in capsys.readouterr().out
