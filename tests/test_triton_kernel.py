"""The Triton kernel of ``bin_statistics`` on a GPU equals the CPU (numba) kernel: bit for bit on float32
probabilities (the same fixed-point sums), within 1e-12 on float64.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) on CPU
tensors: the same kernel source, executed with NumPy. With a CUDA device the compiled kernel runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from segcal.functional import _triton
from segcal.functional.binning import bin_edges, bin_statistics

#: the compiled kernel on a CUDA device; elsewhere the interpreter (TRITON_INTERPRET=1, set in conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    """``(module, device)``, with two blocks per program: several voxel groups per row even on small images."""
    monkeypatch.setattr(_triton, "_SUBS", 2)
    return _triton, DEVICE


def _case(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax probabilities (2, 4, 13, 11, 9) with adversarial values written in: every edge k/20 rounded in
    ``dtype`` and its neighbours one ulp away, exact 0 and 1, and (outside [0, 1] or NaN) values that both
    kernels clamp (NaN -> 0); a label map and a mask."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 13, 11, 9)
    p = torch.softmax(3 * torch.randn(shape, generator=g, dtype=torch.float64), 1).to(dtype)
    e = bin_edges(20, dtype)
    special = torch.cat([
        e, torch.nextafter(e, torch.ones_like(e)), torch.nextafter(e, torch.zeros_like(e)),
        torch.tensor([0.0, 1.0, -0.25, 1.5, float("nan")], dtype=dtype),
    ])  # fmt: skip
    flat = p.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[: 4 * special.numel()]
    flat[where] = special.repeat(4)
    lab = torch.randint(0, 4, (2, 13, 11, 9), generator=g)
    mask = torch.rand(2, 13, 11, 9, generator=g) > 0.3
    return p, lab, mask


def _cpu(p: torch.Tensor, lab: torch.Tensor, first: int, mask: torch.Tensor | None, m: int, closed: str):
    ref = bin_statistics(p, lab, m, include_background=first == 0, mask=mask, closed=closed, check=False)
    return torch.stack([ref.count, ref.sum_p, ref.sum_y], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
def test_triton_bins_equal_the_cpu_kernel(kernel, dtype: torch.dtype, closed: str) -> None:
    mod, dev = kernel
    p, lab, mask = _case(dtype)
    for m, first, msk, lab_dtype in [
        (20, 0, None, torch.int64), (20, 1, mask, torch.uint8), (1, 0, mask, torch.int32), (7, 1, None, torch.int16),
        (64, 0, None, torch.uint8),
    ]:  # fmt: skip
        labels = lab.to(lab_dtype)
        e = bin_edges(m, dtype)
        got = mod.label_bin_sums(p.to(dev), labels.to(dev), first, None if msk is None else msk.to(dev), e, closed)
        want = _cpu(p, lab, first, msk, m, closed)  # int64 labels: no new compiled variant of the CPU kernel
        assert got.shape == want.shape == (2, 4 - first, 3, m)
        got = got.cpu()
        if dtype == torch.float32:  # the same integer fixed-point sums as the CPU kernel
            assert torch.equal(got, want), (m, first, msk is None, lab_dtype)
        else:
            assert torch.equal(got[:, :, 0::2], want[:, :, 0::2]), (m, first)  # counts and hits
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_triton_bins_of_a_binary_bool_label_map(kernel) -> None:
    mod, dev = kernel
    p, lab, _ = _case(torch.float32, seed=3)
    p2 = torch.stack([p[:, 0], 1 - p[:, 0]], 1)
    lab2 = lab > 1
    got = mod.label_bin_sums(p2.to(dev), lab2.to(dev), 0, None, bin_edges(10, torch.float32), "right").cpu()
    assert torch.equal(got, _cpu(p2, lab2.to(torch.uint8), 0, None, 10, "right"))


def test_triton_kernel_is_chosen_only_where_it_serves() -> None:
    p = torch.rand(1, 2, 4, 4, 4)
    assert not _triton.available(p, 20)  # a CPU tensor: the numba kernel
    assert _triton.takes(p, 20) and _triton.takes(p.double(), _triton.MAX_BINS)
    assert not _triton.takes(p, _triton.MAX_BINS + 1) and not _triton.takes(p.half(), 20)
    assert not _triton.takes(torch.empty(2, 40_000, 1, 1), 20)  # more rows than a CUDA grid's second axis
    if torch.cuda.is_available():
        pc = p.cuda()
        assert _triton.available(pc, 20) and _triton.available(pc.double(), _triton.MAX_BINS)
        assert not _triton.available(pc, _triton.MAX_BINS + 1) and not _triton.available(pc.half(), 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bin_statistics_on_cuda_takes_the_kernel_and_equals_the_cpu() -> None:
    p, lab, mask = _case(torch.float32, seed=5)
    p = p.clamp(0, 1).nan_to_num(0.0)
    p = p / p.sum(1, keepdim=True)
    for kw in ({}, {"mask": mask}, {"include_background": False, "closed": "left"}):
        kw_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        got = bin_statistics(p.cuda(), lab.cuda(), 20, **kw_cuda)
        want = bin_statistics(p, lab, 20, **kw)
        for a, b in zip((got.count, got.sum_p, got.sum_y), (want.count, want.sum_p, want.sum_y), strict=True):
            assert a.device.type == "cuda" and torch.equal(a.cpu(), b)


def test_cuda_dispatch_of_bin_statistics_and_top_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU code paths of ``bin_statistics`` (the kernel reads the unclamped input when ``check=False``) and
    of ``top_label_statistics`` (the kernel bins the confidences, label 0 marking a correct voxel), run on the CPU
    with the kernel in the interpreter (``available`` forced), equal the CPU kernels."""
    import segcal.functional.calibration as calibration
    from segcal.functional.calibration import top_label_statistics

    p, lab, mask = _case(torch.float32, seed=7)
    p = p.nan_to_num(0.0)  # the CPU top-label kernel's NaN rule is its own (with check=False garbage in)
    want_bins = bin_statistics(p, lab, 20, mask=mask, check=False)
    want_top = top_label_statistics(p, lab, 20, mask=mask, check=False, closed="left")
    if DEVICE.type == "cpu":
        monkeypatch.setattr(_triton, "available", lambda probs, num_bins: True)
        monkeypatch.setattr(calibration, "_top_label_numba", lambda *a: None)
        monkeypatch.setattr(_triton, "_SUBS", 2)  # the interpreter runs every block: small groups
    pd = p.to(DEVICE).requires_grad_(True)  # off the CPU numba path, onto the GPU dispatch
    got_bins = bin_statistics(pd, lab.to(DEVICE), 20, mask=mask.to(DEVICE), check=False)
    got_top = top_label_statistics(pd.detach(), lab.to(DEVICE), 20, mask=mask.to(DEVICE), check=False, closed="left")
    for got, want in ((got_bins, want_bins), (got_top, want_top)):
        for a, b in zip((got.count, got.sum_p, got.sum_y), (want.count, want.sum_p, want.sum_y), strict=True):
            assert torch.equal(a.cpu(), b)
