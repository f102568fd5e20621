"""The documented example script runs headless and writes what it promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import starfile

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "scripted_loop.py"


def test_scripted_loop_example_runs_headless(tmp_path):
    spec = importlib.util.spec_from_file_location("scripted_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(tmp_path / "out", quick=True)
    loop = result["loop"]
    assert len(starfile.read(result["star"])) == result["n_picks"] == len(loop.picks_table())
    assert sorted(p.name for p in result["relion"]) == sorted(
        f"{n}_autopick.star" for n in loop.picks_table()["micrograph"].unique())
    assert result["csv"].is_file() and (tmp_path / "out" / "model.pt").is_file()
    positives, negatives = loop.labels()
    assert len(negatives) > 0 and len(positives) > 45  # the corrections were recorded
    assert 0.0 <= result["ap_retrained"] <= 1.0
