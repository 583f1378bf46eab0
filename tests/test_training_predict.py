"""Prediction: sliding window, NIfTI/npz outputs, MC dropout, ensembles, temperature and calibrators."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _training_utils import synthetic_squares
from segcal.cli import app
from segcal.io import read_folder_info, read_prediction
from segcal.training import (
    build_model,
    config_from_dict,
    enable_mc_dropout,
    load_model,
    predict_files,
    predict_probabilities,
)


def _checkpoint(path, seed=0, dropout=0.0, out_channels=3):
    cfg = config_from_dict(
        {
            "model": {
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 1,
                "dropout": dropout,
                "out_channels": out_channels,
            }
        }
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sliding_window_matches_direct_forward_and_ensemble_average(tmp_path):
    m1 = _checkpoint(tmp_path / "a.pt", seed=0)
    m2 = _checkpoint(tmp_path / "b.pt", seed=1)
    x = torch.from_numpy(synthetic_squares(1, 16, seed=0)[0])
    with torch.no_grad():
        p1, p2 = torch.softmax(m1(x), 1), torch.softmax(m2(x), 1)
    probs, logits = predict_probabilities(m1, x, return_logits=True)
    torch.testing.assert_close(probs, p1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(logits, 1), p1, atol=1e-6, rtol=1e-5)
    # windows of 8x8 with overlap: still a probability map of the right shape
    pw = predict_probabilities(m1, x, roi_size=(8, 8), overlap=0.5)
    assert pw.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pw.sum(1), torch.ones(1, 16, 16))
    ens = predict_probabilities([load_model(tmp_path / "a.pt"), load_model(tmp_path / "b.pt")], x)
    torch.testing.assert_close(ens, (p1 + p2) / 2, atol=1e-6, rtol=1e-5)


def test_temperature_and_calibrator_hook(tmp_path):
    m = _checkpoint(tmp_path / "a.pt")
    x = torch.from_numpy(synthetic_squares(2, 16, seed=3)[0])
    with torch.no_grad():
        logits = m(x)
    torch.testing.assert_close(
        predict_probabilities(m, x, temperature=2.0), torch.softmax(logits / 2, 1), atol=1e-6, rtol=1e-5
    )

    class Half:
        def transform(self, z):
            return torch.softmax(z * 0.5, 1)

    torch.testing.assert_close(
        predict_probabilities(m, x, calibrator=Half()), torch.softmax(logits / 2, 1), atol=1e-6, rtol=1e-5
    )
    with pytest.raises(ValueError, match="temperature"):
        predict_probabilities(m, x, temperature=0.0)
    with pytest.raises(TypeError, match="transform"):
        predict_probabilities(m, x, calibrator=object())


def test_mc_dropout_running_mean_equals_manual_average(tmp_path):
    m = _checkpoint(tmp_path / "d.pt", dropout=0.3)
    x = torch.from_numpy(synthetic_squares(1, 16, seed=5)[0])
    torch.manual_seed(11)
    mc = predict_probabilities(m, x, mc_samples=4)
    assert not m.training and all(not mod.training for mod in m.modules())  # eval mode restored
    torch.manual_seed(11)
    m.eval()
    assert enable_mc_dropout(m) > 0
    with torch.no_grad():
        manual = torch.stack([torch.softmax(m(x), 1) for _ in range(4)]).mean(0)
    m.eval()
    torch.testing.assert_close(mc, manual, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        det = torch.softmax(m(x), 1)
    assert (mc - det).abs().max() > 1e-4  # the passes really were stochastic
    calls = []

    def hook(model, image, infer, to_probs, samples):  # the segcal.posthoc.mc_dropout plug-in point
        calls.append(samples)
        return to_probs(infer(model, image))

    predict_probabilities(m, x, mc_samples=7, mc_fn=hook)
    assert calls == [7]
    plain = _checkpoint(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="dropout layers"):
        predict_probabilities(plain, x, mc_samples=2)


def test_predict_files_nifti_affine_and_npz_shapes(tmp_path):
    m = _checkpoint(tmp_path / "a.pt")
    x, _ = synthetic_squares(2, 16, seed=7)
    inp = tmp_path / "in"
    inp.mkdir()
    affine = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 4], [0, 0, 3, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(x[0, 0, :, :, None], affine), str(inp / "case0_image.nii.gz"))
    np.savez(inp / "case1.npz", image=x[1, 0])
    # NIfTI output
    written = predict_files(
        tmp_path / "a.pt", inp, tmp_path / "out_nii", output_format="nifti", save_logits=True
    )
    assert sorted(p.name for p in written) == ["case0.nii.gz", "case1.nii.gz"]
    img = nib.load(str(tmp_path / "out_nii" / "case0.nii.gz"))
    np.testing.assert_allclose(img.affine, affine)
    data = np.asarray(img.dataobj)
    assert data.shape == (16, 16, 1, 3)
    np.testing.assert_allclose(data.sum(-1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = torch.softmax(m(torch.from_numpy(x[:1])), 1)[0].numpy()
    np.testing.assert_allclose(np.moveaxis(data[:, :, 0], -1, 0), ref, atol=1e-5)
    logits = read_prediction(tmp_path / "out_nii" / "logits" / "case0.nii.gz", "nifti")
    assert logits.kind == "logits" and logits.declared_by is not None
    assert read_prediction(tmp_path / "out_nii" / "case0.nii.gz", "nifti").kind == "probabilities"
    assert read_folder_info(tmp_path / "out_nii").kind == "probabilities"
    assert read_folder_info(tmp_path / "out_nii" / "logits").kind == "logits"
    # npz output through the CLI, float16
    res = CliRunner().invoke(
        app,
        [
            "predict",
            str(inp),
            "-o",
            str(tmp_path / "out_npz"),
            "-c",
            str(tmp_path / "a.pt"),
            "--float16",
            "--save-logits",
            "--temperature",
            "1.5",
        ],
    )
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "out_npz" / "case1.npz", allow_pickle=False) as z:
        p, lg = z["probabilities"], z["logits"]
    assert p.shape == (3, 16, 16) and p.dtype == np.float16 and lg.shape == (3, 16, 16)
    np.testing.assert_allclose(p.astype(np.float32).sum(0), 1.0, atol=3e-3)


def test_predict_bad_inputs(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot load checkpoint"):
        load_model(tmp_path / "junk.pt")
    _checkpoint(tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict_files(tmp_path / "a.pt", tmp_path / "missing.nii.gz", tmp_path / "o")
    np.savez(tmp_path / "bad.npz", img=np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz: archive has no key 'image'"):
        predict_files(tmp_path / "a.pt", tmp_path / "bad.npz", tmp_path / "o")
    res = CliRunner().invoke(
        app, ["predict", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o"), "-c", str(tmp_path / "a.pt")]
    )
    assert res.exit_code == 2 and "has no key 'image'" in " ".join(res.output.split())
