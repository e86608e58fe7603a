"""Block types the kernels do not read as GGUF stores them (llama.cpp's K-quants, IQ4, ...), converted at load
(`QTensor.native`) or re-laid (the K-quants: `kernels.prepare`): checked against gguf-py's dequantization, and a
model llama.cpp quantized to Q4_K_M against llama.cpp's logits."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import quants

from engine.kernels import SUPER_TYPES
from engine.qtensor import AS_BLOCKS, NATIVE_TYPES, SCALES, QTensor

# the block types kept as stored in a checkpoint (converted or re-laid by the kernels), and the byte offsets of
# their f16 scales: set to small finite values, the other bytes random
F16_AT = {q: at for q, at in SCALES.items() if q not in NATIVE_TYPES or q in SUPER_TYPES}
CONVERTED = [q for q in F16_AT if q not in NATIVE_TYPES]


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def random_blocks(qtype, rows, cols, rng):
    n = rows * cols // GGML_QUANT_SIZES[qtype][0]
    b = rng.integers(0, 256, (n, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for at in F16_AT.get(qtype, ()):
        b[:, at:at + 2] = (rng.uniform(0.5, 2, (n, 1)) * 10.0 ** rng.integers(-6, -1, (n, 1))).astype(
            np.float16).view(np.uint8)
    if qtype == QT.MXFP4:  # a power-of-two scale's exponent byte first
        b[:, 0] = rng.integers(110, 126, n)
    return QTensor(qtype, (rows, cols), b.reshape(rows, -1))


@pytest.mark.parametrize("qtype", CONVERTED + list(AS_BLOCKS), ids=lambda q: q.name)
def test_native_holds_the_values(qtype, rng):
    """IQ4_NL becomes Q8_0 with the same values, IQ4_XS too but for the f16 rounding of its sub-block scales; the
    others (through gguf-py, 5 rows at a time) Q8_0 re-quantized, within half a Q8_0 step and 127 times the f16
    rounding of its scale. Q4_K, which the kernels read as stored, converts (`converted`: export --outtype q4_1) to
    Q4_1 within the f16 rounding of its scale products (2^-11 of each term, so within 2^-9 of a 32-value block's
    largest value). f16 rounds within 2^-11 of a value, and within 2^-25 below 2^-14 (subnormals), hence the
    absolute terms."""
    rows, cols = 13, 768
    t = random_blocks(qtype, rows, cols, rng)
    ref = quants.dequantize(t.data, qtype).reshape(rows, cols).astype(np.float64)
    nat = t.converted() if qtype in AS_BLOCKS else t.native(rows=5)
    assert nat.qtype == AS_BLOCKS.get(qtype, QT.Q8_0) and nat.shape == (rows, cols)
    assert nat.data.shape == (rows, cols // 32 * GGML_QUANT_SIZES[nat.qtype][1])
    err = np.abs(nat.dequantize() - ref).reshape(rows, -1, 32)
    amax = np.abs(ref).reshape(rows, -1, 32).max(axis=2, keepdims=True)
    if qtype == QT.IQ4_NL:
        assert err.max() == 0
    elif qtype == QT.IQ4_XS:  # a scale d * (ls - 32) rounded to f16, times int8 values up to 127
        assert (err <= 2.0 ** -10 * amax + 127 * 2.0 ** -25).all() and err.max() > 0
    elif qtype == QT.Q4_K:  # 15 times a subnormal's rounding, at most
        assert (err <= 2.0 ** -9 * amax + 32 * 2.0 ** -25).all() and err.max() > 0
    else:
        assert (err <= (0.5 + 127 * 2.0 ** -11) * amax / 127 + 127 * 2.0 ** -25).all()


def test_q3_k_as_q8_0_holds_its_values(rng):
    """Q3_K's values are its d times integers (sc - 32) (q - 4) that int8 holds: `as_q8_0` (export --outtype q8_0)
    gives Q8_0 blocks of the same values, where quantizing them again would round them."""
    t = random_blocks(QT.Q3_K, 13, 768, rng)
    q8 = t.as_q8_0()
    assert q8.qtype == QT.Q8_0 and q8.data.shape == (13, 768 // 32 * 34)
    np.testing.assert_array_equal(q8.dequantize(), t.dequantize())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", list(F16_AT) + [QT.MXFP4], ids=lambda q: q.name)
def test_finite_reads_each_type_s_scales(qtype, rng):
    """`finite` (the loader's check) finds a NaN or infinite scale in any block of a type kept as stored: SCALES
    names bytes whose NaN makes gguf-py's values NaN; MXFP4, whose scale is not an f16, is read through its values."""
    t = random_blocks(qtype, 6, 512, rng)
    assert t.finite() and t.finite(chunk=3)
    blocks = t.data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    for at, n, bad in [(at, 2, v) for at in F16_AT.get(qtype, ()) for v in (0x7E00, 0xFC00)] or [(0, 1, 0xFF)]:
        blocks[7, at:at + n] = np.array([bad], np.uint16 if n == 2 else np.uint8).view(np.uint8)  # NaN, -inf
        assert not np.isfinite(quants.dequantize(blocks[7:8], qtype)).all()
        assert not t.finite() and not t.finite(chunk=3)
        blocks[7, at:at + n] = blocks[6, at:at + n]


def test_a_scale_past_f16_once_converted_falls_back_to_f32(rng):
    """Q4_K's d * sc can pass f16's 65504 where d alone does not (d 2000, sc up to 63): converted to Q4_1 (an
    export), such a tensor becomes F32 (its values as gguf-py gives them) rather than Q4_1 scales of infinity; the
    kernels read it as stored, their products in float32."""
    t = random_blocks(QT.Q4_K, 2, 256, rng)
    t.data.reshape(-1, 144)[:, 0:2] = np.array([2000.0], np.float16).view(np.uint8)
    assert t.finite() and t.native() is t
    nat = t.converted()
    assert nat.qtype == QT.F32
    np.testing.assert_array_equal(nat.data, quants.dequantize(t.data, QT.Q4_K).reshape(2, 256))


def test_native_keeps_native_types_and_widens_what_blocks_cannot_hold(rng):
    for qtype in (QT.Q4_1, QT.Q5_0, QT.Q5_1):  # the kernels compute on these blocks as stored
        q = QTensor.from_float(rng.standard_normal((4, 64)).astype(np.float32), qtype)
        assert q.native() is q and q.native_type == qtype
    odd = random_blocks(QT.IQ4_NL, 1, 256, rng)
    vec = QTensor(QT.IQ4_NL, (256,), odd.data.reshape(-1))  # not a matrix: F32
    assert vec.native().qtype == QT.F32
    np.testing.assert_array_equal(vec.native().data, quants.dequantize(odd.data, QT.IQ4_NL).reshape(-1))


def test_llamacpp_q4_k_m_file_against_llamacpp(data_dir, tmp_path, capsys):
    """tiny_q4_k_m.gguf is llama.cpp's Q4_K_M of a tiny random llama (tiny_config("silu", n_embd=256, n_ff=512),
    tiny_weights seed 3, written with pre="gpt-2"), made by llama-cpp-python 0.3.36's llama_model_quantize; its
    Q4_K and Q6_K tensors stay as stored in the checkpoint, and the kernels read them re-laid, with the same
    values (the torch reference dequantizes them). tiny_q4_k_m_llamacpp.npz: llama.cpp's logits at every position of
    48 tokens. Both engines follow llama.cpp's within 5% (measured 3.5%; the same values in F32: 2.9%, the part
    that llama.cpp's own 8-bit activations make) and agree with its top token at 90% of the positions or more, the
    kernels through their decode steps too (a prompt of 48 tokens is prefilled batched in torch); the unquantized
    model is 29% away, which the check tells apart."""
    from engine.api import load
    from tiny_model import tiny_config, tiny_weights, write_gguf
    ref = np.load(f"{data_dir}/tiny_q4_k_m_llamacpp.npz")
    ids, want = ref["ids"].tolist(), ref["logits"].astype(np.float64)

    def distance(m):
        got = m.logits(ids).double().numpy()
        return np.linalg.norm(got - want) / np.linalg.norm(want), (got.argmax(-1) == want.argmax(-1)).mean()
    for backend in ("kernels", "torch"):
        m = load(f"{data_dir}/tiny_q4_k_m.gguf", n_ctx=64, backend=backend)
        assert {t.qtype for t in m.ckpt.tensors.values()} == {QT.F32, QT.Q4_K, QT.Q6_K}  # as stored
        if backend == "kernels":  # which read them as they are, with nothing to say
            assert "the kernels read" not in capsys.readouterr().err
            assert {w.qtype for w in m.net.mats.values()} == {QT.Q4_K, QT.Q6_K}
        rel, top = distance(m)
        assert rel < 0.05 and top >= 0.9, (backend, rel, top)
        if backend == "kernels":  # the decode steps' dot products on the re-laid Q4_K and Q6_K blocks
            steps = np.stack([m.net.step(t, p).copy() for p, t in enumerate(ids)]).astype(np.float64)
            rel = np.linalg.norm(steps - want) / np.linalg.norm(want)
            assert rel < 0.05 and (steps.argmax(-1) == want.argmax(-1)).mean() >= 0.9, rel
    c = tiny_config("silu", n_embd=256, n_ff=512)
    rel, _ = distance(load(write_gguf(str(tmp_path / "f32.gguf"), c, tiny_weights(c, seed=3)), n_ctx=64))
    assert rel > 0.2


def test_export_q4_1_keeps_the_q4_k_blocks_as_the_kernels_read_them(data_dir, tmp_path, capsys):
    """`export --outtype q4_1` of a Q4_K_M file writes each Q4_K matrix as the kernels' Q4_1 form of it
    (`converted`), to the bit (not re-quantized from its values: that would round it twice); Q6_K ones are quantized
    from their values."""
    from engine.loader import load_checkpoint
    from tools.cli import main
    src = load_checkpoint(f"{data_dir}/tiny_q4_k_m.gguf")
    assert main(["export", "-m", f"{data_dir}/tiny_q4_k_m.gguf", "--format", "gguf", "--outtype", "q4_1",
                 "-o", str(tmp_path / "out")]) == 0
    out = load_checkpoint(str(tmp_path / "out.gguf"))
    for name, t in src.tensors.items():
        if t.qtype == QT.Q4_K:
            assert out.tensors[name].qtype == QT.Q4_1
            np.testing.assert_array_equal(out.tensors[name].data, t.converted().data)
        elif t.qtype == QT.Q6_K:
            assert out.tensors[name].qtype == QT.Q4_1
            np.testing.assert_array_equal(out.tensors[name].data, QTensor.from_float(t.dequantize(), QT.Q4_1).data)


def test_a_file_whose_scale_products_pass_f16(data_dir, tmp_path, capsys):
    """A Q4_K block of blk.0.ffn_down with d 60000 (d * sc past 65504): the kernels read that matrix as stored (their
    products in float32), the sparse path's transposed down is F32 (its Q8_0 scales would pass 65504), and an export
    to a type that cannot hold its values (Q4_1's scales) stops with one line naming the tensor."""
    import gguf

    from engine import kernels as K
    from engine.api import load
    from tools.cli import main
    path = tmp_path / "huge.gguf"
    path.write_bytes(open(f"{data_dir}/tiny_q4_k_m.gguf", "rb").read())
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == QT.Q4_K
    with open(path, "r+b") as fh:
        fh.seek(int(t.data_offset))
        fh.write(np.array([60000.0], np.float16).tobytes())
    m = load(str(path), n_ctx=64)
    err = capsys.readouterr().err
    assert "the kernels read" not in err, err
    L = m.net.layers[0]
    assert L.down.qtype == QT.Q4_K and K.transpose(L.down_src).qtype == QT.F32 and L.down_t.qtype == QT.F32
    assert np.isfinite(m.logits(list(range(2, 12))).numpy()).all()
    code = main(["export", "-m", str(path), "--format", "gguf", "--outtype", "q4_1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "tensor blk.0.ffn_down.weight: values up to" in err, err
    assert not list(tmp_path.glob("out*"))


def test_transpose_reads_the_values_the_dense_path_reads(rng):
    """The sparse path's ffn_down_t of a Q4_K ffn_down holds the Q8_0 rows of the values the dense path reads, the
    file's (the kernels give them faster than gguf-py)."""
    from engine import kernels as K
    t = random_blocks(QT.Q4_K, 64, 256, rng)
    got = K.transpose(t)
    want = QTensor.from_float(np.ascontiguousarray(t.dequantize().T), QT.Q8_0)
    assert (got.qtype, got.rows, got.cols) == (QT.Q8_0, 256, 64)
    np.testing.assert_array_equal(K.dequantize_rows(got, 0, 256), want.dequantize())


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0], ids=lambda q: q.name)
def test_export_q8_0_keeps_q4_0_and_q5_0_values(qtype, tmp_path):
    """Q8_0 holds every Q4_0 and Q5_0 value (the block's d times an integer of -16..15): `export --outtype q8_0`
    writes them as they are, where quantizing their values again moved them by up to half a Q8_0 step."""
    from engine.loader import load_checkpoint
    from tiny_model import tiny_config, tiny_weights, write_gguf
    from tools.cli import main
    c = tiny_config("silu")
    src = write_gguf(str(tmp_path / "src.gguf"), c, tiny_weights(c, seed=3), qtype)
    assert main(["export", "-m", src, "--format", "gguf", "--outtype", "q8_0", "-o", str(tmp_path / "out")]) == 0
    out = load_checkpoint(str(tmp_path / "out.gguf"))
    n = 0
    for name, t in load_checkpoint(src).tensors.items():
        if t.qtype == qtype:
            assert out.tensors[name].qtype == QT.Q8_0
            np.testing.assert_array_equal(out.tensors[name].dequantize(), t.dequantize())
            n += 1
    assert n >= 7
