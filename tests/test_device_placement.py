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


@pytest.fixture(autouse=True)
def fixed_data(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The flows' inputs, made once on the CPU (before the default device changes)."""
    monkeypatch.setattr(api, "_data", lambda dev, seed=0: {k: v.clone() for k, v in DATA.items()})
    yield


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
    assert got.keys() == want.keys()
    for key, a in got.items():
        b = want[key]
        if isinstance(a, torch.Tensor):
            assert a.device.type == "cpu", key
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) or torch.allclose(a, b, equal_nan=True), key
        else:
            assert a == b or (a != a and b != b), key


def test_the_trick_catches_a_tensor_made_without_a_device() -> None:
    """The guard itself: the pattern of the bugs it found fails under a ``meta`` default device."""

    def stray(dev: torch.device) -> torch.Tensor:
        total = torch.zeros(4, dtype=torch.float64)  # no device: the default one
        return total + DATA["probs"].to(dev).double().sum((0, 2, 3, 4))

    _run(stray, None)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _run(stray, "meta")
