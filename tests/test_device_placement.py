"""Every tensor segcal makes follows its inputs' device, whatever torch's default device.

The bug this guards against: a tensor created without ``device=`` (``torch.zeros(...)``, ``torch.as_tensor(x)``,
a new ``nn.Conv3d``) lands on torch's default device, the CPU, while the inputs sit on a GPU. The calibrators,
conformal risk control and the threshold sweep all failed so on CUDA tensors ("Expected all tensors to be on
the same device"), which a CPU-only test suite cannot see.

This test sees it without a GPU. It sets torch's default device to ``meta`` (tensors without data) and runs the
public flows on CPU inputs. A tensor made without a device then lands on ``meta`` and the flow fails, exactly
where it would fail on a GPU. Made right, it runs and gives the numbers of the normal run.

The same flows run on a real GPU against the CPU in ``benchmarks/check_cuda_api.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import check_cuda_api as api

CPU = torch.device("cpu")
DATA = api._data(CPU)

#: the flows of the GPU check that build only from their inputs (the torchmetrics metric is a module built by
#: the caller, and MC dropout draws from the default generator: both run in the GPU check only)
FLOWS: dict[str, Callable[[torch.device], Any]] = {
    "metric object": api.metric_object,
    "MONAI metrics": api.monai_metrics,
    "conformal risk control": api.conformal,
    "threshold sweep": api.thresholds,
    "uncertainty": api.uncertainty,
    "ensembles": api.ensembles,
    "CalibrateLogits": api.calibrate_logits_transform,
    "targets on the host": api.calibrator_host_targets,
    "local temperature scaling with images": api.local_with_images,
    **{
        name: api.calibrator(name, **kw)
        for name, kw in (
            ("TemperatureScaling", {}),
            ("VectorScaling", {}),
            ("MatrixScaling", {}),
            ("DirichletScaling", {}),
            ("AuxiliaryConvCalibrator", {"epochs": 2}),
            ("LocalTemperatureScaling", {"epochs": 2}),
        )
    },
    "AuxiliaryConvCalibrator (patches)": api.calibrator("AuxiliaryConvCalibrator", epochs=2, patch_size=6),
    "TemperatureScaling (voxel reservoir)": api.calibrator("TemperatureScaling", max_voxels=2000),
}


def _functional_flows() -> dict[str, Callable[[], Any]]:
    import segcal.functional as F
    from segcal.functional import scoring

    p, lab, oh, m = DATA["probs"], DATA["labels"], DATA["onehot"], DATA["mask"]
    regions = [[3], [1, 3]]
    return {
        "dilated_bbox_mask": lambda: F.dilated_bbox_mask(lab[0], (1.0, 1.0, 2.0), 4.0),
        "hausdorff_distance_95": lambda: F.hausdorff_distance_95(p, lab, spacing=(1.0, 1.0, 2.0)),
        "region channels": lambda: (F.region_probabilities(p, regions), F.region_targets(lab, regions, 4, p.shape[2:])),
        "calibration_errors": lambda: F.calibration_errors(F.bin_statistics(p, lab, 15, mask=m)),
        "top_label_statistics": lambda: F.top_label_statistics(p, lab, 15, mask=m),
        "hard_bin_sums": lambda: F.hard_bin_sums(p, oh, 10),
        "soft_bin_sums": lambda: F.soft_bin_sums(p, oh, 10),
        "case_statistics, regions": lambda: scoring.image_metrics(
            scoring.case_statistics(p, lab, 10, regions=regions, fine_bins=50)
        ),
        "case_statistics, multilabel with a reference": lambda: scoring.image_metrics(
            scoring.case_statistics(p, oh, 10, mode="multilabel", reference=p)
        ),
        "pooled_metrics": lambda: scoring.pooled_metrics(scoring.case_statistics(p, lab, 10, fine_bins=40)),
        "fdr_statistics": lambda: F.fdr_statistics(p, lab),
        "conformal_masks": lambda: F.conformal_masks(p, [0.1, 0.2, 0.3, 0.4]),
        "threshold_masks": lambda: F.threshold_masks(p, [0.1, 0.2, 0.3, 0.4]),
    }


@pytest.mark.parametrize("name", sorted(_functional_flows()))
def test_a_functional_entry_point_makes_its_tensors_where_its_inputs_are(name: str) -> None:
    flow = _functional_flows()[name]
    want = _run(lambda dev: flow(), None)
    got = _run(lambda dev: flow(), "meta")
    _assert_same(got, want)


@pytest.fixture(autouse=True)
def fixed_data(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The flows' inputs, made once on the CPU (before the default device changes)."""
    monkeypatch.setattr(api, "_data", lambda dev, seed=0: {k: v.clone() for k, v in DATA.items()})
    yield


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The run under the ``meta`` default device gave the normal run's results, every tensor on the CPU."""
    assert got.keys() == want.keys()
    for key, a in got.items():
        b = want[key]
        if isinstance(a, torch.Tensor):
            assert a.device.type == "cpu", key
            assert torch.allclose(a.double(), b.double(), equal_nan=True), key
        else:
            assert a == b or (a != a and b != b), key


def _run(flow: Callable[[torch.device], Any], default: str | None) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_default_device(default)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return api._flatten(flow(CPU))
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_a_flow_makes_its_tensors_where_its_inputs_are(name: str) -> None:
    flow = FLOWS[name]
    want = _run(flow, None)
    got = _run(flow, "meta")  # a tensor made without a device would land on meta and fail the flow
    _assert_same(got, want)


def test_the_trick_catches_a_tensor_made_without_a_device() -> None:
    """The guard itself: the pattern of the bugs it found fails under a ``meta`` default device."""

    def stray(dev: torch.device) -> torch.Tensor:
        total = torch.zeros(4, dtype=torch.float64)  # no device: the default one
        return total + DATA["probs"].to(dev).double().sum((0, 2, 3, 4))

    _run(stray, None)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _run(stray, "meta")
