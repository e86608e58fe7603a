"""The dense reference forward in torch: LLaMA decoder with GQA, adjacent-pair rotary, a KV cache allocated once.

No I/O here. Weights arrive as GGUF-named `QTensor`s and are dequantized to float32 once: this is the
reference path that the numba kernel path is tested against, and the batched prefill.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import QKV, ModelConfig, blk, torch_threads


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * w, the rms taken in float32 whatever x's dtype: float16 squares overflow past 256, and
    SmolLM2's residuals reach 25,000 (the result is then x's dtype, promoted with w's)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def ffn_activation(g: torch.Tensor, u: torch.Tensor | None, act: str, t: float) -> torch.Tensor:
    """h = act(g) * u for a gated FFN (u None: plain act(g)). dReLU gates both branches."""
    if act == "silu":
        h = F.silu(g)
    elif act == "relu":
        h = F.relu(g)
    elif act == "fatrelu":
        h = torch.where(g > t, g, torch.zeros_like(g))
    else:  # drelu
        h = F.relu(g)
        u = F.relu(u) if u is not None else None
    return h if u is None else h * u


def quantize_rows_q8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x rounded as ggml rounds activations before a quantized dot product: int8 per block of 32 with an fp16 scale
    (Q8_0); block 256 (the K-quants): as the kernels round it for their integer sums (to an ulp of a scale), each
    block's scale a whole multiple, 1..32, of its 256 values' amax / (32 * 127) (`kernels._prep_x`)."""
    xb = x.unflatten(-1, (-1, 32))  # (..., n/32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    if block == 256:
        big = amax.unflatten(-2, (-1, 8)).amax(-2).repeat_interleave(8, -2)  # (..., n/32, 1): its super-block's
        d = big / (32 * 127) * torch.ceil(32 * amax / big.clamp(min=1e-30)).clamp(1, 32)
    else:
        d = (amax / 127).clamp(max=65504).half().float()  # past f16's range ggml's scale is inf (NaN values): finite
    q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d)))
    return (q * d).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, hd) with rotation on adjacent pairs (x[2i], x[2i+1]); cos/sin (T, hd/2)."""
    x2 = x.unflatten(-1, (-1, 2))  # (T, H, hd/2, 2)
    a, b = x2[..., 0], x2[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with query t (at position pos + t) seeing keys 0..pos+t: q (H, T, hd), k and v
    (Hkv, S, hd) with S = pos + T, query head h reading key head h // (H / Hkv) -> (H, T, hd).
    torch's fused CPU kernel (flash attention: blocks of queries and keys, no (H, T, S) scores, causal blocks
    skipped) takes 4-D inputs with unit stride along hd only; given 3-D ones, or the values strided as the cache
    holds them, torch runs its plain path, which builds every head's (T, S) scores: 2-3x slower from 512 tokens,
    5 GB more at 8192."""
    q4, k4, v4 = (t.contiguous()[None] for t in (q, k, v))  # (1, heads, T or S, hd)
    gqa, T = q.shape[0] != k.shape[0], q.shape[1]
    if pos == 0 or T == 1:  # from position 0 the mask is torch's causal one; a single query sees every key
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=T > 1, enable_gqa=gqa)[0]
    t = torch.arange(pos + T, device=q.device)
    seen = t[None, :] <= t[pos:, None]  # (T, S): key s is at or before query t's position
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=seen, enable_gqa=gqa)[0]


class TorchModel:
    """Dense forward over a KV cache of n_ctx positions."""

    def __init__(self, c: ModelConfig, tensors: dict, n_ctx: int,
                 dequant_rows: Callable[[str, int, int], torch.Tensor] | None = None,
                 kv: tuple[np.ndarray, np.ndarray] | None = None):
        """dequant_rows None: every weight is dequantized to float32 once (the reference path). Otherwise a
        callable(name, r0, r1) -> float32 rows r0:r1, used per matmul in chunks of CHUNK rows, so that no full
        float32 copy is held (the kernel engine's prefill). `blk.N.ffn_down_t.weight` (n_ff, n_embd) may stand
        in for ffn_down. kv: the K and V caches to share (ModelConfig.kv_shapes; float32, or uint16 holding f16)."""
        torch_threads()
        self.c, self.n_ctx, self.q = c, n_ctx, tensors
        self.dequant_rows = dequant_rows
        self.w = {k: torch.from_numpy(t.dequantize().copy()) for k, t in tensors.items()
                  if dequant_rows is None or len(t.shape) == 1}
        # ggml multiplies block-quantized weights with 8-bit activations; doing the same tracks llama.cpp closer
        self.x8 = {k: 32 for k, t in tensors.items() if t.block_size == 32}  # name: values an activation scale
        if c.tied_embeddings:
            self.alias = {"output.weight": "token_embd.weight"}
            if "token_embd.weight" in self.x8:
                self.x8["output.weight"] = self.x8["token_embd.weight"]
        else:
            self.alias = {}
        self.down_t = blk(0, "ffn_down_t") in tensors
        self.cos, self.sin = (torch.from_numpy(t) for t in c.rope_tables(n_ctx))
        self.k_cache, self.v_cache = (torch.zeros(s) for s in c.kv_shapes(n_ctx)) if kv is None else \
            (torch.from_numpy(a).view(torch.float16 if a.dtype == np.uint16 else torch.float32) for a in kv)
        self.sparsity = None  # optional engine.sparsity.Sparsifier: zeroes h's inactive neurons before `down`
        self.ffn_hook = None  # optional callable(layer, x_ffn_in (T, n_embd), h (T, n_ff)) -> h, for profiling
        self.predict = None  # optional callable(layer, x_ffn_in (T, n_embd)) -> bool (T, n_ff) predicted active

    CHUNK = 4096

    @contextmanager
    def hooked(self, hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None, dense: bool = False):
        """`ffn_hook` set to hook inside a with block, restored after it (also on errors); dense: without the
        sparsity config there too."""
        saved = self.ffn_hook, self.sparsity
        self.ffn_hook, self.sparsity = hook, None if dense else self.sparsity
        try:
            yield self
        finally:
            self.ffn_hook, self.sparsity = saved

    def decode_bytes_per_token(self) -> int:
        shapes = [t.shape for k, t in self.q.items() if k != "token_embd.weight" or self.c.tied_embeddings]
        return sum(int(np.prod(s)) * 4 for s in shapes)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        name = self.alias.get(name, name)
        if self.dequant_rows is None:
            return self.w[name][r0:r1]
        return self.dequant_rows(name, r0, r1)

    def mm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (T, cols) @ W.T -> (T, rows)."""
        x = quantize_rows_q8(x, self.x8[name]) if name in self.x8 else x
        n = self.q[self.alias.get(name, name)].shape[0]
        if self.dequant_rows is None:
            return x @ self.rows(name, 0, n).T
        return torch.cat([x @ self.rows(name, r, min(n, r + self.CHUNK)).T for r in range(0, n, self.CHUNK)], 1)

    def down(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h (T, n_ff) through the down projection -> (T, n_embd)."""
        if not self.down_t:
            return self.mm(h, blk(i, "ffn_down"))
        name, n, out = blk(i, "ffn_down_t"), self.c.n_ff, None
        for r in range(0, n, self.CHUNK):
            part = h[:, r:r + self.CHUNK] @ self.rows(name, r, min(n, r + self.CHUNK))  # (T, n_embd)
            out = part if out is None else out + part
        return out

    def embed(self, tokens: list[int]) -> torch.Tensor:
        if self.dequant_rows is None:
            return self.w["token_embd.weight"][torch.as_tensor(tokens)]
        return torch.from_numpy(self.q["token_embd.weight"].rows(np.asarray(tokens)).dequantize())

    def qkv(self, i: int, x: torch.Tensor) -> list[torch.Tensor]:
        """q (T, H, hd), k and v (T, Hkv, hd) of layer i for normed x (T, n_embd), biases added (attn_bias)."""
        c, T = self.c, x.shape[0]
        out = []
        for name, heads in zip(QKV, (c.n_head, c.n_head_kv, c.n_head_kv)):
            y = self.mm(x, blk(i, name))
            out.append((y + self.w[blk(i, name, "bias")] if c.attn_bias else y).view(T, heads, c.head_dim))
        return out

    def attention(self, i: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        c, T = self.c, x.shape[0]
        q, k, v = self.qkv(i, x)  # (T, H, hd), (T, Hkv, hd), (T, Hkv, hd)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k_cache[i, :, pos:pos + T], self.v_cache[i, :, :, pos:pos + T] = k.transpose(0, 1), v.permute(1, 2, 0)
        keys = self.k_cache[i, :, :pos + T].to(q.dtype)  # (Hkv, S, hd)
        vals = self.v_cache[i, :, :, :pos + T].transpose(1, 2).to(q.dtype)  # (Hkv, S, hd)
        o = causal_attention(q.transpose(0, 1), keys, vals, pos)  # (H, T, hd)
        return self.mm(o.transpose(0, 1).reshape(T, c.n_embd), blk(i, "attn_output"))

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """h (T, n_ff): the FFN's hidden activations for normed input x (T, n_embd)."""
        c = self.c
        u = self.mm(x, blk(i, "ffn_up"))  # (T, n_ff)
        if not c.ffn_gated:
            return ffn_activation(u, None, c.act, c.act_threshold)
        return ffn_activation(self.mm(x, blk(i, "ffn_gate")), u, c.act, c.act_threshold)

    @torch.inference_mode()
    def forward(self, tokens: list[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (T, n_vocab) for all positions, or (n_vocab,) for the last one."""
        logits = self.mm(self.hidden(tokens, pos, last=not all_logits), "output.weight")
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def hidden(self, tokens: list[int], pos: int, last: bool = False) -> torch.Tensor:
        """The hidden states after the output norm (T, n_embd) of tokens placed at pos.. (last: the last position's
        alone, (1, n_embd)): what the output matrix reads, and the embeddings' per-token vectors."""
        c, w = self.c, self.w
        if pos + len(tokens) > self.n_ctx:
            raise ValueError(f"{pos + len(tokens)} positions exceed the context of {self.n_ctx}")
        x = self.embed(tokens)  # (T, n_embd)
        for i in range(c.n_layer):
            x = x + self.attention(i, rms_norm(x, w[blk(i, "attn_norm")], c.rms_eps), pos)
            xn = rms_norm(x, w[blk(i, "ffn_norm")], c.rms_eps)
            h = self.ffn(i, xn)  # (T, n_ff)
            if self.sparsity is not None:
                h = self.sparsity(i, h)  # below-threshold neurons contribute nothing
            if self.predict is not None:
                h = h.masked_fill(~self.predict(i, x), 0.0)  # neurons the predictors skip
            if self.ffn_hook is not None:
                h = self.ffn_hook(i, x, h)
            x = x + self.down(i, h)
        return rms_norm(x[-1:] if last else x, w["output_norm.weight"], c.rms_eps)

    def next_logits(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (n_vocab,) after tokens placed at pos.. (the generate loop's call, as KernelModel's)."""
        return self.forward(tokens, pos).numpy()
