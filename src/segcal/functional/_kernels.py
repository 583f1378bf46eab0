"""Fused CPU histogram kernels (numba) behind :func:`segcal.functional.binning.bin_statistics`.

One pass over the probabilities computes, per image, channel and bin, the voxel count, the sum of
probabilities and the sum of targets. Work is split into chunks of voxels processed in parallel; each chunk
keeps small local histograms (integer counts, float64 sums) that are merged exactly at the end: counts are exact
integers, sums are float64 whatever the input dtype.

* :func:`_hist_voxels` (exclusive mode with a label map, the common case) walks each chunk once per channel
  (contiguous rows) into four interleaved histograms. With ``validate`` it also counts, chunk by chunk while
  the rows are in cache, the values outside [0, 1] or NaN and the largest deviation of the channel sum from
  1; only when one of them is off does the caller run the precise (slower) checks that name the problem.
* :func:`_hist_dense` handles one-hot / multi-hot / soft targets row by row (image x channel), with two
  interleaved histograms so runs of voxels in the same bin do not serialise on one memory location.

Bin of ``p`` (after clamping into [0, 1], SPEC §0): the ``k`` with ``edges[k] < p <= edges[k + 1]``
(``closed="right"``) or ``edges[k] <= p < edges[k + 1]`` (``closed="left"``), clamped to ``[0, M - 1]``;
``edges`` are the correctly rounded ``k / M`` in the input dtype. ``floor(p * M)`` is corrected branch-free
against the padded edge tables ``lo``/``hi`` (one comparison for ``closed="right"``, see :func:`_bin_of`).
"""

from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency, but keep the pure-torch path importable if it breaks on a platform
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

#: voxels per parallel task; local int32 counts cannot overflow (<= _CHUNK per bin)
_CHUNK = 1 << 16
#: interleaved histograms per task (a power of two)
_LANES = 4


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


if HAVE_NUMBA:

    @njit(inline="always", nogil=True, boundscheck=False)
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

    @njit(inline="always", nogil=True)
    def _clamp01(v):  # pragma: no cover - compiled
        return min(max(v, 0.0), 1.0)

    @njit(nogil=True, boundscheck=False, cache=True)
    def _row_check(pc, tot):  # pragma: no cover - compiled
        """Adds row ``pc`` (n,) to the channel sums ``tot`` (n,); returns how many of its values are outside
        [0, 1] or NaN (a vectorisable loop: no serial min / max chain)."""
        nout = 0
        for i in range(pc.shape[0]):
            w = np.float64(pc[i])
            tot[i] += w
            nout += not (w >= 0.0 and w <= 1.0)
        return nout

    @njit(nogil=True, boundscheck=False, cache=True)
    def _row_hist(pc, lb, lc, mk, use_mask, lo, hi, m, right, hc, hp, validate, tot):  # pragma: no cover
        """One contiguous row ``pc`` (n,) with labels ``lb`` (n,) into ``hc`` (L, 2M) int64 (index ``2k + hit``,
        hit = ``lb == lc``) and ``hp`` (L, M) float64, both reset first; lane = voxel index mod L.

        With ``validate``, also adds the row to ``tot`` (n,) (channel sums) and returns the number of values
        outside [0, 1] or NaN (mask ignored, :func:`_row_check`); otherwise returns 0.
        """
        hc[:] = 0
        hp[:] = 0.0
        n = pc.shape[0]
        nout = _row_check(pc, tot) if validate else 0
        if use_mask:
            for i in range(n):
                if mk[i] != 0:
                    v = min(max(np.float64(pc[i]), 0.0), 1.0)
                    k = _bin_of(v, lo, hi, m, right)
                    r = np.uint64(i & (_LANES - 1))
                    hc[r, np.uint64(2) * k + np.uint64(lb[i] == lc)] += 1
                    hp[r, k] += v
            return nout
        nr = n // _LANES * _LANES
        for i0 in range(0, nr, _LANES):
            for r in range(_LANES):
                v = min(max(np.float64(pc[i0 + r]), 0.0), 1.0)
                k = _bin_of(v, lo, hi, m, right)
                hc[r, np.uint64(2) * k + np.uint64(lb[i0 + r] == lc)] += 1
                hp[r, k] += v
        for i in range(nr, n):
            v = min(max(np.float64(pc[i]), 0.0), 1.0)
            k = _bin_of(v, lo, hi, m, right)
            hc[0, np.uint64(2) * k + np.uint64(lb[i] == lc)] += 1
            hp[0, k] += v
        return nout

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_voxels(p, lab, first, mask, use_mask, lo, hi, right, validate, out, vstats):  # pragma: no cover
        """Exclusive mode, label map. p: (B, C, S) float; lab: (B, S) int; mask: (B, S) uint8.

        out: (B, C - first, 3, M) float64, accumulated. vstats: (B * n_chunks, 2) float64 receives per task
        (number of values outside [0, 1] or NaN, max |sum_c p - 1|) over all voxels and channels (mask
        ignored); the caller re-checks precisely (and names the problem) only when one of them is off.

        A task is one image and one chunk of ``_CHUNK`` voxels; it walks the chunk once per channel (rows are
        contiguous) into ``_LANES`` interleaved histograms (lane = voxel index mod ``_LANES``), so runs of
        voxels in one bin do not serialise on one memory location. Counts and label hits share one int64
        table (index ``2k + hit``). With ``validate`` the channel sums are accumulated in a chunk buffer.
        """
        nb, nc, s = p.shape
        m = out.shape[3]
        kc = nc - first
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        n_tasks = nb * n_chunks
        partial = np.zeros((n_tasks, kc, 3, m))
        for t in prange(n_tasks):
            b = t // n_chunks
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            n = s1 - s0
            hc = np.zeros((_LANES, 2 * m), np.int64)
            hp = np.zeros((_LANES, m))
            tot = np.zeros(n if validate else 1)
            nout = 0
            lb = lab[b, s0:s1]
            mk = mask[b, s0:s1] if use_mask else mask[0, 0:1]
            for c in range(nc):
                pc = p[b, c, s0:s1]
                if c < first:
                    if validate:
                        nout += _row_check(pc, tot)
                    continue
                nout += _row_hist(pc, lb, lb.dtype.type(c), mk, use_mask, lo, hi, m, right, hc, hp, validate, tot)
                for k in range(m):
                    n0 = 0
                    n1 = 0
                    sp = 0.0
                    for r in range(_LANES):
                        n0 += hc[r, 2 * k]
                        n1 += hc[r, 2 * k + 1]
                        sp += hp[r, k]
                    partial[t, c - first, 0, k] = n0 + n1
                    partial[t, c - first, 1, k] = sp
                    partial[t, c - first, 2, k] = n1
            dev = 0.0
            if validate:
                for i in range(n):
                    dev = max(dev, abs(tot[i] - 1.0))
            vstats[t, 0] = nout
            vstats[t, 1] = dev
        for bc in prange(nb * kc):
            b = bc // kc
            c = bc % kc
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[b, c, q, k] += partial[b * n_chunks + j, c, q, k]

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_top_label(p, lab, mask, use_mask, lo, hi, right, validate, out, vstats):  # pragma: no cover
        """Top-label bins, exclusive mode with a label map: confidence ``max_c p`` (first maximum, as
        ``torch.max``), hit = ``argmax == label``. p: (B, C, S); lab: (B, S); out: (B, 1, 3, M) accumulated;
        vstats as in :func:`_hist_voxels`."""
        nb, nc, s = p.shape
        m = out.shape[3]
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        n_tasks = nb * n_chunks
        partial = np.zeros((n_tasks, 3, m))
        for t in prange(n_tasks):
            b = t // n_chunks
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hc = np.zeros(4 * m, np.int32)
            hp = np.zeros(2 * m)
            vmin = np.inf
            vmax = -np.inf
            nbad = 0
            dev = 0.0
            for i in range(s0, s1):
                best = p[b, 0, i]
                arg = 0
                tot = 0.0
                for c in range(nc):
                    v = p[b, c, i]
                    if validate:
                        tot += v
                        vmin = min(vmin, v)
                        vmax = max(vmax, v)
                        nbad += not np.isfinite(v)
                    if v > best:
                        best = v
                        arg = c
                if validate:
                    dev = max(dev, abs(tot - 1.0))
                if use_mask and mask[b, i] == 0:
                    continue
                conf = min(max(np.float64(best), 0.0), 1.0)
                k = _bin_of(conf, lo, hi, m, right)
                ln = i & 1
                hc[ln * 2 * m + 2 * k + np.int64(lab[b, i] == arg)] += 1
                hp[ln * m + k] += conf
            for k in range(m):
                n1 = hc[2 * k + 1] + hc[2 * m + 2 * k + 1]
                partial[t, 0, k] = hc[2 * k] + hc[2 * m + 2 * k] + n1
                partial[t, 1, k] = hp[k] + hp[m + k]
                partial[t, 2, k] = n1
            vstats[t, 0] = vmin
            vstats[t, 1] = vmax
            vstats[t, 2] = nbad
            vstats[t, 3] = dev
        for b in prange(nb):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[b, 0, q, k] += partial[b * n_chunks + j, q, k]

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
            r = t // n_chunks
            b = r // c_count
            cid = class_ids[r % c_count]
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
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
        for r in prange(n_rows):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[r, q, k] += partial[r * n_chunks + j, q, k]

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
            row = t // n_chunks
            b = row // kc
            c = first + row % kc
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
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
    if HAVE_NUMBA:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
