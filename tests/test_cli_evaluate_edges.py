"""``segcal evaluate`` / ``compare`` at the edges: nothing matched, every case failed, names with Rich markup or
matplotlib math text, runs with different bins. Each gives a clear message, the documented exit code, and
(for evaluate) a summary and report listing the failures."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from _eval_data import affine_for, write_nifti_dataset
from segcal.cli import app

runner = CliRunner()


def _evaluate(pred: Path, lab: Path, out: Path, *extra: str, report: bool = True):  # type: ignore[no-untyped-def]
    args = ["evaluate", str(pred), str(lab), "-o", str(out), "--workers", "0", "--no-hd95", "--bins", "10"]
    return runner.invoke(app, [*args, *extra, *([] if report else ["--no-report"])])


def test_no_case_matched_writes_summary_and_report_and_exits_2(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 2)
    for f in lab.iterdir():
        f.rename(lab / f"other_{f.name}")
    r = _evaluate(pred, lab, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "no case matched" in r.output and "Traceback" not in r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_cases"] == 0 and len(summary["unmatched"]["prediction"]) == 2
    assert (tmp_path / "out" / "report.html").exists()


def test_every_case_failed_writes_summary_and_report_and_exits_2(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 2)
    for f in pred.iterdir():
        f.write_bytes(b"not a nifti")
    r = _evaluate(pred, lab, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "cannot read NIfTI" in r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["n_ok"], summary["n_failed"]) == (0, 2)
    assert "case000" in (tmp_path / "out" / "report.html").read_text()


def test_names_with_rich_markup_and_math_text_are_shown_verbatim(tmp_path: Path) -> None:
    root = tmp_path / "a[/b] [v2]"
    pred, lab, data = write_nifti_dataset(root, 2)
    aff = affine_for((1.0, 1.5, 2.5))
    probs, label = data["case000"]
    weird = "x$\\foo$[bold]y"
    nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), aff), pred / f"{weird}.nii.gz")
    nib.save(nib.Nifti1Image(label, aff), lab / f"{weird}.nii.gz")
    (pred / "case001.nii.gz").write_bytes(b"bad")  # a failure message that names the odd folder
    r = _evaluate(pred, lab, tmp_path / "out [x]", "--regions", "A$1$=1;[red]B=1,2")
    assert r.exit_code == 2, r.output  # case001 failed
    text = " ".join(r.output.split())
    assert "[v2]" in text and "a[/b]" in text.replace(" ", "") and weird in r.output  # Rich markup shown as is
    assert "A$1$" in r.output and "[red]B" in r.output
    report = (tmp_path / "out [x]" / "report.html").read_text()
    assert f'<td class="text">{weird}</td>' in report  # and the figures with it in their titles were drawn


def test_compare_runs_with_different_bins_is_refused_before_writing(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    assert _evaluate(pred, lab, tmp_path / "a", report=False).exit_code == 0
    r = runner.invoke(app, ["evaluate", str(pred), str(lab), "-o", str(tmp_path / "b"), "--workers", "0",
                            "--no-hd95", "--bins", "7", "--no-report"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "different numbers of bins" in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path: Path) -> None:
    """Writing into an input folder would overwrite or mix the inputs (calibrate --apply-to X -o X) or make a
    rerun read its own outputs as cases (evaluate -o PRED/out)."""
    pred, lab, _ = write_nifti_dataset(tmp_path, 2)
    before = sorted(p.name for p in pred.iterdir())
    for out in (pred, pred / "out"):
        r = _evaluate(pred, lab, out)
        assert r.exit_code == 1, r.output
        assert "input folder" in " ".join(r.output.split()) and "Traceback" not in r.output
        r = runner.invoke(app, ["calibrate", "--val-pred", str(pred), "--val-labels", str(lab),
                                "--apply-to", str(pred), "-o", str(out)])
        assert r.exit_code == 2, r.output  # a bad parameter
        assert "input folder" in " ".join(r.output.split())
    assert sorted(p.name for p in pred.iterdir()) == before  # nothing written into the inputs
