"""The numba kernels against gguf's dequantize + numpy in float64, on small random matrices."""
import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants

from engine import kernels as K
from engine.qtensor import SCALES, QTensor

# numba's typed inliner reports the inlined helpers' loop variables from a pedantic internal check (see kernels)
pytestmark = pytest.mark.filterwarnings("ignore:variable '_row_:numba.core.errors.NumbaIRAssumptionWarning")

TYPES = [QT.F32, QT.F16, *K.BLOCK_TYPES]  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
EXACT_TOL, INT8_TOL = 1e-4, 1e-2  # relative error of the exact paths and of the int8-activation paths


def rel(got, ref) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def tol(qtype: QT, exact: bool) -> float:
    return EXACT_TOL if exact or qtype in (QT.F32, QT.F16) else INT8_TOL


def int8_x(x: np.ndarray, k: bool = False) -> np.ndarray:
    """x (float32) as the int8 activation paths see it, float64: per 32-block, quants rint(x * (127 / amax)) (round
    half to even, float32 steps) times the block's scale amax / 127 (truncating instead is off by about 1e-2); k
    (the K-quants' integer sums): the scale a whole multiple m = ceil(32 amax / A), 1..32, of A / (32 127), A the
    amax of its super-block of 8 blocks, and the quants rint(x * (1 / scale))."""
    if k:
        b = x.reshape(-1, 8, 32)
        amax = np.abs(b).max(2, keepdims=True)  # (n/256, 8, 1)
        big = amax.max(1, keepdims=True)
        m = np.clip(np.ceil(np.float32(K.XM) * amax / big), 1, K.XM).astype(np.float32)
        scale = big / np.float32(K.XM * 127) * m
        return (np.rint(b * (np.float32(1) / scale)).astype(np.float64) * scale).reshape(-1)
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(1, keepdims=True)  # (nb, 1)
    q = np.rint(b * (np.float32(127) / amax))  # integers in [-127, 127]
    return (q.astype(np.float64) * (amax / np.float32(127))).reshape(-1)


def emulated(qtype: QT, exact: bool, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The x a matvec of qtype multiplies, and the tolerance against it: int8 x emulated to float32 rounding."""
    if exact or qtype in (QT.F32, QT.F16):
        return x.astype(np.float64), EXACT_TOL
    # measured at most 4.4e-7 over 200 random matrices per type
    return int8_x(x, qtype in K.SUPER_TYPES), 2e-6


def weight(rng, rows: int, cols: int, qtype: QT) -> tuple[K.KMatrix, np.ndarray]:
    """A prepared random matrix and its float64 dequantized reference."""
    qt = QTensor.from_float(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    return K.prepare(qt), qt.dequantize().astype(np.float64)


def super_source(rng, rows: int, cols: int, qtype: QT) -> QTensor:
    """A random matrix of a K-quant type the kernels re-lay (K.SUPER_TYPES): random quant and sub-scale bytes (Q6_K's
    sub-scales -128 and 127 in some blocks), the super-blocks' f16 d small, of either sign, subnormal in some
    (values up to about 4)."""
    size, nbytes = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows * cols // size, nbytes), dtype=np.uint8)
    for at in SCALES[qtype]:  # d (Q2_K, Q4_K, Q5_K: and dmin)
        d = rng.uniform(0.5, 1.0, (len(b), 1)) * {QT.Q6_K: 1e-3, QT.Q3_K: 2e-2, QT.Q2_K: 0.1, QT.Q4_K: 2e-2,
                                                  QT.Q5_K: 1e-2}[qtype]
        d *= rng.choice([-1, 1], (len(b), 1))
        d[::7] *= 1e-3  # below 2^-14: f16 subnormals
        b[:, at:at + 2] = d.astype(np.float16).view(np.uint8)
    if qtype == QT.Q6_K:
        b[::5, 192:208:2], b[::5, 193:208:2] = 0x80, 0x7F
    return QTensor(qtype, (rows, cols), b.reshape(rows, -1))


def row_sets(rng, n: int) -> dict[str, np.ndarray]:
    return {"empty": np.zeros(0, np.int32), "full": np.arange(n, dtype=np.int32),
            "random": rng.choice(n, n // 3 + 1, replace=False).astype(np.int32)}  # unsorted, odd sizes


def test_matvec_rows_from_the_end(rng):
    """A negative row id counts from the end, as numpy's (rows are not bounds-checked otherwise)."""
    for qtype in TYPES:
        w, ref = weight(rng, 37, 64, qtype)
        x, rows = rng.standard_normal(64).astype(np.float32), np.array([-1, -37, 5], np.int32)
        out = np.zeros(3, np.float32)
        K.matvec_rows(w, rows, x, out, exact=True)
        assert rel(out, ref[rows] @ x) < EXACT_TOL, qtype


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prepare_keeps_stored_size(qtype, rng):
    qt = QTensor.from_float(rng.standard_normal((37, 96)).astype(np.float32), qtype)
    w = K.prepare(qt)
    assert (w.rows, w.cols, w.qtype) == (37, 96, qtype)
    assert w.nbytes == qt.nbytes


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec(qtype, exact, rng):
    w, ref = weight(rng, 37, 96, qtype)  # odd row count
    x = rng.standard_normal(96).astype(np.float32)
    out = np.full(37, np.nan, np.float32)
    K.matvec(w, x, out, exact=exact)
    xe, t = emulated(qtype, exact, x)
    assert rel(out, ref @ xe) < t
    assert rel(out, ref @ x) < tol(qtype, exact)


@pytest.mark.parametrize("qtype", K.BLOCK_TYPES, ids=lambda t: t.name)
def test_matvec_of_a_block_too_small_to_scale(qtype, rng):
    """A block of x under 1e-30 counts as 0s (127 / its max overflowed to inf, and its quant sum went to INT_MIN:
    Q4 results of 1e8 where the truth is 1e-36); the other blocks as usual."""
    w, ref = weight(rng, 37, 96, qtype)
    x = rng.standard_normal(96).astype(np.float32)
    x[32:64] *= np.float32(1e-37)
    out = np.full(37, np.nan, np.float32)
    K.matvec(w, x, out)
    assert rel(out, ref @ x) < INT8_TOL


def test_k_quant_x_of_tiny_and_huge_super_blocks(rng):
    """x for the K-quants' integer sums (`_prep_x` with per 8): a super-block under 1e-30 quantizes to 0s, one near
    float32's largest values to its 8-bit steps (its multiples at 32: 1 made quants of 4064, wrapped in int8), a
    small block in an ordinary super-block to a small multiple of the unit."""
    w = K.prepare(super_source(rng, 4, 768, QT.Q4_K))
    x = rng.standard_normal(768).astype(np.float32)
    x[:256] *= np.float32(1e-36)
    x[256:512] = np.float32(3.2e38) * np.sign(x[256:512])
    x[512:544] *= np.float32(0.01)
    K._prep_x(x, w.X, 8)
    xq, xd, xm, xu = w.X[1].astype(np.float64), w.X[2], w.X[6], w.X[7]
    assert not xq[:256].any() and np.abs(xq).max() == 127
    np.testing.assert_allclose(xq[256:512] * np.repeat(xd[8:16], 32), x[256:512], rtol=1e-6)
    assert xm[8] == K.XM and 1 <= xm[16] < 4 and xm[17:].max() == K.XM and xu[2] == np.abs(x[512:]).max() / 4064
    step = np.repeat(xd[16:], 32)
    assert (np.abs(xq[512:] * step - x[512:]) <= step / 2 * 1.001).all() and step[0] < 4 * xu[2]


def q8_with_min_quants(rng, rows: int, cols: int) -> QTensor:
    """A random Q8_0 matrix with some quants at -128 (no quantizer writes them; a file may hold them)."""
    qt = QTensor.from_float(rng.standard_normal((rows, cols)).astype(np.float32), QT.Q8_0)
    blocks = qt.data.reshape(rows, cols // 32, 34)
    blocks[:, ::2, 2 + rng.integers(0, 32)] = 0x80
    return qt


@pytest.mark.parametrize("exact", [True, False])
def test_matvec_q8_most_negative_quant(exact, rng):
    qt = q8_with_min_quants(rng, 23, 128)
    ref = qt.dequantize().astype(np.float64)
    assert (ref == 0).sum() < ref.size // 20 and (K.prepare(qt).W[0] == -128).sum() >= 23 * 2
    x = rng.standard_normal(128).astype(np.float32)
    out = np.zeros(23, np.float32)
    K.matvec(K.prepare(qt), x, out, exact=exact)
    assert rel(out, ref @ x) < tol(QT.Q8_0, exact)


ISA_CHECK = """
import json, sys
import numpy as np
from gguf import GGMLQuantizationType as QT
from engine import kernels as K
from engine.qtensor import QTensor
from tests.test_kernels import _rows_dot, int8_x, q8_with_min_quants, rel, super_source
from numba import njit
K.ISA = sys.argv[1]


@njit
def widen(h, out):
    for i in range(h.size):
        out[i] = K._widen(h[i])


@njit
def store(x, out):
    for i in range(x.size):
        out[i] = K._stored(x[i], out)


rng = np.random.default_rng(7)
errors, errors16, emulated = {}, {}, {}
for qtype in K.BLOCK_TYPES + K.SUPER_TYPES:
    # 1, 2, 5, 6, 7 blocks: every tail of vnni512's steps of 2 x 2 blocks; super-blocks are 8 and 16
    for cols in (256, 512) if qtype in K.SUPER_TYPES else (32, 64, 160, 192, 224):
        qt = (q8_with_min_quants(rng, 29, cols) if qtype == QT.Q8_0 else super_source(rng, 29, cols, qtype)
              if qtype in K.SUPER_TYPES else QTensor.from_float(rng.standard_normal((29, cols)).astype(np.float32),
                                                               qtype))
        x = rng.standard_normal(cols).astype(np.float32)
        out = np.zeros(29, np.float32)
        km, ref = K.prepare(qt), qt.dequantize().astype(np.float64) @ x
        K.matvec(km, x, out)
        errors[qtype.name] = max(errors.get(qtype.name, 0.0), rel(out, ref))
        if qtype in K.SUPER_TYPES:  # their integer sums against x quantized per super-block
            e = rel(out, qt.dequantize().astype(np.float64) @ int8_x(x, True))
            emulated[qtype.name] = max(emulated.get(qtype.name, 0.0), e)
        _rows_dot(km.W, x, km.X16, out)  # rows against 16-bit x: the dense FFN's down @ h (but a K-quant's)
        errors16[qtype.name] = max(errors16.get(qtype.name, 0.0), rel(out, ref))
asm = "\\n".join(K._k_matvec.inspect_asm().values()) if sys.argv[1] != "generic" else ""
asm16 = "\\n".join(_rows_dot.inspect_asm().values()) if sys.argv[1] != "generic" else ""
halves = np.arange(2**16, dtype=np.uint16)  # every f16 bit pattern
widened = np.zeros(halves.size, np.float32)
widen(halves, widened)
finite = halves.view(np.float16).astype(np.float32)
mid = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)  # ties between neighbours
x = np.concatenate([finite, mid, rng.standard_normal(10**5).astype(np.float32) * np.float32(2.0) ** rng.integers(
    -30, 20, 10**5).astype(np.float32), np.float32([65504, 65519.99, 65520, 65536, 1e10, 2.0**-25, 3e-8, 5.9e-8])])
stored = np.zeros(x.size, np.uint16)
store(x, stored)
with np.errstate(invalid="ignore", over="ignore"):
    want = x.astype(np.float16)
print(json.dumps({"errors": errors, "errors16": errors16, "emulated": emulated, "vpdpbusd": "vpdpbusd" in asm,
                  "vpmaddubsw": "vpmaddubsw" in asm, "vpdpwssd": "vpdpwssd" in asm,
                  "zmm_dot": any("vpdpbusd" in line and "zmm" in line for line in asm.splitlines()),
                  "vpmaddwd16": sorted({r for line in asm16.splitlines() if "vpmaddwd" in line
                                        for r in ("ymm", "zmm") if r in line}),
                  "widen_wrong": int(((widened.view(np.uint32) != finite.view(np.uint32))
                                      & ~(np.isnan(widened) & np.isnan(finite))).sum()),
                  "store_wrong": int(((stored != want.view(np.uint16))
                                      & ~(np.isnan(stored.view(np.float16)) & np.isnan(want))).sum()),
                  "stored": int(x.size)}))
"""


@pytest.mark.parametrize("isa", ["vnni512", "vnni", "avx2", "generic"])
def test_int8_dot_product_of_each_isa(isa, tmp_path):
    """Each host-dependent int8 block dot product (K.ISA), and the int16 one of the dense FFN's down @ h, compiled
    in a new process with its own numba cache (a process compiles one of them), against float64 (the K-quants'
    integer sums also against x quantized per super-block, to float32 rounding); the host must
    support the instructions. Also the f16 conversions of each path (`_widen`, `_stored`) against numpy, on every
    f16 value and on float32 values around them. The generic path compiles for NUMBA_CPU_NAME=generic, where
    LLVM's f16 conversions call compiler-rt functions numba cannot link (the process aborted before the integer
    conversions)."""
    order = ["generic", "avx2", "vnni", "vnni512"]
    if order.index(isa) > order.index(K.host_isa()):
        pytest.skip(f"this host's CPU runs {K.host_isa()}, not {isa}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", ISA_CHECK, isa], capture_output=True, text=True, timeout=300,
                         cwd=root, env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path),
                                        **({"NUMBA_CPU_NAME": "generic"} if isa == "generic" else {})})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    errors = got["errors"]
    assert set(errors) == {t.name for t in K.BLOCK_TYPES + K.SUPER_TYPES}
    assert all(0 < e < INT8_TOL for e in errors.values()), errors
    assert set(got["errors16"]) == set(errors) and all(0 < e < 1e-4 for e in got["errors16"].values()), got
    emulated = got["emulated"]
    assert set(emulated) == {t.name for t in K.SUPER_TYPES} and all(e < 2e-6 for e in emulated.values()), emulated
    assert got["stored"] > 2**17 and (got["widen_wrong"], got["store_wrong"]) == (0, 0), got
    if isa != "generic":  # the path asked for is the one compiled (x86 hosts)
        # vpmaddubsw: the block types' products on AVX2, the K-quants' pairs on every path, then vpdpwssd with VNNI
        # (LLVM fuses AVX2's vpmaddwd and add into it too where the host has it)
        vnni = isa.startswith("vnni")
        assert (got["vpdpbusd"], got["vpmaddubsw"], got["zmm_dot"]) == (vnni, True, isa == "vnni512")
        assert got["vpdpwssd"] or not vnni
        # the 16-bit x path's products: 512-bit over two blocks with vnni512 (256-bit for an odd last block)
        assert got["vpmaddwd16"] == (["ymm", "zmm"] if isa == "vnni512" else ["ymm"]), got


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_rows(qtype, exact, rng):
    w, ref = weight(rng, 37, 64, qtype)
    x = rng.standard_normal(64).astype(np.float32)
    for name, rows in row_sets(rng, 37).items():
        out = np.full(rows.size, np.nan, np.float32)
        K.matvec_rows(w, rows, x, out, exact=exact)
        xe, t = emulated(qtype, exact, x)
        assert rel(out, ref[rows] @ xe) < t, name
        assert rel(out, ref[rows] @ x) < tol(qtype, exact), name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_axpy_rows(qtype, rng):
    w_t, ref = weight(rng, 37, 160, qtype)
    for name, rows in row_sets(rng, 37).items():
        coef = rng.standard_normal(rows.size).astype(np.float32)
        out = rng.standard_normal(160).astype(np.float32)
        want = out + coef.astype(np.float64) @ ref[rows]  # accumulates into out
        K.axpy_rows(w_t, rows, coef, out)
        assert rel(out, want) < EXACT_TOL, name


def test_axpy_rows_odd_dense_width(rng):
    """Dense types take any width."""
    w_t, ref = weight(rng, 37, 45, QT.F16)
    rows, coef = np.arange(37, dtype=np.int32), rng.standard_normal(37).astype(np.float32)
    out = np.zeros(45, np.float32)
    K.axpy_rows(w_t, rows, coef, out)
    assert rel(out, coef @ ref) < EXACT_TOL


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_transpose(qtype, rng):
    a = rng.standard_normal((64, 96)).astype(np.float32)
    qt = QTensor.from_float(a, qtype)
    w_t = K.transpose(qt)
    assert (w_t.rows, w_t.cols) == (96, 64)
    assert w_t.qtype == (qtype if qtype in (QT.F32, QT.F16) else QT.Q8_0)
    x = rng.standard_normal(64).astype(np.float32)
    out = np.zeros(96, np.float32)
    K.matvec(w_t, x, out, exact=True)
    want = QTensor.from_float(np.ascontiguousarray(qt.dequantize().T), w_t.qtype).dequantize().astype(np.float64)
    assert rel(out, want @ x) < EXACT_TOL


def silu(v):
    return v / (1 + np.exp(-v))


def ffn_reference(g, u, d_t, x, act, threshold, active):
    """float64 FFN over the active neurons; g None for a plain FFN."""
    fns = {K.ACT_SILU: silu, K.ACT_RELU: lambda v: np.maximum(v, 0),
           K.ACT_FATRELU: lambda v: np.where(v > threshold, v, 0), K.ACT_DRELU: lambda v: np.maximum(v, 0)}
    f = fns[act]
    up = u @ x
    if g is None:
        h = f(up)
    else:
        h = f(g @ x) * (np.maximum(up, 0) if act == K.ACT_DRELU else up)
    idx = np.arange(len(h)) if active is None else active
    return h[idx] @ d_t[idx]


def ffn_case(rng, qtype, n_embd=64, n_ff=96, gated=True):
    """gate, up (n_ff, n_embd) of qtype, down_t (n_ff, n_embd) from transposing a (n_embd, n_ff) down."""
    gate, g = weight(rng, n_ff, n_embd, qtype) if gated else (None, None)
    up, u = weight(rng, n_ff, n_embd, qtype)
    down = QTensor.from_float(rng.standard_normal((n_embd, n_ff)).astype(np.float32), qtype)
    down_t = K.transpose(down)
    d_t = QTensor.from_float(np.ascontiguousarray(down.dequantize().T), down_t.qtype).dequantize()
    x = (rng.standard_normal(n_embd) / np.sqrt(n_embd)).astype(np.float32)
    return (gate, up, down_t, x), (g, u, d_t.astype(np.float64))


@pytest.mark.parametrize("act", [K.ACT_SILU, K.ACT_RELU, K.ACT_FATRELU, K.ACT_DRELU],
                         ids=["silu", "relu", "fatrelu", "drelu"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_ffn_activations(act, gated, rng):
    (gate, up, down_t, x), (g, u, d_t) = ffn_case(rng, QT.Q4_1, gated=gated)
    active_sets = {"all (None)": None, **row_sets(rng, up.rows)}
    for name, active in active_sets.items():
        want = ffn_reference(g, u, d_t, x, act, 0.25, active)
        for exact in (True, False):
            out = np.full(64, np.nan, np.float32)  # overwritten, not accumulated
            K.ffn(gate, up, down_t, x, act, 0.25, out, active, exact=exact)
            if name == "empty":
                assert not out.any()
            elif exact or act in (K.ACT_SILU, K.ACT_RELU, K.ACT_DRELU):
                # int8 x can move FATReLU's g across its threshold, a jump of ~t: only the exact path there
                assert rel(out, want) < tol(QT.Q4_1, exact), (name, exact)


@numba.njit
def _rows_dot(W, x, X, out):
    K._prep_x(x, X, K._x_per(W, X))
    for r in range(out.size):
        out[r] = K._row_dot(W, np.int64(r), x, X, False)


@pytest.mark.parametrize("qtype", K.BLOCK_TYPES, ids=lambda t: t.name)
def test_int16_x_dot_products(qtype, rng):
    """The dense FFN's down projection takes h in 16 bits per block (KMatrix.X16): far closer to float64 than the
    8-bit x of the other matrices (error ~1e-5, against ~5e-3), also for heavy-tailed x like SiLU FFN outputs."""
    m, ref = weight(rng, 37, 160, qtype)
    for x in (rng.standard_normal(160), rng.standard_normal(160) ** 5):
        x = x.astype(np.float32)
        out, out8 = np.zeros(37, np.float32), np.zeros(37, np.float32)
        _rows_dot(m.W, x, m.X16, out)
        _rows_dot(m.W, x, m.X, out8)
        assert rel(out, ref @ x) < 1e-4 < rel(out8, ref @ x) / 10


def test_q8_0_quantizer_is_gguf_pys(rng):
    """The numba Q8_0 quantizer (`QTensor.from_float`, transposes, exports) writes gguf-py's bytes: rows over a wide
    range of magnitudes, a block of zeros, of -0.0, of values on rounding ties, of subnormals, one at f16's edge."""
    a = rng.standard_normal((64, 96)).astype(np.float32) * np.exp(rng.uniform(-30, 12, (64, 1))).astype(np.float32)
    a[0, :32], a[1, :32], a[2, :32] = 0.0, -0.0, 1e-40
    a[3, :32] = (np.arange(32) - 15.5) / 2  # with -63.5: d = 0.5, so a / d is on a tie (-14.5 ... 15.5)
    a[3, 0] = -63.5
    a[5, 32:64] = np.float32(65504 * 127)
    with np.errstate(over="ignore", invalid="ignore"):  # gguf-py's 1 / d of the subnormals' d: inf, then 0 quants
        want, want64 = quants.quantize(a, QT.Q8_0), quants.quantize(a[:, :64], QT.Q8_0)
    np.testing.assert_array_equal(K.quantize_q8_0(a), want)
    np.testing.assert_array_equal(QTensor.from_float(a, QT.Q8_0).data, want)
    t = np.ascontiguousarray(a.T)  # a transposed view is read in place
    np.testing.assert_array_equal(QTensor.from_float(t.T, QT.Q8_0).data, want)
    np.testing.assert_array_equal(K.quantize_q8_0(a[:, :64]), want64)  # a view with rows apart
    with pytest.raises(ValueError, match="not whole blocks"):
        K.quantize_q8_0(a[:, :40])
    a[6, 3] = np.nan  # its block's d NaN, as gguf-py's (`finite` then says so: F32 in a transpose, an error in export)
    q = QTensor.from_float(a, QT.Q8_0)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(q.data[6, :2], quants.quantize(a[6:7, :32], QT.Q8_0)[0, :2]) and not q.finite()
    assert np.array_equal(q.data[6, 34:], want[6, 34:])  # the row's other blocks as they were


@pytest.mark.parametrize("qtype", K.SUPER_TYPES, ids=lambda t: t.name)
def test_super_types(qtype, rng):
    """Q6_K, Q3_K and Q2_K, re-laid in blocks of 32 with two scales each (Q2_K: and two mins), Q4_K and Q5_K with a
    scale and min each, all with the super-block's d (and dmin) once: the values gguf-py dequantizes (to the bit but
    for a zero's sign) (the axpy path reads them), in 6.625, 3.625, 2.625, 4.625 and 5.625 bits a weight (6.5625,
    3.4375, 2.625, 4.5 and 5.5 stored); matvec exact, and with int8 x against the emulated int8 x at float32
    rounding; row subsets; 16-bit x (what a block type's down @ h takes in the dense FFN; a K-quant's takes 8-bit h);
    an FFN whose gate, up and down are of the type, through down_t (sparse) and through the stored down (dense)."""
    qt = super_source(rng, 37, 512, qtype)
    w, ref = K.prepare(qt), qt.dequantize().astype(np.float64)
    block = {QT.Q6_K: 26.5, QT.Q3_K: 14.5, QT.Q2_K: 10.5, QT.Q4_K: 18.5, QT.Q5_K: 22.5}[qtype]  # bytes a block of 32
    assert (w.qtype, w.rows, w.cols, w.nbytes) == (qtype, 37, 512, 37 * 512 // 32 * block)
    assert qt.native() is qt
    np.testing.assert_array_equal(K.dequantize_ids(w, np.arange(37)), ref)
    np.testing.assert_array_equal(K.values(qt), ref)
    x = rng.standard_normal(512).astype(np.float32)
    for exact in (True, False):
        out = np.full(37, np.nan, np.float32)
        K.matvec(w, x, out, exact=exact)
        xe, t = emulated(qtype, exact, x)
        assert rel(out, ref @ xe) < t and rel(out, ref @ x) < tol(qtype, exact), exact
        for name, rows in row_sets(rng, 37).items():
            out = np.full(rows.size, np.nan, np.float32)
            K.matvec_rows(w, rows, x, out, exact=exact)
            assert rel(out, ref[rows] @ xe) < t, (name, exact)
    out = np.zeros(37, np.float32)
    _rows_dot(w.W, x, w.X16, out)
    assert rel(out, ref @ x) < 1e-4
    (gate, g), (up, u) = (weight(rng, 512, 256, QT.Q4_1) for _ in range(2))
    down = super_source(rng, 256, 512, qtype)
    d = down.dequantize().T.astype(np.float64)  # (n_ff, n_embd)
    down_t = K.transpose(down)
    d_t = QTensor.from_float(np.ascontiguousarray(down.dequantize().T), QT.Q8_0).dequantize()
    x = (rng.standard_normal(256) / 16).astype(np.float32)
    for name, active in {"all (None)": None, **row_sets(rng, 512)}.items():
        for exact in (True, False):
            bound = tol(qtype, exact) * (1 if exact else 2)  # int8 x in gate and up, and 8-bit h in down
            sparse, dense = np.full(256, np.nan, np.float32), np.full(256, np.nan, np.float32)
            K.ffn(gate, up, down_t, x, K.ACT_SILU, 0.0, sparse, active, exact=exact)
            K.ffn(gate, up, down_t, x, K.ACT_SILU, 0.0, dense, active, exact=exact, down=K.prepare(down))
            if active is None or active.size == 512:  # the dense path reads the stored down
                assert rel(dense, ffn_reference(g, u, d, x, K.ACT_SILU, 0.0, active)) < bound, (name, exact)
            if active is not None and active.size:  # down_t: Q8_0 rows of the same values, re-quantized
                assert rel(sparse, ffn_reference(g, u, d_t, x, K.ACT_SILU, 0.0, active)) < bound, (name, exact)


def test_exp_against_numpy():
    """kernels._exp (a polynomial, so that loops over it vectorize) against float64 exp, clamped at the ends."""
    @numba.njit(fastmath=True)
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = K._exp(x[i])

    x = np.concatenate([np.linspace(-87, 88, 10**6), [-1e4, -100, -88, 89, 100, 1e4, 0.0, -0.0]]).astype(np.float32)
    out = np.zeros_like(x)
    exp_all(x, out)
    want = np.exp(np.clip(x, -87, 88).astype(np.float64))
    err = np.abs(out - want) / want
    assert err.max() < 1e-5 and err[np.abs(x) < 10].max() < 1e-6, err.max()


def test_dot_against_float64_in_its_fixed_order():
    """kernels._dot (the attention's sums, and dense rows) against float64 for every length class (32-steps,
    8-steps, tail) and each b type; plain sums (no products that FMA could fuse) bit for bit against numpy taking
    them in the documented order."""
    @numba.njit(fastmath=True)
    def dot(a, b, n):
        return K._dot(a, b, n)

    def ordered(a, n):  # the documented order, in float32
        p = a[:n]
        n32, n8 = n & ~31, n & ~7
        acc = [np.zeros(8, np.float32) for _ in range(4)]
        for k in range(0, n32, 32):
            for j in range(4):
                acc[j] = acc[j] + p[k + 8 * j:k + 8 * j + 8]
        for k in range(n32, n8, 8):
            acc[0] = acc[0] + p[k:k + 8]
        v = (acc[0] + acc[1]) + (acc[2] + acc[3])
        for w in (4, 2, 1):
            v = v[:w] + v[w:2 * w]
        t = v[0]
        for k in range(n8, n):
            t = np.float32(t + p[k])
        return t

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 31, 32, 33, 40, 64, 100, 1000):
        a = rng.standard_normal(n + 3).astype(np.float32)
        b = rng.standard_normal(n + 3).astype(np.float32)
        for bb, b64 in ((b, b.astype(np.float64)), (b.astype(np.float16).view(np.uint16), b.astype(np.float16)),
                        (None, None)):
            want = a[:n].astype(np.float64) @ (np.float64(b64[:n]) if bb is not None else np.ones(n))
            got = dot(a, bb, n)
            assert abs(got - want) <= 1e-5 * max(1.0, np.abs(a[:n]).sum()), (n, got, want)
        assert dot(a, None, n) == ordered(a, n)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("qtype", K.BLOCK_TYPES, ids=lambda t: t.name)
def test_ffn_untransposed_down(qtype, exact, rng, monkeypatch):
    """With the stored down (n_embd, n_ff), dense active sets compute h, then down @ h, against the reference on
    the stored down; sparser sets still take down_t's rows."""
    (gate, up, _, x), (g, u, _) = ffn_case(rng, qtype, n_ff=160)
    qt = QTensor.from_float(rng.standard_normal((64, 160)).astype(np.float32), qtype)
    down, down_t = K.prepare(qt), K.transpose(qt)
    d = qt.dequantize().T.astype(np.float64)  # (n_ff, n_embd) as stored
    d_t = QTensor.from_float(np.ascontiguousarray(qt.dequantize().T), down_t.qtype).dequantize().astype(np.float64)
    for dense_from in (0.0, K.DENSE_FROM):  # every set through down; only the dense ones
        monkeypatch.setattr(K, "DENSE_FROM", dense_from)
        for name, active in {"all (None)": None, **row_sets(rng, up.rows)}.items():
            out = np.full(64, np.nan, np.float32)
            K.ffn(gate, up, down_t, x, K.ACT_SILU, 0.0, out, active, exact=exact, down=down)
            dense = dense_from == 0.0 or active is None or active.size == up.rows
            want = ffn_reference(g, u, d if dense else d_t, x, K.ACT_SILU, 0.0, active)
            assert rel(out, want) < tol(qtype, exact), (name, dense_from)
    with pytest.raises(ValueError, match="shapes disagree"):
        K.ffn(gate, up, down_t, x, K.ACT_SILU, 0.0, np.zeros(64, np.float32), down=K.prepare(qt.rows(np.arange(32))))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_ffn_types(qtype, rng):
    (gate, up, down_t, x), (g, u, d_t) = ffn_case(rng, qtype)
    active = row_sets(rng, up.rows)["random"]
    for exact in (True, False):
        out = np.zeros(64, np.float32)
        K.ffn(gate, up, down_t, x, K.ACT_SILU, 0.0, out, active, exact=exact)
        assert rel(out, ffn_reference(g, u, d_t, x, K.ACT_SILU, 0.0, active)) < tol(qtype, exact)


def test_ffn_thread_counts(rng):
    """Per-thread partial sums give the same result whatever the thread count, and whatever the number of slices
    given (nt: more or fewer than the threads)."""
    (gate, up, down_t, x), _ = ffn_case(rng, QT.Q4_1)
    outs = []
    for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(n)
        outs.append(np.zeros(64, np.float32))
        K.ffn(gate, up, down_t, x, K.ACT_RELU, 0.0, outs[-1], exact=True)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for nt in (1, 3, 7):
        outs.append(np.zeros(64, np.float32))
        K.ffn(gate, up, down_t, x, K.ACT_RELU, 0.0, outs[-1], exact=True, nt=nt)
    assert down_t.part.shape[0] == max(7, numba.config.NUMBA_NUM_THREADS)
    for out in outs[1:]:
        assert rel(outs[0], out.astype(np.float64)) < 1e-6


def test_rejects_unsupported(rng):
    a = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="BF16"):
        K.prepare(QTensor.from_float(a, QT.BF16))
    with pytest.raises(ValueError, match="2-D"):
        K.prepare(QTensor.from_float(a[0], QT.F32))
    for qtype, block_bytes in ((QT.Q8_0, 34), (QT.Q4_0, 18), (QT.Q4_1, 20), (QT.Q5_0, 22), (QT.Q5_1, 24)):
        bad = QTensor(qtype, (4, 48), np.zeros((4, 2 * block_bytes), np.uint8))  # 48 cols: 1.5 blocks
        with pytest.raises(ValueError, match=f"{qtype.name}.*4x48"):
            K.prepare(bad)
    w = K.prepare(QTensor.from_float(a, QT.Q8_0))
    with pytest.raises(ValueError, match="x must be"):
        K.matvec(w, np.zeros(32, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="x must be"):
        K.matvec(w, np.zeros(64), np.zeros(4, np.float32))


def test_kernel_cache_follows_every_engine_source(tmp_path):
    """cpu.py inlines helpers from kernels.py, and numba checks only a function's own file: so the cache folder is
    named after all of the engine's sources, and editing kernels.py alone moves every kernel to a new one (and
    removes the old folder)."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "engine"), tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import numba, engine.kernels; print(numba.config.CACHE_DIR)"

    def cache_dir(**env):
        env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    first = cache_dir(NUMBA_CACHE_DIR=None)
    assert first.startswith(str(tmp_path / "engine" / "__pycache__" / "numba-"))
    assert cache_dir(NUMBA_CACHE_DIR=None) == first
    os.makedirs(os.path.join(first, "engine"))  # as a compiling run leaves it
    with open(tmp_path / "engine" / "kernels.py", "a") as fh:
        fh.write("# edited\n")
    assert cache_dir(NUMBA_CACHE_DIR=None) != first
    assert not os.path.exists(first)  # the old sources' kernels are removed, not left to pile up
    # NUMBA_CACHE_DIR: a folder of these sources under it (stale kernels were loaded from it after an edit)
    assert cache_dir(NUMBA_CACHE_DIR=str(tmp_path / "mine")) == str(
        tmp_path / "mine" / "hotcold" / os.path.basename(cache_dir(NUMBA_CACHE_DIR=None)))
    # a cache folder that cannot be made (numba raised "no locator available" at import, as for a read-only install
    # run by a user without a home): a private folder of the temporary directory's, or else no cache
    (tmp_path / "file").write_text("")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "file"), "TMPDIR": str(tmp_path / "tmp")}
    name, private = os.path.basename(cache_dir(NUMBA_CACHE_DIR=None)), tmp_path / "tmp" / f"hotcold-{os.getuid()}"

    def fallback():
        res = subprocess.run([sys.executable, "-c", code + "; print(engine.kernels.CACHED)"], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()[-1], res.stderr
    cached, err = fallback()
    assert cached == "True" and os.stat(private).st_mode & 0o777 == 0o700
    assert f"kernel cache {tmp_path / 'file' / 'hotcold' / name} cannot be written; using {private / name}" in err
    os.chmod(private, 0o777)  # a folder others can write (their pickles would run here): not used
    cached, err = fallback()
    assert cached == "False" and "no kernel cache can be written" in err


def test_jit_cache_is_used_by_a_new_process(rng):
    """cache=True works from the installed package: a fresh process loads the kernels this one compiled."""
    w, _ = weight(rng, 8, 64, QT.Q4_1)
    K.matvec(w, np.ones(64, np.float32), np.zeros(8, np.float32))
    code = ("import numpy as np; from engine import kernels as K; from engine.qtensor import QTensor; "
            "from gguf import GGMLQuantizationType as QT; "
            "w = K.prepare(QTensor.from_float(np.ones((8, 64), np.float32), QT.Q4_1)); "
            "K.matvec(w, np.ones(64, np.float32), np.zeros(8, np.float32)); "
            "print(sum(K._k_matvec.stats.cache_hits.values()), sum(K._k_matvec.stats.cache_misses.values()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    hits, misses = map(int, res.stdout.split())
    assert (hits, misses) == (1, 0)


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0], ids=lambda t: t.name)
def test_scored_ffn_is_the_sparse_ffn_over_the_score_rule(qtype, rng, monkeypatch):
    """A sparsity config's FFN (h once for every neuron, down for those whose |h_i| * ||down[:, i]|| is above t):
    its active ids are the rule's on a float64 h, and its output is `ffn`'s over those ids, bit for bit, through
    down_t's rows or (DENSE_FROM 0) the stored down; t 0 is the exact rule h_i != 0 (ReLU)."""
    (gate, up, _, x), (g, u, _) = ffn_case(rng, qtype, n_ff=160)
    qt = QTensor.from_float(rng.standard_normal((64, 160)).astype(np.float32), qtype)
    d = qt.dequantize().astype(np.float64)  # (n_embd, n_ff) as stored
    norms = np.linalg.norm(d, axis=0)  # (n_ff,)
    for act in (K.ACT_SILU, K.ACT_RELU):
        h = (silu(g @ x) if act == K.ACT_SILU else np.maximum(g @ x, 0)) * (u @ x)  # float64 (n_ff,)
        s = np.sort(np.abs(h) * norms)
        k = 64 + int(np.argmax(s[65:97] - s[64:96]))  # the widest gap near the middle: no score near t
        for t in ((s[k] + s[k + 1]) / 2, 0.0) if act == K.ACT_SILU else (0.0,):
            want = np.flatnonzero(np.abs(h) * norms > t if t > 0 else h != 0).astype(np.int32)
            for dense_from in (K.DENSE_FROM, 0.0):
                monkeypatch.setattr(K, "DENSE_FROM", dense_from)
                down, down_t = K.prepare(qt), K.transpose(qt)
                run = K.scored_ffn_runner(gate, up, down_t, act, 0.0, down=down, exact=True)
                out, ids, hs = np.full(64, np.nan, np.float32), np.zeros(160, np.int32), np.zeros(160, np.float32)
                n = run(x, out, norms.astype(np.float32), t, ids, hs)
                assert np.array_equal(ids[:n], want), (act, t, dense_from)
                ref = np.full(64, np.nan, np.float32)
                K.ffn(gate, up, down_t, x, act, 0.0, ref, want, exact=True, down=down)
                assert np.array_equal(out, ref), (act, t, dense_from)
                assert rel(out, h[want] @ d.T[want]) < 1e-2, (act, t, dense_from)  # down_t's Q8_0 rounding
