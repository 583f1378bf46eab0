"""The fast paths of the loss bin sums against straightforward reference implementations written here.

``hard_bin_sums`` (numba on CPU float32 / float64, ``bin_index`` + ``scatter_add`` elsewhere) and
``soft_bin_sums`` (numba with a hand-derived gradient on CPU, the torch formula under autograd elsewhere) must
give the values and gradients of the plain formulas: to 1e-10 in float64, on random and adversarial inputs
(values exactly at the rounded edges ``k / M`` and their float neighbours, 0 and 1, rows longer than a kernel
chunk). The torch path is what runs on CUDA; it is checked here on CPU and, where a GPU is present, there.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcal.functional import binning
from segcal.functional.binning import bin_edges, hard_bin_sums, soft_bin_sums
from segcal.functional.losses import hard_calibration_error, soft_calibration_error

# -- reference implementations: one boolean mask per bin, autograd through plain sums ---------------------------


def ref_hard_sums(p: torch.Tensor, y: torch.Tensor, m: int, closed: str = "right") -> tuple[torch.Tensor, ...]:
    """``(count, Σp, Σy)`` ``(B, C, M)`` with one mask per bin: ``(e_k, e_{k+1}]`` (``p <= e_1`` in bin 0,
    ``p > e_{M-1}`` in bin M - 1), or ``[e_k, e_{k+1})`` for ``closed="left"``; ``e_k`` the rounded edges."""
    e = bin_edges(m, p.dtype)
    b, c = p.shape[:2]
    pf, yf = p.reshape(b, c, -1), y.reshape(b, c, -1)
    cols = []
    for k in range(m):
        lo_ok = torch.ones_like(pf, dtype=torch.bool) if k == 0 else (pf > e[k] if closed == "right" else pf >= e[k])
        if k == m - 1:
            hi_ok = torch.ones_like(lo_ok)
        else:
            hi_ok = pf <= e[k + 1] if closed == "right" else pf < e[k + 1]
        w = (lo_ok & hi_ok).to(p.dtype)
        cols.append(torch.stack([w.sum(-1), (w * pf).sum(-1), (w * yf).sum(-1)], -1))
    out = torch.stack(cols, -1)  # (B, C, 3, M)
    return out[:, :, 0], out[:, :, 1], out[:, :, 2]


def ref_soft_sums(p: torch.Tensor, y: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    """Triangular kernel written per bin: ``w_k(p) = max(0, 1 - |clamp(pM - 1/2, 0, M - 1) - k|)``."""
    b, c = p.shape[:2]
    pf, yf = p.reshape(b, c, -1), y.reshape(b, c, -1)
    pos = (pf * m - 0.5).clamp(0.0, m - 1.0)
    cols = []
    for k in range(m):
        w = (1.0 - (pos - k).abs()).clamp_min(0.0)
        cols.append(torch.stack([w.sum(-1), (w * pf).sum(-1), (w * yf).sum(-1)], -1))
    out = torch.stack(cols, -1)
    return out[:, :, 0], out[:, :, 1], out[:, :, 2]


def ref_ace(count: torch.Tensor, sp: torch.Tensor, sy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    gaps = [(sp[..., k] - sy[..., k]).abs() / count[..., k].clamp_min(1e-300) for k in range(count.shape[-1])]
    g = torch.stack(gaps, -1)
    return torch.where(valid, g, torch.zeros_like(g)).sum(-1) / valid.sum(-1)


def adversarial_probs(m: int, dtype: torch.dtype, n_random: int = 200, seed: int = 0) -> torch.Tensor:
    """Every rounded edge, its two float neighbours, 0, 1 and random values, shuffled, as ``(1, 1, N)``."""
    e = bin_edges(m, dtype)
    up = torch.nextafter(e, torch.ones_like(e)).clamp(0, 1)
    down = torch.nextafter(e, torch.zeros_like(e)).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor([0.0, 1.0], dtype=dtype)
    vals = torch.cat([e, up, down, ends, torch.rand(n_random, generator=g, dtype=dtype)])
    return vals[torch.randperm(vals.numel(), generator=g)].view(1, 1, -1)


def both_hard_paths(p: torch.Tensor, y: torch.Tensor, m: int, closed: str) -> dict[str, tuple[torch.Tensor, ...]]:
    b, c = p.shape[:2]
    pr, yr = p.reshape(b, c, -1), y.reshape(b, c, -1)
    return {
        "numba": binning._HardBinSums.apply(pr, yr, m, closed, True),
        "torch": binning._HardBinSums.apply(pr, yr, m, closed, False),
        "public": hard_bin_sums(p, y, m, closed),
    }


# -- hard bins -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("class_ids", [None, [1, 2, 3]], ids=["all", "no_background"])
def test_hard_sums_of_a_label_map_equal_those_of_its_one_hot(
    dtype: torch.dtype, closed: str, class_ids: list[int] | None
) -> None:
    """A label map is read without a one-hot: counts, Σp, Σy and the gradient equal the one-hot target's, on
    both paths, with values on the edges and a class absent from one image."""
    g = torch.Generator().manual_seed(11)
    lab = torch.randint(0, 4, (2, 70_000), generator=g)  # longer than a kernel chunk
    lab[1][lab[1] == 2] = 0  # class 2 absent from image 1
    ids = list(range(4)) if class_ids is None else class_ids
    p0 = torch.rand(2, len(ids), 70_000, generator=g, dtype=dtype)
    edges = adversarial_probs(20, dtype, n_random=0).view(-1)  # the edges, their neighbours, 0 and 1
    p0[:, :, : edges.numel()] = edges
    onehot = (lab.unsqueeze(1) == torch.tensor(ids).view(1, -1, 1)).to(dtype)
    weights = torch.linspace(-1, 1, 20, dtype=dtype)
    for use_numba in (True, False):
        results = []
        for target in (onehot, lab):
            p = p0.clone().requires_grad_(True)
            extra = () if target is onehot else (torch.tensor(ids),)
            out = binning._HardBinSums.apply(p, target, 20, closed, use_numba, *extra)
            (out[1] * weights).sum().backward()
            results.append((out, p.grad))
        (a, ga), (b, gb) = results
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), use_numba
        assert torch.equal(ga, gb), use_numba
        assert bool((a[2][1, ids.index(2)] == 0).all()) if 2 in ids else True  # the absent class: no hits
    public = hard_bin_sums(p0, lab.view(2, 1, -1), 20, closed, class_ids)
    for x, y in zip(public, binning._HardBinSums.apply(p0, onehot, 20, closed, True), strict=True):
        assert torch.equal(x, y)


def test_hard_sums_label_map_arguments_are_checked() -> None:
    p = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    lab = torch.randint(0, 3, (2, 8, 8))
    with pytest.raises(ValueError, match=r"class_ids must name one class per channel \(3\), got 2"):
        hard_bin_sums(p, lab, class_ids=[1, 2])
    with pytest.raises(ValueError, match="class_ids applies to a label map"):
        hard_bin_sums(p, torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float(), class_ids=[0, 1, 2])
    dense = hard_bin_sums(p, torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float())
    for a, b in zip(hard_bin_sums(p, lab.to(torch.uint8)), dense, strict=True):  # any integer dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("m", [1, 3, 10, 20, 257])
def test_hard_sums_equal_reference_at_edges(dtype: torch.dtype, closed: str, m: int) -> None:
    p = adversarial_probs(m, dtype, seed=m)
    y = (torch.rand(p.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) < 0.5).to(dtype)
    rc, rp, ry = ref_hard_sums(p, y, m, closed)
    for name, (c, sp, sy) in both_hard_paths(p, y, m, closed).items():
        assert torch.equal(c, rc), name  # counts are exact: every value in the reference's bin
        assert torch.equal(sy, ry), name  # sums of 0/1 are exact
        torch.testing.assert_close(sp, rp, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0, msg=name)


def test_hard_sums_values_and_gradients_match_reference_float64() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 9, 7, 5, generator=g, dtype=torch.float64)
    y = torch.rand(2, 4, 9, 7, 5, generator=g, dtype=torch.float64)  # soft targets: gradient to y as well
    w = torch.randn(3, 2, 4, 20, generator=g, dtype=torch.float64)
    results = {}
    for name in ("ref", "numba", "torch"):
        zz, yy = z.clone().requires_grad_(True), y.clone().requires_grad_(True)
        p = torch.softmax(zz, 1)
        if name == "ref":
            out = ref_hard_sums(p, yy, 20)
        else:
            out = binning._HardBinSums.apply(p.reshape(2, 4, -1), yy.reshape(2, 4, -1), 20, "right", name == "numba")
        (out[1] * w[1] + out[2] * w[2]).sum().backward()
        results[name] = (out, zz.grad, yy.grad)
    (rv, rgz, rgy) = results["ref"]
    for name in ("numba", "torch"):
        v, gz, gy = results[name]
        for a, b in zip(v, rv, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        torch.testing.assert_close(gz, rgz, rtol=0, atol=1e-10)
        torch.testing.assert_close(gy, rgy, rtol=0, atol=1e-10)
    assert not results["numba"][0][0].requires_grad  # the count carries no gradient


def test_hard_sums_gradcheck_and_double_backward() -> None:
    g = torch.Generator().manual_seed(4)
    p = torch.rand(1, 2, 30, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.rand(1, 2, 30, generator=g, dtype=torch.float64).requires_grad_(True)
    for use_numba in (True, False):

        def f(a: torch.Tensor, b: torch.Tensor, use_numba: bool = use_numba) -> tuple[torch.Tensor, torch.Tensor]:
            _, sp, sy = binning._HardBinSums.apply(a, b, 7, "right", use_numba)
            return sp, sy

        # the bins are piecewise constant: finite differences that cross no edge see the same gradient
        assert torch.autograd.gradcheck(f, (p, y), eps=1e-9, atol=1e-7)
        assert torch.autograd.gradgradcheck(f, (p, y), eps=1e-9, atol=1e-7)


def test_hard_sums_long_rows_cross_chunk_boundaries() -> None:
    n = (1 << 16) * 2 + 1234
    g = torch.Generator().manual_seed(5)
    p = torch.rand(1, 2, n, generator=g, dtype=torch.float64)
    y = (torch.rand(1, 2, n, generator=g) < 0.3).double()
    rc, rp, ry = ref_hard_sums(p, y, 20)
    c, sp, sy = binning._HardBinSums.apply(p, y, 20, "right", True)
    assert torch.equal(c, rc) and torch.equal(sy, ry)
    torch.testing.assert_close(sp, rp, rtol=1e-12, atol=0)
    pt = p.clone().requires_grad_(True)
    w = torch.randn(1, 2, 20, generator=g, dtype=torch.float64)
    (binning._HardBinSums.apply(pt, y, 20, "right", True)[1] * w).sum().backward()
    assert torch.equal(pt.grad, w.gather(2, binning.bin_index(p, 20)))


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    saturate=st.floats(0.0, 1.0),
)
def test_hard_ace_loss_matches_reference_property(m: int, n: int, seed: int, saturate: float) -> None:
    """mL1-ACE value and gradient (float64) equal the per-bin reference, saturated (0 / 1) values included."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(2, 3, n, generator=g, dtype=torch.float64)
    sat = torch.rand(p.shape, generator=g) < saturate
    p = torch.where(sat, p.round(), p)
    y = (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).double()
    a = p.clone().requires_grad_(True)
    got = hard_calibration_error(a, y, m)
    got.sum().backward()
    b = p.clone().requires_grad_(True)
    c, sp, sy = ref_hard_sums(b, y, m)
    want = ref_ace(c, sp, sy, c > 0)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


# -- soft bins -------------------------------------------------------------------------------------------------


def _soft_run(
    fn: Callable[..., tuple[torch.Tensor, ...]], p: torch.Tensor, y: torch.Tensor, m: int, w: torch.Tensor
) -> tuple:
    a, b = p.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = fn(a, b, m)
    sum((o * wk).sum() for o, wk in zip(out, w, strict=True)).backward()
    return out, a.grad, b.grad


@pytest.mark.parametrize("m", [1, 2, 4, 20])
def test_soft_sums_values_and_gradients_match_reference_float64(m: int) -> None:
    g = torch.Generator().manual_seed(6 + m)
    p = adversarial_probs(m, torch.float64, seed=m).repeat(2, 3, 1)
    y = torch.rand(p.shape, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, 3, m, generator=g, dtype=torch.float64)
    rv, rga, rgb = _soft_run(ref_soft_sums, p, y, m, w)
    for fn in (soft_bin_sums, binning._soft_bin_sums_torch):
        v, ga, gb = _soft_run(fn, p, y, m, w)
        for x, r in zip(v, rv, strict=True):
            torch.testing.assert_close(x, r, rtol=0, atol=1e-10)
        if m > 1:  # M = 1: every value sits on the reference's |pos - k| kink
            torch.testing.assert_close(ga, rga, rtol=0, atol=1e-10)
        torch.testing.assert_close(gb, rgb, rtol=0, atol=1e-10)
    # at the bin centres (the kinks of the triangular kernel, and the clamp bounds p M - 1/2 = 0 and M - 1) the
    # one-sided derivative is a convention: the numba gradient takes the torch formula's, bounds included
    centres = ((torch.arange(m, dtype=torch.float64) + 0.5) / m).view(1, 1, -1).expand(2, 3, m)
    pc = torch.cat([p, centres], -1)
    yc = torch.rand(pc.shape, generator=g, dtype=torch.float64)
    fast = _soft_run(soft_bin_sums, pc, yc, m, w)
    slow = _soft_run(binning._soft_bin_sums_torch, pc, yc, m, w)
    for x, r in zip((*fast[0], fast[1], fast[2]), (*slow[0], slow[1], slow[2]), strict=True):
        torch.testing.assert_close(x, r, rtol=0, atol=1e-10)


def test_soft_sums_gradcheck_and_second_derivatives() -> None:
    g = torch.Generator().manual_seed(7)
    p = (torch.rand(1, 2, 25, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    y = torch.rand(1, 2, 25, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: soft_bin_sums(a, b, 6), (p, y))
    assert torch.autograd.gradgradcheck(lambda a, b: soft_bin_sums(a, b, 6), (p, y))
    # a gradient penalty sees the second derivative of the formula, not a constant
    hess = []
    for fn in (soft_bin_sums, binning._soft_bin_sums_torch):
        (gp,) = torch.autograd.grad((fn(p, y, 6)[1] ** 2).sum(), p, create_graph=True)
        hess.append(torch.autograd.grad(gp.square().sum(), p)[0])
    torch.testing.assert_close(hess[0], hess[1], rtol=0, atol=1e-10)
    assert hess[0].abs().sum() > 0


def test_soft_ace_loss_float32_close_to_float64_reference() -> None:
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 4, 16, 16, 8, generator=g)
    lab = torch.randint(0, 4, (2, 16, 16, 8), generator=g)
    y = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).float()
    a = z.clone().requires_grad_(True)
    got = soft_calibration_error(torch.softmax(a, 1), y, 20)
    got.sum().backward()
    b = z.double().requires_grad_(True)
    w, swp, swy = ref_soft_sums(torch.softmax(b, 1), y.double(), 20)
    want = ref_ace(w, swp, swy, w >= 1e-3)
    want.sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-6)


# -- CUDA: the torch paths on the device equal the CPU paths -----------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loss_sums_and_bin_statistics_equal_cpu() -> None:
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2, 4, 20, 20, 12, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (2, 20, 20, 12), generator=g)
    y = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).double()
    for fn in (hard_calibration_error, soft_calibration_error):
        outs = []
        for dev in ("cpu", "cuda"):
            a = z.detach().to(dev).requires_grad_(True)  # a leaf on each device (z.to("cpu") is z itself)
            v = fn(torch.softmax(a, 1), y.to(dev), 20)
            v.sum().backward()
            outs.append((v.cpu(), a.grad.cpu()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=1e-10)
    p = torch.softmax(z.float(), 1)
    cpu = binning.bin_statistics(p, lab, 20)
    dev = binning.bin_statistics(p.cuda(), lab.cuda(), 20).to("cpu")
    assert torch.equal(dev.count, cpu.count) and torch.equal(dev.sum_y, cpu.sum_y)
    torch.testing.assert_close(dev.sum_p, cpu.sum_p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["HardL1ACELoss", "SoftL1ACELoss"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("variant", ["mL1-ACE", "mL1-MCE"])
def test_calibration_losses_on_a_label_map_equal_the_one_hot_target(
    loss_name: str, include_background: bool, variant: str
) -> None:
    """The losses read a label map without building its one-hot: value and gradient equal those of the same
    loss on the one-hot target, with ``ignore_empty_classes`` (class 2 absent from image 1) and per-class
    terms, on the CPU kernels and on the torch path CUDA runs."""
    import segcal.losses as losses

    g = torch.Generator().manual_seed(5)
    z = 3 * torch.randn(2, 4, 9, 8, 7, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (2, 1, 9, 8, 7), generator=g)
    lab[1][lab[1] == 2] = 3
    onehot = torch.nn.functional.one_hot(lab[:, 0], 4).movedim(-1, 1).double()
    kw = {"softmax": True, "include_background": include_background, "variant": variant, "reduction": "none"}
    for torch_path in (False, True):
        out = []
        for target, to_onehot_y in ((lab, True), (onehot, False)):
            for ignore in (False, True):
                zz = z.clone().requires_grad_(True)
                loss = getattr(losses, loss_name)(to_onehot_y=to_onehot_y, ignore_empty_classes=ignore, **kw)
                with pytest.MonkeyPatch.context() as mp:
                    if torch_path:
                        mp.setattr(binning, "_numba_rows", lambda p: False)
                    v = loss(zz, target)
                v.sum().backward()
                out.append((v.detach(), zz.grad))
        for (va, ga), (vb, gb) in zip(out[:2], out[2:], strict=True):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-12)
            torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
        col = 2 if include_background else 1  # class 2's column
        assert out[1][0][1, col] == 0 and out[0][0][1, col] > 0  # zeroed only with ignore_empty_classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("class_ids", [None, [1, 2, 3]], ids=["all", "no_background"])
def test_soft_sums_of_a_label_map_equal_those_of_its_one_hot(dtype: torch.dtype, class_ids: list[int] | None) -> None:
    """The soft bins read a label map without a one-hot on the CPU: weights, Σwp, Σwy and the gradient equal
    the one-hot target's bit for bit (the same kernel arithmetic), the torch formula's within rounding, with
    values on the bin centres, 0 and 1, and a class absent from one image; ``create_graph`` still works."""
    g = torch.Generator().manual_seed(12)
    lab = torch.randint(0, 4, (2, 70_000), generator=g)  # longer than a kernel chunk
    lab[1][lab[1] == 2] = 0  # class 2 absent from image 1
    ids = list(range(4)) if class_ids is None else class_ids
    p0 = torch.rand(2, len(ids), 70_000, generator=g, dtype=dtype)
    special = torch.cat([(torch.arange(20, dtype=dtype) + 0.5) / 20, bin_edges(20, dtype)])
    p0[:, :, : special.numel()] = special
    onehot = (lab.unsqueeze(1) == torch.tensor(ids).view(1, -1, 1)).to(dtype)
    weights = torch.linspace(-1, 1, 20, dtype=dtype)
    results = []
    for fn, target, kw in (
        (soft_bin_sums, onehot, {}),
        (soft_bin_sums, lab.view(2, 1, -1), {"class_ids": class_ids}),
        (binning._soft_bin_sums_torch, onehot, {}),
    ):
        p = p0.clone().requires_grad_(True)
        out = fn(p, target, 20, **kw)
        (sum(o * weights for o in out)).sum().backward()
        results.append((out, p.grad))
    (a, ga), (b, gb), (t, gt) = results
    for x, y, z in zip(a, b, t, strict=True):
        assert torch.equal(x, y)
        torch.testing.assert_close(y, z, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-3)
    assert torch.equal(ga, gb)
    torch.testing.assert_close(gb, gt, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    if 2 in ids:
        assert bool((b[2][1, ids.index(2)] == 0).all())  # the absent class: no target weight
    p = p0[:, :, :50].clone().requires_grad_(True)  # create_graph: the torch formula on the label map's one-hot
    (gp,) = torch.autograd.grad(soft_bin_sums(p, lab[:, :50], 20, class_ids)[1].sum(), p, create_graph=True)
    (want,) = torch.autograd.grad(binning._soft_bin_sums_torch(p, onehot[:, :, :50], 20)[1].sum(), p, create_graph=True)
    torch.testing.assert_close(gp, want)
    with pytest.raises(ValueError, match="class_ids applies to a label map"):
        soft_bin_sums(p0, onehot, 20, class_ids=ids)
