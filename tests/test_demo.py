"""The first-version demo runs end to end on the embedded data and measures what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from segcal.cli import app

    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--output", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    preds = summary["predictors"]
    assert set(preds) == {"reference", "sharpened", "smoothed"}
    soft = {k: v["soft reference"] for k, v in preds.items()}
    for cls in summary["classes"]:
        # scored against the known probabilities, the reference is calibrated and tempering is not
        assert soft["reference"]["ace"][cls] < 0.02
        assert soft["sharpened"]["ace"][cls] > 2 * soft["reference"]["ace"][cls] + 0.02
        assert soft["smoothed"]["ace"][cls] > 2 * soft["reference"]["ace"][cls] + 0.02
    # the cross-entropy to the reference is minimised by the reference itself
    assert soft["reference"]["nll"] < soft["sharpened"]["nll"]
    assert soft["reference"]["nll"] < soft["smoothed"]["nll"]
    pngs = sorted(out.glob("reliability_*.png"))
    assert len(pngs) == 9 and all(p.stat().st_size > 5000 for p in pngs)
    assert "Calibration on the test slices" in res.output
