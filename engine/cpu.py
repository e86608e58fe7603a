"""The kernel engine: one-token decode on the numba kernels over weights in their stored GGUF blocks.

Long prompts (and perplexity) run batched in torch (`TorchModel` with non-resident weights): each matmul
dequantizes row chunks of the prepared matrices on the fly, so no float32 copy of the model is ever held.
Short prompts go through the decode step token by token, and torch is not even imported for them: a process
that generates from a short prompt starts a second sooner. Both paths share one KV cache. State (cache, scratch
vectors) is allocated once here; a decode step allocates nothing but, in a model with an output matrix of its own,
the embedding row it reads from the file.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import kernels as K
from .config import CACHE_TYPES, QKV, ModelConfig, blk
from .qtensor import AS_NATIVE, QTensor

ACT_CODES = {"silu": K.ACT_SILU, "relu": K.ACT_RELU, "fatrelu": K.ACT_FATRELU, "drelu": K.ACT_DRELU}
# called per layer with (layer, x_resid (n_embd,), xn (n_embd,)); returns active neuron ids (int32) or None
Selector = Callable[[int, np.ndarray, np.ndarray], "np.ndarray | None"]
# prompts up to this many tokens are prefilled by decode steps: on 2 cores SmolLM2 steps at ~8 ms a token, while
# the first batched torch forward of a process costs ~0.5 s more than later ones (import and matmul start-up)
STEP_PREFILL = 48


@njit(inline="always", **K._SERIAL)
def rms_norm_into(x, w, eps, out):
    s = np.float32(0.0)
    for j in range(x.size):
        s += x[j] * x[j]
    r = np.float32(1.0 / math.sqrt(s / x.size + eps))
    for j in range(x.size):
        out[j] = x[j] * r * w[j]


@njit(inline="always", **K._SERIAL)
def rope_into(v, n_head, hd, cos, sin):
    """Rotate adjacent pairs of each head of v (n_head * hd,) in place; cos/sin (hd/2,)."""
    for h in range(n_head):
        b = h * hd
        for j in range(hd // 2):
            x0, x1 = v[b + 2 * j], v[b + 2 * j + 1]
            v[b + 2 * j] = x0 * cos[j] - x1 * sin[j]
            v[b + 2 * j + 1] = x0 * sin[j] + x1 * cos[j]


@njit(**K._PARALLEL)
def attention_into(x, attn_norm, ffn_norm, eps, Wq, Wk, Wv, bqkv, Wo, kc, vc, pos, cos, sin, xn, qkv, att, scores,
                   Xq, Xo):
    """A decode step's attention block in one call, in place: q, k, v of xn = rms_norm(x) * attn_norm, plus their
    biases bqkv (q's, k's, v's, end to end: zeros without attn_bias), rotated;
    k, v written to the cache at pos; x += o(attention of q over the cache); then xn = rms_norm(x) * ffn_norm.
    x, xn (E,); W* weights as KMatrix.W; kc (Hkv, n_ctx, hd), vc (Hkv, hd, n_ctx) this layer's cache (see
    ModelConfig.kv_shapes), float32 or f16 bits (uint16); cos, sin (hd/2,); scratch: qkv (H hd + 2 Hkv hd,),
    att (H hd,), scores (H, n_ctx), Xq / Xo the prepared x of q and o."""
    n_kv, hd = kc.shape[0], kc.shape[2]
    nq, nk = Wq[0].shape[0], Wk[0].shape[0]
    n_head = nq // hd
    rms_norm_into(x, attn_norm, eps, xn)
    K._prep_x(xn, Xq, max(K._x_per(Wq, Xq), K._x_per(Wk, Xq), K._x_per(Wv, Xq)))
    for j in prange(qkv.size):
        if j < nq:
            K._prefetch_ahead(Wq, np.int64(j), nq)
            qkv[j] = K._row_dot(Wq, np.int64(j), xn, Xq, False) + bqkv[j]
        elif j < nq + nk:
            K._prefetch_ahead(Wk, np.int64(j - nq), nk)
            qkv[j] = K._row_dot(Wk, np.int64(j - nq), xn, Xq, False) + bqkv[j]
        else:
            K._prefetch_ahead(Wv, np.int64(j - nq - nk), qkv.size - nq - nk)
            qkv[j] = K._row_dot(Wv, np.int64(j - nq - nk), xn, Xq, False) + bqkv[j]
    rope_into(qkv, n_head + n_kv, hd, cos, sin)  # q then k: both rotate, v is past them
    for g in range(n_kv):
        for d in range(hd):
            kc[g, pos, d] = K._stored(qkv[nq + g * hd + d], kc)
            vc[g, d, pos] = K._stored(qkv[nq + nk + g * hd + d], vc)
    group = n_head // n_kv
    scale = np.float32(1.0 / math.sqrt(hd))
    for h in prange(n_head):
        g = h // group
        qh, sc, oh = qkv[h * hd:(h + 1) * hd], scores[h], att[h * hd:(h + 1) * hd]  # (hd,), (n_ctx,), (hd,)
        kg, vg = kc[g], vc[g]  # (n_ctx, hd), (hd, n_ctx)
        m = np.float32(-np.inf)  # sums through K._dot: one order in every compiled copy
        for t in range(pos + 1):
            sc[t] = K._dot(qh, kg[t], hd) * scale
            m = max(m, sc[t])
        for t in range(pos + 1):
            sc[t] = K._exp(sc[t] - m)
        inv = np.float32(1.0) / K._dot(sc, None, pos + 1)
        for d in range(hd):
            oh[d] = K._dot(sc, vg[d], pos + 1) * inv  # vg[d]: (n_ctx,)
    K._prep_x(att, Xo, K._x_per(Wo, Xo))
    for r in prange(x.size):
        K._prefetch_ahead(Wo, np.int64(r), x.size)
        x[r] += K._row_dot(Wo, np.int64(r), att, Xo, False)
    rms_norm_into(x, ffn_norm, eps, xn)


@dataclass
class Layer:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    bqkv: np.ndarray  # (n_head hd + 2 n_head_kv hd,): the q, k and v biases end to end, zeros without attn_bias
    q: K.KMatrix
    k: K.KMatrix
    v: K.KMatrix
    o: K.KMatrix
    gate: K.KMatrix | None
    up: K.KMatrix
    down: K.KMatrix | None  # (n_embd, n_ff) as stored, kept when block-quantized: the dense FFN's (fewer bytes)
    down_src: QTensor | None = None  # ffn_down as stored, while down_t is not built yet
    built_down_t: K.KMatrix | None = None
    runs: dict = field(default_factory=dict)  # sparse (bool) -> kernels.ffn_runner bound to this layer

    @property
    def down_t(self) -> K.KMatrix:
        """(n_ff, n_embd): the sparse FFN's rows, one per neuron. For a block-quantized ffn_down, built on first use
        (the first sparse step), so that dense decoding neither waits for the transpose at load nor holds a second
        down; other types are transposed at load, where the dense FFN reads down_t."""
        if self.built_down_t is None:
            self.built_down_t, self.down_src = K.transpose(self.down_src), None
        return self.built_down_t


def vector(t: QTensor) -> np.ndarray:
    """A norm's weights in float32, copied: an F32 one is a view of the file's map, which the loader lets go of
    (`Checkpoint.drop_pages`) and each step would fault back in, neighbouring pages with it."""
    return np.array(t.dequantize(), np.float32)


class KernelModel:
    """Same interface as TorchModel (`forward(tokens, pos, all_logits)`); decode runs on the kernels."""

    def __init__(self, c: ModelConfig, tensors: dict[str, QTensor], n_ctx: int, cache_type: str = "f16"):
        self.c, self.n_ctx = c, n_ctx
        widened = sorted({t.qtype.name for t in tensors.values()
                          if len(t.shape) == 2 and t.native_type not in K.KERNEL_TYPES})
        if widened:
            print(f"hotcold: note: the kernels widen {', '.join(widened)} matrices to F32 (twice their memory); "
                  "`hotcold export --outtype f16` keeps them at their size", file=sys.stderr)
        read_as = set()  # (stored type, the type the kernels read it as: QTensor.native), for the note below

        def prepare(t: QTensor) -> K.KMatrix:  # one at a time: a converted copy goes before the next is made
            n = t.native()
            if n.qtype != t.qtype:
                read_as.add((t.qtype, n.qtype))
            return K.prepare(n if n.qtype in K.KERNEL_TYPES else n.with_dequantized())
        self.mats: dict[str, K.KMatrix] = {}  # GGUF name -> prepared matrix (what the torch prefill reads)
        self.layers = []
        blocks = K.BLOCK_TYPES + K.SUPER_TYPES
        keep_down = all(blk(i, "ffn_down") in tensors and tensors[blk(i, "ffn_down")].native_type in blocks
                        for i in range(c.n_layer))
        for i in range(c.n_layer):
            prep = {n: prepare(tensors[blk(i, n)]) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up")
                    + (("ffn_gate",) if c.ffn_gated else ()) + (("ffn_down",) if keep_down else ())}
            given = tensors.get(blk(i, "ffn_down_t"))  # else transposed on first use, block types to Q8_0
            L = Layer(
                attn_norm=vector(tensors[blk(i, "attn_norm")]), ffn_norm=vector(tensors[blk(i, "ffn_norm")]),
                bqkv=np.concatenate([vector(tensors[blk(i, n, "bias")]) if c.attn_bias else
                                     np.zeros(prep[n].rows, np.float32) for n in QKV]),
                q=prep["attn_q"], k=prep["attn_k"], v=prep["attn_v"], o=prep["attn_output"],
                gate=prep.get("ffn_gate"), up=prep["ffn_up"], down=prep.get("ffn_down"),
                down_src=tensors.get(blk(i, "ffn_down")), built_down_t=None if given is None else prepare(given))
            self.mats.update({blk(i, n): m for n, m in prep.items()})
            if not keep_down:  # the prefill reads down_t then
                self.mats[blk(i, "ffn_down_t")] = L.down_t
            self.layers.append(L)
        self.embd = tensors["token_embd.weight"]  # rows looked up as stored
        self.lm_head = prepare(tensors["token_embd.weight" if c.tied_embeddings else "output.weight"])
        self.mats["output.weight"] = self.lm_head
        if read_as:
            said = (f"{q.name} as {to.name}"
                    f"{'' if to == AS_NATIVE.get(q) else ' (re-quantized)' if to == QT.Q8_0 else ' (widened)'}"
                    for q, to in sorted(read_as))
            print(f"hotcold: note: the kernels read {', '.join(said)}", file=sys.stderr)
        self.out_norm = vector(tensors["output_norm.weight"])
        # what the torch prefill reads (`torch`): the same prepared matrices, dequantized in row chunks
        small = {k: t for k, t in tensors.items() if len(t.shape) == 1 or k == "token_embd.weight"}
        shapes = {k: QTensor(m.qtype, (tensors[k].shape[0] if k in tensors else m.rows, m.cols), np.empty(0))
                  for k, m in self.mats.items()}
        self.batched_tensors = {**small, **shapes}
        self.act, self.threshold = ACT_CODES[c.act], float(c.act_threshold)
        self.nt = numba.get_num_threads()  # the sparse FFN's slices: the thread count at load (engine.api sets it)
        self.select: Selector | None = None  # the sparse hook: active FFN neurons per layer
        self.runtime = None  # engine.hybrid.Runtime: predictor-driven FFN, replaces `select`
        self.threshold_ffn = None  # engine.sparsity.KernelSelector: a sparsity config's FFN, replaces `select`
        # state, allocated once
        # keys (n_layer, Hkv, n_ctx, hd), values (n_layer, Hkv, hd, n_ctx) (ModelConfig.kv_shapes), shared with the
        # `torch` prefill
        self.k_cache, self.v_cache = (np.zeros(s, CACHE_TYPES[cache_type]) for s in c.kv_shapes(n_ctx))
        self.cos, self.sin = c.rope_tables(n_ctx)
        self.x = np.zeros(c.n_embd, np.float32)
        self.x_row = self.x.reshape(1, -1)  # (1, n_embd) view of x
        self.token = np.zeros(1, np.int64)  # (1,): the step's token, as the row id of the embedding
        self.xn = np.zeros(c.n_embd, np.float32)
        L = self.layers[0]
        self.qkv = np.zeros(L.q.rows + L.k.rows + L.v.rows, np.float32)  # (n_head hd + 2 n_head_kv hd,): q, k, v
        self.att = np.zeros(L.o.cols, np.float32)  # (n_head hd,)
        self.tmp = np.zeros(c.n_embd, np.float32)  # (n_embd,): the FFN's output
        self.scores = np.zeros((c.n_head, n_ctx), np.float32)  # (n_head, n_ctx)
        self.logits = np.zeros(c.n_vocab, np.float32)  # (n_vocab,)
        # attention_into's arguments but x, pos, cos, sin, per layer (bound once: 1-2 us a call less)
        self.attn_args = [(L.attn_norm, L.ffn_norm, c.rms_eps, L.q.W, L.k.W, L.v.W, L.bqkv, L.o.W, self.k_cache[i],
                           self.v_cache[i]) for i, L in enumerate(self.layers)]
        self.attn_scratch = [(self.xn, self.qkv, self.att, self.scores, L.q.X, L.o.X) for L in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes of all prepared weights (both FFN down layouts once the sparse path has built down_t)."""
        return sum(m.nbytes for m in {id(m): m for L in self.layers for m in self.ffn_mats(L) + self.attn_mats(L)}
                   .values()) + self.lm_head.nbytes

    @staticmethod
    def attn_mats(L: Layer) -> list[K.KMatrix]:
        return [L.q, L.k, L.v, L.o]

    @staticmethod
    def ffn_mats(L: Layer) -> list[K.KMatrix]:
        """The FFN matrices held now (down_t once built)."""
        return [m for m in (L.gate, L.up, L.down, L.built_down_t) if m is not None]

    def decode_bytes_per_token(self, sparsity: float = 0.0, all_rows: bool = False) -> int:
        """Weight bytes a decode step reads with that share of FFN neurons skipped: the active neurons' gate and up
        rows (every neuron's with all_rows: a sparsity config's scores need all of h) and their down_t rows, or all
        of down when the set is dense enough for `kernels.ffn` to read it (a dense step reads down rather than
        down_t where both are kept)."""
        total = self.lm_head.nbytes
        for L in self.layers:
            total += sum(m.nbytes for m in self.attn_mats(L))
            total += (1 if all_rows else 1 - sparsity) * (L.up.nbytes + (L.gate.nbytes if L.gate else 0))
            dense = L.down is not None and (sparsity == 0 or 1 - sparsity >= K.DENSE_FROM)
            total += L.down.nbytes if dense else (1 - sparsity) * L.down_t.nbytes
        return round(total)

    @cached_property
    def torch(self):
        """The batched forward (engine.model.TorchModel) over the prepared weights and this model's KV cache,
        built (and torch imported) on first use."""
        from .model import TorchModel
        net = TorchModel(self.c, self.batched_tensors, self.n_ctx, dequant_rows=self.dequant_rows,
                         kv=(self.k_cache, self.v_cache))
        net.alias = {}
        for i in range(self.c.n_layer):  # 8-bit x a super-block where a decode step rounds it so: a K-quant's, and
            # that of the matrices that share its x
            for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("attn_output",), ("ffn_down",)):
                names = [blk(i, n) for n in group if blk(i, n) in self.mats]
                if K.x_blocks(*(self.mats[n] for n in names)) > 1:
                    net.x8.update(dict.fromkeys(names, 256))
        if self.lm_head.qtype in K.SUPER_TYPES:
            net.x8["output.weight"] = 256
        return net

    def dequant_rows(self, name: str, r0: int, r1: int):
        import torch
        return torch.from_numpy(K.dequantize_rows(self.mats[name], r0, r1))

    def forward(self, tokens: list[int], pos: int, all_logits: bool = False):
        """torch logits, as TorchModel.forward: (T, n_vocab) for all positions, or (n_vocab,) for the last."""
        import torch
        if len(tokens) > 1 or all_logits:
            return self.torch.forward(tokens, pos, all_logits)
        return torch.from_numpy(self.step(tokens[0], pos).copy())

    def hidden(self, tokens: list[int], pos: int, last: bool = False):
        """TorchModel.hidden: the hidden states after the output norm (T, n_embd) (last: (1, n_embd)), from decode
        steps for up to STEP_PREFILL tokens (no output matrix read), else from the batched forward, as next_logits."""
        import torch
        if len(tokens) > max(STEP_PREFILL, 1):
            return self.torch.hidden(tokens, pos, last)
        rows = []
        for j, t in enumerate(tokens):
            self.step(t, pos + j, head=False)
            rows.append(self.xn.copy())
        return torch.from_numpy(np.stack(rows[-1:] if last else rows))

    def next_logits(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (n_vocab,) after tokens placed at pos..: decode steps for up to STEP_PREFILL tokens, else one
        batched forward. The step's buffer: read it before the next call."""
        if len(tokens) > max(STEP_PREFILL, 1):
            return self.torch.forward(tokens, pos).numpy()
        for j, t in enumerate(tokens):
            self.step(t, pos + j)
        return self.logits

    def ffn(self, L: Layer, xn: np.ndarray, out: np.ndarray, active: np.ndarray | None) -> None:
        """out = layer L's FFN of xn over the active neuron ids (None: all; dense ones read the stored down)."""
        sparse = active is not None or L.down is None
        run = L.runs.get(sparse)
        if run is None:  # the sparse runner builds down_t (on the first sparse use)
            run = L.runs[sparse] = K.ffn_runner(L.gate, L.up, L.down_t if sparse else None, self.act,
                                                self.threshold, down=L.down, nt=self.nt)
        run(xn, out, active)

    def check_step(self, token: int, pos: int) -> None:
        """A decode step's token and position, before anything is written (LayerOffload's device layers too)."""
        if pos >= self.n_ctx:
            raise ValueError(f"position {pos} is past the context of {self.n_ctx}")
        if not 0 <= token < self.embd.shape[0]:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.embd.shape[0]}")

    def step(self, token: int, pos: int, first: int = 0, head: bool = True) -> np.ndarray:
        """One token at position pos through layers first.. on the kernels; returns the logits buffer (head False:
        not computed; self.xn holds the hidden state after the output norm).
        first > 0: self.x holds the residual entering that layer (the layers before it ran elsewhere)."""
        c, x, xn, tmp = self.c, self.x, self.xn, self.tmp
        self.check_step(token, pos)
        if first == 0:
            if c.tied_embeddings:  # the prepared lm_head holds the embedding rows: the token's row by a kernel
                self.token[0] = token
                K._dequant_ids(self.lm_head.W, self.token, self.x_row)
            else:
                x[:] = self.embd.rows(np.array([token])).dequantize()[0]
        cos, sin = self.cos[pos], self.sin[pos]
        for i in range(first, c.n_layer):
            L = self.layers[i]
            attention_into(x, *self.attn_args[i], pos, cos, sin, *self.attn_scratch[i])
            if self.runtime is not None:  # predictors, maybe a hot part on another device (engine/hybrid.py)
                self.runtime.ffn(i, x, xn, tmp)
            elif self.threshold_ffn is not None:  # a sparsity config (engine/sparsity.py)
                self.threshold_ffn.ffn(i, xn, tmp)
            else:
                self.ffn(L, xn, tmp, self.select(i, x, xn) if self.select is not None else None)
            x += tmp
        rms_norm_into(x, self.out_norm, c.rms_eps, xn)
        if head:
            K.matvec(self.lm_head, xn, self.logits)
        return self.logits
