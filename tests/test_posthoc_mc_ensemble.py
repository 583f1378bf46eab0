"""MC dropout in a trained MONAI UNet and deep ensembles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posthoc_helpers import phantom
from segcal.functional.calibration import negative_log_likelihood
from segcal.posthoc import (
    MCDropout,
    average_models,
    average_prediction_folders,
    ensemble_probabilities,
    ensemble_size_study,
    insert_dropout,
    insert_dropout_unet,
    mc_predict,
    retrain_after_dropout,
)

torch.set_num_threads(1)


def _unet(dims: int = 2) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2)).eval()


def test_unet_decoder_and_center_positions() -> None:
    net = _unet()
    names = insert_dropout_unet(net, "decoder", p=0.2)
    assert names == ["model.2", "model.1.submodule.2"]
    mods = dict(net.named_modules())
    for n in names:
        assert isinstance(mods[n], torch.nn.Sequential) and isinstance(mods[n][0], MCDropout)
        assert mods[n][0].p == 0.2
    assert sum(isinstance(m, MCDropout) for m in net.modules()) == 2

    net = _unet()
    names = insert_dropout_unet(net, "center")
    assert names == ["model.1.submodule.1.submodule", "model.1.submodule.2"]
    mods = dict(net.named_modules())
    assert isinstance(mods["model.1.submodule.1.submodule.0"], MCDropout)
    assert not any(isinstance(m, MCDropout) for m in mods["model.2"].modules())
    with pytest.raises(ValueError, match="position"):
        insert_dropout_unet(_unet(), "middle")  # type: ignore[arg-type]


def test_insert_dropout_by_name_and_errors() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    insert_dropout(net, ["2"], p=0.3)
    assert isinstance(net[2][0], MCDropout)
    with pytest.raises(ValueError, match="not found"):
        insert_dropout(net, ["nope"])
    with pytest.raises(ValueError, match="dropout probability"):
        MCDropout(1.5)


def test_mc_predict_p0_equals_deterministic_and_sums_to_one() -> None:
    net = _unet()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        det = torch.softmax(net(x), 1)
    insert_dropout_unet(net, "decoder", p=0.0)
    out = mc_predict(net, x, n_samples=5)
    assert torch.allclose(out["mean"], det, atol=1e-6)
    assert out["mutual_information"].abs().max() < 1e-5
    assert out["entropy"].shape == (2, 1, 32, 32)

    net2 = _unet()
    insert_dropout_unet(net2, "decoder", p=0.5)
    out = mc_predict(net2, x, n_samples=20, seed=0)
    assert torch.allclose(out["mean"].sum(1), torch.ones(()), atol=1e-5)
    assert out["mutual_information"].max() > 1e-4  # samples really differ
    assert not net2.training
    # sliding-window passes of a fully-convolutional net with p=0 equal the whole-image pass
    insert_dropout_unet(net3 := _unet(), "center", p=0.0)
    sw = mc_predict(net3, x, n_samples=2, roi_size=(32, 32))
    assert torch.allclose(sw["mean"], det, atol=1e-5)
    multi = mc_predict(net2, x, n_samples=3, mode="multilabel")
    assert multi["entropy"].shape == (2, 3, 32, 32)


def test_retrain_after_dropout_only_moves_later_layers() -> None:
    net = _unet()
    insert_dropout_unet(net, "center", p=0.1)
    x = torch.randn(2, 1, 16, 16)
    y = torch.randint(0, 3, (2, 16, 16))
    first_down = dict(net.named_parameters())["model.0.conv.weight"].detach().clone()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = retrain_after_dropout(
        net, [(x, y)], lambda z, t: torch.nn.functional.cross_entropy(z, t), epochs=3, lr=1e-2
    )
    assert len(losses) == 3
    after = dict(net.named_parameters())
    assert torch.equal(after["model.0.conv.weight"], first_down)  # encoder before the dropout stays frozen
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(
        n.startswith(("model.1.submodule.1.submodule", "model.1.submodule.2", "model.2")) for n in moved
    )
    assert all(p.requires_grad for p in net.parameters())
    seen = []

    def counting_loss(z, t):
        seen.append(1)
        return torch.nn.functional.cross_entropy(z, t)

    gen = ((x, y) for _ in range(2))
    retrain_after_dropout(net, gen, counting_loss, epochs=1)
    assert len(seen) == 2  # the traced first batch is not lost
    with pytest.raises(TypeError, match="re-iterable"):
        retrain_after_dropout(net, ((x, y) for _ in range(2)), counting_loss, epochs=2)


def test_ensemble_identical_members_equal_member_and_complementary_lower_nll() -> None:
    z, y = phantom(n=4, c=3, shape=(32, 32), seed=20)
    p = torch.softmax(z, 1)
    assert torch.allclose(ensemble_probabilities([p, p, p]), p, atol=1e-6)
    # two complementary predictors: each is over-confident (extra noise of opposite sign)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(z.shape, generator=g) * 1.5
    a, b = torch.softmax(z + noise, 1), torch.softmax(z - noise, 1)
    ens = ensemble_probabilities([a, b])
    nll = [float(negative_log_likelihood(q, y).mean()) for q in (a, b, ens)]
    assert nll[2] < min(nll[0], nll[1])
    with pytest.raises(ValueError, match="shape"):
        ensemble_probabilities([p, p[:, :, :8]])


def test_average_models_and_folders(tmp_path) -> None:
    x = torch.randn(1, 1, 16, 16)
    nets = [_unet(), _unet()]
    assert torch.allclose(average_models(nets, x), torch.softmax(nets[0](x), 1).detach(), atol=1e-6)
    z, _ = phantom(n=2, c=3, shape=(8, 8), seed=21)
    probs = torch.softmax(z, 1).numpy()
    for m, scale in enumerate((1.0, 0.5)):
        d = tmp_path / f"m{m}"
        d.mkdir()
        q = torch.softmax(torch.from_numpy(probs) * 0 + z * scale, 1).numpy()
        np.save(d / "case_a.npy", q[0])
        np.savez(d / "case_b.npz", probabilities=q[1])
    out = dict(average_prediction_folders([tmp_path / "m0", tmp_path / "m1"]))
    expected = (torch.softmax(z, 1) + torch.softmax(z * 0.5, 1)).numpy() / 2
    assert sorted(out) == ["case_a", "case_b"]
    assert np.allclose(out["case_a"], expected[0], atol=1e-6)
    assert np.allclose(out["case_b"], expected[1], atol=1e-6)
    (tmp_path / "m1" / "case_b.npz").unlink()
    with pytest.raises(ValueError, match="different cases"):
        list(average_prediction_folders([tmp_path / "m0", tmp_path / "m1"]))


def test_ensemble_size_study() -> None:
    z, y = phantom(n=3, c=3, shape=(24, 24), seed=22)
    g = torch.Generator().manual_seed(1)
    members = [torch.softmax(z + torch.randn(z.shape, generator=g) * 1.5, 1) for _ in range(6)]
    res = ensemble_size_study(members, y, sizes=(1, 2, 6), n_resamples=8, seed=0)
    assert set(res) == {1, 2, 6}
    for m in res:
        mean, lo, hi = res[m]["nll"]
        assert lo <= mean <= hi
    assert res[6]["nll"][0] < res[2]["nll"][0] < res[1]["nll"][0]
    assert res[6]["nll"][1] == res[6]["nll"][2]  # one subset only
    with pytest.raises(ValueError, match="sizes"):
        ensemble_size_study(members, y, sizes=(7,))
