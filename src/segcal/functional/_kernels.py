"""Fused CPU histogram kernels (numba) behind :func:`segcal.functional.binning.bin_statistics`.

One pass over the probabilities computes, per image, channel and bin, the voxel count, the sum of
probabilities and the sum of targets. Work is split into chunks of voxels processed in parallel; each chunk
keeps small local histograms that are merged at the end: counts are exact integers.

* :func:`_hist_voxels` (exclusive mode with a label map and float32 / float64 probabilities, the common case)
  walks each chunk in L1-sized blocks. Per block and channel, pass 1 (vectorised) clamps, validates and bins
  every value without a table lookup and writes a packed ``(slot, q)`` word; pass 2 scatters the words into
  eight interleaved lane histograms of packed ``count | fixed-point sum`` int64 entries (one memory update
  per value). Float32 sums are exact integer sums of ``round(p * 2**30)`` (within 4.7e-10 per voxel of the
  exact sum, independent of voxel order and thread count); float64 inputs keep float64 sums. The validation
  counts voxels whose channel sum is off 1 or that hold a value outside [0, 1] or NaN (summed as 8, so the sum
  is off too); only when one is found does the caller run the precise (slower) checks that name the problem.
  On AVX2 CPUs, float32 inputs go to :func:`segcal.functional._simd.hist_voxels` instead: the same result bit
  for bit, with the two dominant slots of each channel summed in vector registers and only the other values
  (about a fifth of a softmax) scattered.
* :func:`_hist_top_label` folds the channel rows of a block into the maximum and argmax (vectorised), then runs
  the confidences through the same two passes as one channel, with ``argmax == label`` as the hit.
* :func:`_hist_labels` (half-precision rows converted to float32, or bin counts whose edges the division of
  pass 1 does not reproduce) and :func:`_hist_dense` (one-hot / multi-hot / soft targets) walk rows with the
  table-corrected bin of :func:`_bin_of` and float64 sums, with two interleaved histograms so runs of voxels in
  the same bin do not serialise on one memory location.

Bin of ``p`` (after clamping into [0, 1]): the ``k`` with ``edges[k] < p <= edges[k + 1]``
(``closed="right"``) or ``edges[k] <= p < edges[k + 1]`` (``closed="left"``), clamped to ``[0, M - 1]``;
``edges`` are the correctly rounded ``k / M`` in the input dtype. ``floor(p * M)`` is corrected by one
comparison with an edge: computed by one division in :func:`_pack_loop`, looked up in the padded edge tables
``lo``/``hi`` in :func:`_bin_of`.
"""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
from numba import njit, prange

#: voxels per parallel task; local int32 counts cannot overflow (<= _CHUNK per bin)
_CHUNK = 1 << 16
#: voxels per block of :func:`_hist_voxels` (its rows, channel sums and packed words stay in L1)
_BLOCK = 2048
#: interleaved lane histograms of :func:`_hist_voxels` (a power of two)
_LANES = 8
#: fixed-point probabilities of :func:`_hist_voxels`: ``q = round(p * 2**_QBITS)`` (fits an int32)
_QBITS = 30
_QSCALE_INV = 2.0**-_QBITS
#: packed lane-histogram entry ``count << _CNT_SHIFT | sum of q``: per task a lane sees at most
#: ``_CHUNK / _LANES + _LANES`` voxels, so the sum of q stays below ``2**(_QBITS + 14) < 2**_CNT_SHIFT``
_CNT_SHIFT = 46
_CNT_ONE = np.int64(1) << np.int64(_CNT_SHIFT)
_LOW32 = np.int64(0xFFFFFFFF)
#: what the validation adds to a voxel's channel sum for a value outside [0, 1] or NaN (the sum is then off 1)
_FLAGGED = 8.0
assert (_CHUNK // _LANES + _LANES) * 2**_QBITS < 2**_CNT_SHIFT and _BLOCK % _LANES == 0


#: fewest parallel tasks :func:`_hist_voxels` aims at (smaller chunks for small inputs, so threads share evenly)
_MIN_TASKS = 32


def task_chunk(s: int, images: int) -> int:
    """Voxels per task of :func:`_hist_voxels` for ``images`` images of ``s`` voxels: ``_CHUNK``, or fewer
    whole blocks where that gives fewer than ``_MIN_TASKS`` tasks (e.g. 9 tasks on 2 threads: 5 against 4)."""
    if images * math.ceil(s / _CHUNK) >= _MIN_TASKS:
        return _CHUNK
    per_task = math.ceil(s / math.ceil(_MIN_TASKS / images))
    return max(_BLOCK, min(_CHUNK, math.ceil(per_task / _BLOCK) * _BLOCK))


def voxel_kernel_ok(num_bins: int, dtype: np.dtype) -> bool:
    """The preconditions of :func:`_hist_voxels`: ``j / M`` computed by one division in ``dtype`` equals the
    edges of :func:`~segcal.functional.binning.bin_edges` (``k / M`` rounded in float64, then in ``dtype``) for
    every ``j`` (true for float64, and for float32 at least up to M = 200,000; checked per call, it costs
    microseconds), and the machine is little-endian (pass 1 writes an int64 as two int32 halves)."""
    j = np.arange(num_bins + 1)
    edges_ok = np.array_equal(j.astype(dtype) / dtype.type(num_bins), (j / num_bins).astype(dtype))
    return bool(edges_ok) and sys.byteorder == "little"


def edge_tables(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padded edge tables for :func:`_bin_of`, of length ``P`` = the smallest power of two > ``M``.

    ``lo[k] = edges[k]`` for ``1 <= k < M``, ``lo[0] = -inf`` and ``lo[k] = +inf`` for ``k >= M``;
    ``hi[k] = edges[k + 1]`` for ``k < M - 1`` and ``+inf`` from ``M - 1`` on. The power-of-two length lets
    the kernels clamp an index with a mask instead of a (mispredicted) branch.
    """
    m = len(edges) - 1
    size = 1 << int(m).bit_length()  # > m
    lo = np.full(size, np.inf, dtype=edges.dtype)
    hi = np.full(size, np.inf, dtype=edges.dtype)
    lo[0] = -np.inf
    lo[1:m] = edges[1:m]
    hi[: m - 1] = edges[1:m]
    return lo, hi



@njit(nogil=True, boundscheck=False)
def _bin_of(v, lo, hi, m, right):  # pragma: no cover - compiled
    """Bin of ``v`` (already clamped into [0, 1]) in ``[0, M - 1]``, as an unsigned index.

    ``floor(v * M)`` (masked to the table length, so a NaN that survived the clamp with validation off
    lands in a valid bin) is the bin of the exact real edges; the edges rounded in the input dtype differ
    from those only for ``v`` exactly at a rounded edge, so for ``closed="right"`` one comparison
    (``v <= lo[k]``) corrects it, which also maps ``v = 1`` (``k = M``, ``lo[M] = +inf``) into bin ``M - 1``
    (``v * M`` is monotone in ``v`` and exact for float32 and narrower inputs; for float64 it may round up
    to the next integer, which the same comparison catches). ``closed="left"`` uses both comparisons.
    Branch-free: no mispredictions on saturated (0 / 1) probabilities.
    """
    k = np.int64(v * m) & (lo.shape[0] - 1)
    if right:
        return np.uint64(k - np.int64(v <= lo[k]))
    return np.uint64(k + np.int64(v >= hi[k]) - np.int64(v < lo[k]))

@njit(nogil=True)
def _clamp01(v):  # pragma: no cover - compiled
    return min(max(v, 0.0), 1.0)

@njit(nogil=True, boundscheck=False, error_model="numpy")
def _row_validate(pc, tot):  # pragma: no cover - compiled
    """Adds row ``pc`` (n,) to the channel sums ``tot`` (n,), a value outside [0, 1] or NaN as
    ``_FLAGGED`` (so that its voxel's sum is off; see :func:`_mark_sums_off`). Vectorised."""
    zero = pc.dtype.type(0.0)
    one = pc.dtype.type(1.0)
    flagged = pc.dtype.type(_FLAGGED)
    for i in range(pc.shape[0]):
        w = pc[i]
        ok = (w >= zero) & (w <= one)
        tot[i] += w if ok else flagged

@njit(nogil=True, boundscheck=False, error_model="numpy")
def _pack_value(w, hit, mk_i, m, right, masked):  # pragma: no cover - compiled
    """Pass 1 for one value ``w`` (see :func:`_pack_loop`): ``(q, slot, t)`` with ``t`` what the value adds
    to its voxel's channel sum (``w``, or ``_FLAGGED`` where clamping changed it)."""
    dt = type(w)
    zero = dt(0.0)
    one = dt(1.0)
    mf = dt(m)
    v = min(max(w, zero), one)
    v = v if v == v else zero  # NaN -> 0: every index below stays in range
    t = w if v == w else dt(_FLAGGED)
    j = np.int32(v * mf)
    if right:
        k = np.int32(j - np.int32(v <= dt(j) / mf))
        k = k if k > np.int32(0) else np.int32(0)  # p = 0: bin 0
    else:
        k = j - np.int32(v < dt(j) / mf) + np.int32(v >= dt(j + np.int32(1)) / mf)
        k = k if k < np.int32(m - 1) else np.int32(m - 1)
    slot = 2 * k + np.int32(hit)
    if masked:
        slot = slot if mk_i != 0 else np.int32(2 * m)
    return np.int32(np.rint(v * dt(2.0**_QBITS))), slot, t  # exact product, rounded half to even


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _pack_loop(pc, lb, lc, mk, m, right, masked, pk, tot):  # pragma: no cover - compiled
    """Pass 1 (vectorised): per value ``i`` of row ``pc`` (n,) the packed word ``slot << 32 | q`` as the
    int32 pair ``pk[2 i] = q``, ``pk[2 i + 1] = slot`` (an int64 on little-endian machines; two int32
    stores vectorise where one int64 does not), with ``slot = 2 k + (lb == lc)`` (``k`` the bin; voxels
    with ``mk == 0`` get the discard slot ``2 M``) and ``q = round(p * 2**_QBITS)``, ``p`` clamped into
    [0, 1] (NaN -> 0). Also adds the value to the channel sums ``tot``, or ``_FLAGGED`` where clamping
    changed it (outside [0, 1] or NaN): always, as a branch would cost more than the stores.

    The bin needs no table: with ``j = int(p * M)`` (computed in the input dtype: ``floor`` of the exact
    product, or one more when the product rounds up to an integer) and the edge ``e_j = j / M`` correctly
    rounded in the input dtype (one IEEE division), ``k = j - (p <= e_j)`` for ``closed="right"`` (``j = 0``
    excepted) is exactly the bin of the rounded edges: ``p <= e_j`` with ``p >= j / M`` only when ``p`` is
    the edge itself, and a product rounded up to ``j`` means ``p < j / M``, hence ``p <= e_j``.
    ``closed="left"`` adds the upper comparison ``p >= e_{j+1}`` (an edge rounded below ``(j + 1) / M``).
    """
    for i in range(pc.shape[0]):
        q, slot, t = _pack_value(pc[i], lb[i] == lc, mk[i] if masked else 1, m, right, masked)
        tot[i] += t
        pk[2 * i] = q
        pk[2 * i + 1] = slot


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _pack_pair_loop(pa, pb, lb, la, lbc, mk, m, right, masked, pka, pkb, tot):  # pragma: no cover - compiled
    """:func:`_pack_loop` for two channel rows ``pa``, ``pb`` (labels ``la``, ``lbc``) in one vectorised
    loop: the label and the voxel's channel sum are loaded and stored once for both values."""
    for i in range(pa.shape[0]):
        li = lb[i]
        mi = mk[i] if masked else 1
        qa, sa, ta = _pack_value(pa[i], li == la, mi, m, right, masked)
        qb, sb, tb = _pack_value(pb[i], li == lbc, mi, m, right, masked)
        tot[i] += ta + tb
        pka[2 * i] = qa
        pka[2 * i + 1] = sa
        pkb[2 * i] = qb
        pkb[2 * i + 1] = sb


@njit(nogil=True, boundscheck=False)
def _pack_pair(pa, pb, lb, la, lbc, mk, m, right, masked, pka, pkb, tot):  # pragma: no cover - compiled
    """:func:`_pack_pair_loop` with ``right`` and ``masked`` as constants (as :func:`_pack_row`)."""
    if right:
        if masked:
            _pack_pair_loop(pa, pb, lb, la, lbc, mk, m, True, True, pka, pkb, tot)
        else:
            _pack_pair_loop(pa, pb, lb, la, lbc, mk, m, True, False, pka, pkb, tot)
    elif masked:
        _pack_pair_loop(pa, pb, lb, la, lbc, mk, m, False, True, pka, pkb, tot)
    else:
        _pack_pair_loop(pa, pb, lb, la, lbc, mk, m, False, False, pka, pkb, tot)


@njit(nogil=True, boundscheck=False)
def _pack_row(pc, lb, lc, mk, m, right, masked, pk, tot):  # pragma: no cover - compiled
    """:func:`_pack_loop` with ``right`` and ``masked`` as constants (a branch inside the loop stops its
    vectorisation; ``closed="left"`` has two divisions and does not vectorise as well). Without a mask,
    ``mk`` is not read."""
    if right:
        if masked:
            _pack_loop(pc, lb, lc, mk, m, True, True, pk, tot)
        else:
            _pack_loop(pc, lb, lc, mk, m, True, False, pk, tot)
    elif masked:
        _pack_loop(pc, lb, lc, mk, m, False, True, pk, tot)
    else:
        _pack_loop(pc, lb, lc, mk, m, False, False, pk, tot)

@njit(nogil=True, boundscheck=False)
def _scatter_packed(pk, n, h):  # pragma: no cover - compiled
    """Pass 2: adds ``1 << _CNT_SHIFT | q`` of each packed word ``pk[:n]`` to slot ``pk >> 32`` of lane
    histogram ``h[i % _LANES]`` (``_LANES`` interleaved tables: a run of voxels in one bin does not
    serialise on one memory location)."""
    nr = n // _LANES * _LANES
    for i0 in range(0, nr, _LANES):
        for r in range(_LANES):
            e = pk[i0 + r]
            h[np.uint64(r), np.uint64(e >> np.int64(32))] += _CNT_ONE + (e & _LOW32)
    for i in range(nr, n):
        e = pk[i]
        h[0, np.uint64(e >> np.int64(32))] += _CNT_ONE + (e & _LOW32)

@njit(nogil=True, boundscheck=False)
def _scatter_exact(pk, pc, n, h, hp):  # pragma: no cover - compiled
    """Pass 2 for float64 inputs: counts as in :func:`_scatter_packed` (``q`` ignored) and the clamped
    probabilities summed in float64 into the lane tables ``hp`` (same slots)."""
    zero = pc.dtype.type(0.0)
    one = pc.dtype.type(1.0)
    nr = n // _LANES * _LANES
    for i0 in range(0, nr, _LANES):
        for r in range(_LANES):
            w = pc[i0 + r]
            v = w if w > zero else zero
            v = v if v < one else one
            k = np.uint64(pk[i0 + r] >> np.int64(32))
            h[np.uint64(r), k] += _CNT_ONE
            hp[np.uint64(r), k] += v
    for i in range(nr, n):
        w = pc[i]
        v = w if w > zero else zero
        v = v if v < one else one
        k = np.uint64(pk[i] >> np.int64(32))
        h[0, k] += _CNT_ONE
        hp[0, k] += v

@njit(nogil=True, boundscheck=False)
def _bin_row(pc, lb, lc, mk, m, right, masked, pk32, pk, tot, exact, h, hp):  # pragma: no cover - compiled
    """Both passes for one row ``pc`` (n,) of a block: :func:`_pack_row` into ``pk32`` (whose int64 view is
    ``pk``), then :func:`_scatter_exact` (``exact``: float64 sums into ``hp``) or :func:`_scatter_packed`
    into the lane tables ``h`` (L, 2M + 1)."""
    _pack_row(pc, lb, lc, mk, m, right, masked, pk32, tot)
    if exact:
        _scatter_exact(pk, pc, pc.shape[0], h, hp)
    else:
        _scatter_packed(pk, pc.shape[0], h)

@njit(nogil=True, boundscheck=False)
def _bin_pair(  # pragma: no cover - compiled
    pa, pb, lb, la, lbc, mk, m, right, masked, pk32, pk, pk32b, pkb, tot, exact, ha, hpa, hb, hpb
):
    """:func:`_bin_row` for two channel rows of a block: one :func:`_pack_pair` (pass 1 of both) into
    ``pk32`` / ``pk32b``, then pass 2 of each into its lane tables ``ha`` / ``hb``."""
    _pack_pair(pa, pb, lb, la, lbc, mk, m, right, masked, pk32, pk32b, tot)
    n = pa.shape[0]
    if exact:
        _scatter_exact(pk, pa, n, ha, hpa)
        _scatter_exact(pkb, pb, n, hb, hpb)
    else:
        _scatter_packed(pk, n, ha)
        _scatter_packed(pkb, n, hb)


@njit(nogil=True, boundscheck=False)
def _mark_sums_off(tot, n, thr, bad):  # pragma: no cover - compiled
    """Sets ``bad[i]`` (n,) int32 where the channel sum ``tot[i]`` of a block's voxel is NaN or off 1 by more
    than ``thr`` (``thr < 7``), which includes every voxel with a value outside [0, 1] or NaN: such a value
    was summed as ``_FLAGGED`` = 8, so the sum is >= 8 (the others are in [0, 1]) or NaN. Element-wise
    (vectorised; an integer reduction here would widen to int64 and cost twice as much); the caller
    counts the marks once per task."""
    one = tot.dtype.type(1.0)
    th = tot.dtype.type(thr)
    for i in range(n):
        bad[i] |= np.int32(not (abs(tot[i] - one) <= th))

@njit(nogil=True, boundscheck=False)
def _unpack_lanes(h, hp, exact, dst):  # pragma: no cover - compiled
    """Lane tables ``h`` (L, 2M + 1) packed int64 (and ``hp`` float64 sums with ``exact``) of one task and
    channel into ``dst`` (3, M): count, sum of p (``exact``) or of q (an integer < 2**53, exact in
    float64; scaled in :func:`_merge_partials`), number of hits."""
    m = dst.shape[1]
    for k in range(m):
        n0 = 0
        n1 = 0
        q = 0
        sp = 0.0
        for r in range(_LANES):
            e0 = h[r, 2 * k]
            e1 = h[r, 2 * k + 1]
            n0 += e0 >> _CNT_SHIFT
            n1 += e1 >> _CNT_SHIFT
            q += (e0 & (_CNT_ONE - 1)) + (e1 & (_CNT_ONE - 1))
            if exact:
                sp += hp[r, 2 * k] + hp[r, 2 * k + 1]
        dst[0, k] = n0 + n1
        dst[1, k] = sp if exact else q
        dst[2, k] = n1

@njit(nogil=True, boundscheck=False)
def _merge_partials(partial, n_chunks, exact, out):  # pragma: no cover - compiled
    """Adds the per-task sums ``partial`` (B * n_chunks, K, 3, M) into ``out`` (B, K, 3, M), summing the
    chunks of each image first: fixed-point sums of q add exactly (below 2**53, i.e. sums of p below 2**23
    per image and bin) and are scaled once."""
    nb, kc, _, m = out.shape
    for bc in range(nb * kc):  # a few thousand additions: serial
        b = bc // kc
        c = bc % kc
        for k in range(m):
            acc0 = 0.0
            acc1 = 0.0
            acc2 = 0.0
            for j in range(n_chunks):
                acc0 += partial[b * n_chunks + j, c, 0, k]
                acc1 += partial[b * n_chunks + j, c, 1, k]
                acc2 += partial[b * n_chunks + j, c, 2, k]
            out[b, c, 0, k] += acc0
            out[b, c, 1, k] += acc1 if exact else acc1 * _QSCALE_INV
            out[b, c, 2, k] += acc2

@njit(nogil=True)
def task_range(t, n_chunks, chunk, s):  # pragma: no cover - compiled
    """Task ``t`` of a parallel kernel over rows of ``s`` voxels (an image, or an image's channel), each cut
    into ``n_chunks`` chunks of ``chunk`` voxels: ``(row, first voxel, end voxel)``."""
    s0 = (t % n_chunks) * chunk
    return t // n_chunks, s0, min(s, s0 + chunk)


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _hist_voxels(p, lab, first, mask, use_mask, right, validate, thr, exact, chunk, out, vstats):  # pragma: no cover
    """Exclusive mode, label map, float32/float64 probabilities. p: (B, C, S); lab: (B, S) int;
    mask: (B, S) uint8. Requires :func:`voxel_kernel_ok` for ``M`` and the dtype.

    out: (B, C - first, 3, M) float64, accumulated. vstats: (B * n_chunks,) float64 receives per task the
    number of voxels (mask ignored) with a value outside [0, 1] or NaN or whose channel sum is NaN or
    deviates from 1 by more than ``thr`` (``thr < 7``, see :func:`_mark_sums_off`); the caller re-checks
    precisely (and names the problem) only when one is non-zero.

    A task is one image and one chunk of ``chunk`` voxels (``_CHUNK``, or fewer whole blocks for small inputs:
    :func:`task_chunk`), walked in blocks of ``_BLOCK`` voxels (a block's rows, channel sums and packed
    words stay in L1); per block, channels in pairs: pass 1 of both rows in one vectorised loop
    (:func:`_pack_pair`: clamp, validation, bin) and pass 2 of each (:func:`_scatter_packed`), both in
    :func:`_bin_pair` (an odd channel out: :func:`_bin_row`), into the channel's lane histograms of packed
    ``count << _CNT_SHIFT | sum q`` int64 entries, unpacked once per task (channels before ``first`` are only
    validated, :func:`_row_validate`).
    Counts are exact. Sums of probabilities: with ``exact`` (float64 inputs) float64 sums
    (:func:`_scatter_exact`); otherwise exact integer sums of ``q = round(p * 2**_QBITS)``, i.e. within
    ``2**-(_QBITS + 1)`` (4.7e-10) per voxel of the exact sum, so a bin's mean confidence is within 4.7e-10,
    and (integer sums) the result does not depend on the order of the voxels or the number of threads.
    """
    nb, nc, s = p.shape
    m = out.shape[3]
    kc = nc - first
    width = 2 * m + 1  # slots 2k (miss), 2k + 1 (hit), 2M (discarded by the mask)
    n_chunks = (s + chunk - 1) // chunk
    n_tasks = nb * n_chunks
    partial = np.zeros((n_tasks, kc, 3, m))
    for t in prange(n_tasks):
        b, s0, s1 = task_range(t, n_chunks, chunk, s)
        h = np.zeros((kc, _LANES, width), np.int64)
        hp = np.zeros((kc, _LANES, width) if exact else (1, 1, 1))
        pk32 = np.empty(2 * _BLOCK, np.int32)
        pk = pk32.view(np.int64)
        pk32b = np.empty(2 * _BLOCK, np.int32)
        pkb = pk32b.view(np.int64)
        tot = np.zeros(_BLOCK, p.dtype)
        bad = np.zeros(_BLOCK, np.int32)
        for a0 in range(s0, s1, _BLOCK):
            a1 = min(s1, a0 + _BLOCK)
            n = a1 - a0
            lb = lab[b, a0:a1]
            mk = mask[b, a0:a1] if use_mask else mask[0, 0:0]  # not read without a mask
            tot[:] = 0.0
            if validate and first > 0:
                for c in range(first):
                    _row_validate(p[b, c, a0:a1], tot[:n])
            for c in range(first, nc - 1, 2):  # channel pairs: one pass 1 for both rows
                ka = c - first
                hpa = hp[ka] if exact else hp[0]
                hpb = hp[ka + 1] if exact else hp[0]
                la = lb.dtype.type(c)
                lbc = lb.dtype.type(c + 1)
                _bin_pair(p[b, c, a0:a1], p[b, c + 1, a0:a1], lb, la, lbc, mk, m, right, use_mask,
                          pk32, pk, pk32b, pkb, tot, exact, h[ka], hpa, h[ka + 1], hpb)
            if (nc - first) % 2 == 1:  # an odd channel out
                c = nc - 1
                hpc = hp[c - first] if exact else hp[0]
                lc = lb.dtype.type(c)
                _bin_row(p[b, c, a0:a1], lb, lc, mk, m, right, use_mask, pk32, pk, tot, exact, h[c - first], hpc)
            if validate:
                _mark_sums_off(tot, n, thr, bad)
        nbad = 0
        for i in range(_BLOCK):
            nbad += bad[i]
        for c in range(kc):
            _unpack_lanes(h[c], hp[c] if exact else hp[0], exact, partial[t, c])
        vstats[t] = nbad
    _merge_partials(partial, n_chunks, exact, out)

@njit(nogil=True, boundscheck=False, error_model="numpy")
def _row_argmax(pc, c, best, arg, tot):  # pragma: no cover - compiled
    """Folds channel ``c`` (row ``pc`` (n,)) into the running maximum ``best`` and its channel ``arg``
    (strictly greater replaces: the first maximum wins, as ``torch.max``), and into the channel sums
    ``tot`` (as :func:`_row_validate`). Vectorised across voxels."""
    zero = pc.dtype.type(0.0)
    one = pc.dtype.type(1.0)
    ci = np.int32(c)
    flagged = pc.dtype.type(_FLAGGED)
    for i in range(pc.shape[0]):
        w = pc[i]
        gt = w > best[i]
        best[i] = w if gt else best[i]
        arg[i] = ci if gt else arg[i]
        ok = (w >= zero) & (w <= one)
        tot[i] += w if ok else flagged

@njit(nogil=True, boundscheck=False)
def _block_argmax(pb, a0, a1, best, arg, tot):  # pragma: no cover - compiled
    """Voxels ``a0:a1`` of the channel rows ``pb`` (C, S): their maximum ``best``, its channel ``arg`` and
    the channel sums ``tot`` (validation, see :func:`_row_validate`) into the first ``a1 - a0`` entries,
    one vectorised :func:`_row_argmax` per channel."""
    n = a1 - a0
    best[:n] = -np.inf
    arg[:n] = 0
    tot[:n] = 0.0
    for c in range(pb.shape[0]):
        _row_argmax(pb[c, a0:a1], c, best[:n], arg[:n], tot[:n])

@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _hist_top_label(p, lab, mask, use_mask, right, validate, thr, exact, out, vstats):  # pragma: no cover
    """Top-label bins, exclusive mode with a label map: confidence ``max_c p`` (first maximum, as
    ``torch.max``), hit = ``argmax == label``. p: (B, C, S) float32/float64; lab: (B, S) int; mask: (B, S)
    uint8; out: (B, 1, 3, M) accumulated; vstats, ``exact`` and the fixed-point sums as in
    :func:`_hist_voxels` (same preconditions). Per block: the channel rows fold into the maximum
    (:func:`_row_argmax`, vectorised, with the validation), then the confidences go through the same
    pass 1 / pass 2 as a channel of :func:`_hist_voxels`, with ``argmax == label`` as the hit. (A float32
    value >= 2**-6 times 2**30 is already an integer, so its q is exact: top-label confidences, >= 1 / C,
    are summed exactly for up to 64 classes.)"""
    nb, _, s = p.shape
    m = out.shape[3]
    width = 2 * m + 1
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    n_tasks = nb * n_chunks
    partial = np.zeros((n_tasks, 1, 3, m))
    for t in prange(n_tasks):
        b, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        h = np.zeros((_LANES, width), np.int64)
        hp = np.zeros((_LANES, width) if exact else (1, 1))
        pk32 = np.empty(2 * _BLOCK, np.int32)
        pk = pk32.view(np.int64)
        best = np.empty(_BLOCK, p.dtype)
        arg = np.empty(_BLOCK, np.int32)
        hit = np.empty(_BLOCK, np.uint8)
        tot = np.empty(_BLOCK, p.dtype)
        bad = np.zeros(_BLOCK, np.int32)
        scratch_tot = np.empty(_BLOCK, p.dtype)  # pass 1's validation of the confidences is not needed
        for a0 in range(s0, s1, _BLOCK):
            a1 = min(s1, a0 + _BLOCK)
            n = a1 - a0
            lb = lab[b, a0:a1]
            mk = mask[b, a0:a1] if use_mask else mask[0, 0:0]  # not read without a mask
            _block_argmax(p[b], a0, a1, best, arg, tot)
            for i in range(n):
                hit[i] = np.uint8(lb[i] == arg[i])
            _bin_row(best[:n], hit[:n], np.uint8(1), mk, m, right, use_mask, pk32, pk, scratch_tot, exact, h, hp)
            if validate:
                _mark_sums_off(tot, n, thr, bad)
        nbad = 0
        for i in range(_BLOCK):
            nbad += bad[i]
        _unpack_lanes(h, hp, exact, partial[t, 0])
        vstats[t] = nbad
    _merge_partials(partial, n_chunks, exact, out)

@njit(nogil=True, boundscheck=False, cache=True)
def _add_row_partials(partial, n_chunks, out):  # pragma: no cover - compiled
    """Adds the per-task sums ``partial`` (R * n_chunks, 3, M) into ``out`` (R, 3, M), the chunks of each row in
    order (a few thousand additions: serial)."""
    n_rows, _, m = out.shape
    for r in range(n_rows):
        for j in range(n_chunks):
            for q in range(3):
                for k in range(m):
                    out[r, q, k] += partial[r * n_chunks + j, q, k]


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _hist_labels(p, lab, class_ids, mask, use_mask, lo, hi, right, out):  # pragma: no cover - compiled
    """Row variant (used for half-precision inputs converted one row at a time).

    p: (R, S) float; lab: (B, S) int; rows r = b * C + c; out: (R, 3, M) float64 (accumulated).
    """
    n_rows, s = p.shape
    c_count = class_ids.shape[0]
    m = out.shape[2]
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_rows * n_chunks, 3, m))
    for t in prange(n_rows * n_chunks):
        r, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        b = r // c_count
        cid = class_ids[r % c_count]
        hc = np.zeros(m, np.int32)
        hy = np.zeros(m, np.int32)
        hp = np.zeros(m)
        for i in range(s0, s1):
            if use_mask and mask[b, i] == 0:
                continue
            v = _clamp01(p[r, i])
            k = _bin_of(v, lo, hi, m, right)
            hc[k] += 1
            hy[k] += np.int32(lab[b, i] == cid)
            hp[k] += v
        for k in range(m):
            partial[t, 0, k] = hc[k]
            partial[t, 1, k] = hp[k]
            partial[t, 2, k] = hy[k]
    _add_row_partials(partial, n_chunks, out)

@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _hist_dense(p, y, first, mask, use_mask, lo, hi, right, out):  # pragma: no cover - compiled
    """p, y: (B, C, S) (any strides); channels first.. are binned; mask: (B, S) uint8;
    out: (B, C - first, 3, M) float64, accumulated."""
    nb, nc, s = p.shape
    m = out.shape[3]
    kc = nc - first
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    n_tasks = nb * kc * n_chunks
    partial = np.zeros((n_tasks, 3, m))
    for t in prange(n_tasks):
        row, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        b = row // kc
        c = first + row % kc
        hn = np.zeros((2, m), np.int32)
        hp = np.zeros((2, m))
        hy = np.zeros((2, m))
        for i in range(s0, s1):
            if use_mask and mask[b, i] == 0:
                continue
            v = _clamp01(p[b, c, i])
            k = _bin_of(v, lo, hi, m, right)
            ln = i & 1  # two interleaved histograms: runs of voxels in one bin do not serialise
            hn[ln, k] += 1
            hp[ln, k] += v
            hy[ln, k] += y[b, c, i]
        for k in range(m):
            partial[t, 0, k] = hn[0, k] + hn[1, k]
            partial[t, 1, k] = hp[0, k] + hp[1, k]
            partial[t, 2, k] = hy[0, k] + hy[1, k]
    for row in prange(nb * kc):
        b = row // kc
        c = row % kc
        for j in range(n_chunks):
            for q in range(3):
                for k in range(m):
                    out[b, c, q, k] += partial[row * n_chunks + j, q, k]


def set_threads(n: int) -> None:
    """Set the number of threads the numba kernels use (defaults to numba's, i.e. all cores)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# -- differentiable bin sums of the calibration losses (forward sums and the gradient gathers) ---------------


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _bin_loop(pc, m, right, divide, lo, hi, dst):  # pragma: no cover - compiled
    """The bin of each value of ``pc`` (n,) clamped into [0, 1] into ``dst`` (n,): with ``divide`` (the edges
    are the divided ones, :func:`voxel_kernel_ok`) by :func:`_pack_loop`'s division (vectorised), else by
    the table lookup of :func:`_bin_of`."""
    if divide:
        dt = pc.dtype.type
        zero = dt(0.0)
        one = dt(1.0)
        mf = dt(m)
        for i in range(pc.shape[0]):
            v = min(max(pc[i], zero), one)
            v = v if v == v else zero
            j = np.int32(v * mf)
            if right:
                k = np.int32(j - np.int32(v <= dt(j) / mf))
                k = k if k > np.int32(0) else np.int32(0)
            else:
                k = j - np.int32(v < dt(j) / mf) + np.int32(v >= dt(j + np.int32(1)) / mf)
                k = k if k < np.int32(m - 1) else np.int32(m - 1)
            dst[i] = k
    else:
        for i in range(pc.shape[0]):
            dst[i] = _bin_of(_clamp01(pc[i]), lo, hi, m, right)


@njit(nogil=True, boundscheck=False)
def _bins(pc, m, right, divide, lo, hi, dst):  # pragma: no cover - compiled
    """:func:`_bin_loop` with ``right`` and ``divide`` as constants (vectorised loops)."""
    if divide:
        if right:
            _bin_loop(pc, m, True, True, lo, hi, dst)
        else:
            _bin_loop(pc, m, False, True, lo, hi, dst)
    else:
        _bin_loop(pc, m, right, False, lo, hi, dst)


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _hard_sums(p, y, lab, class_ids, lo, hi, right, divide, idx, out):  # pragma: no cover - compiled
    """Hard bins of the losses. p: (R, S) float32/float64 rows (image-channel pairs); the target either
    ``y`` (R, S) rows in p's dtype (one-hot / soft; ``class_ids`` empty), or a label map ``lab`` (B, S) integer
    with ``class_ids`` (C,) the class of each channel (row ``r = b * C + c`` hits where ``lab[b] ==
    class_ids[c]``; no one-hot is built); ``lo``/``hi``: the edge tables of :func:`edge_tables` in p's dtype;
    ``divide``: :func:`voxel_kernel_ok` holds (bins by one vectorised division); idx: (R, S) uint8/int16
    receives each value's bin (kept for the backward gather); out: (R, 3, M) float64 receives count, Σ p, Σ y
    per bin.

    The bin is that of ``p`` clamped into [0, 1] (the bins of :func:`~segcal.functional.binning.bin_index`);
    per task of ``_CHUNK`` values, one vectorised loop writes the bins, a second adds the unclamped values
    into float64 sums over two interleaved histograms (a run of values in one bin does not serialise)."""
    n_rows, s = p.shape
    m = out.shape[2]
    n_cls = class_ids.shape[0]
    labels = n_cls > 0
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_rows * n_chunks, 3, m))
    for t in prange(n_rows * n_chunks):
        r, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        hn = np.zeros((2, m), np.int64)
        hp = np.zeros((2, m))
        hy = np.zeros((2, m))
        pr = p[r, s0:s1]
        ir = idx[r, s0:s1]
        _bins(pr, m, right, divide, lo, hi, ir)
        if labels:
            lr = lab[r // n_cls, s0:s1]
            cid = class_ids[r % n_cls]
            for i in range(s1 - s0):
                k = np.int64(ir[i])
                ln = i & 1
                hn[ln, k] += 1
                hp[ln, k] += pr[i]
                hy[ln, k] += lr[i] == cid
        else:
            yr = y[r, s0:s1]
            for i in range(s1 - s0):
                k = np.int64(ir[i])
                ln = i & 1
                hn[ln, k] += 1
                hp[ln, k] += pr[i]
                hy[ln, k] += yr[i]
        for k in range(m):
            partial[t, 0, k] = hn[0, k] + hn[1, k]
            partial[t, 1, k] = hp[0, k] + hp[1, k]
            partial[t, 2, k] = hy[0, k] + hy[1, k]
    _add_row_partials(partial, n_chunks, out)


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _gather_bins(g, idx, dst):  # pragma: no cover - compiled
    """``dst[r, i] = g[r, idx[r, i]]``: the gradient of a per-bin sum reaching each value of its bin.
    g: (R, M); idx: (R, S) uint8/int16 bins from :func:`_hard_sums`; dst: (R, S)."""
    n_rows, s = idx.shape
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    for t in prange(n_rows * n_chunks):
        r, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        gr = g[r]
        for i in range(s0, s1):
            dst[r, i] = gr[np.int64(idx[r, i])]


@njit(nogil=True)
def _soft_position(w, mf, top, lo_max, half, zero):  # pragma: no cover - compiled
    """Triangular soft binning of one value ``w`` (all arithmetic in its dtype, as the torch formula; ``mf``,
    ``top``, ``half``, ``zero`` are ``M``, ``M - 1``, 1/2, 0 in that dtype): the lower bin
    ``lo = min(floor(pos), lo_max)``, ``hi = min(lo + 1, M - 1)``, the upper weight ``pos - lo`` with
    ``pos = clamp(w M - 1/2, 0, M - 1)`` (``lo_max = max(M - 2, 0)`` in the dtype too) and ``d pos / d w``
    (``M`` inside the clamp, bounds included, else 0)."""
    x = w * mf - half
    pos = min(max(x, zero), top)
    lof = min(np.floor(pos), lo_max)
    lo = np.int64(lof)
    hi = min(lo + 1, np.int64(top))
    w_hi = pos - lof
    dpos = mf if (x >= zero) & (x <= top) else zero
    return lo, hi, w_hi, dpos


@njit(nogil=True)
def _soft_target_row(y, lab, ids, r, use_lab):  # pragma: no cover - compiled
    """Row ``r``'s target source: ``(label row, class id, unused y row)`` with a label map, else
    ``(unused label row, 0, y row)``."""
    if use_lab:
        nc = ids.shape[0]
        return lab[r // nc], ids[r % nc], y[0]
    return lab[0], lab.dtype.type(0), y[r]


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _soft_sums(p, y, lab, ids, out):  # pragma: no cover - compiled
    """Soft (triangular) bins of the losses, the formula of :func:`~segcal.functional.binning.soft_bin_sums`.
    p, y: (R, S) float32/float64; out: (R, 3, M) float64 receives Σ w, Σ w p, Σ w y per bin (weights in
    p's dtype, sums in float64 per task of ``_CHUNK`` values). With a label map ``lab`` (B, S) int64 and
    ``ids`` (C,) (``R = B C``; ``y`` then (1, 0), not read) the target of row ``r`` is
    ``lab[r // C] == ids[r % C]``: no one-hot."""
    n_rows, s = p.shape
    use_lab = lab.shape[1] > 0
    m = out.shape[2]
    dt = p.dtype.type
    mf = dt(m)
    top = dt(m - 1)
    lo_max = dt(max(m - 2, 0))
    half = dt(0.5)
    zero = dt(0.0)
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_rows * n_chunks, 3, m))
    for t in prange(n_rows * n_chunks):
        r, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        h = np.zeros((3, m))
        lrow, cid, yrow = _soft_target_row(y, lab, ids, r, use_lab)
        for i in range(s0, s1):
            w = p[r, i]
            v = dt(lrow[i] == cid) if use_lab else yrow[i]
            lo, hi, w_hi, _ = _soft_position(w, mf, top, lo_max, half, zero)
            w_lo = dt(1.0) - w_hi
            h[0, lo] += w_lo
            h[0, hi] += w_hi
            h[1, lo] += w_lo * w
            h[1, hi] += w_hi * w
            h[2, lo] += w_lo * v
            h[2, hi] += w_hi * v
        for q in range(3):
            for k in range(m):
                partial[t, q, k] = h[q, k]
    _add_row_partials(partial, n_chunks, out)


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _soft_grads(p, y, lab, ids, g, gp, gy):  # pragma: no cover - compiled
    """Gradients of the soft bin sums of :func:`_soft_sums` (targets ``y`` or the label map ``lab`` / ``ids``,
    as there). g: (R, 3, M) gradients reaching Σ w, Σ w p, Σ w y (float64); gp, gy: (R, S) receive d/dp and
    d/dy (``gy`` of shape (0, 0) when not wanted).
    With ``w_lo = 1 - w_hi`` and ``d w_hi / d p = d pos / d p``: d/dp = Σ over the two bins ``b`` of
    ``g_w[b] w_b' + g_wp[b] (w_b' p + w_b) + g_wy[b] w_b' y`` and d/dy = ``g_wy[lo] w_lo + g_wy[hi] w_hi``."""
    n_rows, s = p.shape
    m = g.shape[2]
    dt = p.dtype.type
    mf = dt(m)
    top = dt(m - 1)
    lo_max = dt(max(m - 2, 0))
    half = dt(0.5)
    zero = dt(0.0)
    want_y = gy.shape[1] == s
    use_lab = lab.shape[1] > 0
    n_chunks = (s + _CHUNK - 1) // _CHUNK
    for t in prange(n_rows * n_chunks):
        r, s0, s1 = task_range(t, n_chunks, _CHUNK, s)
        gr = g[r]
        lrow, cid, yrow = _soft_target_row(y, lab, ids, r, use_lab)
        for i in range(s0, s1):
            w = p[r, i]
            v = dt(lrow[i] == cid) if use_lab else yrow[i]
            lo, hi, w_hi, dpos = _soft_position(w, mf, top, lo_max, half, zero)
            w_lo = dt(1.0) - w_hi
            a_hi = gr[0, hi] + gr[1, hi] * w + gr[2, hi] * v
            a_lo = gr[0, lo] + gr[1, lo] * w + gr[2, lo] * v
            gp[r, i] = dpos * (a_hi - a_lo) + w_lo * gr[1, lo] + w_hi * gr[1, hi]
            if want_y:
                gy[r, i] = w_lo * gr[2, lo] + w_hi * gr[2, hi]
