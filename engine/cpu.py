"""The kernel engine: one-token decode on the numba kernels over weights in their stored GGUF blocks.

Prefill (and perplexity) stays batched in torch (`TorchModel` with non-resident weights): each matmul
dequantizes row chunks of the prepared matrices on the fly, so no float32 copy of the model is ever held.
Both paths share one KV cache. State (cache, scratch vectors) is allocated once here; a decode step
allocates nothing but its logits copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import kernels as K
from .config import ModelConfig, blk
from .model import TorchModel, rope_tables
from .qtensor import QTensor

ACT_CODES = {"silu": K.ACT_SILU, "relu": K.ACT_RELU, "fatrelu": K.ACT_FATRELU, "drelu": K.ACT_DRELU}
# called per layer with (layer, x_resid (n_embd,), xn (n_embd,)); returns active neuron ids (int32) or None
Selector = Callable[[int, np.ndarray, np.ndarray], "np.ndarray | None"]


@njit(nogil=True, cache=True, fastmath=True)
def rms_norm_into(x, w, eps, out):
    s = 0.0
    for j in range(x.size):
        s += x[j] * x[j]
    r = 1.0 / math.sqrt(s / x.size + eps)
    for j in range(x.size):
        out[j] = x[j] * r * w[j]


@njit(nogil=True, cache=True, fastmath=True)
def rope_into(v, n_head, hd, cos, sin):
    """Rotate adjacent pairs of each head of v (n_head * hd,) in place; cos/sin (hd/2,)."""
    for h in range(n_head):
        b = h * hd
        for j in range(hd // 2):
            x0, x1 = v[b + 2 * j], v[b + 2 * j + 1]
            v[b + 2 * j] = x0 * cos[j] - x1 * sin[j]
            v[b + 2 * j + 1] = x0 * sin[j] + x1 * cos[j]


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def attend_into(q, kc, vc, n_pos, scores, out):
    """One query over the cache. q (H*hd,), kc/vc (n_ctx, Hkv, hd), scores (H, n_ctx) scratch, out (H*hd,)."""
    n_kv, hd = kc.shape[1], kc.shape[2]
    n_head = q.size // hd
    group = n_head // n_kv
    scale = 1.0 / math.sqrt(hd)
    for h in prange(n_head):
        g = h // group
        m = -np.inf
        for t in range(n_pos):
            s = 0.0
            for d in range(hd):
                s += q[h * hd + d] * kc[t, g, d]
            s *= scale
            scores[h, t] = s
            m = max(m, s)
        tot = 0.0
        for t in range(n_pos):
            e = math.exp(scores[h, t] - m)
            scores[h, t] = e
            tot += e
        for d in range(hd):
            out[h * hd + d] = 0.0
        for t in range(n_pos):
            p = scores[h, t] / tot
            for d in range(hd):
                out[h * hd + d] += p * vc[t, g, d]


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _dequant_rows(W, r0, out):
    for j in prange(out.shape[0]):
        row = out[j]  # (cols,)
        row[:] = 0.0
        K._row_axpy(W, r0 + j, np.float32(1.0), row)


def dequantize_rows(m: K.KMatrix, r0: int, r1: int) -> np.ndarray:
    """float32 rows r0:r1 of a prepared matrix (the batched prefill's weights, one chunk at a time)."""
    out = np.empty((r1 - r0, m.cols), np.float32)
    _dequant_rows(m.W, np.int64(r0), out)
    return out


def down_t_of(down: QTensor) -> QTensor:
    """ffn_down (n_embd, n_ff) -> ffn_down_t (n_ff, n_embd), one contiguous row per neuron (PowerInfer's layout).
    Block-quantized inputs are re-quantized to Q8_0 along the new rows, which adds almost no error."""
    qtype = down.qtype if down.qtype in (QT.F32, QT.F16) else QT.Q8_0
    return QTensor.from_float(np.ascontiguousarray(down.dequantize().T), qtype)


@dataclass
class Layer:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    proj: list  # (matrix, r0, r1): attn_q, attn_k, attn_v rows stacked into qkv[r0:r1] (one matrix if types agree)
    o: K.KMatrix
    gate: K.KMatrix | None
    up: K.KMatrix
    down_t: K.KMatrix


def kernel_ready(t: QTensor) -> QTensor:
    """The kernels take F32, F16, Q8_0, Q4_0 and Q4_1; anything else (BF16) is widened to F32."""
    return t if t.qtype in (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1) else t.with_dequantized()


class KernelModel:
    """Same interface as TorchModel (`forward(tokens, pos, all_logits)`); decode runs on the kernels."""

    def __init__(self, c: ModelConfig, tensors: dict[str, QTensor], n_ctx: int):
        self.c, self.n_ctx = c, n_ctx
        tensors = {k: kernel_ready(t) if len(t.shape) == 2 else t for k, t in tensors.items()}
        self.mats: dict[str, tuple[K.KMatrix, int]] = {}  # GGUF name -> (prepared matrix, first row in it)
        self.layers = []
        for i in range(c.n_layer):
            q, k, v = (tensors[blk(i, n)] for n in ("attn_q", "attn_k", "attn_v"))
            if q.qtype == k.qtype == v.qtype:  # one matvec for all three
                qkv = K.prepare(QTensor(q.qtype, (q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]),
                                        np.concatenate([q.data, k.data, v.data])))
                proj = [(qkv, 0, qkv.rows)]
                self.mats.update({blk(i, "attn_q"): (qkv, 0), blk(i, "attn_k"): (qkv, q.shape[0]),
                                  blk(i, "attn_v"): (qkv, q.shape[0] + k.shape[0])})
            else:
                proj, r = [], 0
                for n, t in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
                    proj.append((K.prepare(t), r, r + t.shape[0]))
                    self.mats[blk(i, n)] = (proj[-1][0], 0)
                    r += t.shape[0]
            down_t = tensors.get(blk(i, "ffn_down_t")) or down_t_of(tensors[blk(i, "ffn_down")])
            prep = {n: K.prepare(tensors[blk(i, n)])
                    for n in ("attn_output", "ffn_up") + (("ffn_gate",) if c.ffn_gated else ())}
            prep["ffn_down_t"] = K.prepare(down_t)
            self.mats.update({blk(i, n): (m, 0) for n, m in prep.items()})
            self.layers.append(Layer(
                attn_norm=tensors[blk(i, "attn_norm")].dequantize(), ffn_norm=tensors[blk(i, "ffn_norm")].dequantize(),
                proj=proj, o=prep["attn_output"], gate=prep.get("ffn_gate"), up=prep["ffn_up"],
                down_t=prep["ffn_down_t"]))
        self.embd = tensors["token_embd.weight"]
        self.lm_head = K.prepare(tensors["token_embd.weight" if c.tied_embeddings else "output.weight"])
        self.mats["output.weight"] = (self.lm_head, 0)
        self.out_norm = tensors["output_norm.weight"].dequantize()
        # the torch prefill reads the same prepared matrices, dequantized in row chunks
        small = {k: t for k, t in tensors.items() if len(t.shape) == 1 or k == "token_embd.weight"}
        shapes = {k: QTensor(m.qtype, (tensors[k].shape[0] if k in tensors else m.rows, m.cols), np.empty(0))
                  for k, (m, _) in self.mats.items()}
        self.torch = TorchModel(c, {**small, **shapes}, n_ctx, dequant_rows=self.dequant_rows)
        self.torch.alias = {}
        self.act, self.threshold = ACT_CODES[c.act], float(c.act_threshold)
        self.select: Selector | None = None  # the sparse hook: active FFN neurons per layer
        self.runtime = None  # engine.hybrid.Runtime: predictor-driven FFN, replaces `select`
        # state, allocated once
        kv = c.n_head_kv * c.head_dim
        self.k_cache, self.v_cache = self.torch.k_cache.numpy(), self.torch.v_cache.numpy()  # shared
        cos, sin = rope_tables(c, n_ctx)
        self.cos, self.sin = cos.numpy(), sin.numpy()
        self.x = np.zeros(c.n_embd, np.float32)
        self.xn = np.zeros(c.n_embd, np.float32)
        self.qkv = np.zeros(c.n_embd + 2 * kv, np.float32)
        self.att = np.zeros(c.n_embd, np.float32)
        self.tmp = np.zeros(c.n_embd, np.float32)
        self.scores = np.zeros((c.n_head, n_ctx), np.float32)
        self.logits = np.zeros(c.n_vocab, np.float32)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in {id(m): m for m, _ in self.mats.values()}.values())

    def decode_bytes_per_token(self) -> int:
        return self.nbytes

    def dequant_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        m, off = self.mats[name]
        return torch.from_numpy(dequantize_rows(m, off + r0, off + r1))

    def forward(self, tokens: list[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        if len(tokens) > 1 or all_logits:
            return self.torch.forward(tokens, pos, all_logits)
        return torch.from_numpy(self.step(tokens[0], pos).copy())

    def step(self, token: int, pos: int) -> np.ndarray:
        """One token at position pos through every layer on the kernels; returns the logits buffer."""
        c, x, xn, qkv, att, tmp = self.c, self.x, self.xn, self.qkv, self.att, self.tmp
        if pos >= self.n_ctx:
            raise ValueError(f"position {pos} is past the context of {self.n_ctx}")
        x[:] = self.embd.rows(np.array([token])).dequantize()[0]
        hd, E = c.head_dim, c.n_embd
        kv = c.n_head_kv * hd
        cos, sin = self.cos[pos], self.sin[pos]
        for i, L in enumerate(self.layers):
            rms_norm_into(x, L.attn_norm, c.rms_eps, xn)
            for m, r0, r1 in L.proj:
                K.matvec(m, xn, qkv[r0:r1])
            q, k, v = qkv[:E], qkv[E:E + kv], qkv[E + kv:]
            rope_into(q, c.n_head, hd, cos, sin)
            rope_into(k, c.n_head_kv, hd, cos, sin)
            self.k_cache[i, pos] = k.reshape(c.n_head_kv, hd)
            self.v_cache[i, pos] = v.reshape(c.n_head_kv, hd)
            attend_into(q, self.k_cache[i], self.v_cache[i], pos + 1, self.scores, att)
            K.matvec(L.o, att, tmp)
            x += tmp
            rms_norm_into(x, L.ffn_norm, c.rms_eps, xn)
            if self.runtime is not None:  # predictors, maybe a hot part on another device (engine/hybrid.py)
                self.runtime.ffn(i, x, xn, tmp)
            else:
                active = self.select(i, x, xn) if self.select is not None else None
                K.ffn(L.gate, L.up, L.down_t, xn, self.act, self.threshold, tmp, active)
            x += tmp
        rms_norm_into(x, self.out_norm, c.rms_eps, xn)
        K.matvec(self.lm_head, xn, self.logits)
        return self.logits
