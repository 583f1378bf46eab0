"""The fused case passes of ``case_statistics`` (numba on CPU, Triton on a GPU) equal the separate functions.

``case_statistics`` takes a fused pass for exclusive classes with a label map: on CPU the numba pass, where the
Triton kernels serve (a CUDA device) ``_triton.case_sums`` then ``_triton.label_bin_sums``. Without a GPU the
Triton path runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) on CPU tensors, with
the dispatch forced. The inputs are adversarial: probabilities on every bin edge and one ulp beside it, exact
0 and 1, ties for the maximum, an all-background image, a class present in one voxel, masks of every dtype.
"""

from __future__ import annotations

import pytest
import torch

import segcal.functional.scoring as scoring
from segcal.functional import _triton
from segcal.functional.binning import bin_edges
from segcal.functional.scoring import TargetError, case_statistics

#: the compiled kernels on a CUDA device; elsewhere the interpreter (TRITON_INTERPRET=1, set in conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FIELDS = ("bins", "top", "counts", "brier_sum", "nll_sum", "n_voxels")


def _case(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities (3, 4, 9, 8, 7) summing to one, with the adversarial values above; labels; a mask."""
    g = torch.Generator().manual_seed(seed)
    b, c, spatial = 3, 4, (9, 8, 7)
    p = torch.softmax(3 * torch.randn(b, c, *spatial, generator=g, dtype=torch.float64), 1)
    e = bin_edges(20, torch.float64)
    # voxel-wise rows on the edges: (e, 1 - e, 0, 0), ulp neighbours, ties (0.5, 0.5, 0, 0), saturated (1, 0, 0, 0)
    specials = [torch.tensor([v, 1 - v, 0.0, 0.0], dtype=torch.float64) for v in e.tolist()]
    specials += [torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.25] * 4), torch.tensor([0.0, 0.0, 1.0, 0.0])]
    flat = p.movedim(1, -1).reshape(-1, c)
    where = torch.randperm(flat.shape[0], generator=g)[: len(specials)]
    flat[where] = torch.stack(specials).to(torch.float64)
    p = flat.reshape(b, *spatial, c).movedim(-1, 1).contiguous().to(dtype)
    # one ulp beside the edges in the input dtype, still summing to one within the tolerance
    q = p[:, 1].reshape(-1)
    q[:21] = torch.nextafter(bin_edges(20, dtype), torch.ones(21, dtype=dtype))
    p[:, 0] = 1 - p[:, 1:].sum(1)
    lab = torch.randint(0, c, (b, *spatial), generator=g)
    lab[1] = 0  # an all-background image
    lab[2] = torch.where(lab[2] == 3, 1, lab[2])
    lab[2, 4, 4, 4] = 3  # a class present in one voxel
    mask = torch.rand(b, *spatial, generator=g) > 0.3
    return p.clamp(0, 1), lab, mask


def _stats(p: torch.Tensor, lab: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    s = case_statistics(p, lab, 20, include_background=True, **kw)
    return {f: getattr(s, f) for f in FIELDS}


def _assert_equal(got: dict, want: dict, exact_sums: bool) -> None:
    for f in FIELDS:
        a, b = got[f].cpu(), want[f]
        if f in ("counts", "n_voxels") or (exact_sums and f in ("bins", "top")):
            assert torch.equal(a, b), f
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
def test_fused_numba_pass_equals_the_separate_functions(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, closed: str
) -> None:
    p, lab, mask = _case(dtype)
    for msk in (None, mask):
        fused = _stats(p, lab, mask=msk, closed=closed)
        with monkeypatch.context() as mp:
            mp.setattr(scoring, "_fast_label_map", lambda *a: None)  # the separate torch functions
            separate = _stats(p, lab, mask=msk, closed=closed)
        _assert_equal(fused, separate, exact_sums=False)
        assert torch.equal(fused["bins"][:, :, 0::2], separate["bins"][:, :, 0::2])  # counts and hits
        assert torch.equal(fused["top"][:, :, 0::2], separate["top"][:, :, 0::2])


@pytest.fixture
def gpu_path(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device of the Triton path; without a GPU its dispatch forced onto the interpreter (with two blocks per
    program of the binning kernel: the interpreter runs every block, and these images are small)."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(_triton, "available", lambda probs, num_bins: True)
        monkeypatch.setattr(_triton, "_SUBS", 2)
    return DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
def test_triton_case_pass_equals_the_cpu_pass(
    monkeypatch: pytest.MonkeyPatch, gpu_path: torch.device, dtype: torch.dtype, closed: str
) -> None:
    p, lab, mask = _case(dtype, seed=1)
    calls: list[int] = []
    original = _triton.case_sums
    monkeypatch.setattr(_triton, "case_sums", lambda *a: calls.append(1) or original(*a))
    for msk in (None, mask):
        with monkeypatch.context() as mp:
            mp.setattr(_triton, "available", lambda probs, num_bins: False)
            want = _stats(p, lab, mask=msk, closed=closed)
        calls.clear()
        mk = None if msk is None else msk.to(gpu_path)
        got = _stats(p.to(gpu_path), lab.to(gpu_path, torch.uint8), mask=mk, closed=closed)
        assert calls, "the Triton case pass did not run"
        _assert_equal(got, want, exact_sums=dtype == torch.float32)  # float32: the same fixed-point sums


@pytest.mark.parametrize("triton_path", [False, True], ids=["numba", "triton"])
def test_a_mask_of_any_binary_dtype_or_with_a_channel_axis_gives_the_same_statistics(
    monkeypatch: pytest.MonkeyPatch, triton_path: bool
) -> None:
    """Regression: the numba pass read the bytes of a float or int64 mask as if it were bool (wrong confusion
    counts and top-label bins, without an error)."""
    dev = torch.device("cpu")
    if triton_path:
        if DEVICE.type == "cpu":
            monkeypatch.setattr(_triton, "available", lambda probs, num_bins: True)
            monkeypatch.setattr(_triton, "_SUBS", 2)
        dev = DEVICE
    p, lab, mask = _case(torch.float32, seed=2)
    p, lab, mask = p.to(dev), lab.to(dev), mask.to(dev)
    want = _stats(p, lab, mask=mask)
    assert want["n_voxels"].tolist() == mask.sum((1, 2, 3)).tolist()
    for other in (mask.to(torch.uint8), mask.float(), mask.long(), mask[:, None]):
        _assert_equal(_stats(p, lab, mask=other), want, exact_sums=True)
    with pytest.raises(ValueError, match="mask must be binary"):
        _stats(p, lab, mask=mask.float() * 0.5)


def test_the_triton_pass_validates_as_the_cpu_pass(gpu_path: torch.device) -> None:
    p, lab, _ = _case(torch.float32, seed=3)
    p, lab = p.to(gpu_path), lab.to(gpu_path)
    bad = p.clone()
    bad[0, 1, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="prediction contains 1 NaN/Inf values"):
        case_statistics(bad, lab, 20)
    off = p.clone()
    off[1, :, 0, 0, 0] = 0.4  # sums to 1.6
    with pytest.raises(ValueError, match="sum to 1 over the channel axis"):
        case_statistics(off, lab, 20)
    wrong = lab.clone()
    wrong[2, 0, 0, 0] = 7
    with pytest.raises(TargetError, match=r"labels must lie in \[0, 3\] for 4 classes, found values in \[0, 7\]"):
        case_statistics(p, wrong, 20)
    # a channel sum off by less than the tolerance passes, as on the CPU
    near = p.clone()
    near[0, 0, 1, 1, 1] += 1e-4
    case_statistics(near, lab, 20)


def test_triton_case_pass_with_many_classes_and_labels_out_of_range(
    monkeypatch: pytest.MonkeyPatch, gpu_path: torch.device
) -> None:
    """13 classes (the confusion histograms' width, 16, holds the classes, an out-of-range column and the discard
    column), and with ``check=False`` labels outside [0, C): they count as false positives of the argmax only,
    as on the CPU."""
    g = torch.Generator().manual_seed(4)
    c = 13
    p = torch.softmax(2 * torch.randn(2, c, 11, 9, 7, generator=g), 1)
    lab = torch.randint(0, c, (2, 11, 9, 7), generator=g)
    lab[0, :2] = 20
    lab[1, 0, 0] = -3
    with monkeypatch.context() as mp:
        mp.setattr(_triton, "available", lambda probs, num_bins: False)
        want = _stats(p, lab, check=False)
    got = _stats(p.to(gpu_path), lab.to(gpu_path), check=False)
    _assert_equal(got, want, exact_sums=True)
    assert want["counts"][..., 1].sum() > want["counts"][..., 2].sum()  # the out-of-range labels are there
