"""Calibrators fitted on targets holding a single class warn that the fit is not meaningful; a diverged fit is
refused and leaves the calibrator unfitted (docs/posthoc.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

from posthoc_helpers import phantom
from segcal.posthoc import (
    AuxiliaryConvCalibrator,
    LastLayerFineTuner,
    NotFittedError,
    TemperatureScaling,
    VectorScaling,
)

torch.set_num_threads(1)

SINGLE = "only one class present in the fitting targets; the fitted {} is not meaningful"
CALIBRATORS = [
    (TemperatureScaling, {}, "temperature"),
    (VectorScaling, {}, "vector scaling"),
    (AuxiliaryConvCalibrator, {"kernel_size": 3, "epochs": 2}, "convolution"),
]


@pytest.mark.parametrize(("cls", "kwargs", "what"), CALIBRATORS)
@pytest.mark.parametrize("label", [0, 2])
def test_single_class_targets_warn(cls: type, kwargs: dict, what: str, label: int) -> None:
    z, y = phantom(n=3, c=3, shape=(20, 20), seed=0)
    with pytest.warns(UserWarning, match=f"^{cls.__name__}: " + SINGLE.format(what)):
        cls(**kwargs).fit(z, torch.full_like(y, label))


@pytest.mark.parametrize(("cls", "kwargs", "what"), CALIBRATORS)
def test_normal_targets_do_not_warn(cls: type, kwargs: dict, what: str) -> None:
    z, y = phantom(n=3, c=3, shape=(20, 20), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(**kwargs).fit(z, y)
        cls(**kwargs).fit([(z[i], y[i]) for i in range(3)])  # streamed volumes


def test_the_masked_voxels_are_what_counts() -> None:
    """Two classes in the targets, but the mask keeps only class-0 voxels: the fitted voxels hold one class."""
    z, y = phantom(n=2, c=3, shape=(20, 20), seed=2)
    with pytest.warns(UserWarning, match=SINGLE.format("temperature")):
        TemperatureScaling().fit([(z[i], y[i], y[i] == 0) for i in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScaling().fit([(z[i], y[i], y[i] <= 1) for i in range(2)])


def test_multilabel_all_positive_or_all_negative_channels_warn() -> None:
    z, y = phantom(n=3, c=2, shape=(20, 20), seed=3, mode="multilabel")
    for constant in (torch.zeros_like(y), torch.ones_like(y)):
        with pytest.warns(UserWarning, match=SINGLE.format("temperature")):
            TemperatureScaling(mode="multilabel").fit(z, constant)
    mixed = torch.zeros_like(y)
    mixed[:, 1] = y[:, 1]  # one channel with both positives and negatives is enough
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScaling(mode="multilabel").fit(z, mixed)
        VectorScaling(mode="multilabel").fit(z, y)


def test_last_layer_finetuner_warns_on_single_class_targets() -> None:
    torch.manual_seed(0)
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    with pytest.warns(UserWarning, match=SINGLE.format("last layer")):
        LastLayerFineTuner(net, epochs=1).fit([(z, torch.zeros_like(y))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LastLayerFineTuner(net, epochs=1).fit([(z, y)])


def test_a_diverged_fit_is_refused_and_leaves_the_calibrator_unfitted(monkeypatch: pytest.MonkeyPatch) -> None:
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=5)
    for bad in (float("inf"), float("nan"), 0.0):
        monkeypatch.setattr(TemperatureScaling, "_store", lambda self, params, t=bad: setattr(self, "temperature_", t))
        ts = TemperatureScaling()
        with pytest.raises(ValueError, match=r"^TemperatureScaling: the fit diverged .*temperature"):
            ts.fit(z, y)
        with pytest.raises(NotFittedError):
            ts.transform(z)

    def nan_scale(self: VectorScaling, params: list[torch.Tensor]) -> None:
        self.scale_ = torch.full_like(params[0], float("nan"))
        self.bias_ = params[1]

    monkeypatch.setattr(VectorScaling, "_store", nan_scale)
    with pytest.raises(ValueError, match=r"^VectorScaling: the fit diverged .*scale"):
        VectorScaling().fit(z, y)
