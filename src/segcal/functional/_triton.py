"""Fused GPU kernels (Triton): the histogram behind ``bin_statistics`` and ``top_label_statistics`` with a label
map, and the per-case pass of ``case_statistics``.

The torch formulas (``bucketize``, then a scatter of three float64 values per voxel) read and write every value
several times; on a GPU that costs far more than one read of the probabilities. This kernel makes one pass:
each program takes one image-channel row and a group of ``_BLOCK * _SUBS`` voxels, and per block of voxels it

* clamps the probabilities into [0, 1] (NaN -> 0, as the CPU kernel), and bins them as
  :func:`segcal.functional._kernels._bin_of` does: ``floor(p * M)`` corrected by one comparison with the padded
  edge table of :func:`~segcal.functional._kernels.edge_tables` (``closed="left"``: two), so the bins are those
  of the edges rounded in the input dtype;
* float32 inputs: adds per bin the voxel's row ``(1, hit, the five 7-bit digits of q)``, ``q = round(p * 2**30)``
  (half to even; the CPU kernel's fixed point), by an int8 tensor-core product of the bins' one-hot matrix
  ``(W, block)`` (``W`` a power of two >= M and >= 16) and the rows ``(block, 16)``: exact integer sums, so counts,
  hits and sums are bit-identical to the CPU kernel's;
* float64 inputs: counts ``slot = 2 k + hit`` with ``tl.histogram`` and sums the probabilities per bin in float64
  by a one-hot reduction (within 1e-12 of the CPU's float64 sums).

Voxels outside the mask match no bin (and a discard slot).

:func:`case_sums` is the GPU form of the CPU's fused case pass (:mod:`segcal.functional._case_kernel`): one
program per block of one image's voxels walks the class rows once and gives the validation flags and label range,
the confusion counts of the argmax, the squared errors (Brier), the log-likelihood of the label (NLL), and the
top-label confidence and correctness of each voxel, which :func:`label_bin_sums` then bins.

Each program writes its partial counts and sums to its own row of a buffer that torch then adds: no atomics,
and the result does not depend on the scheduling. Used on CUDA devices where Triton is installed (it ships with
the CUDA builds of torch on Linux) and ``M <= MAX_BINS``; elsewhere the callers keep the torch paths.
The tests run the same kernels on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch

from segcal.functional import _kernels

try:  # an optional accelerator: the CUDA builds of torch bring it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

__all__ = ["MAX_BINS", "CaseSums", "available", "case_sums", "label_bin_sums"]

#: the most bins the kernel takes (its one-hot tile is ``_BLOCK x W`` wide); more bins use the torch path
MAX_BINS = 64
#: voxels per block (one tile) and blocks per program
_BLOCK = 64
_SUBS = 64
#: warps per program
_WARPS = 2
#: voxels per program of :func:`case_sums` and its warps
_CASE_BLOCK = 1024
_CASE_WARPS = 4
#: the most image-channel rows of one launch (a CUDA grid's second axis); larger batches take the torch path
_MAX_ROWS = 65_535
#: fixed-point scale of float32 sums (as the CPU kernel: ``q = round(p * 2**30)``)
_QBITS = 30
#: where the float32 kernel's per-voxel row (1, hit, the five 7-bit digits of q, low first) lands among the 16
#: columns of its per-bin table: the order of its ``tl.join`` / ``tl.reshape`` (column ``2 (4t + 2u + w)`` holds
#: join level 1, 2, 3 index ``t, u, w``)
_COLUMNS = {"count": 0, "hit": 8, "digits": (4, 12, 2, 10, 6)}


def available(probs: torch.Tensor, num_bins: int) -> bool:
    """Whether :func:`label_bin_sums` serves ``probs`` (float32 / float64 on a CUDA device, Triton importable,
    ``num_bins <= MAX_BINS``, at most ``_MAX_ROWS`` image-channel rows: the second axis of a CUDA grid)."""
    return triton is not None and probs.device.type == "cuda" and takes(probs, num_bins)


def takes(probs: torch.Tensor, num_bins: int) -> bool:
    """The kernel's own conditions, whatever the device: float32 / float64, ``1 <= num_bins <= MAX_BINS``, at
    most ``_MAX_ROWS`` image-channel rows."""
    return (
        probs.dtype in (torch.float32, torch.float64)
        and 1 <= num_bins <= MAX_BINS
        and probs.ndim >= 2
        and probs.shape[0] * probs.shape[1] <= _MAX_ROWS
    )


#: the padded edge tables per (M, dtype, device), copied to the device once: a host-to-device copy at every call
#: would first wait for the work queued on the GPU
_TABLES: dict[tuple[int, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _edge_tables(edges: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~segcal.functional._kernels.edge_tables` of ``edges`` (CPU, rounded in the input dtype) on
    ``device``, made once per number of bins, dtype and device."""
    key = (edges.numel() - 1, edges.dtype, str(device))
    if key not in _TABLES:
        lo, hi = _kernels.edge_tables(edges.numpy())
        _TABLES[key] = (torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device))
    return _TABLES[key]


def _flat(
    probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' operands: probabilities ``(B, C, S)``, labels ``(B, S)`` (a bool map as bytes) and the mask
    ``(B, S)`` as bytes (without a mask, the labels stand in: the kernels do not read it), contiguous."""
    b, c = probs.shape[:2]
    s = math.prod(probs.shape[2:])
    lab = labels.reshape(b, s)
    lab = (lab.view(torch.uint8) if lab.dtype == torch.bool else lab).contiguous()
    msk = lab if mask is None else mask.reshape(b, s).bool().contiguous().view(torch.uint8)
    return probs.detach().reshape(b, c, s).contiguous(), lab, msk


def label_bin_sums(
    probs: torch.Tensor,
    labels: torch.Tensor,
    first: int,
    mask: torch.Tensor | None,
    edges: torch.Tensor,
    closed: str,
) -> torch.Tensor:
    """Per-bin ``(count, Σp, Σy)`` of channels ``first:`` of ``probs`` against a label map.

    Args:
        probs: ``(B, C, *spatial)`` float32 / float64 probabilities (already validated; clamped here).
        labels: ``(B, *spatial)`` integer label map (the hits of channel ``c`` are the voxels labelled ``c``).
        first: first channel binned (1 drops the background).
        mask: ``(B, *spatial)`` bool region or ``None``.
        edges: the ``M + 1 <= MAX_BINS + 1`` bin edges rounded in ``probs``' dtype, on the CPU
            (:func:`~segcal.functional.binning.bin_edges`).
        closed: ``"right"`` (``e_k < p <= e_{k+1}``) or ``"left"``.

    Returns:
        ``(B, C - first, 3, M)`` float64 on ``probs``' device.
    """
    if triton is None:  # pragma: no cover - guarded by available()
        raise RuntimeError("the Triton kernel needs the triton package")
    p, lab, msk = _flat(probs, labels, mask)
    b, c, s = p.shape
    kc = c - first
    dev = probs.device
    use_mask = mask is not None
    num_bins = edges.numel() - 1
    if not 1 <= num_bins <= MAX_BINS:
        raise ValueError(f"the Triton kernel takes 1 to {MAX_BINS} bins, got {num_bins}")
    lo, hi = _edge_tables(edges, dev)
    fixed = p.dtype == torch.float32
    w = max(16, 1 << (num_bins - 1).bit_length())  # >= M, and >= 16 for the tensor-core product
    w2 = 1 << (2 * num_bins).bit_length()  # > 2M: slots 0..2M-1 and the discard slot 2M
    n_groups = triton.cdiv(s, _BLOCK * _SUBS)
    rows = b * kc
    if fixed:
        counts = torch.empty((n_groups, rows, w, 16), dtype=torch.int32, device=dev)
        sums = counts  # the float32 kernel writes its (W, 16) tables to `counts` only
    else:
        counts = torch.empty((n_groups, rows, w2), dtype=torch.int32, device=dev)
        sums = torch.empty((n_groups, rows, w), dtype=torch.float64, device=dev)
    _label_bins_kernel[(n_groups, rows)](
        p, lab, msk, lo, hi, counts, sums, s, c, first, num_bins,
        USE_MASK=use_mask, RIGHT=closed == "right", FIXED=fixed,
        BLOCK=_BLOCK, SUBS=_SUBS, W=w, W2=w2, P=lo.shape[0], num_warps=_WARPS,
    )  # fmt: skip
    if fixed:
        tab = counts.sum(0, dtype=torch.int64)[:, :num_bins]  # (rows, M, 16): the columns of _COLUMNS
        n, hits = tab[..., _COLUMNS["count"]], tab[..., _COLUMNS["hit"]]
        q = sum(tab[..., col] << (7 * i) for i, col in enumerate(_COLUMNS["digits"]))
        total = q.double() * 2.0**-_QBITS  # integer sums below 2**53: exact in float64, scaled exactly
    else:
        slots = counts.sum(0, dtype=torch.int64)
        hits = slots[:, 1 : 2 * num_bins : 2]
        n = slots[:, 0 : 2 * num_bins : 2] + hits
        total = sums.sum(0)[:, :num_bins]
    return torch.stack([n.double(), total, hits.double()], 1).reshape(b, kc, 3, num_bins)


def _float64_bits(x: float) -> int:
    """The bits of ``x`` as a float64, for a kernel argument that must stay float64 (Triton passes a Python
    float as float32): the kernel bitcasts them back. ``x`` in (2**-511, 2): the bits exceed 2**31, so the
    argument is an int64."""
    bits = struct.unpack("<q", struct.pack("<d", x))[0]
    if not 2**31 <= bits < 2**63:
        raise ValueError(f"{x!r} is outside what the kernel takes as a float64 bit pattern")
    return bits


class CaseSums(NamedTuple):
    """What :func:`case_sums` returns for ``B`` images of ``C`` classes and ``S`` voxels (on the input's device)."""

    #: ``(B, C, 3)`` float64 true positives, false positives and false negatives of the argmax (a label outside
    #: [0, C) is a false positive of the argmax only), voxels outside the mask excluded
    counts: torch.Tensor
    #: ``(B, C)`` float64 ``Σ (p_k − [y = k])²`` over the mask (``p`` clamped into [0, 1], NaN -> 0)
    sq: torch.Tensor
    #: ``(B,)`` float64 ``Σ −ln clamp(p_y, eps, 1 − eps)`` over the voxels in the mask with a label in [0, C)
    nll_sum: torch.Tensor
    #: ``(B,)`` float64 number of voxels in the mask
    n_in_mask: torch.Tensor
    #: ``(B,)`` int64 voxels (mask ignored) with a value outside [0, 1] or NaN, or a channel sum off 1 by
    #: more than ``thr``
    n_flagged: torch.Tensor
    #: ``(B, 2)`` int64 smallest and largest label
    label_range: torch.Tensor
    #: ``(B, 1, S)`` the top-label confidence ``max_c p_c`` (the first maximum, unclamped), in ``probs``' dtype
    confidence: torch.Tensor
    #: ``(B, S)`` uint8: 1 where the argmax is not the label (label 0 of :func:`label_bin_sums` marks a hit)
    wrong: torch.Tensor


def case_sums(
    probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, eps: float, thr: float
) -> CaseSums:
    """One pass over ``probs`` ``(B, C, *spatial)`` (float32 / float64, on any device Triton serves) and the
    label map ``labels`` ``(B, *spatial)`` (integer or bool) with the optional ``mask`` ``(B, *spatial)`` bool:
    the statistics of :class:`CaseSums`, with the formulas of the CPU's fused pass (the argmax is the first
    maximum, as ``torch.max``; ``thr < 7``: a value outside [0, 1] or NaN is summed as 8, so its voxel is
    flagged)."""
    if triton is None:  # pragma: no cover - guarded by the caller
        raise RuntimeError("the Triton kernel needs the triton package")
    p, lab, msk = _flat(probs, labels, mask)
    b, c, s = p.shape
    dev = probs.device
    use_mask = mask is not None
    n_blocks = triton.cdiv(s, _CASE_BLOCK)
    cp = 1 << (c + 1).bit_length()  # > C + 1: argmax / label columns 0..C-1, C (a label out of range), discard
    sq = torch.empty((n_blocks, b, c), dtype=torch.float64, device=dev)
    cells = torch.empty((n_blocks, b, 3, cp), dtype=torch.int32, device=dev)
    stats = torch.empty((n_blocks, b, 2), dtype=torch.float64, device=dev)
    ints = torch.empty((n_blocks, b, 3), dtype=torch.int64, device=dev)
    conf = torch.empty((b, 1, s), dtype=p.dtype, device=dev)
    wrong = torch.empty((b, s), dtype=torch.uint8, device=dev)
    _case_kernel[(n_blocks, b)](
        p, lab, msk, conf, wrong, sq, cells, stats, ints, s, c, _float64_bits(eps), float(thr),
        USE_MASK=use_mask, CP=cp, BLOCK=_CASE_BLOCK, num_warps=_CASE_WARPS,
    )  # fmt: skip
    npred, nlab, tp = cells.sum(0, dtype=torch.int64)[..., :c].unbind(1)
    counts = torch.stack([tp, npred - tp, nlab - tp], -1).double()
    st = stats.sum(0)
    lo, hi = ints[..., 1].amin(0), ints[..., 2].amax(0)
    return CaseSums(
        counts, sq.sum(0), st[:, 0], st[:, 1], ints[..., 0].sum(0), torch.stack([lo, hi], 1), conf, wrong
    )


if triton is not None:

    @triton.jit
    def _digit_rows(v, hit, BLOCK: tl.constexpr):  # pragma: no cover - compiled (or interpreted by Triton)
        """Per voxel the int8 row ``(1, hit, the five 7-bit digits of q = round(p * 2**30), 0, ...)``, 16 wide,
        in the column order of ``_COLUMNS``; ``q`` rounded half to even, as the CPU kernel."""
        y = v * 1073741824.0  # p * 2**30: exact in float32
        fl = tl.floor(y)
        d = y - fl
        odd = (fl.to(tl.int32) & 1) == 1
        q = (fl + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)).to(tl.int32)
        r01 = tl.join(tl.full([BLOCK], 1, tl.int32), hit)
        r23 = tl.join(q & 127, (q >> 7) & 127)
        r45 = tl.join((q >> 14) & 127, (q >> 21) & 127)
        r67 = tl.join(q >> 28, tl.zeros([BLOCK], tl.int32))
        rows = tl.join(tl.join(r01, r23), tl.join(r45, r67))  # (BLOCK, 2, 2, 2)
        rows = tl.join(tl.reshape(rows, [BLOCK, 8]), tl.zeros([BLOCK, 8], tl.int32))
        return tl.reshape(rows, [BLOCK, 16]).to(tl.int8)

    @triton.jit
    def _label_bins_kernel(  # pragma: no cover - compiled (or interpreted by Triton)
        p_ptr, lab_ptr, mask_ptr, lo_ptr, hi_ptr, cnt_ptr, sum_ptr, S, C, FIRST, M,
        USE_MASK: tl.constexpr, RIGHT: tl.constexpr, FIXED: tl.constexpr,
        BLOCK: tl.constexpr, SUBS: tl.constexpr, W: tl.constexpr, W2: tl.constexpr, P: tl.constexpr,
    ):  # fmt: skip
        """Program ``(g, r)``: voxels ``[g * SUBS * BLOCK, (g + 1) * SUBS * BLOCK)`` of row ``r`` (image
        ``r // (C - FIRST)``, channel ``FIRST + r % (C - FIRST)``). Writes to row ``g * num_rows + r``: with
        ``FIXED`` (float32) the per-bin table ``(W, 16)`` of ``cnt_ptr`` (columns: ``_COLUMNS``), else the slot
        counts ``(W2,)`` of ``cnt_ptr`` and the per-bin float64 sums ``(W,)`` of ``sum_ptr``."""
        g = tl.program_id(0)
        r = tl.program_id(1)
        kc = C - FIRST
        img = r // kc
        ch = FIRST + r % kc
        prow = (img * C + ch).to(tl.int64) * S
        lrow = img.to(tl.int64) * S
        bins = tl.arange(0, W)
        if FIXED:
            table = tl.zeros([W, 16], dtype=tl.int32)
        else:
            slots = tl.zeros([W2], dtype=tl.int32)
            acc = tl.zeros([W], dtype=tl.float64)
        for i in range(SUBS):
            offs = (g * SUBS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inb = offs < S
            x = tl.load(p_ptr + prow + offs, mask=inb, other=0.0)
            v = tl.minimum(tl.maximum(x, 0.0), 1.0)
            v = tl.where(v == v, v, 0.0)  # NaN -> 0 (only without validation)
            j = (v * M).to(tl.int32) & (P - 1)
            lo = tl.load(lo_ptr + j)
            if RIGHT:
                k = j - (v <= lo).to(tl.int32)
            else:
                hi = tl.load(hi_ptr + j)
                k = j + (v >= hi).to(tl.int32) - (v < lo).to(tl.int32)
            lab = tl.load(lab_ptr + lrow + offs, mask=inb, other=0)
            keep = inb
            if USE_MASK:
                keep = keep & (tl.load(mask_ptr + lrow + offs, mask=inb, other=0) != 0)
            hit = (lab == ch).to(tl.int32)
            if FIXED:
                rows = _digit_rows(v, hit, BLOCK)
                # the integer tensor-core product adds the rows of each bin's voxels exactly
                onehot = (bins[:, None] == tl.where(keep, k, W)[None, :]).to(tl.int8)  # (W, BLOCK)
                table = tl.dot(onehot, rows, table, out_dtype=tl.int32)
            else:
                slot = tl.where(keep, 2 * k + hit, 2 * M)
                slots += tl.histogram(slot, W2)
                onehot = tl.where(keep, k, W)[:, None] == bins[None, :]  # a discarded voxel matches no bin
                acc += tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)
        row = g.to(tl.int64) * tl.num_programs(1) + r
        if FIXED:
            tl.store(cnt_ptr + row * W * 16 + bins[:, None] * 16 + tl.arange(0, 16)[None, :], table)
        else:
            tl.store(cnt_ptr + row * W2 + tl.arange(0, W2), slots)
            tl.store(sum_ptr + row * W + bins, acc)

    @triton.jit
    def _case_kernel(  # pragma: no cover - compiled (or interpreted by Triton)
        p_ptr, lab_ptr, mask_ptr, conf_ptr, wrong_ptr, sq_ptr, cell_ptr, stat_ptr, int_ptr, S, C, eps_bits, thr,
        USE_MASK: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program ``(g, b)``: voxels ``[g * BLOCK, (g + 1) * BLOCK)`` of image ``b``. Writes to its row
        ``g * B + b``: ``sq`` (C,) float64; ``cells`` (3, CP) int32 histograms of the argmax, of the label (C
        where out of range) and of the argmax where it is the label, over the mask; ``stats`` (2,) float64 NLL
        sum and voxels in the mask; ``ints`` (3,) int64 flagged voxels, smallest and largest label; and per
        voxel the confidence and the miss flag. ``eps_bits``: the likelihood clamp ``eps`` as float64 bits."""
        g = tl.program_id(0)
        img = tl.program_id(1)
        row = g.to(tl.int64) * tl.num_programs(1) + img
        offs = g.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < S
        lrow = img.to(tl.int64) * S
        lab = tl.load(lab_ptr + lrow + offs, mask=inb, other=0).to(tl.int64)
        keep = inb
        if USE_MASK:
            keep = keep & (tl.load(mask_ptr + lrow + offs, mask=inb, other=0) != 0)
        dt = p_ptr.dtype.element_ty
        best = tl.full([BLOCK], float("-inf"), dt)
        arg = tl.zeros([BLOCK], tl.int32)
        tot = tl.zeros([BLOCK], dt)
        py = tl.full([BLOCK], 1.0, dt)
        for ch in range(C):
            x = tl.load(p_ptr + (img * C + ch).to(tl.int64) * S + offs, mask=inb, other=0.0)
            gt = x > best  # strictly greater: the first maximum wins; NaN never
            best = tl.where(gt, x, best)
            arg = tl.where(gt, ch, arg)
            tot += tl.where((x >= 0.0) & (x <= 1.0), x, 8.0)  # a value out of range puts its sum off 1
            v = tl.minimum(tl.maximum(x, 0.0), 1.0)
            v = tl.where(v == v, v, 0.0)  # NaN -> 0
            yk = lab == ch
            py = tl.where(yk, v, py)
            d = v.to(tl.float64) - yk.to(tl.float64)
            tl.store(sq_ptr + row * C + ch, tl.sum(tl.where(keep, d * d, 0.0), axis=0))
        flagged = inb & ~(tl.abs(tot - 1.0) <= thr)
        known = (lab >= 0) & (lab < C)
        eps = eps_bits.to(tl.float64, bitcast=True)
        f = tl.minimum(tl.maximum(py.to(tl.float64), eps), 1.0 - eps)
        tl.store(stat_ptr + row * 2, tl.sum(tl.where(known & keep, -tl.log(f), 0.0), axis=0))
        tl.store(stat_ptr + row * 2 + 1, tl.sum(keep.to(tl.float64), axis=0))
        tl.store(int_ptr + row * 3, tl.sum(flagged.to(tl.int64), axis=0))
        tl.store(int_ptr + row * 3 + 1, tl.min(tl.where(inb, lab, 9223372036854775807), axis=0))
        tl.store(int_ptr + row * 3 + 2, tl.max(tl.where(inb, lab, -9223372036854775807), axis=0))
        discard = CP - 1
        hit = arg.to(tl.int64) == lab
        col = tl.where(known, lab, C).to(tl.int32)
        cols = tl.arange(0, CP)
        tl.store(cell_ptr + row * 3 * CP + cols, tl.histogram(tl.where(keep, arg, discard), CP))
        tl.store(cell_ptr + (row * 3 + 1) * CP + cols, tl.histogram(tl.where(keep, col, discard), CP))
        tl.store(cell_ptr + (row * 3 + 2) * CP + cols, tl.histogram(tl.where(keep & hit, arg, discard), CP))
        tl.store(conf_ptr + lrow + offs, best, mask=inb)
        tl.store(wrong_ptr + lrow + offs, (~hit).to(tl.uint8), mask=inb)
