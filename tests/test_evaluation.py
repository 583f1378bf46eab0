"""Dataset evaluation: known answers vs the core, regions, resume, bad inputs, Dask, statistics."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import segcal.functional as F
from _eval_data import affine_for, write_nifti_dataset, write_nnunet_dataset
from segcal.evaluation import ConfigMismatchError, EvalConfig, ResultStore, run_evaluation
from segcal.evaluation.compare import compare_runs
from segcal.evaluation.statistics import (
    bootstrap_ci,
    cliffs_delta,
    cohens_d_paired,
    holm,
    rank_biserial_paired,
    rank_sum_test,
    summarize,
    wilcoxon_signed_rank,
)
from segcal.functional.regions import dilated_bbox_mask, parse_region_spec

BRATS = (("ET", "TC", "WT"), ((3,), (1, 3), (1, 2, 3)))


def _rows(out):
    with open(out / "cases.csv") as fh:
        return list(csv.DictReader(fh))


def test_dilated_bbox_mask_uses_spacing_in_mm():
    lab = np.zeros((20, 20, 10), np.int64)
    lab[8:10, 9:11, 5] = 2
    m = dilated_bbox_mask(lab, spacing=(2.0, 1.0, 3.0), margin_mm=(4.0, 3.0, 4.0))
    idx = np.argwhere(m)
    # x: 2 voxels (4 mm / 2 mm); y: 3 voxels; z: ceil(4 / 3) = 2 voxels
    assert idx.min(0).tolist() == [6, 6, 3] and idx.max(0).tolist() == [11, 13, 7]
    assert m.sum() == 6 * 8 * 5
    onehot = torch.from_numpy(np.eye(3)[lab]).permute(3, 0, 1, 2)
    mt = dilated_bbox_mask(onehot, (2.0, 1.0, 3.0), (4.0, 3.0, 4.0))
    assert isinstance(mt, torch.Tensor) and bool((mt.numpy() == m).all())
    assert not dilated_bbox_mask(np.zeros((4, 4, 4)), (1, 1, 1)).any()
    edge = np.zeros((5, 5, 5), int)
    edge[0, 0, 0] = 1
    assert dilated_bbox_mask(edge, (1, 1, 1), 8).all()  # clipped to the image


def test_parse_region_spec():
    assert parse_region_spec("ET=3;TC=1,3;WT=1,2,3") == (["ET", "TC", "WT"], [[3], [1, 3], [1, 2, 3]])
    with pytest.raises(ValueError, match="NAME=label"):
        parse_region_spec("ET3")


@pytest.mark.parametrize("region", ["whole", "bbox"])
def test_runner_equals_metric_core(tmp_path, region):
    pred, lab, data = write_nifti_dataset(tmp_path, 3, spacing=(1.0, 1.5, 2.5))
    cfg = EvalConfig(fmt="nifti", num_bins=10, region=region, bbox_margin_mm=(2.0, 3.0, 2.5))
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    assert (res.n_ok, res.n_failed) == (3, 0)
    rows = {(r["case_id"], r["class"]): r for r in _rows(tmp_path / "out")}
    bins = np.load(tmp_path / "out" / "bins.npz", allow_pickle=False)
    assert bins["bin_stats"].shape == (3, 3, 3, 10) and bins["case_ids"].dtype.kind == "U"
    assert bins["class_names"].tolist() == ["class_1", "class_2", "class_3"]
    for i, (cid, (probs, label)) in enumerate(sorted(data.items())):
        p = torch.from_numpy(probs)[None]
        y = torch.from_numpy(label.astype(np.int64))[None]
        mask = None if region == "whole" else dilated_bbox_mask(y[0], (1.0, 1.5, 2.5), (2.0, 3.0, 2.5))[None]
        st = F.bin_statistics(p, y, 10, include_background=False, mask=mask)
        np.testing.assert_allclose(bins["bin_stats"][i], st.numpy()[0])
        ce = F.calibration_errors(st)
        dice = F.overlap_scores(F.confusion_counts(p, y, include_background=False, mask=mask))["dice"]
        hd = F.hausdorff_distance_95(p, y, include_background=False, spacing=(1.0, 1.5, 2.5))
        brier = F.brier_score(p, y, include_background=False, mask=mask)
        nll = F.negative_log_likelihood(p, y, mask=mask)
        top = F.calibration_errors(F.top_label_statistics(p, y, 10, mask=mask))
        for k in range(3):
            r = rows[(cid, f"class_{k + 1}")]
            assert float(r["ace"]) == pytest.approx(float(ce["ace"][0, k]), rel=1e-12)
            assert float(r["ece"]) == pytest.approx(float(ce["ece"][0, k]), rel=1e-12)
            assert float(r["mce"]) == pytest.approx(float(ce["mce"][0, k]), rel=1e-12)
            assert float(r["dice"]) == pytest.approx(float(dice[0, k]), rel=1e-12)
            assert float(r["hd95"]) == pytest.approx(float(hd[0, k]), rel=1e-9)
            assert float(r["brier"]) == pytest.approx(float(brier[0, k]), rel=1e-12)
            assert float(r["nll"]) == pytest.approx(float(nll[0]), rel=1e-12)
            assert float(r["top_label_ece"]) == pytest.approx(float(top["ece"][0, 0]), rel=1e-12)
            assert float(r["top_label_mce"]) == pytest.approx(float(top["mce"][0, 0]), rel=1e-12)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    pooled = F.calibration_errors(F.BinStats.from_numpy(bins["bin_stats"]).pooled())
    assert summary["pooled"]["ace"]["class_2"] == pytest.approx(float(pooled["ace"][0, 1]))
    aces = [float(rows[(c, "class_1")]["ace"]) for c in sorted(data)]
    assert summary["macro"]["ace"]["class_1"]["mean"] == pytest.approx(np.mean(aces))
    assert summary["macro"]["ace"]["class_1"]["median"] == pytest.approx(np.median(aces))


def test_nnunet_regions_soft_reference_and_mask(tmp_path):
    pred, lab, data = write_nnunet_dataset(tmp_path, 2, shape=(9, 7, 5), dtype=np.float16)
    ref_dir, mask_dir = tmp_path / "ref", tmp_path / "masks"
    ref_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(3)
    refs = {}
    for cid, (_, label) in data.items():
        onehot = np.moveaxis(np.eye(4, dtype=np.float32)[label], -1, 0)
        soft = 0.8 * onehot + 0.2 * rng.dirichlet(np.ones(4), size=label.shape).transpose(3, 0, 1, 2)
        refs[cid] = soft.astype(np.float32)
        np.save(ref_dir / f"{cid}.npy", refs[cid])
        m = np.zeros(label.shape, np.uint8)
        m[1:8, 1:6, 1:4] = 1
        nib.save(nib.Nifti1Image(m, affine_for((1.0, 1.5, 2.5))), mask_dir / f"{cid}.nii.gz")
    names, regions = BRATS
    cfg = EvalConfig(
        fmt="nnunet", num_bins=15, region_names=names, regions=regions, region="mask", soft_reference=True
    )
    res = run_evaluation(
        pred, lab, tmp_path / "out", cfg, reference_dir=ref_dir, mask_dir=mask_dir, workers=0, progress=False
    )
    assert (res.n_ok, res.n_failed) == (2, 0), res.summary["failed"]
    rows = {(r["case_id"], r["class"]): r for r in _rows(tmp_path / "out")}
    for cid, (probs, label) in data.items():
        p = torch.from_numpy(probs.astype(np.float16).astype(np.float32))[None]
        r = torch.from_numpy(refs[cid])[None]
        m = torch.zeros(label.shape, dtype=torch.bool)
        m[1:8, 1:6, 1:4] = True
        st = F.bin_statistics(p, r, 15, regions=[list(x) for x in regions], mask=m[None])
        ce = F.calibration_errors(st)
        mae = F.mean_absolute_error(
            F.region_probabilities(p, regions),
            F.region_targets(r, regions, 4),
            mode="multilabel",
            mask=m[None],
        )
        y = torch.from_numpy(label.astype(np.int64))[None]
        dice = F.overlap_scores(F.confusion_counts(p, y, regions=regions, mask=m[None]))["dice"]
        for k, name in enumerate(names):
            row = rows[(cid, name)]
            assert float(row["ace"]) == pytest.approx(float(ce["ace"][0, k]), rel=1e-6)
            assert float(row["mae"]) == pytest.approx(float(mae[0, k]), rel=1e-6)  # float32 einsum order
            assert float(row["dice"]) == pytest.approx(float(dice[0, k]), rel=1e-12)


def _bad_dataset(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 10, shape=(8, 7, 6))
    aff = affine_for((1.0, 1.5, 2.5))
    probs, label = data["case001"]
    (pred / "case001.nii.gz").write_bytes((pred / "case001.nii.gz").read_bytes()[:200])  # truncated
    nib.save(
        nib.Nifti1Image(np.zeros((8, 7, 5, 4), np.float32) + 0.25, aff), pred / "case002.nii.gz"
    )  # shape
    bad = np.moveaxis(probs, 0, -1).copy()
    bad[0, 0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, aff), pred / "case003.nii.gz")  # NaN
    nib.save(
        nib.Nifti1Image(np.where(label > 0, 7, 0).astype(np.int16), aff), lab / "case004.nii.gz"
    )  # range
    nib.save(nib.Nifti1Image(label, affine_for((2.0, 1.5, 2.5))), lab / "case005.nii.gz")  # spacing
    nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1) * 2, aff), pred / "case006.nii.gz")  # outside [0, 1]
    nib.save(
        nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.int16), aff), pred / "case007.nii.gz"
    )  # dtype
    (pred / "case008.nii.gz").write_bytes(b"not a nifti")  # corrupt
    nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1) * 0.9, aff), pred / "case009.nii.gz")  # sums to 0.9
    return pred, lab


def test_bad_inputs_are_recorded_and_the_run_continues(tmp_path):
    pred, lab = _bad_dataset(tmp_path)
    res = run_evaluation(
        pred, lab, tmp_path / "out", EvalConfig(fmt="nifti", hd95=False), workers=0, progress=False
    )
    assert (res.n_ok, res.n_failed) == (1, 9)
    errors = {f["case_id"]: f["error"] for f in res.summary["failed"]}
    expect = {
        "case001": "cannot read NIfTI",
        "case002": "shape mismatch",
        "case003": "NaN/Inf",
        "case004": "labels must lie in [0, 3]",
        "case005": "spacing/affine mismatch",
        "case006": "probabilities in [0, 1]",
        "case007": "floating-point",
        "case008": "cannot read NIfTI",
        "case009": "sum to 1",
    }
    for cid, text in expect.items():
        assert text in errors[cid], errors[cid]
        assert f"{cid}.nii.gz" in errors[cid]
    with open(tmp_path / "out" / "failed.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 9
    # rerun: nothing recomputed, nothing duplicated
    res2 = run_evaluation(
        pred, lab, tmp_path / "out", EvalConfig(fmt="nifti", hd95=False), workers=0, progress=False
    )
    assert res2.n_computed == 0 and res2.n_skipped == 10
    with ResultStore(tmp_path / "out", res2.summary["config"]) as store:
        assert set(store.compute_counts().values()) == {1}


def test_config_change_is_refused_unless_overwrite(tmp_path):
    pred, lab, _ = write_nifti_dataset(tmp_path, 2, shape=(6, 5, 4))
    run_evaluation(
        pred, lab, tmp_path / "out", EvalConfig(fmt="nifti", hd95=False), workers=0, progress=False
    )
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        run_evaluation(
            pred,
            lab,
            tmp_path / "out",
            EvalConfig(fmt="nifti", num_bins=5, hd95=False),
            workers=0,
            progress=False,
        )
    res = run_evaluation(
        pred,
        lab,
        tmp_path / "out",
        EvalConfig(fmt="nifti", num_bins=5, hd95=False),
        workers=0,
        progress=False,
        overwrite=True,
    )
    assert res.n_computed == 2
    assert np.load(tmp_path / "out" / "bins.npz")["bin_stats"].shape[-1] == 5


def test_dask_local_cluster_matches_in_process(tmp_path):
    distributed = pytest.importorskip("distributed")
    pred, lab, _ = write_nifti_dataset(tmp_path, 4, shape=(6, 5, 4))
    cfg = EvalConfig(fmt="nifti", hd95=False)
    run_evaluation(pred, lab, tmp_path / "a", cfg, workers=0, progress=False)
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        res = run_evaluation(
            pred, lab, tmp_path / "b", cfg, dask_address=cluster.scheduler_address, progress=False
        )
    assert res.n_ok == 4
    assert (tmp_path / "a" / "cases.csv").read_text() == (tmp_path / "b" / "cases.csv").read_text()
    np.testing.assert_array_equal(
        np.load(tmp_path / "a" / "bins.npz")["bin_stats"], np.load(tmp_path / "b" / "bins.npz")["bin_stats"]
    )


def test_local_process_pool_matches_in_process(tmp_path):
    pred, lab, _ = write_nifti_dataset(tmp_path, 4, shape=(6, 5, 4))
    cfg = EvalConfig(fmt="nifti", hd95=False)
    run_evaluation(pred, lab, tmp_path / "a", cfg, workers=0, progress=False)
    res = run_evaluation(pred, lab, tmp_path / "b", cfg, workers=2, progress=False)
    assert res.n_ok == 4
    assert (tmp_path / "a" / "cases.csv").read_text() == (tmp_path / "b" / "cases.csv").read_text()


def test_compare_runs(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 8, shape=(6, 5, 4))
    cfg = EvalConfig(fmt="nifti", hd95=False)
    run_evaluation(pred, lab, tmp_path / "a", cfg, workers=0, progress=False)
    sharp = tmp_path / "sharp"
    sharp.mkdir()
    for cid, (probs, _) in data.items():
        q = probs**3
        q /= q.sum(0, keepdims=True)
        nib.save(nib.Nifti1Image(np.moveaxis(q, 0, -1), affine_for((1.0, 1.5, 2.5))), sharp / f"{cid}.nii.gz")
    run_evaluation(sharp, lab, tmp_path / "b", cfg, workers=0, progress=False)
    comp = compare_runs([tmp_path / "a", tmp_path / "b"])
    rows = {(r["metric"], r["class"]): r for r in comp["rows"]}
    a = [float(r["ace"]) for r in _rows(tmp_path / "a") if r["class"] == "class_1"]
    b = [float(r["ace"]) for r in _rows(tmp_path / "b") if r["class"] == "class_1"]
    r = rows[("ace", "class_1")]
    assert r["mean_a"] == pytest.approx(np.mean(a)) and r["mean_b"] == pytest.approx(np.mean(b))
    assert r["rel_change"] == pytest.approx((np.mean(b) - np.mean(a)) / np.mean(a))
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon_signed_rank(a, b))
    assert r["p_holm"] >= r["p_wilcoxon"]
    assert ("nll", "case") in rows and ("ace", "mean") in rows
    (tmp_path / "b" / "cases.csv").write_text(
        "\n".join(ln for ln in (tmp_path / "b" / "cases.csv").read_text().splitlines() if "case003" not in ln)
    )
    with pytest.raises(ValueError, match="different case sets"):
        compare_runs([tmp_path / "a", tmp_path / "b"])
    assert compare_runs([tmp_path / "a", tmp_path / "b"], intersection=True)["pairs"][0]["n_cases"] == 7


# ------------------------------------------------------------------------------------------- statistics


def test_holm_against_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> max-accumulate 0.06
    np.testing.assert_allclose(holm(p)[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])


def test_effect_sizes_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.0, 2.5, 1.0, 1.0])
    # d = a - b = [1, -0.5, 2, 3]; ranks of |d| = [2, 1, 3, 4]; R+ = 9, R- = 1
    assert rank_biserial_paired(a, b) == pytest.approx((9 - 1) / 10)
    d = a - b
    assert cohens_d_paired(a, b) == pytest.approx(d.mean() / d.std(ddof=1))
    # pairs (a_i > b_j) - (a_i < b_j) over 16 pairs
    gt = sum(x > y for x in a for y in b)
    lt = sum(x < y for x in a for y in b)
    assert cliffs_delta(a, b) == pytest.approx((gt - lt) / 16)


def test_tests_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(0.5, size=20)
    assert wilcoxon_signed_rank(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert rank_sum_test(a, b) == pytest.approx(stats.mannwhitneyu(a, b).pvalue)
    a[3] = np.nan  # dropped pairwise
    assert wilcoxon_signed_rank(a, b) == pytest.approx(
        stats.wilcoxon(np.delete(a, 3), np.delete(b, 3)).pvalue
    )


def test_bootstrap_and_summary():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    lo, hi = bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)
    assert bootstrap_ci(x, seed=3) == (lo, hi)  # seeded
    s = summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s["n"] == 4 and s["n_nan"] == 1 and s["median"] == 2.5 and s["iqr"] == pytest.approx(1.5)
