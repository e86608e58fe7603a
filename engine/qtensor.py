"""A weight in its stored GGUF form, and the conversions at its edges.

Everything inside the engine holds weights as `QTensor`: the raw storage of one GGUF tensor (quantized blocks
stay blocks) plus its logical numpy-order shape. The torch reference path dequantizes on demand; the numba
kernels compute on the blocks directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES
from gguf import quants

# types the kernels read as stored (BF16 widened; the K-quants re-laid in blocks of 32 with the same values); they
# convert the others as they prepare a model (`QTensor.native`)
NATIVE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q6_K, QT.Q3_K,
                QT.Q2_K, QT.Q4_K, QT.Q5_K)
# block types whose values a native type holds: IQ4_NL's table of int8 values fits in Q8_0's int8 (the same
# values), IQ4_XS's sub-blocks are IQ4_NL blocks (their scale d * (ls - 32) rounded to f16)
AS_NATIVE = {QT.IQ4_NL: QT.Q8_0, QT.IQ4_XS: QT.Q8_0}
# what an export to Q4_1 writes of Q4_K (`QTensor.converted`): its 32-value sub-blocks are Q4_1 blocks (scale d * sc
# and offset -dmin * m rounded to f16, within 2^-11 of them)
AS_BLOCKS = {QT.Q4_K: QT.Q4_1}
# byte offsets of the f16 numbers in each block that scale its values (every value is one of them times or plus
# small numbers): d (Q8_0, Q4_0, Q5_0, Q6_K, Q3_K, the IQ and TQ types), d and m or dmin (Q4_1, Q5_1, Q4_K, Q5_K,
# Q2_K); `finite` reads these, and the values of types not here
SCALES = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.IQ4_NL: (0,),
          QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q3_K: (108,), QT.Q2_K: (80, 82), QT.IQ4_XS: (0,),
          QT.IQ3_S: (0,), QT.IQ3_XXS: (0,), QT.IQ2_S: (0,), QT.IQ2_XS: (0,), QT.IQ2_XXS: (0,), QT.IQ1_S: (0,),
          QT.TQ1_0: (52,), QT.TQ2_0: (64,)}


@dataclass
class QTensor:
    qtype: QT
    shape: tuple[int, ...]  # logical numpy order: (rows, cols) or (n,)
    data: np.ndarray  # block types: uint8 (rows, row_bytes); F32: float32; F16: float16; BF16: uint16

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    def finite(self, chunk: int = 1 << 22) -> bool:
        """No NaN or infinity among the values (SCALES types: among the block scales, from which every value comes;
        other block types: their values), read about `chunk` floats at a time."""
        if self.qtype == QT.F32:
            flat = self.data.reshape(-1)
            return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))
        if self.qtype in (QT.F16, QT.BF16):
            top = np.uint16(0x7F80 if self.qtype == QT.BF16 else 0x7C00)  # exponent all ones: infinity or NaN
            flat = self.data.reshape(-1).view(np.uint16)
            return not any(((flat[i:i + chunk] & top) == top).any() for i in range(0, flat.size, chunk))
        n, size = GGML_QUANT_SIZES[self.qtype]
        blocks = np.asarray(self.data, np.uint8).reshape(-1, size)
        if self.qtype not in SCALES:
            step = max(1, chunk // n)
            return all(np.isfinite(quants.dequantize(blocks[i:i + step], self.qtype)).all()
                       for i in range(0, len(blocks), step))
        top = np.uint16(0x7C00)
        return not any(((blocks[i:i + chunk, o:o + 2].view(np.uint16) & top) == top).any()
                       for o in SCALES[self.qtype] for i in range(0, len(blocks), chunk))

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape`."""
        if self.qtype == QT.F32:
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.qtype == QT.F16:
            return self.data.astype(np.float32).reshape(self.shape)
        if self.qtype == QT.BF16:
            return (self.data.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        return quants.dequantize(self.data, self.qtype).astype(np.float32, copy=False).reshape(self.shape)

    def with_dequantized(self) -> QTensor:
        return QTensor(QT.F32, self.shape, self.dequantize())

    @property
    def remade_type(self) -> QT:
        """The type a matrix computed from this one's values is stored in (a LoRA merge, the sparse path's transpose):
        F32 and F16 as they are, BF16 as F32, block types as Q8_0 (finer than the 4-bit ones: requantizing adds less
        than their own rounding)."""
        return self.qtype if self.qtype in (QT.F32, QT.F16) else QT.F32 if self.qtype == QT.BF16 else QT.Q8_0

    @property
    def native_type(self) -> QT:
        """The type `native` gives."""
        if self.qtype in NATIVE_TYPES:
            return self.qtype
        return QT.F32 if len(self.shape) != 2 or self.shape[1] % 32 else AS_NATIVE.get(self.qtype, QT.Q8_0)

    def native(self, rows: int = 4096) -> QTensor:
        """This tensor in one of NATIVE_TYPES: itself if it is one (of any shape); an AS_NATIVE type as its native
        type; any other block type (IQ3_S, IQ2_XS, ...) re-quantized to Q8_0 from its values; F32 where that cannot
        be (not a matrix, or rows not whole 32-value blocks, or a scale of the result past f16's range, not the
        source's). The kernels convert IQ4_NL and IQ4_XS (`converted`); the other types go through gguf-py's
        dequantization, `rows` rows at a time."""
        qtype = self.native_type
        if qtype == self.qtype:
            return self
        if qtype == QT.F32:
            return self.with_dequantized()
        if self.qtype in AS_NATIVE:
            return self.converted()
        n, cols = self.shape
        blocks = np.asarray(self.data, np.uint8).reshape(n, -1)  # (rows, row bytes)
        out = np.empty((n, cols // 32 * GGML_QUANT_SIZES[qtype][1]), np.uint8)
        for r in range(0, n, rows):
            part = blocks[r:r + rows]
            with np.errstate(over="ignore"):  # a scale past f16's range: infinity, which the F32 fallback replaces
                out[r:r + rows] = quants.quantize(quants.dequantize(part, self.qtype).reshape(len(part), cols), qtype)
        done = QTensor(qtype, self.shape, out)
        return done if done.finite() else self.with_dequantized()  # a scale past f16's range (absurd weights): F32

    def converted(self) -> QTensor:
        """An AS_NATIVE or AS_BLOCKS matrix as the blocks of the type it maps to, by the kernels (`kernels.CONVERT`);
        F32 where a scale of the result would pass f16's range (not the source's)."""
        from . import kernels  # numba's, on first use
        qtype = AS_NATIVE.get(self.qtype) or AS_BLOCKS[self.qtype]
        size = GGML_QUANT_SIZES[self.qtype][1]
        out = kernels.convert(self.qtype, np.asarray(self.data, np.uint8).reshape(-1, size), qtype)
        done = QTensor(qtype, self.shape, out.reshape(self.shape[0], -1))
        return done if done.finite() else self.with_dequantized()

    def as_q8_0(self) -> QTensor:
        """Q4_0, Q5_0 or Q3_K blocks as Q8_0 blocks of the same values: each block's d, and its q - 8 or q - 16 as
        int8 (gguf-py's values are d times those integers, exact in float32, so dividing by d gives them back); Q3_K's
        values are its d times integers (sc - 32) (q - 4) that fit in int8 (`kernels.CONVERT`)."""
        if self.qtype == QT.Q3_K:
            from . import kernels  # numba's, on first use
            blocks = np.asarray(self.data, np.uint8).reshape(-1, GGML_QUANT_SIZES[QT.Q3_K][1])
            return QTensor(QT.Q8_0, self.shape, kernels.convert(QT.Q3_K, blocks, QT.Q8_0).reshape(self.shape[0], -1))
        assert self.qtype in (QT.Q4_0, QT.Q5_0), self.qtype
        blocks = np.asarray(self.data, np.uint8).reshape(-1, GGML_QUANT_SIZES[self.qtype][1])
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d != 0, quants.dequantize(blocks, self.qtype).reshape(-1, 32) / d, 0)
        out = np.concatenate([blocks[:, :2], np.rint(q).astype(np.int8).view(np.uint8)], axis=1)
        return QTensor(QT.Q8_0, self.shape, out.reshape(self.data.shape[:-1] + (-1,)))

    def rows(self, idx: np.ndarray) -> QTensor:
        """A QTensor of the selected rows (row permutation is exact for every type)."""
        return QTensor(self.qtype, (len(idx),) + tuple(self.shape[1:]), np.ascontiguousarray(self.data[idx]))

    @staticmethod
    def from_float(a: np.ndarray, qtype: QT = QT.F32) -> QTensor:
        if qtype == QT.Q8_0 and a.ndim == 2:  # a transposed view as it is
            from . import kernels  # numba's, on first use: gguf-py's bytes (test_q8_0_quantizer_is_gguf_pys)
            return QTensor(qtype, a.shape, kernels.quantize_q8_0(a))
        a = np.ascontiguousarray(a, dtype=np.float32)
        if qtype == QT.F32:
            return QTensor(qtype, a.shape, a)
        if qtype == QT.F16:
            return QTensor(qtype, a.shape, a.astype(np.float16))
        if qtype == QT.BF16:
            return QTensor(qtype, a.shape, (a.view(np.uint32) >> 16).astype(np.uint16))
        return QTensor(qtype, a.shape, quants.quantize(a, qtype))
