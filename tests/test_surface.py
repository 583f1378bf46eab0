"""Surface-distance metrics (HD95, HD, ASSD, NSD): parity with MONAI on random and adversarial masks, an
independent brute-force reference, properties (hypothesis), the probability-level path and the evaluation
outputs (``--surface``, ``--nsd-tolerance-mm``), the metric object and ``segcal compare``."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric
from typer.testing import CliRunner

from _eval_data import write_nifti_dataset
from segcal.cli import app
from segcal.evaluation import EvalConfig, run_evaluation
from segcal.evaluation.compare import compare_runs
from segcal.functional.overlap import _hard_masks, hausdorff_distance_95, surface_scores
from segcal.functional.scoring import case_statistics, image_metrics
from segcal.functional.surface import (
    SURFACE_METRICS,
    class_surface_metrics,
    mask_boundary,
    surface_distances,
    surface_metrics,
)
from segcal.metrics import SegmentationCalibrationMetric

runner = CliRunner()


# ------------------------------------------------------------------------------------------------ references


def _monai(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], tol: list[float]) -> dict[str, np.ndarray]:
    """MONAI's four metrics of ``(B, C, *S)`` boolean masks (every channel kept), float64 arrays."""
    pt, gt = torch.from_numpy(p).float(), torch.from_numpy(g).float()
    sp = list(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "hd95": HausdorffDistanceMetric(include_background=True, percentile=95)(pt, gt, spacing=sp),
            "hd": HausdorffDistanceMetric(include_background=True)(pt, gt, spacing=sp),
            "assd": SurfaceDistanceMetric(include_background=True, symmetric=True)(pt, gt, spacing=sp),
            "nsd": SurfaceDiceMetric(tol, include_background=True)(pt, gt, spacing=sp),
        }
    return {k: v.double().numpy() for k, v in out.items()}


def _assert_matches_monai(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], tol: list[float]) -> None:
    ref = _monai(p, g, spacing, tol)
    got = surface_metrics(torch.from_numpy(p), torch.from_numpy(g), spacing=spacing, nsd_tolerance_mm=tol)
    for name in SURFACE_METRICS:
        r, o = ref[name], got[name].numpy()
        assert np.array_equal(np.isnan(r), np.isnan(o)), (name, r, o)
        assert np.array_equal(np.isposinf(r), np.isposinf(o)), (name, r, o)
        # MONAI returns float32
        np.testing.assert_allclose(o[np.isfinite(r)], r[np.isfinite(r)], rtol=2e-6, atol=1e-6, err_msg=name)


def _brute_force(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances by all pairs of boundary voxels of the whole image (no crop, no distance transform);
    the boundary by explicit face-neighbour tests with a background ring around the image."""

    def boundary(m: np.ndarray) -> np.ndarray:
        pad = np.pad(m, 1)
        inner = np.ones_like(m)
        for ax in range(m.ndim):
            for shift in (-1, 1):
                inner &= np.roll(pad, shift, axis=ax)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return m & ~inner

    ca = np.argwhere(boundary(a)) * np.asarray(spacing)
    cb = np.argwhere(boundary(b)) * np.asarray(spacing)
    d = np.sqrt(((ca[:, None, :] - cb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_random_masks_match_monai_with_anisotropic_spacing(ndim: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 10 * ndim)
    shape = tuple(int(s) for s in rng.integers(4, 16 if ndim == 3 else 30, ndim))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, ndim))
    density = rng.uniform(0.02, 0.6, (2, 3)).reshape(2, 3, *([1] * ndim))
    p = rng.random((2, 3, *shape)) < density
    g = rng.random((2, 3, *shape)) < density[::-1]
    p[0, 2] = False  # one empty, other not
    p[1, 1] = g[1, 1] = False  # both empty
    _assert_matches_monai(p, g, spacing, [0.5, 1.7, 3.0])


def _adversarial(shape: tuple[int, ...]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    n = len(shape)
    z = np.zeros(shape, bool)
    cases = []
    one = z.copy()
    one[(1,) * n] = True
    far = z.copy()
    far[tuple(s - 1 for s in shape)] = True
    cases.append(("single voxels in opposite corners (touching the border)", one, far))
    cases.append(("single voxel vs itself", one, one.copy()))
    full = np.ones(shape, bool)
    cases.append(("whole image vs single voxel", full, one))
    plate_a, plate_b = z.copy(), z.copy()
    plate_a[(slice(None),) * (n - 1) + (2,)] = True  # a one-voxel-thick plate across the image
    plate_b[(slice(None),) * (n - 1) + (shape[-1] - 2,)] = True
    cases.append(("parallel thin plates touching the border", plate_a, plate_b))
    box = z.copy()
    box[tuple(slice(1, s - 1) for s in shape)] = True
    cases.append(("box vs thin plate inside it", box, plate_a))
    border = z.copy()
    border[(0,) + (slice(None),) * (n - 1)] = True
    cases.append(("border face vs whole image", border, full))
    checker = (np.indices(shape).sum(0) % 2).astype(bool)
    cases.append(("checkerboard vs its complement", checker, ~checker))
    cases.append(("empty vs border face", z.copy(), border))
    cases.append(("both empty", z.copy(), z.copy()))
    return cases


@pytest.mark.parametrize("shape", [(9, 7), (7, 6, 5)])
def test_adversarial_masks_match_monai(shape: tuple[int, ...]) -> None:
    spacing = (0.7, 2.5, 1.3)[: len(shape)]
    for name, a, b in _adversarial(shape):
        p = np.stack([a, b])[None]
        g = np.stack([b, a])[None]
        try:
            _assert_matches_monai(p, g, spacing, [1.0, 2.6])
        except AssertionError as exc:  # pragma: no cover - the message names the case
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_distances_equal_whole_image_brute_force(ndim: int) -> None:
    """The crop changes no distance: equal to all pairs of boundary voxels of the whole image."""
    rng = np.random.default_rng(ndim)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.5, ndim))
    for _ in range(6):
        shape = tuple(int(s) for s in rng.integers(5, 14, ndim))
        a = np.zeros(shape, bool)
        b = np.zeros(shape, bool)
        lo = rng.integers(0, 3, ndim)
        a[tuple(slice(int(x), int(x) + 3) for x in lo)] = True
        b |= rng.random(shape) < 0.05
        if not b.any():
            b[(0,) * ndim] = True
        d_ab, d_ba = surface_distances(a, b, spacing)
        e_ab, e_ba = _brute_force(a, b, spacing)
        np.testing.assert_allclose(d_ab, e_ab, rtol=1e-12)
        np.testing.assert_allclose(d_ba, e_ba, rtol=1e-12)


def test_known_distances_and_empty_conventions() -> None:
    """Two single voxels 3 voxels apart along an axis of 2 mm: every distance is 6 mm; NSD is 0 below the
    tolerance and 1 at it. MONAI's empty conventions: one empty → HD95 NaN, HD / ASSD inf, NSD 0; both empty →
    NaN (or the absent values on request)."""
    a = np.zeros((8, 8), bool)
    b = a.copy()
    a[1, 2], b[4, 2] = True, True
    v = class_surface_metrics(a, b, spacing=(2.0, 0.5), nsd_tolerance_mm=5.9)
    assert v == {"hd95": 6.0, "hd": 6.0, "assd": 6.0, "nsd": 0.0}
    assert class_surface_metrics(a, b, spacing=(2.0, 0.5), metrics=["nsd"], nsd_tolerance_mm=6.0) == {"nsd": 1.0}
    one = class_surface_metrics(a, np.zeros_like(a))
    assert math.isnan(one["hd95"]) and one["hd"] == math.inf and one["assd"] == math.inf and one["nsd"] == 0.0
    assert all(math.isnan(x) for x in class_surface_metrics(~np.ones_like(a), ~np.ones_like(a)).values())
    absent = class_surface_metrics(~np.ones_like(a), ~np.ones_like(a), both_empty="absent")
    assert absent == {"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0}


def test_bad_inputs_raise_clear_errors() -> None:
    m = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="unknown surface metric"):
        class_surface_metrics(m, m, metrics=["hd99"])
    with pytest.raises(ValueError, match="tolerance must be finite and >= 0"):
        class_surface_metrics(m, m, nsd_tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="spacing has 3 values"):
        surface_distances(m, m, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be positive"):
        surface_distances(m, m, (1.0, 0.0))
    with pytest.raises(TypeError, match="boolean mask"):
        surface_distances(m.astype(np.float32), m)
    with pytest.raises(ValueError, match="differ in shape"):
        surface_distances(m, np.zeros((4, 5), bool))
    t = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="3 per-class tolerances for 2 scored classes"):
        surface_metrics(t, t, nsd_tolerance_mm=[1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------------ properties

_spacing = st.tuples(*[st.floats(0.25, 4.0)] * 3)


@st.composite
def _mask_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    a = draw(hnp.arrays(np.bool_, shape))
    b = draw(hnp.arrays(np.bool_, shape))
    return a, b, draw(_spacing)[:ndim]


@settings(max_examples=60, deadline=None)
@given(_mask_pair(), st.floats(0.0, 5.0))
def test_properties_symmetry_range_identity(pair, tol) -> None:
    a, b, spacing = pair
    ab = class_surface_metrics(a, b, spacing=spacing, nsd_tolerance_mm=tol)
    ba = class_surface_metrics(b, a, spacing=spacing, nsd_tolerance_mm=tol)
    for m in SURFACE_METRICS:  # HD, ASSD (and HD95, NSD) are symmetric
        assert ab[m] == pytest.approx(ba[m], rel=1e-12, nan_ok=True), m
    if a.any() or b.any():
        assert 0.0 <= ab["nsd"] <= 1.0
        assert ab["hd95"] <= ab["hd"] or math.isnan(ab["hd95"])
        assert ab["assd"] <= ab["hd"]
    if a.any():
        same = class_surface_metrics(a, a.copy(), spacing=spacing, nsd_tolerance_mm=tol)
        assert same == {"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0}


@settings(max_examples=40, deadline=None)
@given(_mask_pair(), st.floats(0.0, 5.0), st.data())
def test_padding_with_background_changes_nothing(pair, tol, data) -> None:
    """Crop invariance: the values depend only on the masks, not on the background around them."""
    a, b, spacing = pair
    pads = [tuple(data.draw(st.integers(0, 3)) for _ in range(2)) for _ in range(a.ndim)]
    before = class_surface_metrics(a, b, spacing=spacing, nsd_tolerance_mm=tol)
    after = class_surface_metrics(np.pad(a, pads), np.pad(b, pads), spacing=spacing, nsd_tolerance_mm=tol)
    for m in SURFACE_METRICS:
        assert after[m] == pytest.approx(before[m], rel=1e-12, nan_ok=True), m


def test_boundary_is_monai_edge_convention() -> None:
    from monai.metrics.utils import get_mask_edges

    rng = np.random.default_rng(3)
    for shape in [(6, 9), (5, 6, 7)]:
        a, b = rng.random(shape) < 0.5, rng.random(shape) < 0.3
        ea, eb = get_mask_edges(a, b, crop=False, always_return_as_numpy=True)
        assert np.array_equal(mask_boundary(a), ea) and np.array_equal(mask_boundary(b), eb)


# ------------------------------------------------------------------------------------ from probabilities


def _probs_with_ties(rng: np.random.Generator, shape: tuple[int, ...], c: int) -> torch.Tensor:
    p = rng.random((2, c, *shape)).astype(np.float32)
    p = np.round(p * 3) / 3 + 1e-3  # many exact ties between channels
    return torch.from_numpy(p / p.sum(1, keepdims=True))


@pytest.mark.parametrize("include_background", [False, True])
def test_per_class_masks_equal_the_one_hot_masks(include_background: bool) -> None:
    """The lean per-class path (uint8 argmax vs label map) equals the surface metrics of the one-hot masks of
    the overlap counts, ties included; and HD95 equals MONAI's on the same masks (both-empty aside)."""
    rng = np.random.default_rng(7)
    probs = _probs_with_ties(rng, (9, 8, 6), 4)
    lab = torch.from_numpy(rng.integers(0, 4, (2, 9, 8, 6)))
    lab[1][lab[1] == 2] = 0  # class 2 absent from the reference of image 1
    sp = (0.8, 1.1, 2.4)
    got = surface_scores(probs, lab, include_background=include_background, spacing=sp, nsd_tolerance_mm=1.5)
    hard, y, _ = _hard_masks(probs, lab, None, "exclusive", None, None, True)
    first = 0 if include_background else 1
    ref = surface_metrics(hard[:, first:], y[:, first:], spacing=sp, nsd_tolerance_mm=1.5, both_empty="absent")
    for m in SURFACE_METRICS:
        torch.testing.assert_close(got[m], ref[m], equal_nan=True, rtol=0, atol=0)
    hd = hausdorff_distance_95(probs, lab, include_background=include_background, spacing=sp)
    torch.testing.assert_close(hd, got["hd95"], equal_nan=True, rtol=0, atol=0)
    mon = _monai(hard[:, first:].numpy(), y[:, first:].numpy(), sp, [1.5] * (4 - first))
    both = ~(hard[:, first:].flatten(2).any(-1) | y[:, first:].flatten(2).any(-1))
    for m in SURFACE_METRICS:
        np.testing.assert_allclose(got[m][~both].numpy(), mon[m][~both.numpy()], rtol=2e-6, atol=1e-6)


def test_regions_and_multilabel_use_the_general_masks() -> None:
    rng = np.random.default_rng(2)
    probs = _probs_with_ties(rng, (8, 7, 5), 4)
    lab = torch.from_numpy(rng.integers(0, 4, (2, 8, 7, 5)))
    regions = [[3], [1, 3], [1, 2, 3]]
    got = surface_scores(probs, lab, regions=regions, spacing=(1.0, 2.0, 0.5))
    hard, y, _ = _hard_masks(probs, lab, None, "exclusive", regions, None, True)
    ref = surface_metrics(hard, y, spacing=(1.0, 2.0, 0.5), both_empty="absent")
    for m in SURFACE_METRICS:
        torch.testing.assert_close(got[m], ref[m], equal_nan=True, rtol=0, atol=0)


def test_case_statistics_and_metric_object() -> None:
    rng = np.random.default_rng(5)
    probs = _probs_with_ties(rng, (10, 9, 6), 3).double()
    lab = torch.from_numpy(rng.integers(0, 3, (2, 10, 9, 6)))
    sp = (1.0, 1.5, 2.0)
    stats = case_statistics(probs, lab, 10, surface=("nsd", "assd", "hd"), nsd_tolerance_mm=[1.0, 2.0], spacing=sp)
    ref = surface_scores(probs, lab, spacing=sp, nsd_tolerance_mm=[1.0, 2.0])
    values = image_metrics(stats)
    assert torch.isnan(values["hd95"]).all()  # not asked for
    for m in ("hd", "assd", "nsd"):
        torch.testing.assert_close(values[m], ref[m])
    metric = SegmentationCalibrationMetric(10, surface=("hd95", "nsd"), nsd_tolerance_mm=2.0)
    metric.update(probs[:1], lab[:1], spacing=sp)
    other = SegmentationCalibrationMetric(10, surface=("hd95", "nsd"), nsd_tolerance_mm=2.0)
    other.update(probs[1:], lab[1:], spacing=sp)
    res = metric.merge(other).compute()
    assert "hd" not in res.per_image and "assd" not in res.per_image and "hd" not in res.pooled
    ref2 = surface_scores(probs, lab, spacing=sp, metrics=("hd95", "nsd"), nsd_tolerance_mm=2.0)
    torch.testing.assert_close(res.per_image["nsd"], ref2["nsd"])
    torch.testing.assert_close(res.per_image["hd95"], ref2["hd95"])
    with pytest.raises(ValueError, match="different settings"):
        metric.merge(SegmentationCalibrationMetric(10, surface=("hd95", "nsd"), nsd_tolerance_mm=1.0))


# ---------------------------------------------------------------------------------------------- evaluation


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_evaluate_surface_options_outputs_and_compare(tmp_path: Path) -> None:
    pred, lab, data = write_nifti_dataset(tmp_path, 3, spacing=(1.0, 1.5, 2.5))
    base = ["evaluate", str(pred), str(lab), "--bins", "10", "--workers", "0", "--no-report"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    plain = _csv(tmp_path / "plain" / "cases.csv")
    assert not {"hd", "assd", "nsd"} & set(plain[0])  # a run without them writes what it always wrote
    assert "surface" not in json.loads((tmp_path / "plain" / "summary.json").read_text())["config"]
    args = [*base, "-o", str(tmp_path / "surf"), "--surface", "hd,assd,nsd", "--nsd-tolerance-mm", "1,2,3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = _csv(tmp_path / "surf" / "cases.csv")
    summary = json.loads((tmp_path / "surf" / "summary.json").read_text())
    assert summary["config"]["surface"] == ["hd", "assd", "nsd"]
    assert summary["config"]["nsd_tolerance_mm"] == [1.0, 2.0, 3.0]
    assert {"hd", "assd", "nsd"} <= set(summary["macro"])
    for cid, (probs, label) in data.items():
        p, y = torch.from_numpy(probs)[None], torch.from_numpy(label.astype(np.int64))[None]
        ref = surface_scores(p, y, spacing=(1.0, 1.5, 2.5), nsd_tolerance_mm=[1.0, 2.0, 3.0])
        for k in range(3):
            row = next(r for r in rows if r["case_id"] == cid and r["class"] == f"class_{k + 1}")
            for m in SURFACE_METRICS:
                assert float(row[m]) == pytest.approx(float(ref[m][0, k]), rel=1e-12), m
    # same rows as the plain run in every other column
    assert [{k: v for k, v in r.items() if k not in ("hd", "assd", "nsd")} for r in rows] == plain
    with np.load(tmp_path / "surf" / "bins.npz") as z:
        assert {"hd", "assd", "nsd"} <= set(z.files)
    with np.load(tmp_path / "plain" / "bins.npz") as z:
        assert not {"hd", "assd", "nsd"} & set(z.files)
    # another tolerance is another configuration
    r = runner.invoke(app, [*args[:-1], "1,2,4"])
    assert r.exit_code == 1 and "different configuration" in r.output
    comp = compare_runs([tmp_path / "surf", tmp_path / "surf"])
    assert {"hd", "assd", "nsd"} <= {row["metric"] for row in comp["rows"]}
    comp = compare_runs([tmp_path / "plain", tmp_path / "surf"])  # only the common metrics
    assert "nsd" not in {row["metric"] for row in comp["rows"]}
    comp = compare_runs([tmp_path / "surf", tmp_path / "surf"], group_by=r"case00([0-9])")  # from bins.npz
    assert "nsd" in {row["metric"] for row in comp["rows"]}
    from segcal.report import build_evaluation_report

    html = build_evaluation_report(tmp_path / "surf").read_text()
    assert '<td class="text">nsd</td>' in html and "<th>assd</th>" in html and "<strong>NSD</strong>" in html


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--surface", "hd,hd99"], "unknown surface metric"),
        (["--surface", "hd", "--nsd-tolerance-mm", "1"], "add nsd to --surface"),
        (["--surface", "nsd", "--nsd-tolerance-mm", "-1"], ">= 0 mm"),
        (["--surface", "nsd", "--nsd-tolerance-mm", "a"], "numbers separated by commas"),
    ],
)
def test_evaluate_bad_surface_options(tmp_path: Path, extra: list[str], message: str) -> None:
    r = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "o"), *extra])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", r.output).split())  # the message, unwrapped from rich's box
    assert r.exit_code == 2 and message in text, r.output


def test_wrong_tolerance_count_fails_the_case_naming_it(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 1)
    cfg = EvalConfig(fmt="nifti", num_bins=5, hd95=False, surface=("nsd",), nsd_tolerance_mm=(1.0, 2.0))
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    assert res.n_failed == 1
    assert "2 per-class tolerances for 3 scored classes" in res.summary["failed"][0]["error"]


def test_default_configuration_hash_is_unchanged() -> None:
    d = EvalConfig().as_dict()
    assert "surface" not in d and "nsd_tolerance_mm" not in d
    assert "nsd_tolerance_mm" not in EvalConfig(surface=("hd",)).as_dict()
    assert EvalConfig(surface=("nsd", "hd")).as_dict()["surface"] == ("hd", "nsd")
    with pytest.raises(ValueError, match="unknown surface metric"):
        EvalConfig(surface=("hausdorff",))


def test_monai_adapter_computes_the_surface_metric_it_is_named_after() -> None:
    from segcal.integrations.monai import SegcalMetric

    rng = np.random.default_rng(11)
    probs = _probs_with_ties(rng, (9, 8, 6), 3)
    lab = torch.from_numpy(rng.integers(0, 3, (2, 9, 8, 6)))
    sp = (0.9, 1.4, 2.0)
    for name in ("hd", "assd", "nsd"):
        metric = SegcalMetric(name, spacing=sp, nsd_tolerance_mm=[1.0, 2.5], metric_reduction="none")
        metric(probs, lab)
        ref = surface_scores(probs, lab, spacing=sp, metrics=(name,), nsd_tolerance_mm=[1.0, 2.5])[name]
        torch.testing.assert_close(metric.get_buffer(), ref)


def test_docs_example_runs() -> None:
    """The example of docs/evaluation.md, "Surface-distance metrics", as written there."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    at = text.index("from segcal.functional.overlap import surface_scores")
    code = text[text.rindex("```python", 0, at) + len("```python") : text.index("```", at)]
    exec(compile(code, "docs/evaluation.md", "exec"), {})


@pytest.mark.parametrize("ndim", [2, 3])
def test_kdtree_path_equals_the_distance_transform(ndim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-d tree taken for large sparse crops gives the distance transform's distances (and MONAI's values)."""
    import segcal.functional.surface as surface

    rng = np.random.default_rng(40 + ndim)
    shape = (23, 19, 11)[:ndim]
    spacing = (0.6, 1.7, 2.9)[:ndim]
    a = np.zeros(shape, bool)
    a[tuple(slice(2, s - 3) for s in shape)] = True
    a |= rng.random(shape) < 0.03  # scattered false positives
    b = np.roll(a & (rng.random(shape) < 0.9), 2, axis=0)
    edt = surface_distances(a, b, spacing)
    monkeypatch.setattr(surface, "KDTREE_MIN_VOXELS", 0)
    monkeypatch.setattr(surface, "KDTREE_SPARSITY", 0)
    kd = surface_distances(a, b, spacing)
    for x, y in zip(edt, kd, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12)
    p = np.stack([a, b, np.zeros_like(a)])[None]
    g = np.stack([b, a, b])[None]
    _assert_matches_monai(p, g, spacing, [1.0, 2.0, 1.0])
