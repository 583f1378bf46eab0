"""Matrix scaling and Dirichlet calibration: the oracle on planted class-mixing data, agreement with
scikit-learn's multinomial logistic regression and fiducio (unregularised, L2 and ODIR), streaming, save/load and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posthoc_helpers import phantom
from segcal.posthoc import (
    DirichletScaling,
    MatrixScaling,
    NotFittedError,
    TemperatureScaling,
    VectorScaling,
    load_calibrator,
)

torch.set_num_threads(1)

C = 4
SHAPE = (32, 32)
#: a circulant, non-symmetric class-mixing matrix with equal row sums (so matrix scaling and Dirichlet
#: calibration both contain the true posterior)
MIX = torch.tensor(
    [[1.5, 0.6, 0.0, -0.4], [-0.4, 1.5, 0.6, 0.0], [0.0, -0.4, 1.5, 0.6], [0.6, 0.0, -0.4, 1.5]], dtype=torch.float64
)
BIAS = torch.tensor([0.3, -0.2, 0.1, -0.2], dtype=torch.float64)


def _as_volumes(rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C)`` rows → ``(B, C, *SHAPE)`` logits and ``(B, *SHAPE)`` labels (the same voxel order)."""
    n = rows.shape[0] // math.prod(SHAPE)
    return rows.float().T.reshape(C, n, *SHAPE).movedim(1, 0).contiguous(), y.reshape(n, *SHAPE)


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.movedim(1, -1).reshape(-1, maps.shape[1]).double()


def _nll(p: torch.Tensor, y: torch.Tensor) -> float:
    return float(-torch.log(p.double().gather(1, y.reshape(-1, 1))).mean())


def planted(n_vol: int, seed: int, mix: torch.Tensor = MIX, bias: torch.Tensor = BIAS, space: str = "logits"):
    """True posterior logits ``u`` (one row per voxel), labels ``y ~ Categorical(softmax(u))`` and the observed
    logits ``z``: ``z = mix⁻¹ (u − bias)`` (``space="logits"``, the matrix-scaling model), or ``z`` random with
    ``u = mix · log_softmax(z) + bias`` (``space="logprobs"``, the Dirichlet model)."""
    g = torch.Generator().manual_seed(seed)
    n = n_vol * math.prod(SHAPE)
    if space == "logits":
        u = 2.0 * torch.randn(n, C, generator=g, dtype=torch.float64)
        z = torch.linalg.solve(mix, (u - bias).T).T
    else:
        z = 2.0 * torch.randn(n, C, generator=g, dtype=torch.float64)
        u = torch.log_softmax(z, 1) @ mix.T + bias
    y = torch.multinomial(torch.softmax(u, 1), 1, generator=g).squeeze(1)
    return u, z, y


def _sklearn_probs(features: torch.Tensor, y: torch.Tensor, test: torch.Tensor, c_reg: float = np.inf) -> np.ndarray:
    linear_model = pytest.importorskip("sklearn.linear_model")
    ref = linear_model.LogisticRegression(C=c_reg, tol=1e-10, max_iter=2000)
    ref.fit(features.numpy(), y.numpy())
    return ref.predict_proba(test.numpy())


def test_matrix_and_dirichlet_reach_the_oracle_on_class_mixing() -> None:
    _, z, y = planted(24, seed=1)
    ut, zt, yt = planted(24, seed=2)
    zv, yv = _as_volumes(z, y)
    zt_maps, _ = _as_volumes(zt, yt)
    oracle = _nll(torch.softmax(ut, 1), yt)
    nll = {}
    for cls in (TemperatureScaling, VectorScaling, MatrixScaling, DirichletScaling):
        cal = cls().fit(zv, yv)
        nll[cls.__name__] = _nll(_flat(cal.transform(zt_maps)), yt)
    assert nll["MatrixScaling"] < oracle + 0.002
    assert nll["DirichletScaling"] < oracle + 0.002
    for name in ("MatrixScaling", "DirichletScaling"):  # clearly below temperature and vector scaling
        assert nll[name] < min(nll["TemperatureScaling"], nll["VectorScaling"]) - 0.05
    assert nll["VectorScaling"] > oracle + 0.05  # the mixing is not diagonal: the check has something to see


def test_dirichlet_reaches_the_oracle_in_log_probability_space() -> None:
    """A mixing matrix with unequal row sums acting on log-probabilities: the Dirichlet model, not matrix
    scaling (``W log p = W z − logsumexp(z) · W 1``)."""
    mix = MIX + torch.diag(torch.tensor([0.8, -0.3, 0.0, 0.5], dtype=torch.float64))
    _, z, y = planted(24, seed=3, mix=mix, space="logprobs")
    ut, zt, yt = planted(24, seed=4, mix=mix, space="logprobs")
    zv, yv = _as_volumes(z, y)
    zt_maps, _ = _as_volumes(zt, yt)
    oracle = _nll(torch.softmax(ut, 1), yt)
    dirichlet = DirichletScaling().fit(zv, yv)
    nll_dirichlet = _nll(_flat(dirichlet.transform(zt_maps)), yt)
    assert nll_dirichlet < oracle + 0.002
    shifted = zt_maps + torch.randn(zt_maps.shape[0], 1, *SHAPE)  # a constant per voxel added to every logit
    assert torch.allclose(dirichlet.transform(shifted), dirichlet.transform(zt_maps), atol=1e-5)
    matrix = MatrixScaling().fit(zv, yv)
    assert _nll(_flat(matrix.transform(zt_maps)), yt) > nll_dirichlet + 0.002  # outside the matrix-scaling family
    assert not torch.allclose(matrix.transform(shifted), matrix.transform(zt_maps), atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 25.0], ids=["random", "saturated"])
@pytest.mark.parametrize("cls", [MatrixScaling, DirichletScaling])
def test_unregularised_fit_equals_multinomial_logistic_regression(cls: type, scale: float) -> None:
    """Unregularised matrix scaling is multinomial logistic regression on the logits, Dirichlet calibration on the
    log-probabilities: held-out probabilities agree with scikit-learn's (also on logits scaled by 25, where the
    softmax saturates and the fit must shrink them; there the NLL is flat along some directions, so equal NLL
    allows probabilities to differ by up to 2e-3)."""
    _, z, y = planted(6, seed=5)
    _, zt, yt = planted(2, seed=6)
    z, zt = z * scale, zt * scale
    zv, yv = _as_volumes(z, y)
    zt_maps, _ = _as_volumes(zt, yt)
    ours = _flat(cls().fit(zv, yv).transform(zt_maps)).numpy()
    feats = (lambda t: t) if cls is MatrixScaling else (lambda t: torch.log_softmax(t, 1))
    ref = _sklearn_probs(feats(_flat(zv)), y, feats(_flat(zt_maps)))
    np.testing.assert_allclose(ours, ref, atol=1e-4 if scale == 1.0 else 2e-3)
    assert _nll(torch.from_numpy(ours), yt) == pytest.approx(_nll(torch.from_numpy(ref), yt), abs=1e-5)


def test_l2_regularisation_equals_penalised_logistic_regression() -> None:
    """``regularization="l2"`` with ``μ = 0``: mean NLL + ``λ Σ W² / C²`` is scikit-learn's ``Σ NLL / N +
    ‖W‖² / (2 C_sk N)`` with ``C_sk = C² / (2 λ N)``."""
    _, z, y = planted(6, seed=7)
    _, zt, _ = planted(2, seed=8)
    zv, yv = _as_volumes(z, y)
    zt_maps, _ = _as_volumes(zt, torch.zeros(zt.shape[0], dtype=torch.long))
    lam = 0.5
    cal = MatrixScaling(regularization="l2", reg_lambda=lam).fit(zv, yv)
    ref = _sklearn_probs(_flat(zv), y, _flat(zt_maps), c_reg=C**2 / (2 * lam * z.shape[0]))
    np.testing.assert_allclose(_flat(cal.transform(zt_maps)).numpy(), ref, atol=1e-4)
    unreg = MatrixScaling().fit(zv, yv)
    assert cal.weight_.square().sum() < unreg.weight_.square().sum() - 0.1  # the penalty acted


@pytest.mark.parametrize("cls_name", ["MatrixScaling", "DirichletCalibration"])
def test_odir_agrees_with_fiducio(cls_name: str) -> None:
    fiducio = pytest.importorskip("fiducio.calibrators")
    ours_cls = MatrixScaling if cls_name == "MatrixScaling" else DirichletScaling
    _, z, y = planted(6, seed=9)
    _, zt, yt = planted(2, seed=10)
    zv, yv = _as_volumes(z, y)
    zt_maps, _ = _as_volumes(zt, yt)
    lam, mu = 0.3, 0.2
    ours = ours_cls(regularization="odir", reg_lambda=lam, reg_mu=mu).fit(zv, yv)
    ref = getattr(fiducio, cls_name)(optimizer="lbfgs", max_iter=500, lambda_reg=lam, mu_reg=mu, device="cpu")
    ref.fit(zv, yv)
    p_ref = ref.transform(zt_maps)
    assert torch.allclose(ours.transform(zt_maps), p_ref.float(), atol=5e-4)
    unreg = ours_cls().fit(zv, yv)
    off = ~torch.eye(C, dtype=torch.bool)
    assert ours.weight_[off].abs().sum() < unreg.weight_[off].abs().sum()  # ODIR shrinks the class mixing


def test_streamed_fit_equals_tensor_fit_and_reservoir_is_close() -> None:
    _, z, y = planted(8, seed=11)
    zv, yv = _as_volumes(z, y)
    full = MatrixScaling().fit(zv, yv)
    vols = [(zv[i], yv[i]) for i in range(zv.shape[0])]
    streamed = MatrixScaling(chunk_size=300).fit(vols)  # gradient accumulated over chunks of 300 voxels
    assert torch.allclose(streamed.weight_, full.weight_, atol=1e-5)
    assert torch.allclose(streamed.bias_, full.bias_, atol=1e-5)
    assert streamed.n_voxels_ == full.n_voxels_ == z.shape[0]
    sub = DirichletScaling(max_voxels=3000, seed=1).fit(v for v in vols)  # one-shot generator, fixed reservoir
    assert sub.n_voxels_ == 3000
    again = DirichletScaling(max_voxels=3000, seed=1).fit(vols)
    assert torch.equal(sub.weight_, again.weight_)
    ref = DirichletScaling().fit(zv, yv)
    assert (sub.weight_ - ref.weight_).abs().max() < 0.3


def test_mask_and_phantom_identity() -> None:
    """On calibrated phantoms the fitted map stays close to the identity; masked-out voxels do not count."""
    z, y = phantom(n=4, c=3, shape=(24, 24), seed=12)
    bad = z.clone()
    bad[:, :, 12:] *= 8
    mask = torch.zeros(4, 24, 24, dtype=torch.bool)
    mask[:, :12] = True
    for cls in (MatrixScaling, DirichletScaling):
        masked = cls().fit(bad, y, mask)
        ref = cls().fit(z[:, :, :12].contiguous(), y[:, :12].contiguous())
        assert torch.allclose(masked.weight_, ref.weight_, atol=1e-5)
        p = masked.transform(z)
        assert torch.allclose(p.sum(1), torch.ones(()), atol=1e-5)
        assert (p - torch.softmax(z, 1)).abs().mean() < 0.03


def test_save_load_roundtrip(tmp_path) -> None:
    _, z, y = planted(2, seed=13)
    zv, yv = _as_volumes(z, y)
    for cls in (MatrixScaling, DirichletScaling):
        cal = cls(regularization="l2", reg_lambda=0.1, reg_mu=0.05, max_voxels=2000, seed=4).fit(zv, yv)
        path = tmp_path / f"{cls.method}.pt"
        cal.save(path)
        back = cls.load(path)
        assert type(load_calibrator(path)) is cls
        assert torch.equal(back.weight_, cal.weight_) and torch.equal(back.bias_, cal.bias_)
        assert (back.regularization, back.reg_lambda, back.reg_mu, back.max_voxels) == ("l2", 0.1, 0.05, 2000)
        assert torch.equal(back.transform(zv), cal.transform(zv))
    with pytest.raises(ValueError, match="saved by MatrixScaling"):
        DirichletScaling.load(tmp_path / "matrix.pt")


def test_bad_input() -> None:
    _, z, y = planted(2, seed=14)
    zv, yv = _as_volumes(z, y)
    with pytest.raises(ValueError, match=r"mode='exclusive' \(softmax\) only.*VectorScaling"):
        MatrixScaling(mode="multilabel")
    with pytest.raises(ValueError, match="DirichletScaling supports mode='exclusive'"):
        DirichletScaling(mode="multilabel")
    cal = MatrixScaling()
    cal.mode = "multilabel"  # changed after construction
    with pytest.raises(ValueError, match="exclusive"):
        cal.fit(zv, yv)
    with pytest.raises(ValueError, match="regularization must be one of"):
        MatrixScaling(regularization="l1")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="reg_lambda must be a finite number >= 0"):
            MatrixScaling(reg_lambda=bad)
        with pytest.raises(ValueError, match="reg_mu must be a finite number >= 0"):
            DirichletScaling(reg_mu=bad)
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        MatrixScaling(max_voxels=0).fit(zv, yv)
    with pytest.raises(NotFittedError):
        DirichletScaling().transform(zv)
    nan = zv.clone()
    nan[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        MatrixScaling().fit(nan, yv)
    with pytest.raises(ValueError, match="labels must lie"):
        DirichletScaling().fit(zv, yv + 4)
    fitted = DirichletScaling().fit(zv, yv)
    with pytest.raises(ValueError, match="fitted on 4"):
        fitted.transform(zv[:, :3])
    with pytest.raises(ValueError, match="volume 1: logits have 3 classes"):
        MatrixScaling().fit([(zv[0], yv[0]), (zv[1, :3], yv[1].clamp_max(2))])


@pytest.mark.parametrize("method", ["matrix", "dirichlet"])
def test_calibrate_cli(tmp_path, method: str) -> None:
    import json

    from _helpers import invoke_cli

    _, z, y = planted(4, seed=15)
    zv, yv = _as_volumes(z, y)
    for name, maps in (("val", zv), ("test", zv[:2])):
        (tmp_path / name).mkdir()
        for i in range(maps.shape[0]):
            np.savez(tmp_path / name / f"case{i}.npz", logits=maps[i].numpy())
    (tmp_path / "lab").mkdir()
    for i in range(yv.shape[0]):
        np.save(tmp_path / "lab" / f"case{i}.npy", yv[i].numpy().astype(np.int16))
    common = ["calibrate", "--val-pred", str(tmp_path / "val"), "--val-labels", str(tmp_path / "lab"),
              "--apply-to", str(tmp_path / "test"), "--method", method]
    res = invoke_cli([*common, "-o", str(tmp_path / "out"), "--max-voxels", "0",
                      "--save-calibrator", str(tmp_path / "cal.pt")])
    assert res.exit_code == 0, res.output
    cal = load_calibrator(tmp_path / "cal.pt")
    ref = (MatrixScaling if method == "matrix" else DirichletScaling)().fit(zv, yv)
    assert type(cal) is type(ref) and torch.allclose(cal.weight_, ref.weight_, atol=1e-5)
    with np.load(tmp_path / "out" / "case1.npz") as f:
        np.testing.assert_allclose(f["probabilities"], ref.transform(zv[1:2])[0].numpy(), atol=1e-5)
    record = json.loads((tmp_path / "out" / "segcal.json").read_text())["calibration"]
    assert record["method"] == method and np.allclose(record["weight"], cal.weight_.numpy())
    res = invoke_cli([*common, "-o", str(tmp_path / "out2"), "--mode", "multilabel"])
    assert res.exit_code == 2 and "exclusive" in res.output


@pytest.mark.parametrize("cls", [MatrixScaling, DirichletScaling])
def test_single_class_targets_warn(cls: type) -> None:
    _, z, y = planted(1, seed=16)
    zv, yv = _as_volumes(z, y)
    with pytest.warns(UserWarning, match=f"^{cls.__name__}: only one class present in the fitting targets"):
        cls().fit(zv, torch.full_like(yv, 2))
