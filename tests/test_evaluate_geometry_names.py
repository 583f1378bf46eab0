"""``segcal evaluate``: voxel geometry travels with the data (file, ``segcal.json`` sidecar, ``--spacing``) and
class names label the class channels (``--class-names``, sidecar, nnU-Net ``dataset.json``) without changing
any number; 2D cases stored with a singleton third axis match their 2D partner."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from _eval_data import affine_for, make_case
from segcal.cli import app
from segcal.evaluation import EvalConfig, run_evaluation
from segcal.io.nnunet import read_nnunet_class_names
from segcal.io.sidecar import FolderInfo, write_folder_info

runner = CliRunner()
SPACING = (0.75, 1.5, 2.5)
SHAPE = (10, 9, 7)
NAMES = ("background", "CSF", "GM", "WM")
#: cases.csv columns that are not numbers
TEXT_COLUMNS = ("case_id", "class", "status", "error")


def _data(n: int = 2, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f"case{i:03d}": make_case(rng, shape) for i in range(n)}


def _write_nifti(root: Path, data: dict, spacing: tuple[float, ...] = SPACING) -> tuple[Path, Path]:
    pred, lab = root / "pred_nii", root / "lab_nii"
    pred.mkdir(parents=True)
    lab.mkdir(parents=True)
    for cid, (probs, label) in data.items():
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), affine_for(spacing)), pred / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine_for(spacing)), lab / f"{cid}.nii.gz")
    return pred, lab


def _write_numpy(root: Path, data: dict, *, npz_spacing: tuple[float, ...] | None = None) -> tuple[Path, Path]:
    pred, lab = root / "pred_np", root / "lab_np"
    pred.mkdir(parents=True)
    lab.mkdir(parents=True)
    for cid, (probs, label) in data.items():
        extra = {"spacing": np.asarray(npz_spacing)} if npz_spacing is not None else {}
        np.savez(pred / f"{cid}.npz", probabilities=probs, **extra)
        np.save(lab / f"{cid}.npy", label)
    return pred, lab


def _evaluate(pred: Path, lab: Path, out: Path, *extra: str, report: bool = False):  # type: ignore[no-untyped-def]
    args = ["evaluate", str(pred), str(lab), "-o", str(out), "--bins", "10", "--workers", "0", *extra]
    return runner.invoke(app, args if report else [*args, "--no-report"])


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cases.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _numbers(out: Path) -> list[dict[str, float]]:
    """Every numeric cell of cases.csv, row by row (the class names left out)."""
    return [
        {k: float(v) if v else math.nan for k, v in r.items() if k not in TEXT_COLUMNS} | {"case": r["case_id"]}
        for r in _rows(out)
    ]


def _same_numbers(a: list[dict], b: list[dict], skip: tuple[str, ...] = ()) -> None:
    assert len(a) == len(b) and a
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if k in skip:
                continue
            assert (v == rb[k]) or (isinstance(v, float) and math.isnan(v) and math.isnan(rb[k])), (k, v, rb[k])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------------------------- geometry


def test_numpy_without_geometry_warns_and_lists_the_cases(tmp_path: Path) -> None:
    """Regression: .npy/.npz cases got 1 mm voxels silently while HD95 is reported in mm."""
    pred, lab = _write_numpy(tmp_path, _data())
    r = _evaluate(pred, lab, tmp_path / "out", "--region", "bbox", report=True)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "2 cases have no voxel geometry; HD95 and bbox margins assume 1 mm voxels; pass --spacing" in text
    geometry = _summary(tmp_path / "out")["geometry"]
    assert geometry["assumed_1mm"] == ["case000", "case001"]
    assert geometry["mm_metrics"] == ["HD95", "bbox margins"] and geometry["folder_spacing"] is None
    assert geometry["warning"].startswith("2 cases have no voxel geometry")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "2 cases have no voxel geometry" in html and "without geometry scored with 1 mm voxels" in html
    # nothing in mm: no warning, but the cases are still listed
    r = _evaluate(pred, lab, tmp_path / "out2", "--no-hd95")
    assert r.exit_code == 0 and "no voxel geometry" not in r.output
    geometry = _summary(tmp_path / "out2")["geometry"]
    assert geometry["warning"] is None and geometry["assumed_1mm"] == ["case000", "case001"]


@pytest.mark.parametrize("how", ["option", "prediction sidecar", "label sidecar", "both sidecars"])
def test_numpy_spacing_gives_the_numbers_of_nifti_with_that_spacing(tmp_path: Path, how: str) -> None:
    data = _data()
    nii_pred, nii_lab = _write_nifti(tmp_path, data)
    np_pred, np_lab = _write_numpy(tmp_path, data)
    extra: tuple[str, ...] = ()
    if how == "option":
        extra = ("--spacing", ",".join(map(str, SPACING)))
    if how in ("prediction sidecar", "both sidecars"):
        write_folder_info(np_pred, FolderInfo(spacing=SPACING))
    if how in ("label sidecar", "both sidecars"):
        write_folder_info(np_lab, FolderInfo(spacing=SPACING))
    bbox = ("--region", "bbox", "--bbox-margin-mm", "2,3,5")
    assert _evaluate(nii_pred, nii_lab, tmp_path / "nii", *bbox).exit_code == 0
    r = _evaluate(np_pred, np_lab, tmp_path / "np", *bbox, *extra)
    assert r.exit_code == 0, r.output
    assert "no voxel geometry" not in r.output
    ref, got = _numbers(tmp_path / "nii"), _numbers(tmp_path / "np")
    _same_numbers(ref, got)
    assert all(math.isfinite(row["hd95"]) for row in got)
    # the same data without any geometry give other HD95 and bbox numbers
    for folder in (np_pred, np_lab):
        (folder / "segcal.json").unlink(missing_ok=True)
    assert _evaluate(np_pred, np_lab, tmp_path / "np1mm", *bbox).exit_code == 0
    assert [r["hd95"] for r in _numbers(tmp_path / "np1mm")] != [r["hd95"] for r in ref]
    geometry = _summary(tmp_path / "np")["geometry"]
    assert geometry["assumed_1mm"] == [] and geometry["folder_spacing"] == list(SPACING)
    expected_from = "--spacing" if how == "option" else str((np_lab if how == "label sidecar" else np_pred).resolve())
    assert geometry["folder_spacing_from"].startswith(expected_from)


def test_npz_spacing_key_gives_the_numbers_of_nifti_with_that_spacing(tmp_path: Path) -> None:
    data = _data()
    nii_pred, nii_lab = _write_nifti(tmp_path, data)
    np_pred, np_lab = _write_numpy(tmp_path, data, npz_spacing=SPACING)
    assert _evaluate(nii_pred, nii_lab, tmp_path / "nii").exit_code == 0
    r = _evaluate(np_pred, np_lab, tmp_path / "np")
    assert r.exit_code == 0 and "no voxel geometry" not in r.output
    _same_numbers(_numbers(tmp_path / "nii"), _numbers(tmp_path / "np"))
    # --spacing never overrides the file's own geometry: a contradiction fails the case, naming the file
    r = _evaluate(np_pred, np_lab, tmp_path / "np_other", "--spacing", "1,1,1")
    assert r.exit_code == 2
    errors = dict(_rows_failed(tmp_path / "np_other"))
    assert "case000.npz" in errors["case000"] and "contradicts the spacing (1.0, 1.0, 1.0) from --spacing" in errors[
        "case000"
    ]


def _rows_failed(out: Path) -> list[tuple[str, str]]:
    with open(out / "failed.csv", newline="") as fh:
        return [(r["case_id"], r["error"]) for r in csv.DictReader(fh)]


def test_spacing_option_contradicting_a_nifti_file_fails_that_case_naming_the_file(tmp_path: Path) -> None:
    pred, lab = _write_nifti(tmp_path, _data())
    r = _evaluate(pred, lab, tmp_path / "out", "--spacing", "1,1,1")
    assert r.exit_code == 2
    for cid, error in _rows_failed(tmp_path / "out"):
        assert str(lab / f"{cid}.nii.gz") in error
        assert "own voxel spacing (0.75, 1.5, 2.5) contradicts the spacing (1.0, 1.0, 1.0) from --spacing" in error
    # the same spacing as the files is accepted
    r = _evaluate(pred, lab, tmp_path / "out2", "--spacing", "0.75,1.5,2.5")
    assert r.exit_code == 0, r.output


def test_conflicting_spacings_are_an_error(tmp_path: Path) -> None:
    pred, lab = _write_numpy(tmp_path, _data())
    write_folder_info(pred, FolderInfo(spacing=(1.0, 1.0, 2.5)))
    write_folder_info(lab, FolderInfo(spacing=(1.0, 1.0, 3.0)))
    r = _evaluate(pred, lab, tmp_path / "out")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "the sidecars state different voxel spacings" in text
    assert "(1, 1, 2.5)" in text and "(1, 1, 3)" in text
    write_folder_info(lab, FolderInfo())
    r = _evaluate(pred, lab, tmp_path / "out", "--spacing", "1,1,3")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "--spacing (1, 1, 3) contradicts the voxel spacing (1, 1, 2.5)" in text
    assert not (tmp_path / "out" / "cases.csv").exists()
    # a spacing with the wrong number of axes fails the cases, naming it
    r = _evaluate(pred, lab, tmp_path / "out2", "--spacing", "1,1")
    assert r.exit_code == 1  # contradicts the sidecar
    write_folder_info(pred, FolderInfo())
    r = _evaluate(pred, lab, tmp_path / "out3", "--spacing", "1,1")
    assert r.exit_code == 2
    assert all("has 2 axes but the case has 3 spatial axes" in e for _, e in _rows_failed(tmp_path / "out3"))


def test_spacing_is_part_of_the_configuration_and_a_sidecar_spacing_of_the_inputs(tmp_path: Path) -> None:
    pred, lab = _write_numpy(tmp_path, _data())
    out = tmp_path / "out"
    assert _evaluate(pred, lab, out, "--spacing", "1,1,1").exit_code == 0
    hd_1mm = [r["hd95"] for r in _numbers(out)]
    r = _evaluate(pred, lab, out, "--spacing", "2,2,2")
    assert r.exit_code == 1 and "different configuration" in r.output
    r = _evaluate(pred, lab, out, "--spacing", "2,2,2", "--overwrite")
    assert r.exit_code == 0 and "2 computed" in r.output
    assert [r["hd95"] for r in _numbers(out)] != hd_1mm
    # a sidecar's spacing is input data: a changed one recomputes the cases on resume
    out = tmp_path / "out_sidecar"
    write_folder_info(pred, FolderInfo(spacing=(1.0, 1.0, 1.0)))
    assert _evaluate(pred, lab, out).exit_code == 0
    assert _evaluate(pred, lab, out).output.count("2 resumed") == 1
    write_folder_info(pred, FolderInfo(spacing=(2.0, 2.0, 2.0)))
    r = _evaluate(pred, lab, out)
    assert r.exit_code == 0 and "0 resumed, 2 computed, 2 recomputed (inputs changed)" in " ".join(r.output.split())
    assert [r["hd95"] for r in _numbers(out)] == [2 * h for h in hd_1mm]
    # renaming in the sidecar recomputes nothing
    write_folder_info(pred, FolderInfo(spacing=(2.0, 2.0, 2.0), class_names=NAMES))
    r = _evaluate(pred, lab, out)
    assert "2 resumed, 0 computed" in r.output
    assert {row["class"] for row in _rows(out)} == {"CSF", "GM", "WM"}


def test_case_result_records_the_spacing_used(tmp_path: Path) -> None:
    data = _data()
    nii_pred, nii_lab = _write_nifti(tmp_path, data)
    np_pred, np_lab = _write_numpy(tmp_path, data)
    cfg = EvalConfig(fmt="npy", num_bins=10)
    res = run_evaluation(np_pred, np_lab, tmp_path / "a", cfg, workers=0, progress=False)
    res_nii = run_evaluation(nii_pred, nii_lab, tmp_path / "b", EvalConfig(num_bins=10), workers=0, progress=False)
    cfg_sp = EvalConfig(fmt="npy", num_bins=10, spacing=SPACING)
    res_sp = run_evaluation(np_pred, np_lab, tmp_path / "c", cfg_sp, workers=0, progress=False)
    for r, spacing, assumed in ((res, [1.0, 1.0, 1.0], True), (res_nii, list(SPACING), False),
                                (res_sp, list(SPACING), False)):
        con = sqlite3.connect(r.out_dir / "results.sqlite")
        for (metrics,) in con.execute("SELECT metrics FROM cases"):
            m = json.loads(metrics)
            assert m["spacing"] == pytest.approx(spacing) and m["spacing_assumed"] is assumed
            assert m["num_classes"] == 4
        con.close()


# ----------------------------------------------------------------------------------------------- 2D cases


def test_2d_nifti_prediction_with_a_singleton_axis_matches_a_2d_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    cases = {f"s{i}": make_case(rng, (12, 11)) for i in range(2)}
    sp2 = (0.75, 1.25)
    aff = affine_for((*sp2, 1.0))
    layouts = {name: (tmp_path / name / "pred", tmp_path / name / "lab") for name in ("xy1c", "xy_label1", "ref")}
    for pred, lab in layouts.values():
        pred.mkdir(parents=True)
        lab.mkdir(parents=True)
    for cid, (probs, label) in cases.items():
        # (X, Y, 1, C) prediction (how `segcal predict --format nifti` writes a 2D slice) vs an (X, Y) label
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1)[:, :, None, :], aff), layouts["xy1c"][0] / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(label, aff), layouts["xy1c"][1] / f"{cid}.nii.gz")
        # (C, X, Y) prediction vs an (X, Y, 1) label
        np.save(layouts["xy_label1"][0] / f"{cid}.npy", probs)
        nib.save(nib.Nifti1Image(label[:, :, None], aff), layouts["xy_label1"][1] / f"{cid}.nii.gz")
        # the reference: plain 2D arrays with the spacing given
        np.save(layouts["ref"][0] / f"{cid}.npy", probs)
        np.save(layouts["ref"][1] / f"{cid}.npy", label)
    r = _evaluate(*layouts["ref"], tmp_path / "ref_out", "--spacing", "0.75,1.25")
    assert r.exit_code == 0, r.output
    for name in ("xy1c", "xy_label1"):
        r = _evaluate(*layouts[name], tmp_path / f"{name}_out")
        assert r.exit_code == 0, r.output
        _same_numbers(_numbers(tmp_path / "ref_out"), _numbers(tmp_path / f"{name}_out"))
        geometry = _summary(tmp_path / f"{name}_out")["geometry"]
        assert geometry["assumed_1mm"] == []


# ------------------------------------------------------------------------------------------------ names


def test_class_names_rename_without_changing_any_number(tmp_path: Path) -> None:
    """Regression: naming the classes needed --regions, which scores other (region) channels."""
    pred, lab = _write_nifti(tmp_path, _data(3))
    assert _evaluate(pred, lab, tmp_path / "plain").exit_code == 0
    r = _evaluate(pred, lab, tmp_path / "named", "--class-names", ",".join(NAMES))
    assert r.exit_code == 0, r.output
    assert "class names from --class-names" in r.output
    _same_numbers(_numbers(tmp_path / "plain"), _numbers(tmp_path / "named"))
    assert [row["class"] for row in _rows(tmp_path / "named")][:3] == ["CSF", "GM", "WM"]
    summary = _summary(tmp_path / "named")
    assert summary["class_names"] == ["CSF", "GM", "WM"] and summary["class_names_from"] == "--class-names"
    assert set(summary["macro"]["ace"]) == {"CSF", "GM", "WM", "mean"}
    plain = _summary(tmp_path / "plain")
    for metric, per_class in plain["macro"].items():
        renamed = {{"class_1": "CSF", "class_2": "GM", "class_3": "WM"}.get(k, k): v for k, v in per_class.items()}
        assert renamed == summary["macro"][metric]
    assert np.load(tmp_path / "named" / "bins.npz")["class_names"].tolist() == ["CSF", "GM", "WM"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "named" / "bins.npz")["bin_stats"], np.load(tmp_path / "plain" / "bins.npz")["bin_stats"]
    )
    # with the background scored, the first name labels it
    r = _evaluate(pred, lab, tmp_path / "bg", "--class-names", ",".join(NAMES), "--include-background")
    assert r.exit_code == 0 and _summary(tmp_path / "bg")["class_names"] == list(NAMES)
    # regions are another metric definition (thresholded summed channels): other numbers
    r = _evaluate(pred, lab, tmp_path / "regions", "--regions", "CSF=1;GM=2;WM=3")
    assert r.exit_code == 0
    assert _summary(tmp_path / "regions")["pooled"]["nll"] != summary["pooled"]["nll"]


def test_resumed_run_with_other_names_leaves_no_stale_name(tmp_path: Path) -> None:
    pred, lab = _write_nifti(tmp_path, _data())
    out = tmp_path / "out"
    r = _evaluate(pred, lab, out, "--class-names", "bg,alpha,beta,gamma", report=True)
    assert r.exit_code == 0, r.output
    first = _numbers(out)
    r = _evaluate(pred, lab, out, "--class-names", "bg,one,two,three", report=True)
    assert r.exit_code == 0 and "2 resumed, 0 computed" in r.output
    _same_numbers(first, _numbers(out))
    files = [out / "cases.csv", out / "summary.json", out / "report.html"]
    texts = [f.read_text() for f in files] + [" ".join(np.load(out / "bins.npz")["class_names"].tolist())]
    for text in texts:
        assert "alpha" not in text and "gamma" not in text
        assert "three" in text
    # and back to no names: the generic ones again
    r = _evaluate(pred, lab, out)
    assert r.exit_code == 0 and {row["class"] for row in _rows(out)} == {"class_1", "class_2", "class_3"}
    assert _summary(out)["class_names_from"] is None


def test_class_names_from_the_sidecar(tmp_path: Path) -> None:
    pred, lab = _write_numpy(tmp_path, _data())
    write_folder_info(lab, FolderInfo(class_names=NAMES))
    r = _evaluate(pred, lab, tmp_path / "out", "--no-hd95")
    assert r.exit_code == 0, r.output
    summary = _summary(tmp_path / "out")
    assert summary["class_names"] == ["CSF", "GM", "WM"]
    assert summary["class_names_from"] == str((lab / "segcal.json").resolve())
    # the option wins over the sidecar
    r = _evaluate(pred, lab, tmp_path / "out2", "--no-hd95", "--class-names", "b,x,y,z")
    assert _summary(tmp_path / "out2")["class_names"] == ["x", "y", "z"]
    # two sidecars that disagree: an error naming both
    write_folder_info(pred, FolderInfo(class_names=("background", "a", "b", "c")))
    r = _evaluate(pred, lab, tmp_path / "out3", "--no-hd95")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "the sidecars name the classes differently" in text
    assert "segcal.json" in text


def _nnunet(tmp_path: Path, labels: dict, where: str = "pred") -> tuple[Path, Path]:
    pred, lab = tmp_path / "nnunet_pred", tmp_path / "labelsTr"
    pred.mkdir()
    lab.mkdir()
    (pred / "plans.json").write_text("{}")
    for cid, (probs, label) in _data().items():
        np.savez_compressed(pred / f"{cid}.npz", probabilities=probs.transpose(0, 3, 2, 1))
        nib.save(nib.Nifti1Image(label, affine_for(SPACING)), lab / f"{cid}.nii.gz")
    folder = pred if where == "pred" else lab
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "numTraining": 2}))
    return pred, lab


@pytest.mark.parametrize("where", ["pred", "label"])
def test_class_names_from_an_nnunet_dataset_json(tmp_path: Path, where: str) -> None:
    pred, lab = _nnunet(tmp_path, {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "ignore": 4}, where)
    r = _evaluate(pred, lab, tmp_path / "out", "--no-hd95")
    assert r.exit_code == 0, r.output
    summary = _summary(tmp_path / "out")
    assert summary["class_names"] == ["CSF", "GM", "WM"]
    assert summary["class_names_from"].endswith("dataset.json")


def test_nnunet_dataset_json_labels() -> None:
    import tempfile

    from segcal.io import CaseError

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dataset.json"
        path.write_text(json.dumps({"labels": {"WM": 3, "background": 0, "GM": [2], "CSF": 1}}))
        assert read_nnunet_class_names(path) == NAMES
        path.write_text(json.dumps({"labels": {"background": 0, "GM": 2}}))
        with pytest.raises(CaseError, match=r"must give the values 0..1 once each"):
            read_nnunet_class_names(path)
        path.write_text(json.dumps({"labels": {"background": 0, "whole tumor": [1, 2, 3], "core": [2, 3], "ET": 3}}))
        with pytest.raises(CaseError, match=r'region-based.*--regions "whole tumor=1,2,3;core=2,3;ET=3"'):
            read_nnunet_class_names(path)
        path.write_text("{not json")
        with pytest.raises(CaseError, match=r"cannot read nnU-Net dataset\.json"):
            read_nnunet_class_names(path)


def test_region_based_dataset_json_is_refused_clearly(tmp_path: Path) -> None:
    pred, lab = _nnunet(tmp_path, {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3})
    r = _evaluate(pred, lab, tmp_path / "out", "--no-hd95")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "dataset.json" in text and "region-based" in text
    # named explicitly, or scored as regions, the run does not need the dataset.json names
    assert _evaluate(pred, lab, tmp_path / "o2", "--no-hd95", "--class-names", "a,b,c,d").exit_code == 0
    assert _evaluate(pred, lab, tmp_path / "o3", "--no-hd95", "--regions", "whole=1,2,3;core=2,3").exit_code == 0


@pytest.mark.parametrize("source", ["option", "sidecar", "dataset.json"])
def test_a_wrong_number_of_class_names_is_an_error_naming_the_source(tmp_path: Path, source: str) -> None:
    pred, lab = _nnunet(tmp_path, {"background": 0, "GM": 1, "WM": 2})
    (pred / "dataset.json").unlink() if source != "dataset.json" else None
    extra: tuple[str, ...] = ()
    if source == "option":
        extra = ("--class-names", "background,GM,WM")
        expected = "from --class-names"
    elif source == "sidecar":
        write_folder_info(pred, FolderInfo(class_names=("background", "GM", "WM")))
        expected = f"from {(pred / 'segcal.json').resolve()}"
    else:
        expected = f"from {(pred / 'dataset.json').resolve()}"
    r = _evaluate(pred, lab, tmp_path / "out", "--no-hd95", *extra)
    text = " ".join(r.output.split())
    assert r.exit_code == 1, r.output
    assert f"3 class names {expected}" in text and "but the predictions have 4 classes" in text


def test_class_names_are_checked(tmp_path: Path) -> None:
    pred, lab = _write_nifti(tmp_path, _data(1))
    for names, message in (("a,b,a,c", "must be unique"), ("bg,mean,b,c", "may not be"), ("a,,b", "none empty")):
        r = _evaluate(pred, lab, tmp_path / "out", "--class-names", names)
        assert r.exit_code in (1, 2) and message in " ".join(r.output.split()), (names, r.output)
    r = _evaluate(pred, lab, tmp_path / "out", "--class-names", ",".join(NAMES), "--regions", "A=1;B=2,3")
    assert r.exit_code == 1 and "use one or the other" in " ".join(r.output.split())


def test_class_names_are_shown_literally(tmp_path: Path) -> None:
    pred, lab = _write_nifti(tmp_path, _data(2))
    names = "bg,[bold]x[/bold],$a_1$,<b>&"
    r = _evaluate(pred, lab, tmp_path / "out", "--class-names", names, report=True)
    assert r.exit_code == 0, r.output
    assert "[bold]" in r.output and "$a_1$" in r.output  # escaped: shown, not interpreted
    html = (tmp_path / "out" / "report.html").read_text()
    assert "&lt;b&gt;&amp;" in html and "<b>&" not in html
    assert (tmp_path / "out" / "figures").is_dir()
