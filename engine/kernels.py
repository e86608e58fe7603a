"""Numba CPU kernels on weights in their GGUF block formats: dense and row-subset matvec, axpy over rows of a
transposed matrix, and the fused sparse FFN of the decode path.

Decode is memory-bandwidth bound, so weights stay in their stored formats (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1; the K-quants Q6_K, Q5_K, Q4_K, Q3_K and Q2_K in blocks of 32, below). `prepare` only regroups each row's
blocks into parts, which costs no extra bytes (the K-quants' scales a few, below): a block type's parts (`PARTS`)
are views of the columns of one buffer, so a row is one run of bytes (quants, scales, ...), and a scattered row of
the sparse FFN is fetched as one (as separate arrays, a Q4_1 row was three runs in three places; one run made a
49152 x 576 Q4_1 matvec 537 -> 465 us, Q5_0 634 -> 555 us, on 2 threads):

    F32 / F16   w  f32 | u16 (f16 bits)  (rows, cols)
    Q8_0        w  i8  (rows, cols)        d u16 (rows, nb)                                        value = d * q
    Q4_0        w  u8  (rows, cols / 2)    d u16 (rows, nb)                                        value = d * (q - 8)
    Q4_1        w  u8  (rows, cols / 2)    d u16 (rows, nb)  m u16 (rows, nb)                      value = d * q + m
    Q5_0        w  u8  (rows, cols / 2)    d u16 (rows, nb)                    h u8 (rows, 4 nb)  value = d * (q - 16)
    Q5_1        w  u8  (rows, cols / 2)    d u16 (rows, nb)  m u16 (rows, nb)  h u8 (rows, 4 nb)  value = d * q + m
    Q6_K        w  u8  (rows, cols / 2)    d u16 (rows, nb)  m u32 (rows, nb/8)  h u64 (rows, nb)  value = d sc (q - 32)
    Q3_K        w  u64 (rows, nb)          d u16 (rows, nb)  m u32 (rows, nb/8)  h u8 (rows, 4 nb)  value = d sc (q - 4)
    Q2_K        w  u64 (rows, nb)          d u16 (rows, nb)  m u32 (rows, nb/8)                  value = d sc q - dmin m
    Q4_K        w  u8  (rows, cols / 2)    d u16 (rows, nb)  m u32 (rows, nb/8)                  value = d sc q - dmin m
    Q5_K        w  u8  (rows, cols / 2)    d u16 (rows, nb)  m u32 (rows, nb/8)  h u8 (rows, 4 nb)  (as Q4_K)

with nb = cols / 32 blocks per row and Q4 bytes as in GGUF (byte j of a block holds element j in its low
nibble and element j + 16 in its high nibble); Q5 adds each element's fifth bit, bit j of a block's 4 bytes of h
(little-endian) for element j, and the kernels put it back in the block's quants as they load them (`_quants`).
The K-quants' 256-value super-blocks `prepare` re-lays in blocks of 32 with the same values (`RELAYOUT`; Q8_0
copies took 8.5 bits a weight): d holds a block's two bytes of scales and m its super-block's f16 d (low half) and
dmin (high; 0 for Q6_K and Q3_K), once for 8 blocks, so the products of scales and d are exact in float32. Q6_K,
Q3_K and Q2_K scale each 16 values on their own: d holds the two int8 sub-scales sc of a block (Q2: 4-bit sc in
the low nibbles, 4-bit mins m in the high ones); Q6 takes bits 4 and 5 from a u64 of h a block (element j's two at
bits 2 (j // 8) of byte j % 8), Q3 its low 2 bits from a u64 of w laid out alike and bit 2 from a plane of h, Q2
its 2 bits from w alone. Q4_K and Q5_K scale each 32 values with 6-bit sc and m: their quants are laid as Q4_1's
and Q5_1's, d holds a block's sc (low byte) and m (high byte). Bits a weight: Q6_K 6.625, Q5_K 5.625, Q4_K 4.625,
Q3_K 3.625, Q2_K 2.625, against 6.5625, 5.5, 4.5, 3.4375 and 2.625 in the file (with d in each block of 32 Q6_K,
Q3_K and Q2_K took 7, 4 and 3.5; Q4_K and Q5_K read as Q4_1 and Q5_1, 5 and 6, their scale products rounded to
f16).

Numba cannot type float16 and its integer arithmetic widens to int64, which LLVM will not vectorize; left to
itself it vectorizes the loop over blocks instead of the 32 weights inside one (2-4 Gweights/s). So the work
on a row of 32-weight blocks is written as LLVM vector code (`_dot_row`, `_axpy_block`, `_widen`): each block's
products go into vector accumulators with the block's scale, and a row ends with one horizontal sum (summing
every block across its lanes cost as much as its products). Only the int8 dot product of one block depends on
the host (`ISA`): vpdpbusd with AVX-512 VNNI or AVX-VNNI, vpmaddubsw + vpmaddwd with AVX2, and generic widened
products elsewhere (a test runs each path); everything else is generic IR (vcvtph2ps + vfmadd231ps for F16 on
x86). Around them everything is plain numba; the per-row helpers are typed `overload`s inlined into the kernels
(a call per row, with numba's exploded array arguments, cost a third of the speed).

Block types have two paths for `W @ x`:
  fast (default)  x is quantized once per call to int8 per 32-block (ggml's Q8_0 activations) and each block is
                  an integer dot with int32 accumulation; relative error ~5e-3 on random data. For the K-quants
                  each block's scale is a whole multiple (1..32) of a unit shared by its super-block (`_prep_x`),
                  so a super-block's products times their sub-scales and multiples sum in integers, converted
                  and scaled once (`_dot_row`), as ggml's Q8_K activations do with one scale for 256 values
                  (whose error on normal x is 1.2x ours).
  exact           f32 x; error at f32 rounding.
Per-block sums of x are precomputed once per call, so the Q4 offset costs one fma per block:
  sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j.

A KMatrix owns small scratch buffers for the prepared x and per-thread partial sums, so calls allocate nothing;
one KMatrix must not be used by two Python threads at once. Threads: `numba.set_num_threads` by the caller.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import platform
import shutil
import stat
import sys
import tempfile
import warnings

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants
from llvmlite import binding as llvm, ir
from numba import njit, prange, types
from numba.core import caching, cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from engine.qtensor import AS_NATIVE, QTensor

ACT_SILU, ACT_RELU, ACT_FATRELU, ACT_DRELU = 0, 1, 2, 3  # FFN activation codes

BLOCK = 32  # weights per block, for every block type here
PREFETCH = 4  # the sparse FFN fetches the rows of the neuron this many places ahead (into L2), a thread's first
# this many before its loop
AHEAD = 4096  # bytes: loops over consecutive rows fetch the row about this far ahead (into L2)
DENSE_FROM = 0.75  # ffn with `down`: active sets of at least this share of n_ff go through the untransposed down
BLOCK_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# a block type's parts in KMatrix.W order, w (quants), d, m, h: the bytes a:b of each GGUF block, read as dtype. A
# prepared row holds its parts end to end, quants first, so the sparse FFN's scattered rows are one run of bytes
PARTS = {QT.Q8_0: ((2, 34, np.int8), (0, 2, np.uint16), None, None),
         QT.Q4_0: ((2, 18, np.uint8), (0, 2, np.uint16), None, None),
         QT.Q4_1: ((4, 20, np.uint8), (0, 2, np.uint16), (2, 4, np.uint16), None),
         QT.Q5_0: ((6, 22, np.uint8), (0, 2, np.uint16), None, (2, 6, np.uint8)),
         QT.Q5_1: ((8, 24, np.uint8), (0, 2, np.uint16), (2, 4, np.uint16), (4, 8, np.uint8)),
         # the K-quants, re-laid by `prepare` in blocks of 32 with the same values (`RELAYOUT`: their bytes there):
         # a block's two bytes of scales in d, the super-block's f16 d and dmin (0 for Q6_K and Q3_K) in m, one u32
         # a super-block (a part marked "super": its first block's bytes alone). Q6_K, Q3_K: two int8 sub-scales
         # (sub-blocks of 16); Q2_K: two bytes of a 4-bit scale and min; Q4_K, Q5_K: a 6-bit scale and min
         QT.Q6_K: ((14, 30, np.uint8), (0, 2, np.uint16), (2, 6, np.uint32, "super"), (6, 14, np.uint64)),
         QT.Q3_K: ((10, 18, np.uint64), (0, 2, np.uint16), (2, 6, np.uint32, "super"), (6, 10, np.uint8)),
         QT.Q2_K: ((6, 14, np.uint64), (0, 2, np.uint16), (2, 6, np.uint32, "super"), None),
         QT.Q4_K: ((6, 22, np.uint8), (0, 2, np.uint16), (2, 6, np.uint32, "super"), None),
         QT.Q5_K: ((10, 26, np.uint8), (0, 2, np.uint16), (2, 6, np.uint32, "super"), (6, 10, np.uint8))}
SUPER_TYPES = (QT.Q6_K, QT.Q3_K, QT.Q2_K, QT.Q4_K, QT.Q5_K)
SUPER = 8  # blocks a super-block of SUPER_TYPES (their rows are whole super-blocks)
XM = 32  # int8 x of the K-quants' integer sums: a block's scale is 1..XM times its super-block's unit (`_prep_x`)
assert 128 * XM < 2**15 and 8 * 2 * 16002 * 128 * XM + 32 * 2 * 2032 * 128 * XM < 2**31  # int16 scales, int32 sums
KERNEL_TYPES = (QT.F32, QT.F16) + BLOCK_TYPES + SUPER_TYPES  # what the kernels read; anything else (BF16) is widened


def host_isa() -> str:
    """The int8 dot product of the block kernels: "vnni512" (512-bit vpdpbusd over two blocks at a time: AVX-512
    VNNI and BW), "vnni" (256-bit vpdpbusd, a block at a time: AVX-VNNI), "avx2" (vpmaddubsw + vpmaddwd) or
    "generic" (widened products, any LLVM target). Generic when numba compiles for a named CPU (NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES, portable caches) rather than for this host."""
    if platform.machine().lower() not in ("x86_64", "amd64") or numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "generic"
    f = llvm.get_host_cpu_features()
    if f.get("avx512vnni") and f.get("avx512bw") and f.get("avx512vl"):
        return "vnni512"
    if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
        return "vnni"
    return "avx2" if f.get("avx2") else "generic"


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _private_dir(path: str) -> bool:
    """path made (mode 700) or found as a directory of this user's that no one else can write: numba's cache files
    are pickles, so a folder another user prepared under a guessable name in /tmp would run their code."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _drop_old_caches(folder: str, keep: str) -> None:
    """New sources (an upgrade, an edit): the kernels of the old ones in folder are dead weight."""
    if not os.path.isdir(keep):
        for old in glob.glob(os.path.join(glob.escape(folder), "numba-*")):
            if old != keep:  # made meanwhile by a process of these sources
                shutil.rmtree(old, ignore_errors=True)


def _cache_by_source() -> bool:
    """Cache the engine's compiled kernels in a folder named after a digest of the engine's sources. numba checks
    only a cached function's own file, and cpu.py and hybrid.py inline this module's helpers: after a change here
    they would load their old code. The folder is in the package's __pycache__, where the folders of other sources
    are removed; under NUMBA_CACHE_DIR/hotcold when that is set, or the user's cache when the package is read-only
    (shared places: nothing is removed there). Where that folder cannot be made or written (a read-only package
    run by a user without a home), a private folder in the temporary directory, with a note; False (no caching: each
    run compiles) where none can be written."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(here) if f.endswith(".py")):
        with open(os.path.join(here, name), "rb") as fh:
            digest.update(name.encode() + fh.read())
    name = "numba-" + digest.hexdigest()[:16]
    shared = os.environ.get("NUMBA_CACHE_DIR") or (
        None if os.access(here, os.W_OK) else
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))
    cache = os.path.join(shared, "hotcold", name) if shared else os.path.join(here, "__pycache__", name)
    if not shared:
        _drop_old_caches(os.path.join(here, "__pycache__"), cache)
    if _writable_dir(cache):
        numba.config.CACHE_DIR = cache
        return True
    private = os.path.join(tempfile.gettempdir(), f"hotcold-{os.getuid()}")
    fallback = os.path.join(private, name)
    if _private_dir(private):
        _drop_old_caches(private, fallback)
        if _writable_dir(fallback):
            numba.config.CACHE_DIR = fallback
            print(f"hotcold: note: kernel cache {cache} cannot be written; using {fallback}", file=sys.stderr)
            return True
    print(f"hotcold: note: no kernel cache can be written ({cache}): each run compiles the kernels", file=sys.stderr)
    return False


def _cache_writes_may_fail() -> None:
    """A kernel that cannot be cached (a full disk under the cache) costs the next process its compile, not this
    one its run: numba's OSError there (through Cache.save_overload, its one entry for writing) becomes a note."""
    save = caching.Cache.save_overload
    warned = []

    def save_overload(self, sig, data):
        try:
            save(self, sig, data)
        except OSError as e:
            if not warned:
                warned.append(e)
                print(f"hotcold: note: kernels not cached in {numba.config.CACHE_DIR or e.filename} "
                      f"({e.strerror or e}): the next run compiles them again", file=sys.stderr)
    caching.Cache.save_overload = save_overload


CACHED = _cache_by_source()  # before any kernel is defined: numba reads it as each one is decorated
_cache_writes_may_fail()
ISA = host_isa()  # read when a kernel is compiled; numba's cache is keyed by the CPU name and features, so it
# follows the host (set by hand only with a cache of its own, as the tests do)
# numpy's error model: x / 0 and x / NaN give inf or NaN, as in numpy, and the checks go (numba's Python model,
# under fastmath, raised ZeroDivisionError on a NaN divisor: an f16 KV cache past 65504 was a traceback mid-decode)
_SERIAL = dict(nogil=True, cache=CACHED, fastmath=True, error_model="numpy")
_PARALLEL = dict(_SERIAL, parallel=True)
# Helpers with float sums that kernels call (here and in cpu.py) are inline="always": each kernel then carries its
# own copy. A called helper could resolve, in a process that loads kernels from numba's cache, to another compiled
# copy that rounded its sums differently, and the first (compiling) run decoded differently from the next. The
# body of a parallel loop is such a function too (numba generates it), so long sums inside one go through `_dot`,
# whose order no optimization changes; the short per-block offset sums of `_row_dot` are left plain (the tests
# that decode past position 32 in a compiling and a cached run agree).
# numba's typed inliner leaves the loop variables of an inlined helper out of the caller's scope bookkeeping
# and reports it from a pedantic internal check; the generated code is unaffected. Some numba builds (0.68.0 on a
# GPU host) put terminal colour codes before the text.
INLINER_WARNING = r"(\x1b\[[0-9;]*m)*variable '_row_"
warnings.filterwarnings("ignore", message=INLINER_WARNING, category=NumbaIRAssumptionWarning)

# ---------------------------------------------------------------------------------------------------------
# LLVM vector code for a row of 32-weight blocks (generic IR but for the int8 products of `_i8_dot`)

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_FAST = ("fast",)
_ORDERED = ("nnan", "ninf", "nsz", "arcp", "contract", "afn")  # fast but for reassoc: sums in the written order


def _vec(t, n):
    return ir.VectorType(t, n)


def _ptr(context, builder, aryty, ary, idx):
    """Address of ary[idx] for a 1-D C-contiguous array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [idx], inbounds=True)


def _load(context, builder, aryty, ary, idx, n):
    """<n x dtype> from ary[idx : idx + n]."""
    elt = context.get_data_type(aryty.dtype)
    p = _ptr(context, builder, aryty, ary, idx)
    return builder.load(builder.bitcast(p, _vec(elt, n).as_pointer()), align=1)


def _splat(builder, v, n):
    vec = builder.insert_element(ir.Constant(_vec(v.type, n), None), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(_vec(_I32, n), [0] * n))


def _kind(qty, hty) -> str:
    """A block row's format from its parts' types (the module docstring's table): "q8" (i8 quants), "q4" (u8
    nibbles), "q5" (nibbles and a plane of fifth bits), and with two scales a block (`PER16`) "q6" (nibbles and a
    u64 of bit pairs a block), "q3" (u64 words of 2-bit quants and a plane of third bits) or "q2" (the u64 words
    alone)."""
    if qty.dtype == types.uint64:
        return "q2" if hty is types.none else "q3"
    if hty is not types.none and hty.dtype == types.uint64:
        return "q6"
    if qty.dtype == types.int8:
        return "q8"
    return "q4" if hty is types.none else "q5"


SIGNED = ("q8", "q6", "q3")  # kinds whose quants `_quants` gives as int8 values (zero points taken off)
PER16 = ("q6", "q3", "q2")  # kinds with two scales a block (sub-blocks of 16)
ZERO = {"q6": 32, "q3": 4}  # the value of a stored quant that stands for 0


def _plane(context, builder, hty, hb, b, n):
    """<32 n x i1>: the bit plane of blocks b..b+n-1 (4 bytes a block): lane 32 i + j is bit j of the block's 4
    little-endian bytes, one bit a quant (a mask register, kmov, on AVX-512, where spreading the bytes over the
    lanes (vpshufb, vptestmb) made a 49152 x 576 Q5_0 matvec 669 us against 642, 2 threads)."""
    bits = _load(context, builder, hty, hb, builder.mul(b, ir.Constant(b.type, 4)), 4 * n)  # <4 n x i8>
    return builder.bitcast(builder.bitcast(bits, ir.IntType(BLOCK * n)), _vec(ir.IntType(1), BLOCK * n))


def _pairs(context, builder, words, b, n, rotate):
    """<32 n x i8>: the 2-bit fields of blocks b..b+n-1's u64 words (element j's at bits 2 (j // 8) of byte
    j % 8), each moved to bits 0-1 (rotate False) or 4-5 (True) of its lane: a word spread over 4 lanes of i64,
    each shifted (vpsrlvq) or rotated (vprolvq) by its own count, then masked."""
    ty, q = words
    w = _load(context, builder, ty, q, b, n)  # <n x i64>
    i64s, i8s = _vec(ir.IntType(64), 4 * n), _vec(ir.IntType(8), BLOCK * n)
    spread = builder.shuffle_vector(w, w, ir.Constant(_vec(_I32, 4 * n), [k // 4 for k in range(4 * n)]))
    if rotate:  # left by 4, 2, 0, 62: bits 2 s..2 s+1 of each byte to bits 4-5
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64s, [i64s] * 3),
                                            f"llvm.fshl.v{4 * n}i64")
        moved = builder.call(fn, [spread, spread, ir.Constant(i64s, [(4 - 2 * (k % 4)) % 64 for k in range(4 * n)])])
    else:
        moved = builder.lshr(spread, ir.Constant(i64s, [2 * (k % 4) for k in range(4 * n)]))
    return builder.and_(builder.bitcast(moved, i8s), ir.Constant(i8s, [0x30 if rotate else 3] * BLOCK * n))


def _quants(context, builder, kind, qty, q, b, n=1, hty=types.none, hb=None, signed=True):
    """<32 n x i8> quants of blocks b..b+n-1 of one row, in element order (`_kind`): Q8_0 bytes; Q4 nibbles; Q5's
    with 16 added where the plane of fifth bits (hb, 4 bytes a block) sets the element's bit; Q6's with bits 4 and
    5 from hb's u64 a block (element j's at bits 2 (j // 8) of byte j % 8), less 32; Q3's 2-bit quants (the same
    layout, in q's u64 words) with 4 from a plane, less 4 (signed False: Q6's and Q3's as stored, 0..63, 0..7);
    Q2's 2-bit quants as Q3's, 0..3 (no zero point: its mins are apart, `_sub_scales`)."""
    if kind == "q8":
        return _load(context, builder, qty, q, builder.mul(b, ir.Constant(b.type, BLOCK)), BLOCK * n)
    i8s = _vec(ir.IntType(8), BLOCK * n)
    if kind in ("q3", "q2"):
        base = _pairs(context, builder, (qty, q), b, n, False)
    else:
        h = BLOCK // 2
        half = _load(context, builder, qty, q, builder.mul(b, ir.Constant(b.type, h)), h * n)
        lo = builder.and_(half, ir.Constant(half.type, [15] * h * n))  # elements 0..15 of each block
        hi = builder.lshr(half, ir.Constant(half.type, [4] * h * n))  # elements 16..31
        order = [o + k * h + j for k in range(n) for o in (0, h * n) for j in range(h)]  # block k: lo k, then hi k
        base = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, BLOCK * n), order))
    if kind == "q6":  # bits 4 and 5 from the u64 words of pairs (a plane of each took 1.3x as long)
        base = builder.or_(base, _pairs(context, builder, (hty, hb), b, n, True))
    elif kind not in ("q4", "q2"):
        on = _plane(context, builder, hty, hb, b, n)
        add = {"q5": 16, "q3": 4}[kind]
        base = builder.or_(base, builder.select(on, ir.Constant(i8s, [add] * BLOCK * n), ir.Constant(i8s, None)))
    return builder.sub(base, ir.Constant(i8s, [ZERO[kind]] * BLOCK * n)) if kind in ZERO and signed else base


def _extend(builder, signed, q, ty):
    """Widen a block's quants to vector type ty (int or float), signed (`SIGNED` kinds) or unsigned."""
    if isinstance(ty.element, ir.FloatType):
        return builder.sitofp(q, ty) if signed else builder.uitofp(q, ty)
    return builder.sext(q, ty) if signed else builder.zext(q, ty)


def _reduce(builder, v):
    """The sum of a float vector's lanes."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32, [_F32, v.type]), f"llvm.vector.reduce.fadd.v{v.type.count}f32")
    return builder.call(fn, [ir.Constant(_F32, 0.0), v], fastmath=_FAST)


def _is_row(ty, dtypes):
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C" and ty.dtype in dtypes


def _high_ok(hb):
    """A row of high bits (u8 planes, or Q6's u64 words), or None."""
    return hb is types.none or _is_row(hb, (types.uint8, types.uint64))


def _like(v, t):
    """Type t, or a vector of t as long as v is one."""
    return _vec(t, v.type.count) if isinstance(v.type, ir.VectorType) else t


def _const(ty, value):
    """A constant of integer or float type ty, splat when ty is a vector."""
    return ir.Constant(ty, [value] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, value)


def _f16_to_f32(builder, v):
    """float32 of an i16 (or a vector of them) holding f16 bits: vcvtph2ps on AVX2 and VNNI hosts (they all have
    F16C). Elsewhere LLVM may lower it to a call to compiler-rt's __extendhfsf2, which numba's JIT cannot link
    (NUMBA_CPU_NAME=generic aborted), so the generic path converts the bits with integer ops: the exponent and
    mantissa moved into place and rescaled by 2^112 (exact, subnormals included), inf and NaN kept."""
    f32 = _like(v, _F32)
    if ISA != "generic":
        return builder.fpext(builder.bitcast(v, _like(v, ir.HalfType())), f32)
    i32 = _like(v, _I32)
    h = builder.zext(v, i32)
    bits = builder.shl(builder.and_(h, _const(i32, 0x7FFF)), _const(i32, 13))
    finite = builder.bitcast(builder.fmul(builder.bitcast(bits, f32), _const(f32, 2.0 ** 112)), i32)
    special = builder.icmp_unsigned("==", builder.and_(h, _const(i32, 0x7C00)), _const(i32, 0x7C00))
    mag = builder.select(special, builder.or_(bits, _const(i32, 0x7F800000)), finite)
    sign = builder.shl(builder.and_(h, _const(i32, 0x8000)), _const(i32, 16))
    return builder.bitcast(builder.or_(mag, sign), f32)


def _f32_to_f16(builder, x):
    """f16 bits (i16) of a float32, rounded to nearest even: vcvtps2ph where `_f16_to_f32` uses vcvtph2ps, else
    integer ops (the call LLVM would emit, __truncsfhf2, is missing too): past 65520 -> inf, NaN -> a quiet NaN,
    below 2^-14 -> rounded by adding 0.5 in float32 (whose ulp there is f16's subnormal step), else the mantissa
    rounded in the integer bits, a carry moving into the exponent."""
    if ISA != "generic":
        return builder.bitcast(builder.fptrunc(x, ir.HalfType()), ir.IntType(16))
    c = lambda value: ir.Constant(_I32, value)  # noqa: E731
    u = builder.bitcast(x, _I32)
    sign = builder.and_(u, c(0x80000000))
    a = builder.xor(u, sign)  # |x| bits
    big = builder.select(builder.icmp_unsigned(">", a, c(0x7F800000)), c(0x7E00), c(0x7C00))
    half = ir.Constant(_F32, 0.5)
    small = builder.sub(builder.bitcast(builder.fadd(builder.bitcast(a, _F32), half), _I32), c(126 << 23))
    odd = builder.and_(builder.lshr(a, c(13)), c(1))
    normal = builder.lshr(builder.add(builder.add(a, c(((15 - 127) << 23) + 0xFFF)), odd), c(13))
    o = builder.select(builder.icmp_unsigned(">=", a, c((127 + 16) << 23)), big,
                       builder.select(builder.icmp_unsigned("<", a, c(113 << 23)), small, normal))
    return builder.trunc(builder.or_(o, builder.lshr(sign, c(16))), ir.IntType(16))


@intrinsic
def _widen(typingctx, v):
    """float32 of a stored value: uint16 holds f16 bits (vcvtph2ps), float32 passes through."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v == types.uint16:
        return types.float32(v), lambda context, builder, sig, args: _f16_to_f32(builder, args[0])
    return None


def _widened_dot(builder, q, xv, per16=False, init=None):
    """<8 x i32> partial sums of the products q_j * x_j, q <32 x i32> and x <32 x i8 or i16> sign-extended: the
    generic path of `_i8_dot` and `_i16_dot` (any LLVM target). per16: lane l sums products 4 l..4 l+3, as the x86
    paths' lanes do (lanes 0-3 the block's first 16 values), else products l, l + 8, l + 16, l + 24."""
    p = builder.mul(q, builder.sext(xv, q.type))
    i32x8 = _vec(_I32, 8)
    lanes = (lambda k: [4 * j + k for j in range(8)]) if per16 else (lambda k: list(range(8 * k, 8 * k + 8)))
    parts = [builder.shuffle_vector(p, p, ir.Constant(i32x8, lanes(k))) for k in range(4)]
    out = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
    return out if init is None else builder.add(out, init)


def _i8_dot(builder, signed, qv, xv, per16=False, init=None):
    """<8 x i32> partial sums of one block's 32 products q_j * x_j (<32 x i8> each; q unsigned (Q4, Q5, and Q6 and
    Q3 as stored) or signed (Q8_0), x signed), by ISA: vpdpbusd (VNNI), vpmaddubsw + vpmaddwd (AVX2), or widened
    products (generic); <16 x i32> of two blocks' 64 (lanes 0-7 the first block) with 512-bit vpdpbusd (vnni512
    only). Lane l of a block holds products 4 l..4 l+3 on x86 (and on the generic path with per16). init: the
    lanes' start (None: 0)."""
    i8s, i32s = _vec(ir.IntType(8), qv.type.count), _vec(_I32, qv.type.count // 4)
    if ISA == "generic":
        return _widened_dot(builder, _extend(builder, signed, qv, _vec(_I32, BLOCK)), xv, per16, init)
    # both instructions take unsigned q and signed x; x is never -128 (_prep_x), so negating it cannot wrap and
    # pairs of products fit vpmaddubsw's i16: 128 * 127 * 2 < 2^15
    if signed:  # |q| * (x with q's sign); |-128| (Q8_0) wraps to 0x80, read as 128
        neg = builder.icmp_signed("<", qv, ir.Constant(i8s, None))
        xv = builder.select(neg, builder.sub(ir.Constant(i8s, None), xv), xv)
        qv = builder.select(neg, builder.sub(ir.Constant(i8s, None), qv), qv)
    if ISA in ("vnni", "vnni512"):  # declared with i32 operands as LLVM before 22 has it; LLVM 22 upgrades the call
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32s, [i32s, i32s, i32s]),
                                            f"llvm.x86.avx512.vpdpbusd.{i32s.count * 32}")
        start = ir.Constant(i32s, None) if init is None else init
        return builder.call(fn, [start, builder.bitcast(qv, i32s), builder.bitcast(xv, i32s)])
    i16x16 = _vec(ir.IntType(16), 16)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16x16, [i8s, i8s]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    out = _pair_dot(builder, builder.call(maddubs, [qv, xv]), ir.Constant(i16x16, [1] * 16))
    return out if init is None else builder.add(out, init)


def _i16_dot(builder, signed, qv, xv, per16=False, init=None):
    """<8 x i32> partial sums of one block's 32 products q_j * x_j, q as in `_i8_dot` and x <32 x i16>: vpmaddwd
    on AVX2 and VNNI hosts, widened products elsewhere. |q x| <= 128 * 32767: a block's sum fits in i32. Two
    blocks (<64 x ...>, vnni512 only): <16 x i32> by 512-bit vpmaddwd, lanes 0-7 the first block. per16: lane l
    of a block sums products 4 l..4 l+3 (adjacent pairs of vpmaddwd's lanes), so lanes 0-3 hold its first 16."""
    n = qv.type.count
    qw = _extend(builder, signed, qv, _vec(ir.IntType(16), n))
    if ISA == "generic":
        return _widened_dot(builder, builder.sext(qw, _vec(_I32, n)), xv, per16, init)
    w = 16 if n == BLOCK else 32  # i16 lanes of one vpmaddwd
    i16s, i32s = _vec(ir.IntType(16), w), _vec(_I32, w // 2)
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32s, [i16s, i16s]),
                                            "llvm.x86.avx2.pmadd.wd" if w == 16 else "llvm.x86.avx512.pmaddw.d.512")

    def part(v, k):
        return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), list(range(w * k, w * k + w))))
    a, b = (builder.call(maddwd, [part(qw, k), part(xv, k)]) for k in (0, 1))
    if per16:  # adjacent lanes of a (block 0, or its first half) then of b
        pairs = lambda o: ir.Constant(_vec(_I32, w // 2), list(range(o, w, 2)))  # noqa: E731
        out = builder.add(builder.shuffle_vector(a, b, pairs(0)), builder.shuffle_vector(a, b, pairs(1)))
        return out if init is None else builder.add(out, init)
    if w == 16:
        return builder.add(a, b)
    lanes = lambda o: ir.Constant(_vec(_I32, 16), list(range(o, o + 8)) + list(range(16 + o, 24 + o)))  # noqa: E731
    return builder.add(builder.shuffle_vector(a, b, lanes(0)), builder.shuffle_vector(a, b, lanes(8)))


def _scaled_dot(builder, qv, xv, sv, acc):
    """acc + <8 n x i32>: the products q_j x_j of n blocks (q <32 n x i8> unsigned, below 64; x signed int8) in
    pairs, each pair times its lane of sv <16 n x i16> (its scale): vpmaddubsw then vpdpwssd (VNNI) or vpmaddwd and
    an add (AVX2); widened products elsewhere (n = 1). Pairs stay below 2 * 63 * 127 (no saturation); lane l of a
    block sums its products 4 l..4 l+3."""
    n = qv.type.count // BLOCK
    i32s = _vec(_I32, 8 * n)
    if ISA == "generic":
        s = builder.sext(builder.shuffle_vector(sv, sv, ir.Constant(i32s, list(range(0, 16, 2)))), i32s)
        return builder.add(acc, builder.mul(_widened_dot(builder, builder.zext(qv, _vec(_I32, BLOCK)), xv, True), s))
    i16s = _vec(ir.IntType(16), 16 * n)
    name = "llvm.x86.avx2.pmadd.ub.sw" if n == 1 else "llvm.x86.avx512.pmaddubs.w.512"
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16s, [qv.type, xv.type]), name)
    p = builder.call(maddubs, [qv, xv])
    if ISA in ("vnni", "vnni512"):  # i32 operands, as `_i8_dot`'s vpdpbusd
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32s, [i32s, i32s, i32s]),
                                            f"llvm.x86.avx512.vpdpwssd.{256 * n}")
        return builder.call(fn, [acc, builder.bitcast(p, i32s), builder.bitcast(sv, i32s)])
    return builder.add(acc, _pair_dot(builder, p, sv))


def _pair_dot(builder, a, b):
    """<8 x i32>: a_2k b_2k + a_2k+1 b_2k+1 of two <16 x i16> (vpmaddwd on x86; the AVX2 int8 products' second
    step)."""
    if ISA == "generic":
        p = builder.mul(builder.sext(a, _vec(_I32, 16)), builder.sext(b, _vec(_I32, 16)))
        return builder.add(*(builder.shuffle_vector(p, p, ir.Constant(_vec(_I32, 8), list(range(o, 16, 2))))
                             for o in (0, 1)))
    i16x16, i32x8 = _vec(ir.IntType(16), 16), _vec(_I32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32x8, [i16x16, i16x16]),
                                        "llvm.x86.avx2.pmadd.wd")
    return builder.call(fn, [a, b])


def _f16_pair(builder, dd):
    """<2 x f32>: the f16 numbers in the low and high halves of an i32 (a super-block's d and dmin)."""
    pair = builder.bitcast(builder.insert_element(ir.Constant(_vec(_I32, 1), None), dd, ir.Constant(_I32, 0)),
                           _vec(ir.IntType(16), 2))
    return _f16_to_f32(builder, pair)


def _times_lane(builder, v, dv, h):
    """Float vector v times lane h of dv."""
    n = v.type.count
    return builder.fmul(v, builder.shuffle_vector(dv, dv, ir.Constant(_vec(_I32, n), [h] * n)), flags=_FAST)


def _sub_scales(builder, words, dd, q2):
    """[<2 k x f32> d sc] of k blocks' halves of a Q6_K / Q3_K / Q2_K super-block (lane 2 j + h: block j's half h),
    from their <k x i16> words (the halves' int8 sub-scales, bytes 0 and 1; Q2_K: a 4-bit scale in each byte's low
    nibble, its min in the high one) and the super-block's i32 of f16 d (low half) and dmin (high); Q2_K also
    [<2 k x f32> -dmin m]. Exact products (11 bits of d times 8 of sc)."""
    k = words.type.count
    dv = _f16_pair(builder, dd)
    b16 = builder.bitcast(words, _vec(ir.IntType(8), 2 * k))
    f16s = _vec(_F32, 2 * k)
    if not q2:
        return [_times_lane(builder, builder.sitofp(b16, f16s), dv, 0)]
    low = builder.and_(b16, ir.Constant(b16.type, [15] * 2 * k))
    high = builder.lshr(b16, ir.Constant(b16.type, [4] * 2 * k))
    return [_times_lane(builder, builder.uitofp(low, f16s), dv, 0),
            builder.fneg(_times_lane(builder, builder.uitofp(high, f16s), dv, 1))]


def _scale_mins(builder, words, dd):
    """(<2 k x f32> d sc of k blocks of a Q4_K / Q5_K super-block, each over its block's two halves, <k x f32> their
    -dmin m) from their <k x i16> words (sc in the low byte, m in the high one) and the super-block's i32 of f16 d
    (low half) and dmin (high); exact products (11 bits of d times 6 of sc)."""
    k = words.type.count
    dv = _f16_pair(builder, dd)
    b8 = builder.bitcast(words, _vec(ir.IntType(8), 2 * k))  # sc_0, m_0, sc_1, m_1, ...

    def times(lanes, h):  # the bytes at lanes times d (h 0) or dmin (h 1)
        v = builder.uitofp(builder.shuffle_vector(b8, b8, ir.Constant(_vec(_I32, len(lanes)), lanes)),
                           _vec(_F32, len(lanes)))
        return _times_lane(builder, v, dv, h)
    return times([2 * (i // 2) for i in range(2 * k)], 0), builder.fneg(times(list(range(1, 2 * k, 2)), 1))


@intrinsic
def _stored(typingctx, v, a):
    """float32 v as array a holds it: f16 bits (vcvtps2ph, round to nearest even) in a uint16 array, else v."""
    if v != types.float32 or not isinstance(a, types.Array) or a.dtype not in (types.float32, types.uint16):
        return None
    if a.dtype == types.float32:
        return types.float32(v, a), lambda context, builder, sig, args: args[0]
    return types.uint16(v, a), lambda context, builder, sig, args: _f32_to_f16(builder, args[0])


@intrinsic
def _dot_row(typingctx, q, hb, d, mn, x, xd, xl, xm):
    """sum_b d_b * sum_j q_bj x[32 b + j] over one row's blocks b < d.size: q its quants (i8 Q8_0, u8 nibbles, u64
    Q3 and Q2 words) with hb its high bits (None where there are none, see `_quants`), d its scales: u16 (f16 bits)
    a block; mn None, or (K-quants) a super-block's u32 of f16 d and dmin, with d a block's two scale bytes
    (`_sub_scales`: Q6_K, Q3_K, Q2_K, whose Q2_K mins of each half multiply x's sum over it: over each lane's 4
    values of x, xl, with int x; `_scale_mins`: Q4_K, Q5_K, whose mins multiply xl, x's float32 block sums). x f32,
    or int8/int16 with per-block scales xd (one more factor xd[b]; unused for f32 x); xm None, or (K-quants, int8
    x: `int_super`) x's multiples of a unit a super-block, xd[t] then super-block t's unit and xl, for Q6_K, Q3_K
    and Q2_K, x's int16 sums over each half-block. Vector accumulators (two, alternating blocks) and one horizontal
    sum per row, not one per block. With vnni512 and int8 or int16 x, a step takes two blocks in 512-bit vectors
    (one Xeon core, in cache: a Q4_1 row of 576 against int8 x 28.6 -> 22.8 ns, of 1536 against int16 x 148.9 ->
    107.6 ns); an odd last block goes alone. Per-16 kinds with int x take their quants unsigned, as stored, and the
    zero point z through xl (x's lane sums, `_prep_x`; with xm, its half-block sums, once a super-block:
    `int_super`): each block's integer dot product starts from -z times them, so sum (q - z) x costs no more than
    sum q x (subtracting z from the quants made them signed: 4 more instructions a block). Their rows are whole
    super-blocks, whose 16 scales (times x's) are computed together, then taken a step at a time."""
    if not (_is_row(q, (types.int8, types.uint8, types.uint64)) and _high_ok(hb)
            and _is_row(d, (types.uint16,)) and (mn is types.none or _is_row(mn, (types.uint32,)))
            and _is_row(x, (types.float32, types.int8, types.int16)) and _is_row(xd, (types.float32,))
            and (xl is types.none or _is_row(xl, (types.float32, types.int32, types.int16)))
            and (xm is types.none or _is_row(xm, (types.int16,)))):
        return None
    exact = x.dtype == types.float32

    def codegen(context, builder, sig, args):
        qty, hty, dty, mty, xty, xdty, xlty, xmty = sig.args
        q, hb, d, mn, x, xd, xl, xm = args
        supers = mty is not types.none  # K-quants: rows of whole super-blocks, their scales once for 8 blocks
        kind = _kind(qty, hty)
        per16 = kind in PER16
        k4 = supers and not per16  # Q4_K, Q5_K: a scale and min a block
        ints = xmty is not types.none  # x in whole multiples xm of a unit a super-block: integer sums (`int_super`)
        nb = context.make_array(dty)(context, builder, d).nitems
        one = ir.Constant(nb.type, 1)
        n = 1 if exact or ISA != "vnni512" else 2  # blocks a step
        width = BLOCK if exact else 8 * n
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, width), None)) for _ in range(2)]
        if k4:  # the blocks' mins times x's block sums (xl), 8 blocks a step
            mins = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, SUPER), None))

        def add_mins(b, words, dd):  # Q4_K, Q5_K: mins += blocks b..b+7's -dmin m times x's block sums (xl); their
            # <16 x f32> d sc (`_scale_mins`)
            sc, mv = _scale_mins(builder, words, dd)
            sums = _load(context, builder, xlty, xl, b, SUPER)
            builder.store(builder.fadd(builder.load(mins), builder.fmul(mv, sums, flags=_FAST), flags=_FAST), mins)
            return sc

        def super_scales(b):  # <16 x f32> the scales of blocks b..b+7's halves, and (Q2) their mins, or None; times
            # x's block scales unless exact
            words = _load(context, builder, dty, d, b, SUPER)
            dd = builder.load(_ptr(context, builder, mty, mn, builder.lshr(b, ir.Constant(b.type, 3))))
            if k4:
                out = [add_mins(b, words, dd)]
            else:
                out = _sub_scales(builder, words, dd, kind == "q2")
            if not exact:
                xs = _load(context, builder, xdty, xd, b, SUPER)
                xs = builder.shuffle_vector(xs, xs, ir.Constant(_vec(_I32, 2 * SUPER), [
                    i // 2 for i in range(2 * SUPER)]))
                out = [builder.fmul(v, xs, flags=_FAST) for v in out]
            return out + [None] * (2 - len(out))

        def int_super(b):  # blocks b..b+7 (a super-block) against x in multiples xm of one unit for them: the
            # quants' products times their sub-scales times x's multiples summed in integers (`_scaled_dot`), times
            # d and x's unit once; the zero points z of Q6 and Q3 (-z sum_h sc_h xm_h x_h) and Q2's mins (sum_h m_h
            # xm_h x_h, times -dmin) from x's sums x_h over the 16 halves (xl: `_prep_x`'s xh), Q4_K's and Q5_K's
            # mins in float (`add_mins`). Integers: |sc xm| <= 128 * 32 fits i16, a lane's sum
            # < 2^31 (8 steps of 2 pairs of 16002 * 4096, and the zero point's 2 * 32 * 2032 * 4096)
            words = _load(context, builder, dty, d, b, SUPER)  # <8 x i16>
            t = builder.lshr(b, ir.Constant(b.type, 3))  # the super-block
            dd = builder.load(_ptr(context, builder, mty, mn, t))
            mult = _load(context, builder, xmty, xm, b, SUPER)  # <8 x i16> x's multipliers, 1..XM
            i16x16 = _vec(ir.IntType(16), 16)
            if k4:
                add_mins(b, words, dd)
                sc = builder.mul(builder.and_(words, ir.Constant(words.type, [255] * SUPER)), mult)
                per = 16  # i16 lanes (pairs of products) a scale
            else:
                b16 = builder.bitcast(words, _vec(ir.IntType(8), 2 * SUPER))
                mult = builder.shuffle_vector(mult, mult, ir.Constant(_vec(_I32, 16), [i // 2 for i in range(16)]))
                if kind == "q2":
                    sc = builder.zext(builder.and_(b16, ir.Constant(b16.type, [15] * 16)), i16x16)
                    mv = builder.mul(builder.zext(builder.lshr(b16, ir.Constant(b16.type, [4] * 16)), i16x16), mult)
                else:
                    sc = builder.sext(b16, i16x16)
                sc = builder.mul(sc, mult)
                per = 8
            isum = ir.Constant(_vec(_I32, 8 * n), None)
            for j in range(0, SUPER, n):
                bj = builder.add(b, ir.Constant(b.type, j))
                qv = _quants(context, builder, kind, qty, q, bj, n, hty, hb, signed=False)
                xv = _load(context, builder, xty, x, builder.mul(bj, ir.Constant(b.type, BLOCK)), BLOCK * n)
                first = j * 16 // per  # scale of block j's first pair of products
                sv = builder.shuffle_vector(sc, sc, ir.Constant(_vec(_I32, 16 * n),
                                                                [first + i // per for i in range(16 * n)]))
                isum = _scaled_dot(builder, qv, xv, sv, isum)
            dv = _f16_pair(builder, dd)
            xs = builder.load(_ptr(context, builder, xdty, xd, t))  # x's unit

            def wide(iv):  # <8 n x i32>: <8 x i32> iv, zeros above
                return iv if n == 1 else builder.shuffle_vector(iv, ir.Constant(iv.type, None), ir.Constant(
                    _vec(_I32, 8 * n), [min(i, 8) for i in range(8 * n)]))

            def add(iv, h):  # acc += float(iv) * d (h 0) or dmin (h 1) * x's scale
                f = builder.fmul(builder.extract_element(dv, ir.Constant(_I32, h)), xs, flags=_FAST)
                upd = builder.fmul(builder.sitofp(iv, _vec(_F32, 8 * n)), _splat(builder, f, 8 * n), flags=_FAST)
                builder.store(builder.fadd(builder.load(accs[0]), upd, flags=_FAST), accs[0])
            if per16:
                xh = _load(context, builder, xlty, xl, builder.shl(b, ir.Constant(b.type, 1)), 16)  # <16 x i16>
                if kind in ZERO:
                    z = builder.mul(_pair_dot(builder, xh, sc), ir.Constant(_vec(_I32, 8), [-ZERO[kind]] * 8))
                    isum = builder.add(isum, wide(z))
                if kind == "q2":
                    add(wide(builder.sub(ir.Constant(_vec(_I32, 8), None), _pair_dot(builder, xh, mv))), 1)
            add(isum, 0)

        def spread(v, k, w, j):  # <w x f32> from <16 x f32> one value a half-block: lanes w / (2 k) apart a value,
            # from block j of the super-block (the dot products' lanes 0-3 are a block's first 16)
            return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), [2 * j + i // (w // (2 * k))
                                                                           for i in range(w)]))

        def scales(b, k, w, sup=None, j=0):  # <w x f32>: each lane's weight scale, times x's block scale unless exact
            if supers:  # from sup, the super-block's (`super_scales`), block b its j-th
                return spread(sup[0], k, w, j)
            s = _f16_to_f32(builder, _load(context, builder, dty, d, b, k) if k > 1 else
                            builder.load(_ptr(context, builder, dty, d, b)))
            if not exact:
                s = builder.fmul(s, _load(context, builder, xdty, xd, b, k) if k > 1 else
                                 builder.load(_ptr(context, builder, xdty, xd, b)), flags=_FAST)
            return _splat(builder, s, w) if k == 1 else builder.shuffle_vector(
                s, s, ir.Constant(_vec(_I32, w), [j // 8 for j in range(w)]))  # lanes 8k..8k+7: block k's scale

        def step(b, acc, k, sup=None, j=0):  # blocks b..b+k-1 into acc (per16: the j-th.. of sup's super-block)
            w = BLOCK if exact else 8 * k
            zero = per16 and not exact and kind in ZERO  # unsigned quants, the zero point in the dot's start
            qv = _quants(context, builder, kind, qty, q, b, k, hty, hb, signed=not zero)
            xv = _load(context, builder, xty, x, builder.mul(b, ir.Constant(b.type, BLOCK)), BLOCK * k)
            if exact:
                v = builder.fmul(_extend(builder, kind in SIGNED, qv, _vec(_F32, BLOCK)), xv, flags=_FAST)
            else:
                dot = _i8_dot if xty.dtype == types.int8 else _i16_dot
                init = None
                if per16:
                    lanes = _load(context, builder, xlty, xl, builder.mul(b, ir.Constant(b.type, 8)), w)
                if zero:
                    init = builder.mul(lanes, ir.Constant(lanes.type, [-ZERO[kind]] * w))
                v = builder.sitofp(dot(builder, kind in SIGNED and not zero, qv, xv, per16, init), _vec(_F32, w))
            upd = builder.fmul(v, scales(b, k, w, sup, j), flags=_FAST)
            if kind == "q2":  # each lane's min times the sum of the values of x its products took
                xsum = xv if exact else builder.sitofp(lanes, _vec(_F32, w))
                upd = builder.fadd(upd, builder.fmul(xsum, spread(sup[1], k, w, j), flags=_FAST), flags=_FAST)
            if w < width:  # the upper lanes of acc take zeros
                upd = builder.shuffle_vector(upd, ir.Constant(upd.type, None), ir.Constant(_vec(_I32, width),
                                                                                       list(range(width))))
            builder.store(builder.fadd(builder.load(acc), upd, flags=_FAST), acc)

        if supers:  # rows of whole super-blocks: their scales once for 8 blocks, then steps of n blocks in turns
            with cgutils.for_range(builder, builder.lshr(nb, ir.Constant(nb.type, 3))) as loop:
                b = builder.shl(loop.index, ir.Constant(nb.type, 3))
                if ints:
                    int_super(b)
                else:
                    sup = super_scales(b)
                    for j in range(0, SUPER, n):
                        step(builder.add(b, ir.Constant(nb.type, j)), accs[j // n % 2], n, sup, j)
            total = builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=_FAST)
            if k4:  # width >= 8 lanes: the mins' 8 into the first
                m = builder.load(mins)
                total = builder.fadd(total, builder.shuffle_vector(m, ir.Constant(m.type, None), ir.Constant(
                    _vec(_I32, width), [i if i < SUPER else SUPER for i in range(width)])), flags=_FAST)
            return _reduce(builder, total)
        shift = ir.Constant(nb.type, n)  # an iteration: 2 n blocks, a step per accumulator
        iters = builder.lshr(nb, shift)
        with cgutils.for_range(builder, iters) as loop:
            b = builder.shl(loop.index, shift)
            step(b, accs[0], n)
            step(builder.add(b, ir.Constant(nb.type, n)), accs[1], n)
        done = builder.shl(iters, shift)
        if n == 2:
            with builder.if_then(builder.icmp_unsigned(">=", builder.sub(nb, done), ir.Constant(nb.type, 2))):
                step(done, accs[0], 2)
        with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nb, one), ir.Constant(nb.type, 0))):
            step(builder.sub(nb, one), accs[n - 1], 1)
        return _reduce(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=_FAST))
    return types.float32(q, hb, d, mn, x, xd, xl, xm), codegen


@intrinsic
def _dot(typingctx, a, b, n):
    """sum_{i < n} a[i] * b[i] (a f32; b f32, f16 bits as uint16, or None for sum a[i]) in one fixed order: four
    8-lane partial sums over 32-element steps, then 8-element steps into the first, the four added pairwise, the
    lanes pairwise, then the tail in order; no reassociation flags, so LLVM keeps that order. A plain numba sum
    with fastmath is vectorized as LLVM sees fit, and inside a parallel loop it was vectorized differently in the
    two compiled copies numba keeps of the loop's body (see test_first_compiling_run...): the first, compiling run
    decoded other bits than the runs that load numba's cache."""
    if not (_is_row(a, (types.float32,)) and (b is types.none or _is_row(b, (types.float32, types.uint16)))
            and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aty, bty, _ = sig.args
        a, b, n = args
        n = context.cast(builder, n, sig.args[2], types.int64)
        i64, f32x8 = ir.IntType(64), _vec(_F32, 8)

        def term(k, width):  # a[k:k+width] * b[k:k+width]
            va = _load(context, builder, aty, a, k, width)
            if bty is types.none:
                return va
            vb = _load(context, builder, bty, b, k, width)
            vb = _f16_to_f32(builder, vb) if bty.dtype == types.uint16 else vb
            return builder.fmul(va, vb, flags=_ORDERED)

        def add(x, y):
            return builder.fadd(x, y, flags=_ORDERED)

        accs = [cgutils.alloca_once_value(builder, ir.Constant(f32x8, None)) for _ in range(4)]
        with cgutils.for_range(builder, builder.lshr(n, ir.Constant(i64, 5))) as loop:
            k = builder.shl(loop.index, ir.Constant(i64, 5))
            for j, acc in enumerate(accs):
                builder.store(add(builder.load(acc), term(builder.add(k, ir.Constant(i64, 8 * j)), 8)), acc)
        n32, n8 = (builder.and_(n, ir.Constant(i64, ~m)) for m in (31, 7))
        with cgutils.for_range(builder, builder.lshr(builder.sub(n8, n32), ir.Constant(i64, 3))) as loop:
            k = builder.add(n32, builder.shl(loop.index, ir.Constant(i64, 3)))
            builder.store(add(builder.load(accs[0]), term(k, 8)), accs[0])
        v = add(add(builder.load(accs[0]), builder.load(accs[1])), add(builder.load(accs[2]), builder.load(accs[3])))
        for w in (4, 2, 1):  # lanes pairwise
            lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), list(range(w))))
            hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), list(range(w, 2 * w))))
            v = add(lo, hi)
        tot = cgutils.alloca_once_value(builder, builder.extract_element(v, ir.Constant(_I32, 0)))
        with cgutils.for_range(builder, builder.sub(n, n8)) as loop:
            k = builder.add(n8, loop.index)
            t = builder.extract_element(term(k, 1), ir.Constant(_I32, 0))
            builder.store(add(builder.load(tot), t), tot)
        return builder.load(tot)
    return types.float32(a, b, n), codegen


@intrinsic
def _axpy_block(typingctx, q, hb, b, scale, word, offset, out):
    """out[32 b + j] += scale * q_j + offset for the 32 quants of block b of row q (hb: its high bits, or None);
    word None, or a K-quant block's u16 of scale bytes with offset its super-block's u32 of f16 d and dmin: then
    scale times each half's d sc, plus scale times each half's -dmin m (Q2_K, Q4_K, Q5_K), decoded as the dot
    products decode them (`_sub_scales`, `_scale_mins`)."""
    if not (_is_row(q, (types.int8, types.uint8, types.uint64)) and _high_ok(hb) and _is_row(out, (types.float32,))
            and (word, offset) in ((types.none, types.float32), (types.uint16, types.uint32))):
        return None

    def codegen(context, builder, sig, args):
        qty, hty, _, _, wty, _, oty = sig.args
        q, hb, b, scale, word, offset, out = args
        kind = _kind(qty, hty)
        qv = _extend(builder, kind in SIGNED, _quants(context, builder, kind, qty, q, b, 1, hty, hb),
                     _vec(_F32, BLOCK))
        i = builder.mul(b, ir.Constant(b.type, BLOCK))
        ov = _load(context, builder, oty, out, i, BLOCK)
        sv = _splat(builder, scale, BLOCK)
        if wty is types.none:
            offv = _splat(builder, offset, BLOCK)
        else:
            def halves(v):  # <32 x f32>: v's 2 (or 1) lanes over the block's halves, times scale
                return builder.fmul(sv, builder.shuffle_vector(v, v, ir.Constant(
                    _vec(_I32, BLOCK), [i * v.type.count // BLOCK for i in range(BLOCK)])), flags=_FAST)
            w1 = builder.insert_element(ir.Constant(_vec(ir.IntType(16), 1), None), word, ir.Constant(_I32, 0))
            pairs = (_sub_scales(builder, w1, offset, kind == "q2") if kind in PER16 else
                     _scale_mins(builder, w1, offset))
            offv = halves(pairs[1]) if len(pairs) > 1 else ir.Constant(_vec(_F32, BLOCK), None)
            sv = halves(pairs[0])
        upd = builder.fadd(builder.fmul(qv, sv, flags=_FAST), offv, flags=_FAST)
        p = _ptr(context, builder, oty, out, i)
        builder.store(builder.fadd(ov, upd, flags=_FAST), builder.bitcast(p, ov.type.as_pointer()), align=1)
    return types.void(q, hb, b, types.float32, word, offset, out), codegen


@intrinsic
def _row(typingctx, a, r):
    """Row r of a 2-D array whose rows are contiguous, as a C-layout 1-D array (r < 0 counts from the end, as
    numpy's): a KMatrix's parts are views of the columns of one buffer (`prepare`), layout A to numba, whose rows
    would be read through their strides (LLVM then left a Q4_1 matvec's loop over block offsets scalar: 576 x 1536
    took 38 us against 19)."""
    if not (isinstance(a, types.Array) and a.ndim == 2 and isinstance(r, types.Integer)):
        return None
    row = types.Array(a.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        aty, rty = sig.args
        src = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], rty, types.intp)
        if rty.signed:
            i = builder.select(builder.icmp_signed("<", i, ir.Constant(i.type, 0)),
                               builder.add(i, builder.extract_value(src.shape, 0)), i)
        i8p = ir.IntType(8).as_pointer()
        start = builder.gep(builder.bitcast(src.data, i8p), [builder.mul(i, builder.extract_value(src.strides, 0))])
        out = context.make_array(row)(context, builder)
        populate_array(out, data=builder.bitcast(start, src.data.type), shape=[builder.extract_value(src.shape, 1)],
                       strides=[src.itemsize], itemsize=src.itemsize, meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, row, out._getvalue())
    return row(a, r), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Hint the cache line holding byte i from the start of a's data into L2 (a hint: no fault past the end)."""
    if not (isinstance(a, types.Array) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        p = builder.gep(builder.bitcast(data, i8p), [args[1]])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0")
        # read, locality 2 (prefetcht1: into L2; prefetcht0, into L1 as well, was slower for the sparse FFN), data
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.void(a, i), codegen


# ---------------------------------------------------------------------------------------------------------
# Per-row helpers. A weight W = (w, d, m, h) as in KMatrix.W: d = m = h = None for F32/F16, m None but for
# Q4_1/Q5_1/Q2_K, h None but for Q5_0/Q5_1/Q6_K/Q3_K; the prepared x X = (xs, xq, xd, xqs, xl, xh, xm, xu) from
# _prep_x. The layout is chosen at typing time (one compiled version per combination) and the helpers are inlined
# into the kernels.

@njit(inline="always", **_SERIAL)
def _prep_x(x, X, per=1):
    """Into X = (xs, xq, xd, xqs, xl, xh, xm, xu), per 32-block of x (nothing for nb = 0): exact sum xs, quants xq
    with scale xd, xqs = xd * sum xq, xl the sums of xq's quads (xl[8 b + l] = xq[32 b + 4 l] + ... +
    xq[32 b + 4 l + 3]: lane l of the block's integer dot product, see `_dot_row`'s zero points) and xh those of
    its halves (xh[2 b + h] over xq[32 b + 16 h..]; int8 xq only). xq int8 (|xq| <= 127, never -128: the int8
    products of `_i8_dot` rely on it) or int16 (|xq| <= 32767). The scale: amax / top of the block (top 127 or
    32767), or with per = 8 (`_x_per`: x of the K-quants' integer sums) a whole multiple xm of a unit xu shared by
    the super-block of 8 blocks: xu = A / (XM top) with A the super-block's amax, xm = ceil(XM amax / A), 1..XM,
    so one integer sum runs over the super-block (ggml's Q8_K takes one scale for 256 values: 1.2x the error on
    normal x, measured). A block (with per = 8, a super-block) below 1e-30 in size quantizes to 0s (top / amax
    would overflow), a super-block past 3e38 in steps of A / top (xm = XM); NaN and inf to 0 (with per = 8, their
    super-block), sum included (an int32 conversion of NaN is INT_MIN, whose low bits the stored quant keeps: 0)."""
    xs, xq, xd, xqs, xl, xh, xm, xu = X
    top = np.float32(127.0) if xq.itemsize == 1 else np.float32(32767.0)
    for g in range(0, xs.size, per):
        end = min(g + per, xs.size)
        big = np.float32(0.0)  # A
        for b in range(g, end):  # the blocks' amax into xd for now
            amax = np.float32(0.0)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                amax = max(amax, abs(x[j]))
            xd[b] = amax
            big = max(big, amax)
        unit = big / (np.float32(XM) * top)
        if per > 1:
            xu[g // per] = unit
        for b in range(g, end):
            o = b * BLOCK
            amax = xd[b]
            if per == 1:
                scale = amax / top
                inv = top / amax if amax > np.float32(1e-30) else np.float32(0.0)
            else:
                m = np.float32(XM)  # a super-block past 3e38 (8-bit steps of big / 127), inf or NaN (0s)
                if big > np.float32(1e-30) and big <= np.float32(3e38):
                    m = min(np.float32(XM), max(np.float32(1.0), np.ceil(np.float32(XM) * amax / big)))
                xm[b] = np.int16(m)
                scale = unit * m
                inv = np.float32(1.0) / scale if big > np.float32(1e-30) else np.float32(0.0)
            s = np.float32(0.0)
            qsum = np.int32(0)
            for j in range(BLOCK):
                s += x[o + j]
                xq[o + j] = np.int32(np.rint(x[o + j] * inv))  # |xq| <= top
                qsum += np.int32(xq[o + j])
            for lane in range(8):
                o4 = o + 4 * lane
                xl[8 * b + lane] = (np.int32(xq[o4]) + np.int32(xq[o4 + 1]) + np.int32(xq[o4 + 2])
                                    + np.int32(xq[o4 + 3]))
            if xq.itemsize == 1:  # (int16 x would overflow them; no kernel reads them there)
                xh[2 * b] = xl[8 * b] + xl[8 * b + 1] + xl[8 * b + 2] + xl[8 * b + 3]
                xh[2 * b + 1] = xl[8 * b + 4] + xl[8 * b + 5] + xl[8 * b + 6] + xl[8 * b + 7]
            xs[b] = s
            xd[b] = scale
            xqs[b] = scale * np.float32(qsum)


def _x_per(W, X):
    """Blocks of x a scale for the rows of W (`_prep_x`): 8 (a super-block) where W is a K-quant and x int8 (their
    integer sums in `_dot_row`), else 1; W None: 1."""


@overload(_x_per, inline="always")
def _x_per_impl(W, X):
    per = SUPER if not isinstance(W, types.NoneType) and _super(W) and X[1].dtype == types.int8 else 1
    return lambda W, X: per


def _dense(W):
    return isinstance(W[1], types.NoneType)


def _super(W):
    """The K-quants (SUPER_TYPES): m a u32 a super-block."""
    return not isinstance(W[2], types.NoneType) and W[2].dtype == types.uint32


def _per16(W):
    """Two scales a block (Q6_K, Q3_K, Q2_K): a K-quant whose quants are u64 words or whose high bits are."""
    return _super(W) and (W[0].dtype == types.uint64 or (not isinstance(W[3], types.NoneType)
                                                          and W[3].dtype == types.uint64))


def _k4(W):
    """A scale and min a block, d and dmin a super-block (Q4_K, Q5_K)."""
    return _super(W) and not _per16(W)


def _row_dot(W, r, x, X, exact):
    """W[r] @ x as float32 (exact: f32 x for block types, else the int8 x of X)."""


def _row_axpy(W, r, s, out):
    """out += s * W[r]."""


def _block_min(W, m, b, db):
    """The offset of block b of a row of W: stored, m[b] of the row's offsets m (Q4_1, Q5_1), -16 d (Q5_0), -8 d
    (Q4_0) or 0 (Q8_0)."""


def _part_row(a, r):
    """Row r of a part of W that a block type may lack (W[2] the offsets m, W[3] the bit planes), or None."""


def _row_prefetch(W, r):
    """Hint every cache line of row r of W's arrays into cache (W None: nothing)."""


def _row_hidden(G, U, i, x, X, act, threshold, exact):
    """Neuron i's FFN activation h_i = act(G[i] @ x) * (U[i] @ x) (see `ffn`); 0 skips the up row."""


@overload(_block_min, inline="always")
def _block_min_impl(W, m, b, db):
    if not isinstance(W[2], types.NoneType):  # Q4_1, Q5_1
        return lambda W, m, b, db: _widen(m[b])
    if not isinstance(W[3], types.NoneType):  # Q5_0
        return lambda W, m, b, db: np.float32(-16.0) * db
    if W[0].dtype == types.uint8:  # Q4_0
        return lambda W, m, b, db: np.float32(-8.0) * db
    return lambda W, m, b, db: np.float32(0.0)  # Q8_0: LLVM drops the offset terms


@overload(_part_row, inline="always")
def _part_row_impl(a, r):
    if isinstance(a, types.NoneType):
        return lambda a, r: None
    return lambda a, r: _row(a, r)


@overload(_row_dot, inline="always")
def _row_dot_impl(W, r, x, X, exact):
    if _dense(W):
        return lambda W, r, x, X, exact: _dot(x, _row(W[0], r), x.size)
    if _super(W):  # no offset terms: Q4_K's and Q5_K's mins times x's block sums, the others' zero points (and
        # Q2_K's mins) through x's sums over halves (int8 x) or quads (int16), in the dot products (`_dot_row`)
        sums = 3 if _k4(W) else 5 if X[1].dtype == types.int8 else 4

        def supers(W, r, x, X, exact):
            wr, hr, d, m = _row(W[0], r), _part_row(W[3], r), _row(W[1], r), _row(W[2], r)
            if exact:
                return _dot_row(wr, hr, d, m, x, X[2], _exact_sums(W, X), None)
            xd, xm = _x_scales(X)
            return _dot_row(wr, hr, d, m, X[1], xd, X[sums], xm)
        return supers

    def blocks(W, r, x, X, exact):
        wr, d, m = _row(W[0], r), _row(W[1], r), _part_row(W[2], r)  # (row quant bytes,), (nb,), (nb,) or None
        xs, xq, xd, xqs = X[0], X[1], X[2], X[3]
        if exact:
            return _dot_row(wr, _part_row(W[3], r), d, None, x, xd, None, None) + _offsets(W, d, m, xs)
        return _dot_row(wr, _part_row(W[3], r), d, None, xq, xd, None, None) + _offsets(W, d, m, xqs)
    return blocks


def _exact_sums(W, X):
    """x's exact block sums for a K-quant's f32 dot products: Q4_K's and Q5_K's mins take them, the others none."""


@overload(_exact_sums, inline="always")
def _exact_sums_impl(W, X):
    return (lambda W, X: X[0]) if _k4(W) else (lambda W, X: None)


def _x_scales(X):
    """(x's scales, multipliers) for a K-quant's dot products: int8 x a unit a super-block and the blocks' whole
    multiples of it (`_prep_x`'s xu, xm), int16 x (xd, None)."""


@overload(_x_scales, inline="always")
def _x_scales_impl(X):
    return (lambda X: (X[7], X[6])) if X[1].dtype == types.int8 else (lambda X: (X[2], None))


def _offsets(W, d, m, sums):
    """sum_b (block b's offset, `_block_min`) * sums[b] over a row of a block type W (d, m its scales and offsets),
    through `_dot`: one summation order in every compiled copy of a kernel. (A plain loop with the kernels'
    fast-math was vectorized as LLVM saw fit, and a compiling run's copy of the attention's o-projection summed it
    otherwise than the cached copy: their logits differed in the last bits from position 1 on, on an AVX-512 host.)"""


@overload(_offsets, inline="always")
def _offsets_impl(W, d, m, sums):
    if not isinstance(W[2], types.NoneType):  # Q4_1, Q5_1: the stored offsets
        return lambda W, d, m, sums: _dot(sums, m, d.size)
    if not isinstance(W[3], types.NoneType):  # Q5_0: -16 d
        return lambda W, d, m, sums: np.float32(-16.0) * _dot(sums, d, d.size)
    if W[0].dtype == types.uint8:  # Q4_0: -8 d
        return lambda W, d, m, sums: np.float32(-8.0) * _dot(sums, d, d.size)
    return lambda W, d, m, sums: np.float32(0.0)  # Q8_0


@overload(_row_axpy, inline="always")
def _row_axpy_impl(W, r, s, out):
    if _dense(W):
        def dense(W, r, s, out):
            wr = _row(W[0], r)
            for c in range(wr.size):  # out may be longer: a padded row of part (`_thread_rows`)
                out[c] += s * _widen(wr[c])
        return dense

    if _super(W):  # each block's scale bytes with its super-block's d and dmin
        def supers(W, r, s, out):
            wr, hr, d, m = _row(W[0], r), _part_row(W[3], r), _row(W[1], r), _row(W[2], r)
            for t in range(m.size):
                for b in range(SUPER * t, SUPER * t + SUPER):
                    _axpy_block(wr, hr, b, s, d[b], m[t], out)
        return supers

    def blocks(W, r, s, out):
        wr, hr, d, m = _row(W[0], r), _part_row(W[3], r), _row(W[1], r), _part_row(W[2], r)
        for b in range(d.size):
            db = _widen(d[b])
            _axpy_block(wr, hr, b, s * db, None, s * _block_min(W, m, b, db), out)
    return blocks


@njit(inline="always", **_SERIAL)
def _prefetch_row(a, r):
    """Hint row r of a into cache, up to where row r + 1 starts: all of a prepared block row, quants first."""
    n = a.strides[0]
    for o in range(r * n, (r + 1) * n + 63, 64):  # rows need not start on a line
        _prefetch(a, o)


@njit(inline="always", **_SERIAL)
def _ahead(W):
    """How many rows of W `_prefetch_ahead` looks ahead."""
    return 1 + AHEAD // W[0].strides[0]


@njit(inline="always", **_SERIAL)
def _prefetch_ahead(W, r, n):
    """Hint the row about AHEAD bytes after row r of W (if it is below n) into cache. A loop over consecutive rows
    that come from DRAM (a decode step's weights do not stay in cache) waits on memory: the hardware prefetcher
    alone kept too few lines in flight. With this in the lm_head, FFN and attention loops dense decode went from
    97-104 to 129-142 tok/s (2 threads, processes of each version in turns); cache-warm loops did not change."""
    a = r + _ahead(W)
    if a < n:
        _row_prefetch(W, a)


@njit(inline="always", **_SERIAL)
def _prefetch_next(W, rows, j, n):
    """Hint row rows[j + PREFETCH] of W (if j + PREFETCH < n) into cache: loops over gathered rows."""
    if j + PREFETCH < n:
        _row_prefetch(W, np.int64(rows[j + PREFETCH]))


@njit(inline="always", **_SERIAL)
def _prefetch_first(W, rows, j0, j1):
    """Hint rows rows[j0:j0 + PREFETCH] of W (those below j1) into cache: a thread's first gathered rows, which
    `_prefetch_next` fetches for no one (SmolLM2's sparse FFN at 90%, random sets: 13.5-14.0 -> 12.0-12.8 us a layer
    with 2 threads, 19.0-19.6 -> 17.7-18.4 with 1)."""
    for j in range(j0, min(j0 + PREFETCH, j1)):
        _row_prefetch(W, np.int64(rows[j]))


@overload(_row_prefetch, inline="always")
def _row_prefetch_impl(W, r):
    if isinstance(W, types.NoneType):  # no gate
        return lambda W, r: None
    return lambda W, r: _prefetch_row(W[0], r)


@overload(_row_hidden, inline="always")
def _row_hidden_impl(G, U, i, x, X, act, threshold, exact):
    if isinstance(G, types.NoneType):  # plain FFN: h = act(up x)
        return lambda G, U, i, x, X, act, threshold, exact: _act(_row_dot(U, i, x, X, exact), act, threshold)

    def gated(G, U, i, x, X, act, threshold, exact):
        h = _act(_row_dot(G, i, x, X, exact), act, threshold)
        if h != 0:  # an inactive gate needs no up row either
            u = _row_dot(U, i, x, X, exact)
            h *= max(u, np.float32(0.0)) if act == ACT_DRELU else u
        return h
    return gated


@intrinsic
def _float_bits(typingctx, i):
    """The float32 whose bits are the low 32 bits of the integer i."""
    if not isinstance(i, types.Integer):
        return None
    return types.float32(i), lambda context, builder, sig, args: builder.bitcast(
        builder.trunc(args[0], _I32) if i.bitwidth > 32 else args[0], _F32)


_EXP_TAYLOR = tuple(1 / math.factorial(k) for k in range(7))  # e^r to r^6


@njit(inline="always", **_SERIAL)
def _exp(x):
    """e^x in float32 without a libm call, so that LLVM vectorizes loops over it (numba's np.exp is a scalar
    call: 30 ns a neuron in the SiLU FFN). x is clamped to [-87, 88]; e^x = 2^t, t = x log2(e), is 2^round(t)
    built in the exponent bits times e^r, r = (t - round(t)) ln 2, from its Taylor polynomial (|r| <= 0.35, error
    under 2e-7). Relative error: below 1e-6 for |x| < 10, up to 8e-6 near the ends (the rounding of t)."""
    t = min(max(x, np.float32(-87.0)), np.float32(88.0)) * np.float32(1.4426950408889634)
    n = np.rint(t)
    r = (t - n) * np.float32(math.log(2))
    p = np.float32(_EXP_TAYLOR[6])
    for k in range(5, -1, -1):  # Horner; unrolled by LLVM
        p = p * r + np.float32(_EXP_TAYLOR[k])
    return p * _float_bits((np.int64(n) + 127) << 23)


@njit(inline="always", **_SERIAL)
def _act(g, act, threshold):
    if act == ACT_SILU:
        return g / (np.float32(1.0) + _exp(-g))
    if act == ACT_FATRELU:
        return g if g > threshold else np.float32(0.0)
    return max(g, np.float32(0.0))  # ReLU, dReLU


# ---------------------------------------------------------------------------------------------------------
# Parallel kernels

@njit(**_PARALLEL)
def _k_matvec(W, rows, x, out, X, exact=False):
    """out[j] = W[rows[j]] @ x (rows None: all rows)."""
    _prep_x(x, X, _x_per(W, X))
    for j in prange(out.size):
        r = np.int64(j) if rows is None else np.int64(rows[j])
        if rows is None:
            _prefetch_ahead(W, r, out.size)
        else:
            _prefetch_next(W, rows, j, out.size)
        out[j] = _row_dot(W, r, x, X, exact)


@njit(**_SERIAL)  # not inlined: in a parallel kernel its `out[:] = 0.0` becomes one more parallel region
def _sum_parts(part, nt, out, accumulate):
    """out (+)= sum of the first nt rows of part."""
    if not accumulate:
        out[:] = 0.0
    for t in range(nt):
        p = part[t]
        for c in range(out.size):
            out[c] += p[c]


@njit(**_PARALLEL)
def _k_axpy(W, rows, coef, out, part, nt):
    """out += sum_j coef[j] * W[rows[j]]; each of nt threads sums a slice of the rows into its row of part
    (faster than splitting the columns of out across threads)."""
    n = rows.size
    for t in prange(nt):
        acc = part[t]  # (cols,)
        acc[:] = 0.0
        for j in range(t * n // nt, (t + 1) * n // nt):
            _row_axpy(W, rows[j], coef[j], acc)
    _sum_parts(part, nt, out, True)


@njit(**_PARALLEL)
def _k_ffn(G, U, D, x, act, threshold, active, out, X, part, hs, nt, exact=False):
    """out = sum_{i in active} h_i * D[i]; each of nt threads takes a slice of the neurons, first computing their
    h into its row of hs, then summing their down rows into its row of part. Two passes, not one per neuron:
    the dot products of one pass do not wait on each other. Scattered rows are latency bound, so the first pass
    fetches all three rows of the neuron PREFETCH places ahead (the second finds its down rows in L2), the slice's
    first PREFETCH neurons before it (`_prefetch_first`), and the second fetches ahead again in case they left."""
    _prep_x(x, X, max(_x_per(G, X), _x_per(U, X)))
    n = U[0].shape[0] if active is None else active.size
    for t in prange(nt):
        acc, h = part[t], hs[t]  # (n_embd,), (n_ff,)
        acc[:] = 0.0
        j0, j1 = t * n // nt, (t + 1) * n // nt
        if active is not None:
            _prefetch_first(G, active, j0, j1)
            _prefetch_first(U, active, j0, j1)
            _prefetch_first(D, active, j0, j1)
        for j in range(j0, j1):
            if active is not None:
                _prefetch_next(G, active, j, j1)
                _prefetch_next(U, active, j, j1)
                _prefetch_next(D, active, j, j1)
            i = np.int64(j) if active is None else np.int64(active[j])
            h[j - j0] = _row_hidden(G, U, i, x, X, act, threshold, exact)
        for j in range(j0, j1):
            if active is not None:
                _prefetch_next(D, active, j, j1)
            if h[j - j0] != 0:
                _row_axpy(D, np.int64(j) if active is None else np.int64(active[j]), h[j - j0], acc)
    _sum_parts(part, nt, out, False)


@njit(**_PARALLEL)
def _k_ffn_dense(G, U, D, x, act, threshold, active, h, out, X, Xh, exact=False):
    """out = D @ h with D the untransposed down (n_embd, n_ff): h_i for i in active (None: all), 0 elsewhere.
    Streams the same bytes as the file's ffn_down (down_t's rows are re-quantized to Q8_0: more bytes)."""
    _prep_x(x, X, max(_x_per(G, X), _x_per(U, X)))
    if active is None:
        for i in prange(h.size):
            if G is not None:
                _prefetch_ahead(G, np.int64(i), h.size)
            _prefetch_ahead(U, np.int64(i), h.size)
            h[i] = _row_hidden(G, U, np.int64(i), x, X, act, threshold, exact)
    else:
        for i in range(h.size):  # a loop, not `h[:] = 0.0`: numba makes that a parallel region of its own
            h[i] = 0.0
        for j in prange(active.size):
            _prefetch_next(G, active, j, active.size)
            _prefetch_next(U, active, j, active.size)
            i = np.int64(active[j])
            h[i] = _row_hidden(G, U, i, x, X, act, threshold, exact)
    _prep_x(h, Xh, _x_per(D, Xh))
    for r in prange(out.size):  # h in 16 bits (Xh, but for the K-quants): 8 bits flipped greedy tokens against
        # llama.cpp on a Q4_1 model, f32 took 2.4x longer
        _prefetch_ahead(D, np.int64(r), out.size)
        out[r] = _row_dot(D, np.int64(r), h, Xh, exact)


@njit(**_PARALLEL)
def _k_ffn_scored(G, U, DT, D, x, act, threshold, norms, t, dense_from, ids, h, out, X, Xh, part, nt, exact=False):
    """The FFN under a sparsity config's threshold t: h for every neuron (its score needs it), then down over the
    neurons whose score |h_i| * norms[i] is above t (h_i != 0 where t is 0), the others' h zeroed. Down: the rows of
    down_t DT, summed as `_k_ffn` sums an active set (the same slices of ids in the same order), or with D (the
    untransposed down, None if absent) D @ h once at least dense_from neurons are active, as `_k_ffn_dense` does.
    Returns the active count; ids[:count] are the active ids, increasing."""
    _prep_x(x, X, max(_x_per(G, X), _x_per(U, X)))
    for i in prange(h.size):
        if G is not None:
            _prefetch_ahead(G, np.int64(i), h.size)
        _prefetch_ahead(U, np.int64(i), h.size)
        h[i] = _row_hidden(G, U, np.int64(i), x, X, act, threshold, exact)
    n = 0
    for i in range(h.size):
        if (h[i] != 0) if t <= 0 else (abs(h[i]) * norms[i] > t):
            ids[n] = i
            n += 1
        else:
            h[i] = 0.0
    if D is not None and n >= dense_from:
        _prep_x(h, Xh, _x_per(D, Xh))
        for r in prange(out.size):
            _prefetch_ahead(D, np.int64(r), out.size)
            out[r] = _row_dot(D, np.int64(r), h, Xh, exact)
        return n
    for q in prange(nt):
        acc = part[q]  # (n_embd,)
        acc[:] = 0.0
        j0, j1 = q * n // nt, (q + 1) * n // nt
        _prefetch_first(DT, ids, j0, j1)
        for j in range(j0, j1):
            _prefetch_next(DT, ids, j, j1)
            _row_axpy(DT, np.int64(ids[j]), h[ids[j]], acc)
    _sum_parts(part, nt, out, False)
    return n


# ---------------------------------------------------------------------------------------------------------
# Weight preparation and the public API

class KMatrix:
    """A weight matrix in kernel layout (see the module docstring), built once at load by `prepare`."""

    def __init__(self, qtype: QT, rows: int, cols: int, w, d=None, m=None, h=None):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self.W = (w, d, m, h)  # what the kernels read
        self.nbytes = sum(int(a.nbytes) for a in self.W if a is not None)
        nb = cols // BLOCK if cols % BLOCK == 0 else 0  # x scratch: per-block sums and quants (see _prep_x)
        self.X, self.X16 = ((np.zeros(nb, np.float32), np.zeros(nb * BLOCK, t), np.zeros(nb, np.float32),
                             np.zeros(nb, np.float32), np.zeros(nb * 8, np.int32), np.zeros(nb * 2, np.int16),
                             np.zeros(nb, np.int16), np.zeros(-(-nb // SUPER), np.float32))
                            for t in (np.int8, np.int16))
        self.Xh = self.X if qtype in SUPER_TYPES else self.X16  # the dense FFN's h for this down: 16 bits a block,
        # the K-quants' 8 bits a super-block (their integer sums, `_dot_row`)
        self.part = np.zeros((0, cols), np.float32)  # per-thread partial sums of axpy_rows / ffn, grown on use (rows
        # padded to whole cache lines: `_thread_rows`)
        self.hs = np.zeros((0, rows), np.float32)  # per-thread h of ffn (as down_t: rows = n_ff), grown on use
        self.vec = np.zeros(cols, np.float32)  # an input vector built in a kernel: the FFN's h for down

    def __repr__(self) -> str:
        return f"KMatrix({self.qtype.name}, {self.rows}x{self.cols}, {self.nbytes} bytes)"


def prepare(qt: QTensor) -> KMatrix:
    """A KMatrix from a 2-D QTensor of one of KERNEL_TYPES: the same bytes, a block type's regrouped into its parts
    (`PARTS`), each row's end to end in one buffer (SUPER_TYPES: the same values, in blocks of 32 first)."""
    if qt.qtype not in KERNEL_TYPES:
        raise ValueError(f"kernels: {qt.qtype.name} matrix {qt.shape}: type not supported "
                         f"({', '.join(t.name for t in KERNEL_TYPES)})")
    if len(qt.shape) != 2:
        raise ValueError(f"kernels: {qt.qtype.name} tensor {qt.shape}: need a 2-D matrix")
    rows, cols = qt.shape
    if qt.qtype == QT.F32:
        return KMatrix(qt.qtype, rows, cols, np.ascontiguousarray(qt.data, np.float32).reshape(rows, cols))
    if qt.qtype == QT.F16:
        f16 = np.ascontiguousarray(qt.data, np.float16).reshape(rows, cols)
        return KMatrix(qt.qtype, rows, cols, f16.view(np.uint16))
    size = GGML_QUANT_SIZES[qt.qtype][0]
    if cols % size:
        raise ValueError(f"kernels: {qt.qtype.name} matrix {rows}x{cols}: cols not a multiple of {size}")
    nb = cols // BLOCK
    blocks = np.asarray(qt.data, np.uint8)
    if qt.qtype in RELAYOUT:  # super-blocks -> blocks of 32 (a transient copy, about the matrix's size)
        src = np.ascontiguousarray(blocks.reshape(-1, GGML_QUANT_SIZES[qt.qtype][1]))
        blocks = np.empty((len(src) * 8, RELAYOUT[qt.qtype][0]), np.uint8)
        RELAYOUT[qt.qtype][1](src, src.view(np.uint16), blocks, blocks.view(np.uint16))
    blocks = blocks.reshape(rows, nb, -1)  # (rows, nb, block bytes)
    width = sum((p[1] - p[0]) * (nb // SUPER if p[3:] else nb) for p in PARTS[qt.qtype] if p)
    buf = np.empty((rows, width), np.uint8)  # a row's parts end to end, as PARTS lists
    parts, o = [], 0
    for part in PARTS[qt.qtype]:
        if part is None:
            parts.append(None)
            continue
        a, b, dtype = part[:3]
        src, n = (blocks[:, ::SUPER], nb // SUPER) if part[3:] == ("super",) else (blocks, nb)
        # the part's bytes of every block, straight into buf's columns (no temporary copy of the part)
        np.ndarray((rows, n, b - a), np.uint8, buf, o, (buf.strides[0], b - a, 1))[...] = src[:, :, a:b]
        parts.append(buf[:, o:o + n * (b - a)].view(dtype))
        o += n * (b - a)
    return KMatrix(qt.qtype, rows, cols, *parts)


def dequantize_rows(m: KMatrix, r0: int, r1: int) -> np.ndarray:
    """float32 rows r0:r1 of a prepared matrix (the batched prefill's weights, one chunk at a time; predictor
    weights as they run)."""
    return dequantize_ids(m, np.arange(r0, r1))


@njit(**_PARALLEL)
def _dequant_ids(W, ids, out):
    """out[j] = row ids[j] of W, float32 (cols,)."""
    for j in prange(ids.size):
        row = out[j]  # (cols,)
        row[:] = 0.0
        _row_axpy(W, np.int64(ids[j]), np.float32(1.0), row)


def dequantize_ids(m: KMatrix, ids: np.ndarray) -> np.ndarray:
    """float32 rows `ids` of a prepared matrix (the hot neurons' rows), (len(ids), cols)."""
    ids = np.asarray(ids, np.int64)
    if ids.size and not (0 <= ids.min() and ids.max() < m.rows):
        raise ValueError(f"row ids outside 0..{m.rows - 1}")
    out = np.empty((ids.size, m.cols), np.float32)
    _dequant_ids(m.W, ids, out)
    return out


def values(qt: QTensor) -> np.ndarray:
    """qt's float32 values: `QTensor.dequantize`'s (test_dequantize_rows_and_ids_are_exact, test_super_types; a zero
    may lose its sign), through the kernels for the block types they read (a 32000 x 2048 Q6_K matrix 0.25 s, 2
    threads beside a test run; gguf-py's 0.41-0.88 s)."""
    if qt.qtype not in BLOCK_TYPES + SUPER_TYPES or len(qt.shape) != 2:
        return qt.dequantize()
    return dequantize_rows(prepare(qt), 0, qt.shape[0])


def transpose(qt: QTensor) -> KMatrix:
    """The transposed matrix (ffn_down -> ffn_down_t: one contiguous row per neuron), dequantized and
    re-quantized as `QTensor.remade_type` says (F32 where a Q8_0 scale would pass f16's range, as `QTensor.native`
    does). IQ4 from the values the dense path reads (`QTensor.native`: the same values as Q8_0 blocks, IQ4_XS's
    scales rounded to f16), which the kernels give faster than gguf-py the file's."""
    qtype = qt.remade_type
    if len(qt.shape) != 2:
        raise ValueError(f"kernels: {qt.qtype.name} tensor {qt.shape}: need a 2-D matrix")
    a = values(qt.native() if qt.qtype in AS_NATIVE else qt).T  # a view: Q8_0's quantizer reads it in place
    with np.errstate(over="ignore"):  # an f16 scale past 65504: infinity, which the F32 fallback replaces
        t = QTensor.from_float(a, qtype)
    return prepare(t if qtype != QT.Q8_0 or t.finite() else QTensor.from_float(a))


def _exact(exact: bool) -> tuple:
    """The kernels' trailing `exact` argument: left out unless True. Left out, numba compiles its default, a
    constant, and the int8 path alone; passed as a runtime bool it cost the dense FFN 9% (5.6-6.1 against
    5.1-5.4 ms a token, one thread, cache-warm)."""
    return (True,) if exact else ()


def _check(a: np.ndarray, n: int, what: str):
    if a.dtype != np.float32 or a.shape != (n,):
        raise ValueError(f"kernels: {what} must be float32 ({n},), got {a.dtype} {a.shape}")


def _parts(w: KMatrix, nt: int | None = None) -> int:
    """nt (default: numba's thread count now), after making sure w has a partial-sum row per slice (allocated once)."""
    nt = nt or numba.get_num_threads()
    if w.part.shape[0] < nt:
        w.part, w.hs = _thread_rows(nt, w.cols), _thread_rows(nt, w.rows)
    return nt


def _thread_rows(nt: int, n: int) -> np.ndarray:
    """Zeros (nt, n') float32, n' >= n, one row a thread, each row on cache lines of its own. Rows that two threads
    write must not share a line: with numpy's 16-byte alignment the end of part[0] could share one with the start
    of part[1], and axpy_rows over 768 cached Q8_0 rows took 66-72 us on 2 threads (1 thread: 50 us), against
    33-49 us with the rows apart."""
    stride = -(-n // 16) * 16  # floats: a multiple of 64 bytes
    buf = np.zeros(nt * stride + 15, np.float32)
    off = (-buf.ctypes.data % 64) // 4
    return buf[off:off + nt * stride].reshape(nt, stride)


def x_blocks(*ms: KMatrix | None) -> int:
    """Blocks of 32 values of x under one scale where the int8 x of matrices ms (None: left out) is prepared once
    for all of them, as the kernels do (`_x_per`): 8 if any is a K-quant, else 1."""
    return SUPER if any(m is not None and m.qtype in SUPER_TYPES for m in ms) else 1


def matvec(w: KMatrix, x: np.ndarray, out: np.ndarray, exact: bool = False) -> None:
    """out = W @ x.   x f32[cols], out f32[rows]. exact: f32 x instead of int8 x for block types."""
    _check(x, w.cols, "x")
    _check(out, w.rows, "out")
    _k_matvec(w.W, None, x, out, w.X, *_exact(exact))


def matvec_rows(w: KMatrix, rows: np.ndarray, x: np.ndarray, out: np.ndarray, exact: bool = False) -> None:
    """out[j] = W[rows[j]] @ x.   rows i32[k] (not bounds-checked; negative: from the end), x f32[cols], out f32[k]."""
    _check(x, w.cols, "x")
    _check(out, rows.size, "out")
    _k_matvec(w.W, rows, x, out, w.X, *_exact(exact))


def axpy_rows(w_t: KMatrix, rows: np.ndarray, coef: np.ndarray, out: np.ndarray) -> None:
    """out += sum_j coef[j] * W_t[rows[j]].   rows i32[k] (not bounds-checked), coef f32[k], out f32[cols]."""
    _check(coef, rows.size, "coef")
    _check(out, w_t.cols, "out")
    nt = _parts(w_t)
    _k_axpy(w_t.W, rows, coef, out, w_t.part, nt)


def ffn_runner(gate: KMatrix | None, up: KMatrix, down_t: KMatrix | None, act: int, threshold: float,
               down: KMatrix | None = None, nt: int | None = None, exact: bool = False):
    """`ffn` with its weights checked and bound once: returns run(x, out, active=None), which computes what
    ffn(gate, up, down_t, x, act, threshold, out, active, exact, down, nt) does without checking x and out. The
    decode step binds one per layer: ffn's checks and argument building cost 3-4 us a call on a 2-core VM, against
    10-45 us for a whole sparse FFN call of SmolLM2."""
    if gate is not None and (gate.rows, gate.cols) != (up.rows, up.cols):
        raise ValueError(f"kernels: ffn shapes disagree: gate {gate}, up {up}")
    if down is not None and (down.rows, down.cols) != (up.cols, up.rows):
        raise ValueError(f"kernels: ffn shapes disagree: down {down}, up {up}")
    if down_t is not None and (down_t.rows, down_t.cols) != (up.rows, up.cols):
        raise ValueError(f"kernels: ffn shapes disagree: up {up}, down_t {down_t}")
    G, U, thr, ex = None if gate is None else gate.W, up.W, np.float32(threshold), _exact(exact)
    dense_from = DENSE_FROM * up.rows
    if down_t is not None:
        nt = _parts(down_t, nt)
        DT, part, hs = down_t.W, down_t.part, down_t.hs

    def run(x: np.ndarray, out: np.ndarray, active: np.ndarray | None = None) -> None:
        if down is not None and (active is None or active.size >= dense_from):
            _k_ffn_dense(G, U, down.W, x, act, thr, active, down.vec, out, up.X, down.Xh, *ex)
        elif down_t is None:
            raise ValueError("kernels: ffn needs down_t for a sparse active set")
        else:
            _k_ffn(G, U, DT, x, act, thr, active, out, up.X, part, hs, nt, *ex)
    return run


def scored_ffn_runner(gate: KMatrix | None, up: KMatrix, down_t: KMatrix, act: int, threshold: float,
                      down: KMatrix | None = None, nt: int | None = None, exact: bool = False):
    """`_k_ffn_scored` with its weights bound once: returns run(x, out, norms, t, ids, h) -> the active count, for
    x, out f32[n_embd], norms f32[n_ff] (||down[:, i]||), t the layer's threshold, ids i32[n_ff] and h f32[n_ff]
    scratch (ids[:count]: the active ids). The same sums as `ffn` over those ids."""
    if gate is not None and (gate.rows, gate.cols) != (up.rows, up.cols):
        raise ValueError(f"kernels: ffn shapes disagree: gate {gate}, up {up}")
    if (down_t.rows, down_t.cols) != (up.rows, up.cols) or down is not None and (down.rows, down.cols) != (
            up.cols, up.rows):
        raise ValueError(f"kernels: ffn shapes disagree: up {up}, down_t {down_t}, down {down}")
    G, U, DT, thr, ex = None if gate is None else gate.W, up.W, down_t.W, np.float32(threshold), _exact(exact)
    D, Xh = (None, down_t.X16) if down is None else (down.W, down.Xh)
    dense_from = DENSE_FROM * up.rows if down is not None else float(up.rows + 1)
    nt = _parts(down_t, nt)

    def run(x: np.ndarray, out: np.ndarray, norms: np.ndarray, t: float, ids: np.ndarray, h: np.ndarray) -> int:
        return _k_ffn_scored(G, U, DT, D, x, act, thr, norms, np.float32(t), dense_from, ids, h, out, up.X, Xh,
                             down_t.part, nt, *ex)
    return run


def ffn(gate: KMatrix | None, up: KMatrix, down_t: KMatrix | None, x: np.ndarray, act: int, threshold: float,
        out: np.ndarray, active: np.ndarray | None = None, exact: bool = False, down: KMatrix | None = None,
        nt: int | None = None) -> None:
    """out = sum_{i in active (None: all)} h_i * down_t[i], h_i = act(gate[i] @ x) * (up[i] @ x)
    (dReLU: relu(gate[i] @ x) * relu(up[i] @ x); gate None: h_i = act(up[i] @ x)); FATReLU keeps g > threshold.
    Fused: no full-width intermediate (a thread's slice of h at most); rows with h_i == 0 are skipped.
    x f32[n_embd], out f32[n_embd] (overwritten), active i32[k] (distinct ids, not bounds-checked; sorted is
    fastest); exact as in matvec, for the gate and up rows (and down).
    down: the untransposed ffn_down (n_embd, n_ff); given it, all-active and dense active sets (DENSE_FROM) compute
    h and then down @ h with h in 16 bits per block (a K-quant down: 8 bits, its integer sums), f32 if exact
    (fewer bytes than down_t's Q8_0 rows when down is block-quantized); down_t may be None then. nt: the slices of
    a sparse active set, one a thread (default: numba's thread count, which costs a microsecond to ask; any nt gives
    the same result up to summation order)."""
    _check(x, up.cols, "x")
    _check(out, up.cols, "out")
    ffn_runner(gate, up, down_t, act, threshold, down, nt, exact)(x, out, active)


# ---------------------------------------------------------------------------------------------------------
# Conversions at load (`QTensor.native`): block types the kernels do not read, written into ones they do, block
# by block with nothing in between (numpy's versions made several temporaries a tensor and ran at 17-30 MB/s; these
# 350-750 MB/s). Each takes the blocks as bytes and as u16 (the same memory) to read and write the f16 scales. No
# fastmath: the arithmetic is ggml's, in its order.
_CONVERTING = dict(_PARALLEL, fastmath=False)


@njit(inline="always", **_SERIAL)
def _scale_min(s, k):
    """Sub-block k's 6-bit scale and min from a Q4_K / Q5_K block's 12 bytes s: bytes 0-3 hold scales 0-3 (low 6
    bits), 4-7 mins 0-3, 8-11 scale and min 4-7 (nibbles), whose top two bits are those of bytes k - 4 and k."""
    if k < 4:
        return s[k] & 63, s[k + 4] & 63
    return (s[k + 4] & 15) | ((s[k - 4] >> 6) << 4), (s[k + 4] >> 4) | ((s[k] >> 6) << 4)


@njit(**_CONVERTING)
def _k_q4_k_as_q4_1(src, src16, out, out16):
    """(n, 144) Q4_K super-blocks (d, dmin, 12 bytes of 6-bit scales and mins, 128 of quants) -> (8 n, 20) Q4_1
    blocks: sub-block k's 32 values d sc_k q - dmin m_k are the Q4_1 block of scale d sc_k and offset -dmin m_k,
    both rounded to f16. Quant byte j of chunk c holds value j of sub-block 2c (low nibble) and of 2c + 1 (high)."""
    for i in prange(src.shape[0]):
        d, dmin = _widen(src16[i, 0]), _widen(src16[i, 1])
        for k in range(8):
            sc, m = _scale_min(src[i, 4:16], k)
            r, q = 8 * i + k, 16 + 32 * (k // 2)  # out block, its quants' chunk
            out16[r, 0] = _stored(d * np.float32(sc), out16)
            out16[r, 1] = _stored(-(dmin * np.float32(m)), out16)
            for j in range(16):  # Q4_1 byte j: values j and j + 16
                a, b = src[i, q + j], src[i, q + 16 + j]
                out[r, 4 + j] = np.uint8((a >> 4) | (b & 0xF0) if k % 2 else (a & 15) | ((b & 15) << 4))


@njit(inline="always", **_SERIAL)
def _q3_scale(src, i, t):
    """Q3_K super-block i's 6-bit scale t (0..15, before its offset 32): the nibble t // 8 of byte 96 + t % 8, and
    bits 2 (t // 4) of byte 104 + t % 4 above it."""
    return ((np.int32(src[i, 96 + t % 8]) >> (4 * (t // 8))) & 15) | (
        ((np.int32(src[i, 104 + t % 4]) >> (2 * (t // 4))) & 3) << 4)


@njit(**_CONVERTING)
def _k_q3_k_as_q8_0(src, src16, out, out16):
    """(n, 110) Q3_K super-blocks (32 bytes of high bits, 64 of 2-bit quants, 12 of sixteen 6-bit scales, d) ->
    (8 n, 34) Q8_0 blocks of the same values: value d (sc - 32) (q - 4) is -d times the integer -(sc - 32) (q - 4),
    in -128..124 (negated, so that (-32)(-4) = 128 is not one). Q8_0 block k holds sub-blocks 2 k and 2 k + 1:
    value l of sub-block 2 k + s is bits 2 j of quant byte 32 h + 16 s + l, less 4 unless bit 4 h + j of high byte
    16 s + l is set (k = 4 h + j); sc is sub-block 2 k + s's scale (`_q3_scale`)."""
    for i in prange(src.shape[0]):
        neg_d = src16[i, 54] ^ np.uint16(0x8000)
        for k in range(8):
            h, j = k // 4, k % 4
            out16[8 * i + k, 0] = neg_d
            for s in range(2):
                t = 2 * k + s
                sc = _q3_scale(src, i, t)
                for l in range(16):
                    q = (np.int32(src[i, 32 + 32 * h + 16 * s + l]) >> (2 * j)) & 3
                    if not (np.int32(src[i, 16 * s + l]) >> (4 * h + j)) & 1:
                        q -= 4
                    out[8 * i + k, 2 + 16 * s + l] = np.uint8((-(sc - 32) * q) & 255)


@njit(inline="always", **_SERIAL)
def _put_bits(out, r, o, n, bits):
    """Bytes o..o+n-1 of block r: the low 8 n bits of bits, little-endian."""
    for t in range(n):
        out[r, o + t] = np.uint8((bits >> (8 * t)) & 255)


@njit(inline="always", **_SERIAL)
def _put_pairs(out, r, o, src, i, start, shift):
    """Bytes o..o+7 of block r: the u64 of 2-bit quants (element e's at bits 2 (e // 8) of byte e % 8), element e
    bits shift..shift+1 of byte start + e of super-block i."""
    for t in range(8):
        v = 0
        for g in range(4):
            v |= ((np.int32(src[i, start + 8 * g + t]) >> shift) & 3) << (2 * g)
        out[r, o + t] = np.uint8(v)


@njit(**_CONVERTING)
def _k_q6_k_blocks(src, src16, out, out16):
    """(n, 210) Q6_K super-blocks (128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d) -> (8 n, 30)
    blocks as PARTS lays Q6_K: sc_2k, sc_2k+1, the u32 of d (and a dmin of 0), a u64 of the quants' bits 4-5
    (element e's at bits 2 (e // 8) of byte e % 8), their nibbles as Q4's. Value 32 p + j of half h (ggml's
    dequantize_row_q6_K order) is element j of block k = 4 h + p: the nibble of byte 64 h + 32 (p % 2) + j (its high
    one for p >= 2), bits 2 p of byte 128 + 32 h + j above it; its scale is sc_(2 k + j // 16)."""
    for i in prange(src.shape[0]):
        for k in range(8):
            h, p, r = k // 4, k % 4, 8 * i + k
            out[r, 0], out[r, 1] = src[i, 192 + 2 * k], src[i, 193 + 2 * k]
            out16[r, 1], out16[r, 2] = src16[i, 104], 0
            top = np.zeros(8, np.int64)
            for j in range(32):
                nib = (np.int64(src[i, 64 * h + 32 * (p % 2) + j]) >> (4 * (p // 2))) & 15
                top[j % 8] |= ((np.int64(src[i, 128 + 32 * h + j]) >> (2 * p)) & 3) << (2 * (j // 8))
                if j < 16:
                    out[r, 14 + j] = np.uint8(nib)
                else:
                    out[r, j - 2] |= np.uint8(nib << 4)
            for t in range(8):
                out[r, 6 + t] = np.uint8(top[t])


@njit(**_CONVERTING)
def _k_q3_k_blocks(src, src16, out, out16):
    """(n, 110) Q3_K super-blocks (32 bytes of high bits, 64 of 2-bit quants, 12 of sixteen 6-bit scales, d) -> (8
    n, 18) blocks as PARTS lays Q3_K: sc_2k - 32, sc_2k+1 - 32, the u32 of d (and a dmin of 0), the plane of the
    quants' third bits, a u64 of their low 2 bits (element e at bits 2 (e // 8) of byte e % 8). Element 16 s + l of
    block k = 4 h + j (sub-block t = 2 k + s): bits 2 j of quant byte 32 + 32 h + 16 s + l, third bit bit k of byte
    16 s + l (value d (sc_t - 32) (q - 4), sc_t from `_q3_scale`)."""
    for i in prange(src.shape[0]):
        for k in range(8):
            h, j, r = k // 4, k % 4, 8 * i + k
            out16[r, 1], out16[r, 2] = src16[i, 54], 0
            plane = np.int64(0)
            for s in range(2):
                t = 2 * k + s
                sc = _q3_scale(src, i, t)
                out[r, s] = np.uint8((sc - 32) & 255)
                for l in range(16):
                    e = 16 * s + l
                    plane |= ((np.int64(src[i, e]) >> k) & 1) << e
            _put_bits(out, r, 6, 4, plane)
            _put_pairs(out, r, 10, src, i, 32 + 32 * h, 2 * j)


@njit(**_CONVERTING)
def _k_q2_k_blocks(src, src16, out, out16):
    """(n, 84) Q2_K super-blocks (16 bytes of sub-block scales (low 4 bits) and mins (high 4), 64 of 2-bit quants,
    d, dmin) -> (8 n, 14) blocks as PARTS lays Q2_K: the sub-blocks' bytes 2 k and 2 k + 1 as they are, d, dmin, a
    u64 of the quants (element e at bits 2 (e // 8) of byte e % 8). Element e of block k = 4 h + j is bits 2 j of
    quant byte 16 + 32 h + e (value d sc q - dmin m of its sub-block 2 k + e // 16)."""
    for i in prange(src.shape[0]):
        for k in range(8):
            h, j, r = k // 4, k % 4, 8 * i + k
            out[r, 0], out[r, 1] = src[i, 2 * k], src[i, 2 * k + 1]
            out16[r, 1], out16[r, 2] = src16[i, 40], src16[i, 41]
            _put_pairs(out, r, 6, src, i, 16 + 32 * h, 2 * j)


@njit(**_CONVERTING)
def _k_q4_k_blocks(src, src16, out, out16):
    """(n, 144) Q4_K super-blocks -> (8 n, 22) blocks as PARTS lays Q4_K: sub-block k's 6-bit scale and min
    (`_scale_min`), the super-block's d and dmin, its 32 quants as a Q4_1 block's (`_k_q4_k_as_q4_1`'s)."""
    for i in prange(src.shape[0]):
        for k in range(8):
            sc, m = _scale_min(src[i, 4:16], k)
            r, q = 8 * i + k, 16 + 32 * (k // 2)  # out block, its quants' chunk
            out[r, 0], out[r, 1] = np.uint8(sc), np.uint8(m)
            out16[r, 1], out16[r, 2] = src16[i, 0], src16[i, 1]
            for j in range(16):  # byte j: values j and j + 16
                a, b = src[i, q + j], src[i, q + 16 + j]
                out[r, 6 + j] = np.uint8((a >> 4) | (b & 0xF0) if k % 2 else (a & 15) | ((b & 15) << 4))


@njit(**_CONVERTING)
def _k_q5_k_blocks(src, src16, out, out16):
    """(n, 176) Q5_K super-blocks -> (8 n, 26) blocks as PARTS lays Q5_K: Q4_K's scale, min, d and dmin, the plane of
    the quants' fifth bits and their nibbles as a Q5_1 block's: value j of sub-block k takes the nibble of byte 48 +
    32 (k // 2) + j (low for even k) and bit k of high byte 16 + j."""
    for i in prange(src.shape[0]):
        for k in range(8):
            sc, m = _scale_min(src[i, 4:16], k)
            r = 8 * i + k
            out[r, 0], out[r, 1] = np.uint8(sc), np.uint8(m)
            out16[r, 1], out16[r, 2] = src16[i, 0], src16[i, 1]
            high = np.int64(0)
            for j in range(32):
                lo = np.int64(src[i, 48 + 32 * (k // 2) + j])
                q = (lo >> 4) if k % 2 else (lo & 15)
                high |= ((np.int64(src[i, 16 + j]) >> k) & 1) << j
                if j < 16:  # byte 10 + j: values j and j + 16
                    out[r, 10 + j] = np.uint8(q)
                else:
                    out[r, j - 6] |= np.uint8(q << 4)
            _put_bits(out, r, 6, 4, high)


RELAYOUT = {QT.Q6_K: (30, _k_q6_k_blocks), QT.Q3_K: (18, _k_q3_k_blocks), QT.Q2_K: (14, _k_q2_k_blocks),
            QT.Q4_K: (22, _k_q4_k_blocks), QT.Q5_K: (26, _k_q5_k_blocks)}
# type -> (bytes a block of 32, kernel)


_IQ4 = np.array(quants.IQ4_NL.kvalues, np.int32)  # IQ4_NL's and IQ4_XS's 16 values of a nibble (int8)


@njit(inline="always", **_SERIAL)
def _iq4_quants(src, i, o, out, r):
    """Q8_0 block r's quants: the 32 IQ4 values of bytes o..o+15 of block i (value j the low nibble of byte j,
    value j + 16 the high one)."""
    for j in range(16):
        q = src[i, o + j]
        out[r, 2 + j] = np.uint8(_IQ4[q & 15] & 255)
        out[r, 18 + j] = np.uint8(_IQ4[q >> 4] & 255)


@njit(**_CONVERTING)
def _k_iq4_nl_as_q8_0(src, src16, out, out16):
    """(n, 18) IQ4_NL blocks (d, 16 bytes of nibbles indexing a table of int8 values) -> (n, 34) Q8_0 blocks of the
    same values d * value."""
    for i in prange(src.shape[0]):
        out16[i, 0] = src16[i, 0]
        _iq4_quants(src, i, 2, out, i)


@njit(**_CONVERTING)
def _k_iq4_xs_as_q8_0(src, src16, out, out16):
    """(n, 136) IQ4_XS super-blocks (d, 16 high bits and 4 bytes of low nibbles of eight 6-bit scales, 128 bytes of
    IQ4 nibbles) -> (8 n, 34) Q8_0 blocks: sub-block k is IQ4_NL's with the scale d (ls_k - 32) rounded to f16."""
    for i in prange(src.shape[0]):
        d, high = _widen(src16[i, 0]), np.int32(src16[i, 1])
        for k in range(8):
            low = np.int32(src[i, 4 + k // 2])
            ls = (((low >> 4) if k % 2 else (low & 15)) | (((high >> (2 * k)) & 3) << 4)) - 32
            out16[8 * i + k, 0] = _stored(d * np.float32(ls), out16)
            _iq4_quants(src, i, 8 + 16 * k, out, 8 * i + k)


CONVERT = {QT.Q4_K: (8, _k_q4_k_as_q4_1), QT.IQ4_NL: (1, _k_iq4_nl_as_q8_0),
           QT.IQ4_XS: (8, _k_iq4_xs_as_q8_0), QT.Q3_K: (8, _k_q3_k_as_q8_0)}
# type -> (blocks out per block in, kernel); the type each becomes: `QTensor.native` (Q3_K's Q8_0 blocks of the
# same values: `QTensor.as_q8_0`, for export)


@njit(**_CONVERTING)
def _k_q8_0_columns(c, out, out16):
    """(cols, rows) float32 c -> (rows, cols // 32 * 34) Q8_0 bytes of its columns (row i of out holds c[:, i]), to
    the bit gguf-py's (and ggml's reference) quantization: a block's d = max |v| / 127 in f32 and its quants v / d
    rounded half away from zero, as floor |v| + floor 2 (|v| - floor |v|). Tiles of 64 columns, the column innermost:
    each of a block's 32 rows of c is read 64 values at a time, whether c is stored so (a transposed down) or is a
    transposed view."""
    n, nb, tile = c.shape[1], c.shape[0] // BLOCK, 64
    for t in prange((n + tile - 1) // tile):
        i0, i1 = t * tile, min(t * tile + tile, n)
        inv = np.empty(tile, np.float32)
        for b in range(nb):
            o = b * BLOCK
            inv[:] = 0.0
            for j in range(BLOCK):  # inv: amax first (NaN once a NaN is met, as numpy's max: d NaN, then F32)
                for i in range(i0, i1):
                    a, m = abs(c[o + j, i]), inv[i - i0]
                    inv[i - i0] = a if a > m or a != a else m
            for i in range(i0, i1):
                d = inv[i - i0] / np.float32(127.0)
                out16[i, 17 * b] = _stored(d, out16)
                inv[i - i0] = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            for j in range(BLOCK):
                for i in range(i0, i1):
                    v = c[o + j, i] * inv[i - i0]
                    m = abs(v)
                    f = np.floor(m)
                    q = np.int32(f + np.floor(np.float32(2.0) * (m - f)))
                    out[i, 34 * b + 2 + j] = np.uint8((-q if v < 0 else q) & 255)


def quantize_q8_0(a: np.ndarray) -> np.ndarray:
    """(rows, cols) float32, cols a multiple of 32 -> (rows, cols // 32 * 34) Q8_0 blocks, gguf-py's bytes; a may be a
    transposed view (ffn_down -> ffn_down_t), read in place (`_k_q8_0_columns`)."""
    rows, cols = a.shape
    if cols % BLOCK:
        raise ValueError(f"Q8_0: rows of {cols} values are not whole blocks of {BLOCK}")
    out = np.empty((rows, cols // BLOCK * GGML_QUANT_SIZES[QT.Q8_0][1]), np.uint8)
    _k_q8_0_columns(np.asarray(a, np.float32).T, out, out.view(np.uint16))
    return out


def convert(qtype: QT, blocks: np.ndarray, to: QT) -> np.ndarray:
    """(n, block bytes) blocks of a CONVERT type -> (n * per, block bytes of `to`) blocks of the type it becomes."""
    per, kernel = CONVERT[qtype]
    src = np.ascontiguousarray(blocks, np.uint8)
    out = np.empty((len(src) * per, GGML_QUANT_SIZES[to][1]), np.uint8)
    kernel(src, src.view(np.uint16), out, out.view(np.uint16))
    return out
