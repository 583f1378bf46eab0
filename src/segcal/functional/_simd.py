"""The float32 voxel kernel on AVX2 CPUs (:func:`hist_voxels`): its first pass is a numba intrinsic written in
LLVM IR (:func:`dominant_groups`).

Most values of a segmentation's softmax fall in two slots of their channel's lane histograms: bin 0 of a
voxel whose label is another class (slot ``0``, "miss") and bin ``M - 1`` of a voxel of this class (slot
``2M - 1``, "hit"). :func:`dominant_groups` walks a channel row eight values at a time in AVX2 registers and

* sums, per lane, the count and the fixed-point values ``q = round(p * 2**30)`` of those two slots (no memory
  update per value);
* writes only the other values (about a fifth on a BraTS-sized softmax) to a buffer, packed left with one
  ``vpermd`` from a 256-row table indexed by the lanes' keep mask (a stream compaction, which numba's
  auto-vectorised loops do not emit); the sign bit of a written value carries its hit flag;
* validates the row (see below).

The caller bins the written values as before (division, packed word, scatter: ``_pack_value`` and
``_scatter_packed``), so every slot, count and fixed-point sum is the one of the portable kernel, bit for bit.

Which values are dominant: bin 0 is ``p < t0`` and bin ``M - 1`` is ``p >= t1``, with ``t0 = e_1`` and
``t1 = e_{M-1}`` for ``closed="left"`` and their next float32 above for ``closed="right"`` (``p <= e_1``,
``p > e_{M-1}``); the edges ``e_k`` are the float32 ``k / M`` of the kernel. A value that these tests miss
is not lost: it is written out and binned exactly. Values outside the mask are neither summed nor written.

The result equals :func:`segcal.functional._kernels._hist_voxels` bit for bit (``tests/test_simd_binning.py``).
Numba caches :func:`hist_voxels` by this file's time stamp: an edit of the helpers it takes from
:mod:`._kernels` needs the cache cleared (``__pycache__/_simd.*.nbi``), as for any numba cache.
Speed: docs/core-validation.md, "The AVX2 kernel".

Validation (``validate``): values are not clamped; each is added to its voxel's channel sum ``tot`` and the
unsigned maximum of the values' bit patterns is kept per lane. A pattern above that of ``1.0f`` is a value
outside ``[+0, 1]`` or a NaN (negative values, ``-0.0`` included, have the sign bit), and the caller then runs
the precise checks, which raise for anything but ``-0.0`` (binned as 0: bin 0, ``q = 0``, as the clamp gives;
a written ``-0.0`` is always a hit, as a miss at 0 is dominant, so its sign bit reads right).
Without ``validate`` the values are clamped into [0, 1] first (NaN -> 0, ``-0.0`` -> ``+0.0``), as in the
portable kernel.

Lane sums are unsigned 32-bit: the caller calls :func:`dominant_groups` on at most :func:`groups_per_call`
groups at a time, so that no lane sum of ``q`` (bin 0) or ``2**30 - q`` (bin ``M - 1``, recovered from the
wrapped sum of ``q`` and the count) can wrap; the sums are then widened and added into int64 accumulators.
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from segcal.functional._kernels import (
    _LANES,
    _QBITS,
    _clamp01,
    _mark_sums_off,
    _merge_partials,
    _pack_value,
    _row_validate,
    _scatter_packed,
    _unpack_lanes,
    task_range,
)

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V8F = ir.VectorType(_F32, 8)
_V8I = ir.VectorType(_I32, 8)
_V8Q = ir.VectorType(_I64, 8)
#: a bit pattern above this in the largest one seen flags a value outside [+0, 1] or a NaN
ONE_BITS = 0x3F800000
_SIGN = -(2**31)

#: values processed per iteration (AVX2: eight float32 lanes)
GROUP = 8
#: how far ahead in a row (values) the loop prefetches into L2: one block of the kernel
PREFETCH = 8192


def avx2_available() -> bool:
    """Whether numba compiles for a CPU with AVX2, the precondition of :func:`dominant_groups`: the host CPU as
    LLVM sees it, unless ``NUMBA_CPU_NAME`` names another target (e.g. ``generic`` for caches shared between
    machines), which counts only with ``+avx2`` in ``NUMBA_CPU_FEATURES``."""
    if numba_config.CPU_NAME not in (None, "host"):
        return "+avx2" in (numba_config.CPU_FEATURES or "")
    try:
        return bool(llvm_binding.get_host_cpu_features().get("avx2", False))
    except Exception:  # pragma: no cover - an LLVM that cannot tell
        return False


def compaction_table() -> np.ndarray:
    """``(256, 8)`` int32: row ``m`` lists the set bits of ``m`` from the lowest (the lanes to keep), zero-padded:
    the ``vpermd`` indices that pack those lanes to the front."""
    table = np.zeros((256, GROUP), np.int32)
    for m in range(256):
        kept = [lane for lane in range(GROUP) if m >> lane & 1]
        table[m, : len(kept)] = kept
    return table


def groups_per_call(t0: float, t1: float) -> int:
    """Most groups one :func:`dominant_groups` call may take so its unsigned 32-bit lane sums cannot wrap: the
    largest ``q`` of a bin-0 value (``p < t0``) and the largest ``2**30 - q`` of a bin-``M - 1`` value
    (``p >= t1``), each at most once per group, at most 256 groups."""
    q0 = int(np.rint(np.float64(np.nextafter(np.float32(t0), np.float32(-1))) * 2**30))
    ql = 2**30 - int(np.rint(np.float64(np.float32(t1)) * 2**30))
    return int(max(1, min(256, (2**32 - 1) // max(q0, ql, 1))))


def _splat(builder: ir.IRBuilder, value: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _vec_at(builder: ir.IRBuilder, data: ir.Value, index: ir.Value, vty: ir.VectorType) -> ir.Value:
    """Pointer to the vector ``vty`` starting at element ``index`` of ``data``."""
    return builder.bitcast(builder.gep(data, [index]), vty.as_pointer())


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ret, args), name)
    return fn


def _lane_total(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of the eight unsigned 32-bit lanes of ``v`` as an i64."""
    add = _declare(builder, "llvm.vector.reduce.add.v8i64", _I64, [_V8Q])
    return builder.call(add, [builder.zext(v, _V8Q)])


class _GroupLoop:
    """The LLVM IR of one :func:`dominant_groups` call: set-up (pointers, constants, lane accumulators), the
    loop body per group of eight values, and the final widening of the lane sums into ``acc``."""

    def __init__(self, context, builder: ir.IRBuilder, signature, args, validate: bool, masked: bool) -> None:
        self.b = builder
        self.validate = validate
        self.masked = masked
        p_, lab_, mk_, lc_, t0_, t1_, table_, out_, j0_, g0_, g1_, tot_, acc_ = args

        def data(k: int, value: ir.Value) -> ir.Value:
            return context.make_array(signature.args[k])(context, builder, value).data

        self.p, self.lab, self.mk, self.table = data(0, p_), data(1, lab_), data(2, mk_), data(6, table_)
        self.out = builder.bitcast(data(7, out_), _I32.as_pointer())
        self.tot, self.acc = data(11, tot_), data(12, acc_)
        self.g0, self.count = g0_, builder.sub(g1_, g0_)
        # the uint8 labels and lc compared zero-extended to 32 bits (the same equality; 32-bit lanes keep every
        # mask below in one AVX2 register width)
        self.lc = _splat(builder, builder.zext(lc_, _I32), _V8I)
        self.t0, self.t1 = _splat(builder, t0_, _V8F), _splat(builder, t1_, _V8F)
        self.zero = ir.Constant(_V8I, [0] * GROUP)
        self.ones = ir.Constant(_V8I, [-1] * GROUP)
        self.fn = {
            "max": _declare(builder, "llvm.x86.avx.max.ps.256", _V8F, [_V8F, _V8F]),
            "min": _declare(builder, "llvm.x86.avx.min.ps.256", _V8F, [_V8F, _V8F]),
            "movmsk": _declare(builder, "llvm.x86.avx.movmsk.ps.256", _I32, [_V8F]),
            "to_int": _declare(builder, "llvm.x86.avx.cvt.ps2dq.256", _V8I, [_V8F]),  # rounds half to even
            "permd": _declare(builder, "llvm.x86.avx2.permd", _V8I, [_V8I, _V8I]),
            "popcount": _declare(builder, "llvm.ctpop.i32", _I32, [_I32]),
            "prefetch": _declare(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
        }
        self.sum_q0 = cgutils.alloca_once_value(builder, self.zero)
        self.count_l = cgutils.alloca_once_value(builder, self.zero)
        self.sum_ql = cgutils.alloca_once_value(builder, self.zero)
        self.top = cgutils.alloca_once_value(builder, self.zero)
        self.j = cgutils.alloca_once_value(builder, j0_)

    def _add_to(self, acc: ir.Value, value: ir.Value, subtract: bool = False) -> None:
        b = self.b
        b.store((b.sub if subtract else b.add)(b.load(acc), value), acc)

    def _values(self, i: ir.Value) -> ir.Value:
        """The group's values: validated (added to ``tot``, largest bit pattern kept) or clamped."""
        b = self.b
        ahead = b.bitcast(b.gep(self.p, [b.add(i, ir.Constant(_I64, PREFETCH))]), _I8.as_pointer())
        b.call(self.fn["prefetch"], [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        w = b.load(_vec_at(b, self.p, i, _V8F), align=4)
        if not self.validate:  # NaN, -0.0 -> +0.0 (maxps returns its second operand then)
            zero, one = ir.Constant(_V8F, [0.0] * GROUP), ir.Constant(_V8F, [1.0] * GROUP)
            return b.call(self.fn["min"], [b.call(self.fn["max"], [w, zero]), one])
        tp = _vec_at(b, self.tot, i, _V8F)
        b.store(b.fadd(b.load(tp, align=4), w), tp, align=4)
        bits, seen = b.bitcast(w, _V8I), b.load(self.top)
        b.store(b.select(b.icmp_unsigned(">", bits, seen), bits, seen), self.top)
        return w

    def _hits(self, i: ir.Value) -> ir.Value:
        b = self.b
        labels = b.zext(b.load(_vec_at(b, self.lab, i, ir.VectorType(_I8, GROUP)), align=1), _V8I)
        return b.sext(b.icmp_unsigned("==", labels, self.lc), _V8I)

    def body(self, index: ir.Value) -> None:
        """One group: dominant sums into the lane accumulators, the other values packed left into ``out``."""
        b = self.b
        i = b.mul(b.add(index, self.g0), ir.Constant(_I64, GROUP))
        v = self._values(i)
        hit = self._hits(i)
        q = b.call(self.fn["to_int"], [b.fmul(v, ir.Constant(_V8F, [2.0**30] * GROUP))])
        d0 = b.and_(b.sext(b.fcmp_ordered("<", v, self.t0), _V8I), b.xor(hit, self.ones))
        dl = b.and_(b.sext(b.fcmp_ordered(">=", v, self.t1), _V8I), hit)
        if self.masked:
            inside = b.zext(b.load(_vec_at(b, self.mk, i, ir.VectorType(_I8, GROUP)), align=1), _V8I)
            inside = b.sext(b.icmp_unsigned("!=", inside, self.zero), _V8I)
            d0, dl = b.and_(d0, inside), b.and_(dl, inside)
        self._add_to(self.count_l, dl, subtract=True)
        self._add_to(self.sum_q0, b.and_(q, d0))
        self._add_to(self.sum_ql, b.and_(q, dl))
        dominant = b.or_(d0, dl)
        if self.masked:  # kept: inside the mask and not dominant
            keep = b.call(self.fn["movmsk"], [b.bitcast(b.and_(inside, b.xor(dominant, self.ones)), _V8F)])
        else:
            keep = b.xor(b.call(self.fn["movmsk"], [b.bitcast(dominant, _V8F)]), ir.Constant(_I32, 255))
        perm = b.load(_vec_at(b, self.table, b.mul(b.zext(keep, _I64), ir.Constant(_I64, GROUP)), _V8I), align=4)
        j = b.load(self.j)
        word = b.or_(b.bitcast(v, _V8I), b.and_(hit, ir.Constant(_V8I, [_SIGN] * GROUP)))
        b.store(b.call(self.fn["permd"], [word, perm]), _vec_at(b, self.out, j, _V8I), align=4)
        b.store(b.add(j, b.zext(b.call(self.fn["popcount"], [keep]), _I64)), self.j)

    def finish(self) -> ir.Value:
        """Adds the lane sums into ``acc`` and returns the new ``j``."""
        b = self.b
        # 2**30 - q of the bin M - 1 values: count * 2**30 - sum q, exact modulo 2**32 (and below it)
        top_q = ir.Constant(_V8I, [1 << 30] * GROUP)
        b.store(b.sub(b.mul(b.load(self.count_l), top_q), b.load(self.sum_ql)), self.sum_ql)
        for k, lanes in enumerate((self.sum_q0, self.count_l, self.sum_ql)):
            slot = b.gep(self.acc, [ir.Constant(_I64, k)])
            b.store(b.add(b.load(slot), _lane_total(b, b.load(lanes))), slot)
        if self.validate:
            umax = _declare(b, "llvm.vector.reduce.umax.v8i32", _I32, [_V8I])
            seen = b.zext(b.call(umax, [b.load(self.top)]), _I64)
            slot = b.gep(self.acc, [ir.Constant(_I64, 3)])
            old = b.load(slot)
            b.store(b.select(b.icmp_unsigned(">", seen, old), seen, old), slot)
        return b.load(self.j)


def _check_types(p, lab, mk, lc, out, tot, acc) -> None:
    for name, arr in (("p", p), ("lab", lab), ("mk", mk), ("out", out), ("tot", tot), ("acc", acc)):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.layout != "C":
            raise TypingError(f"dominant_groups: {name} must be a contiguous 1-d array, got {arr}")
    if p.dtype != types.float32 or tot.dtype != types.float32 or out.dtype != types.uint32:
        raise TypingError("dominant_groups: p and tot must be float32 and out uint32")
    if lab.dtype != types.uint8 or lc != types.uint8:
        raise TypingError(f"dominant_groups: labels and lc must be uint8 (see _block_labels), got {lab.dtype}, {lc}")


def _make_dominant_groups(validate: bool, masked: bool):
    """The intrinsic for one (``validate``, ``masked``) variant (constants of the generated loop)."""

    @intrinsic
    def dominant_groups(typingctx, p, lab, mk, lc, t0, t1, table, out, j0, g0, g1, tot, acc):
        """``j = dominant_groups(p, lab, mk, lc, t0, t1, table, out, j0, g0, g1, tot, acc)``

        p: (n,) float32 row of one channel; lab: (n,) uint8 labels (:func:`_block_labels`); mk: (n,) uint8 mask
        (read only in the masked variant); lc: this channel's label, uint8; t0, t1: float32 thresholds
        (module docstring); table: :func:`compaction_table`; out: uint32 buffer, the non-dominant values written
        from ``j0`` on (float32 bits, hit flag in the sign bit; 8 lanes are stored per group, so 8 more than
        written must fit); groups ``g0 .. g1 - 1`` (values ``8 g0 .. 8 g1 - 1``); tot: (n,) float32 channel sums
        (``validate``); acc: (4,) int64 accumulated: sum of ``q`` in bin 0 / miss, count of bin ``M - 1`` /
        hit, sum of ``2**30 - q`` there, and the largest bit pattern seen (``validate``). Returns the new ``j``.
        """
        _check_types(p, lab, mk, lc, out, tot, acc)
        if t0 != types.float32 or t1 != types.float32:
            raise TypingError("dominant_groups: the thresholds must be float32")
        sig = types.intp(p, lab, mk, lc, t0, t1, table, out, j0, g0, g1, tot, acc)

        def codegen(context, builder, signature, args):
            loop = _GroupLoop(context, builder, signature, args, validate, masked)
            with cgutils.for_range(builder, loop.count) as it:
                loop.body(it.index)
            return loop.finish()

        return sig, codegen

    return dominant_groups


#: the four variants, by (validate, masked)
dominant_groups_checked = _make_dominant_groups(True, False)
dominant_groups_checked_masked = _make_dominant_groups(True, True)
dominant_groups_clamped = _make_dominant_groups(False, False)
dominant_groups_clamped_masked = _make_dominant_groups(False, True)


#: whether :func:`hist_voxels` may run (an AVX2 CPU; tests switch it off to run the portable kernel)
ENABLED = avx2_available()


def applies(p: np.ndarray, lab: np.ndarray, mask: np.ndarray) -> bool:
    """Whether :func:`hist_voxels` takes these arrays (on top of :func:`voxel_kernel_ok`): float32
    probabilities, uint8 labels, or int64 labels with at most 255 channels (the two label types segcal's
    readers and torch give; int16 / int32 labels stay on the portable kernel, which spares compilations),
    C-contiguous arrays, an AVX2 CPU (:data:`ENABLED`)."""
    arrays_ok = p.dtype == np.float32 and all(a.flags.c_contiguous for a in (p, lab, mask))
    labels_ok = lab.dtype == np.uint8 or (lab.dtype == np.int64 and p.shape[1] <= _NARROW_OUTSIDE)
    return ENABLED and arrays_ok and labels_ok


def thresholds(num_bins: int, right: bool) -> tuple[np.float32, np.float32, int]:
    """``(t0, t1, groups per call)`` of :func:`hist_voxels`: bin 0 is ``p < t0`` and bin ``M - 1`` is
    ``p >= t1`` (the float32 edges ``1 / M`` and ``(M - 1) / M``, or their next float32 up for
    ``closed="right"``), see the module docstring."""
    m = np.float32(num_bins)
    e1, e_last = np.float32(1.0) / m, np.float32(num_bins - 1) / m
    if right:
        e1, e_last = np.nextafter(e1, np.float32(2.0)), np.nextafter(e_last, np.float32(2.0))
    return np.float32(e1), np.float32(e_last), groups_per_call(float(e1), float(e_last))




#: what :func:`_block_labels` maps a label outside [0, 255) to: no channel's label when there are <= 255
_NARROW_OUTSIDE = 255


def _block_labels(lb, buf):
    """A block's labels as uint8 for :func:`dominant_groups`: uint8 labels as they are; int64 labels copied into
    ``buf``, those outside [0, 255) as 255. With at most 255 channels (:func:`applies`) a label matches channel
    ``c`` exactly when its narrowed form does, and the AVX2 pass reads one byte per voxel instead of eight."""
    raise NotImplementedError  # compiled only: see the overload below


@overload(_block_labels)
def _block_labels_impl(lb, buf):
    if lb.dtype == types.uint8:
        return lambda lb, buf: lb

    def narrow(lb, buf):
        n = lb.shape[0]
        for i in range(n):
            v = lb[i]
            buf[i] = np.uint8(v) if (v >= 0) & (v < _NARROW_OUTSIDE) else np.uint8(_NARROW_OUTSIDE)
        return buf[:n]

    return narrow


#: voxels per block of :func:`hist_voxels` (pass 2 sees only the written fifth of a block's values)
_BLOCK = 8192
#: the ``vpermd`` indices of :func:`hist_voxels` (:func:`compaction_table`)
COMPACTION_TABLE = compaction_table()


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _pack_kept_loop(kept, n, m, right, pk):  # pragma: no cover - compiled
    """Pass 1 of :func:`._kernels._pack_loop` for the values written by the AVX2 pass : ``kept[:n]`` uint32,
    a float32 in [0, 1] (validated, or clamped) with its hit flag in the sign bit."""
    values = kept.view(np.float32)
    for i in range(n):
        hit = kept[i] >= np.uint32(0x80000000)
        q, slot, _ = _pack_value(abs(values[i]), hit, 1, m, right, False)
        pk[2 * i] = q
        pk[2 * i + 1] = slot


@njit(nogil=True, boundscheck=False)
def _pack_kept(kept, n, m, right, pk):  # pragma: no cover - compiled
    """:func:`_pack_kept_loop` with ``right`` as a constant."""
    if right:
        _pack_kept_loop(kept, n, m, True, pk)
    else:
        _pack_kept_loop(kept, n, m, False, pk)


@njit(nogil=True, boundscheck=False)
def _dominant_row(pc, lb, mk, lc, t0, t1, fl, table, kept, tot, acc, validate, masked):  # pragma: no cover
    """The AVX2 pass over the whole groups of row ``pc`` (:func:`dominant_groups`, ``fl`` groups per
    call), then its last ``n % 8`` values written out as the AVX2 pass writes them (clamped, +0.0 for NaN and
    -0.0, hit in the sign bit; outside the mask: skipped) and validated by :func:`._kernels._row_validate`. Returns
    ``(written, written by the groups)``."""
    n = pc.shape[0]
    ng = n // 8
    j = 0
    for g0 in range(0, ng, fl):
        g1 = min(ng, g0 + fl)
        if validate:
            if masked:
                j = dominant_groups_checked_masked(pc, lb, mk, lc, t0, t1, table, kept, j, g0, g1, tot, acc)
            else:
                j = dominant_groups_checked(pc, lb, mk, lc, t0, t1, table, kept, j, g0, g1, tot, acc)
        elif masked:
            j = dominant_groups_clamped_masked(pc, lb, mk, lc, t0, t1, table, kept, j, g0, g1, tot, acc)
        else:
            j = dominant_groups_clamped(pc, lb, mk, lc, t0, t1, table, kept, j, g0, g1, tot, acc)
    j_groups = j
    values = kept.view(np.float32)
    for i in range(8 * ng, n):
        if masked and mk[i] == 0:
            continue
        v = _clamp01(pc[i])
        values[j] = v if v > np.float32(0.0) else np.float32(0.0)
        if lb[i] == lc:
            kept[j] |= np.uint32(0x80000000)
        j += 1
    if validate:
        _row_validate(pc[8 * ng :], tot[8 * ng : n])
    return j, j_groups


@njit(nogil=True, boundscheck=False)
def _add_dominant(acc, inside, validate, dst):  # pragma: no cover - compiled
    """Adds one task's and channel's dominant sums ``acc`` (see :func:`dominant_groups`) to ``dst``
    (3, M) (as :func:`._kernels._unpack_lanes`): bin 0 / miss counts the ``inside`` in-mask values of whole groups that
    were not written out, less those of bin ``M - 1`` / hit. Returns 1 where ``validate`` saw a value outside
    [+0, 1] or NaN, else 0."""
    m = dst.shape[1]
    count_l = acc[1]
    dst[0, 0] += inside - count_l
    dst[1, 0] += acc[0]
    dst[0, m - 1] += count_l
    dst[1, m - 1] += count_l * (1 << _QBITS) - acc[2]
    dst[2, m - 1] += count_l
    return 1 if validate and acc[3] > ONE_BITS else 0


@njit(nogil=True, boundscheck=False)
def _label_max(lb):  # pragma: no cover - compiled
    """Largest of the uint8 labels ``lb`` (vectorised)."""
    hi = np.uint8(0)
    for i in range(lb.shape[0]):
        hi = max(hi, lb[i])
    return hi


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def hist_voxels(  # pragma: no cover - compiled
    p, lab, first, mask, use_mask, right, validate, thr, chunk, t0, t1, fl, table, out, vstats, labels_max
):
    """:func:`._kernels._hist_voxels` for float32 probabilities on AVX2 CPUs (same arguments, plus the thresholds
    ``t0``, ``t1``, the groups per call ``fl``, :data:`COMPACTION_TABLE` and the output ``labels_max``; ``p``,
    ``lab`` and ``mask`` C-contiguous). Same result, bit for bit: the same slots, counts and fixed-point sums.

    Per block of ``_BLOCK`` voxels and channel, :func:`_dominant_row` sums the two dominant slots (bin 0 /
    miss, bin ``M - 1`` / hit) in vector registers and writes the other values out; pass 2 bins and scatters
    only those (:func:`_pack_kept`, :func:`._kernels._scatter_packed`). Per task and channel the dominant sums join the
    lane tables when they are unpacked: bin 0 / miss counts ``in-mask values - written - bin M - 1 / hit``.
    Validation: as :func:`._kernels._hist_voxels` (channel sums off 1 by more than ``thr``), plus one flag per task and
    channel where the largest bit pattern seen is above that of 1.0 (a value outside [+0, 1] or NaN). With
    ``validate``, ``labels_max`` (tasks,) int64 gets each task's largest label as :func:`_block_labels` narrows
    it (with at most 255 channels, any label outside ``[0, C)`` gives one ``>= C``), read from the block of
    labels already in cache, so that the caller's range check needs no pass of its own over the labels.
    """
    nb, nc, s = p.shape
    m = out.shape[3]
    kc = nc - first
    width = 2 * m + 1
    n_chunks = (s + chunk - 1) // chunk
    n_tasks = nb * n_chunks
    partial = np.zeros((n_tasks, kc, 3, m))
    for t in prange(n_tasks):
        b, s0, s1 = task_range(t, n_chunks, chunk, s)
        h = np.zeros((kc, _LANES, width), np.int64)
        acc = np.zeros((kc, 4), np.int64)  # sum q bin 0 / miss, count and sum 2**30 - q bin M - 1 / hit, max bits
        inside = np.zeros(kc, np.int64)  # in-mask values of whole groups not written out
        kept = np.empty(_BLOCK + 8, np.uint32)
        narrowed = np.empty(_BLOCK, np.uint8)  # int64 labels as uint8 (_block_labels)
        pk32 = np.empty(2 * _BLOCK, np.int32)
        pk = pk32.view(np.int64)
        tot = np.zeros(_BLOCK, np.float32)
        bad = np.zeros(_BLOCK, np.int32)
        hi = 0
        for a0 in range(s0, s1, _BLOCK):
            a1 = min(s1, a0 + _BLOCK)
            n = a1 - a0
            n8 = n // 8 * 8
            lb = _block_labels(lab[b, a0:a1], narrowed)
            if validate:
                hi = max(hi, np.int64(_label_max(lb)))
            mk = mask[b, a0:a1] if use_mask else mask[0, 0:0]
            in8 = n8
            if use_mask:
                in8 = 0
                for i in range(n8):
                    in8 += mk[i] != 0
            tot[:] = 0.0
            if validate and first > 0:
                for c in range(first):
                    _row_validate(p[b, c, a0:a1], tot[:n])
            for c in range(first, nc):
                k = c - first
                j, j8 = _dominant_row(p[b, c, a0:a1], lb, mk, np.uint8(c), t0, t1, fl, table, kept, tot,
                                      acc[k], validate, use_mask)
                inside[k] += in8 - j8
                _pack_kept(kept, j, m, right, pk32)
                _scatter_packed(pk, j, h[k])
            if validate:
                _mark_sums_off(tot, n, thr, bad)
        nbad = 0
        for i in range(_BLOCK):
            nbad += bad[i]
        for c in range(kc):
            _unpack_lanes(h[c], h[c], False, partial[t, c])
            nbad += _add_dominant(acc[c], inside[c], validate, partial[t, c])
        vstats[t] = nbad
        labels_max[t] = hi
    _merge_partials(partial, n_chunks, False, out)
