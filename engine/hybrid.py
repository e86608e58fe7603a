"""Predictor-driven sparse FFN: hot neurons on an accelerator, cold ones on the CPU, both at once.

Per layer and decoded token (`KernelModel.step` hands its FFN to `Runtime.ffn`):

    x (n_embd,)  the residual before the FFN norm (what PowerInfer's predictors read)
      -> predictor: logits = fc2 @ relu(fc1 @ x); active = logits >= threshold      (numba, `predict_split`)
      -> hot active neurons (the split's GPU set): torch on `device` over the hot rows only, which are all
         that device holds; h masked to the predicted ones, queued (asynchronous on CUDA)
      -> cold active neurons: the numba fused FFN over just those rows, on the CPU, meanwhile
      -> out = cold part + hot part

Batched forwards (the prompt, and the first half of each perplexity chunk) run in torch with h masked to the
predicted set (`Runtime.mask`), so every token's FFN sees the same predictors. Perplexity scores the second
half of each chunk through the decode step itself, so quality is measured on what actually runs.

Without a hot device (no CUDA, no split, or an empty one) everything runs on the CPU. A torch CPU device can
stand in for the accelerator: that exercises the hybrid path without a GPU (tests do).

Statistics cover decoded tokens: predicted sparsity per layer, the share of active neurons computed on the
hot device, and with `audit` the true active set as well (computed densely, so slower): recall, precision and
actual sparsity, by DESIGN.md's definitions.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from gguf import GGMLQuantizationType as QT

from . import kernels as K
from .config import AUDIT_KEYS, QKV, HotcoldError, blk, layer_of, torch_threads
from .model import TorchModel, apply_rope, ffn_activation, rms_norm
from .qtensor import QTensor


@njit(**K._SERIAL)
def predict_split(fc1, X1, fc2t, thr, x, hot_pos, z, logit, cold, hot_mask):
    """Predict layer neurons for one token and split them into cold ids and a hot mask.

    fc1 (r, E), fc2t (r, F) as KMatrix.W (F16, F32, Q8_0 or Q4_1), X1 fc1's x scratch; x (E,); hot_pos (F,)
    int32: index in the hot set or -1; scratch z (r,), logit (F,); out: cold (F,) int32 (first n_cold used),
    hot_mask (n_hot,) float32 1/0. Returns (n_cold, n_hot).
    """
    K._prep_x(x, X1)  # the per-block sums of x that block-quantized fc1 rows (Q4_1: their offsets) need
    for j in range(z.size):
        K._prefetch_ahead(fc1, np.int64(j), z.size)
        s = K._row_dot(fc1, np.int64(j), x, X1, True)
        z[j] = s if s > 0 else 0.0
    logit[:] = 0.0
    ahead = K._ahead(fc2t)
    for j in range(z.size):  # fc2 @ z as a sum of fc2's columns for the nonzero z_j: about half are zero
        if j + ahead < z.size and z[j + ahead] != 0.0:
            K._row_prefetch(fc2t, np.int64(j + ahead))
        if z[j] != 0.0:
            K._row_axpy(fc2t, np.int64(j), z[j], logit)
    hot_mask[:] = 0.0
    nc, nh = 0, 0
    for i in range(logit.size):
        if logit[i] >= thr:
            p = hot_pos[i]
            if p >= 0:
                hot_mask[p] = 1.0
                nh += 1
            else:
                cold[nc] = i
                nc += 1
    return nc, nh


def predictor_matrix(w: torch.Tensor, qtype: str = "F16") -> K.KMatrix:
    """A predictor weight (rows, cols) for the kernels in qtype (config.PREDICTOR_TYPES): Q8_0 and Q4_1 are block-
    quantized (the bytes read every token; a bundle trained for that type holds these values to float16 rounding,
    Predictor.round_to); F16 when the values are float16 values (bundles store them so) or the columns are not whole
    32-blocks, else F32."""
    a = np.ascontiguousarray(w.detach().float().numpy())
    if qtype == "F16" or a.shape[1] % 32:
        qtype = "F16" if np.array_equal(a.astype(np.float16).astype(np.float32), a) else "F32"
    return K.prepare(QTensor.from_float(a, QT[qtype]))


@torch.no_grad()
def load_kernel_weights(p, fc1: K.KMatrix, fc2t: K.KMatrix):
    """Predictor p, in place, with the weights the kernels read (fc1 and fc2^T as predictor_matrix, dequantized)."""
    p.fc1.weight.copy_(torch.from_numpy(K.dequantize_rows(fc1, 0, fc1.rows)))
    p.fc2.weight.copy_(torch.from_numpy(K.dequantize_rows(fc2t, 0, fc2t.rows)).T)
    return p


def runtime_predictor(p, fc1: K.KMatrix, fc2t: K.KMatrix):
    """A copy of predictor p holding the weights the kernels read: batched forwards mask with it, so that they
    predict as the decode step does."""
    return load_kernel_weights(copy.deepcopy(p), fc1, fc2t)


class Graphed:
    """`run()`, queued work on fixed buffers, on device `dev`: op by op on a CPU stand-in; on CUDA captured as a
    CUDA graph at the first call (whose work the capture's warm-up run, on a side stream as torch asks, does),
    then replayed on the current stream."""

    def __init__(self, run, dev: torch.device, pool=None):
        self.run, self.dev, self.pool, self.graph = run, dev, pool, None

    def __call__(self) -> None:
        if self.dev.type != "cuda":
            self.run()
            return
        if self.graph is None:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):
                self.run()
            torch.cuda.current_stream(self.dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.run()
        self.graph.replay()


@njit(**K._SERIAL)  # the kernels' flags: _prep_x's scale then rounds as theirs does, to the bit
def stage_x(xn, X, per, dst):
    """dst = xn (n_embd,), rounded as the CPU kernels round it for block-quantized rows when per > 0 (8 bits, a
    float32 scale for each per blocks of 32: `kernels.x_blocks`); X: scratch shaped as a KMatrix's X, for
    `kernels._prep_x`."""
    if per == 0:
        dst[:] = xn
        return
    K._prep_x(xn, X, per)
    xq, xd = X[1], X[2]
    for j in range(dst.size):
        dst[j] = np.float32(xq[j]) * xd[j // K.BLOCK]


class HotPart:
    """The hot neurons' gate, up and down rows on a torch device, and the FFN over them for one token."""

    def __init__(self, net, hot: list[np.ndarray], device: str):
        c = net.c
        self.c, self.dev = c, torch.device(device)
        dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        pin = self.dev.type == "cuda"
        self.ids = [np.asarray(h, np.int32) for h in hot]
        self.gated = net.layers[0].gate is not None
        # per layer: gate_up (2 n_hot, n_embd), gate rows then up rows (plain FFN: up rows only); down (n_hot, n_embd)
        self.gate_up, self.down = [], []
        for L, ids in zip(net.layers, self.ids):
            def rows(m):
                return torch.from_numpy(K.dequantize_ids(m, ids))
            gu = [rows(L.gate), rows(L.up)] if self.gated else [rows(L.up)]
            self.gate_up.append(torch.cat(gu).to(self.dev, dtype))
            self.down.append(rows(L.down_t).to(self.dev, dtype))
        self.dtype = dtype
        # ggml rounds x to 8 bits per block before a block-quantized dot product; the CPU kernels do too, and so
        # does `launch`, on the CPU, for the hot rows (per layer: a converted file can mix types)
        self.per = [K.x_blocks(L.gate, L.up) if L.up.qtype in K.BLOCK_TYPES + K.SUPER_TYPES else 0
                    for L in net.layers]
        self.X = tuple(np.zeros_like(a) for a in net.layers[0].up.X)  # its own scratch (kernels own theirs)
        # staging buffers, allocated once: per layer x then the hot mask, sent in one copy; y back (and numpy views)
        self.in_host = [torch.zeros(c.n_embd + len(ids), pin_memory=pin) for ids in self.ids]
        self.x_np = [t.numpy()[:c.n_embd] for t in self.in_host]  # (n_embd,)
        self.mask_np = [t.numpy()[c.n_embd:] for t in self.in_host]  # (n_hot,) 1/0, written by `predict_split`
        self.y_host = torch.zeros(c.n_embd, pin_memory=pin)
        self.y_np = self.y_host.numpy()  # (n_embd,)
        self.done = torch.cuda.Event() if pin else None
        pool = torch.cuda.graph_pool_handle() if pin else None  # one memory pool for the layers' graphs
        self.steps = [Graphed(functools.partial(self.ffn, i), self.dev, pool) for i in range(len(self.ids))]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.gate_up, self.down) for t in ts)

    def launch(self, i: int, xn: np.ndarray) -> None:
        """Queue layer i's hot FFN for normed input xn, masked by self.mask_np[i]; result via `collect`.

        On CUDA it runs as one CUDA graph per layer, captured at the layer's first token: launched op by op its
        small kernels cost about 20 us each to launch (816 us a layer on an H200 host). The graph is kept short (one
        copy in, gate and up in one matrix product, the activation, the mask, down, one copy out): a replayed node
        still costs microseconds (80 us a layer's round trip with x rounded and the mask sent on the device, 45 us
        so)."""
        stage_x(xn, self.X, self.per[i], self.x_np[i])
        self.steps[i]()
        if self.done is not None:
            self.done.record(torch.cuda.current_stream(self.dev))  # the stream the replay went to

    def ffn(self, i: int) -> None:
        """Layer i's hot FFN from the staging buffers, queued: in_host[i] in, y_host out."""
        c = self.c
        xm = self.in_host[i].to(self.dev, non_blocking=True).to(self.dtype)  # (n_embd + n_hot,)
        x, mask = xm[:c.n_embd], xm[c.n_embd:]
        gu = self.gate_up[i] @ x  # (2 n_hot,) or (n_hot,)
        g, u = gu.chunk(2) if self.gated else (gu, None)
        h = ffn_activation(g, u, c.act, c.act_threshold) * mask  # (n_hot,)
        self.y_host.copy_((h @ self.down[i]).float(), non_blocking=True)

    def collect(self, out: np.ndarray) -> None:
        """out += the launched layer's hot part (waits for the device)."""
        if self.done is not None:
            self.done.synchronize()
        out += self.y_np


def check_hot(hot: list, c, path: str, model_path: str) -> list[np.ndarray]:
    """Hot neuron ids per layer as the runtime takes them: int32, increasing without repeats (a repeated id would
    be computed twice), within 0..n_ff-1."""
    if len(hot) != c.n_layer:
        raise HotcoldError(f"{path}: hot neuron ids for {len(hot)} layers; {model_path} has {c.n_layer}")
    hot = [np.asarray(h) for h in hot]
    for i, h in enumerate(hot):
        if h.ndim != 1 or h.size and not (h.dtype.kind in "iu" and h[0] >= 0 and h[-1] < c.n_ff
                                           and (np.diff(h) > 0).all()):
            raise HotcoldError(f"{path}: layer {i}'s hot neuron ids are not increasing ids without repeats in "
                               f"0..{c.n_ff - 1}")
    return [h.astype(np.int32) for h in hot]


def torch_device(name: str, what: str) -> torch.device:
    """A torch device named for `what` (an option): cpu or cuda[:N], and CUDA there; else HotcoldError."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise HotcoldError(f"{what} {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise HotcoldError(f"{what} {name}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HotcoldError(f"{what} {name}: CUDA is not available here")
    return dev


class Runtime:
    """Predictors (a predictors.bundle.Bundle) driving the sparse FFN of a KernelModel, optionally with a HotPart.

    hot: per layer, the neuron ids placed on `device` (None or empty: all on the CPU). audit: None, or the rule
    (engine.sparsity.truth_rule: exact for ReLU-family models, else the thresholds of the sparsity config the bundle
    was trained with) by which the true active set is also computed per token. qtype: how the
    predictor weights are stored for the kernels (config.PREDICTOR_TYPES); `running` the predictors as they run (those
    weights, dequantized)."""

    def __init__(self, net, bundle, hot: list[np.ndarray] | None = None, device: str | None = None,
                 audit=None, qtype: str = "F16"):
        c = net.c
        torch_threads()
        self.net, self.c, self.qtype = net, c, qtype
        self.fc1 = [predictor_matrix(p.fc1.weight, qtype) for p in bundle.predictors]  # (r, n_embd)
        self.fc2t = [predictor_matrix(p.fc2.weight.T, qtype) for p in bundle.predictors]  # (r, n_ff)
        # F16 (or its F32 fallback) holds the bundle's values exactly: its predictors run as they are
        preds = bundle.predictors if qtype == "F16" else [
            runtime_predictor(p, a, b) for p, a, b in zip(bundle.predictors, self.fc1, self.fc2t)]
        self.running = dataclasses.replace(bundle, predictors=preds)  # a copy: set_thresholds leaves bundle be
        self.thr = [np.float32(t) for t in bundle.thresholds]
        use_hot = hot is not None and device is not None and sum(len(h) for h in hot) > 0
        self.hot = HotPart(net, hot, device) if use_hot else None
        self.hot_pos = []  # per layer (n_ff,) int32: index in the hot set, -1 for cold neurons
        for i in range(c.n_layer):
            pos = np.full(c.n_ff, -1, np.int32)
            if self.hot is not None:
                pos[self.hot.ids[i]] = np.arange(len(self.hot.ids[i]), dtype=np.int32)
            self.hot_pos.append(pos)
        # scratch, allocated once
        self.z = [np.zeros(p.rank, np.float32) for p in bundle.predictors]  # per layer (rank,): relu(fc1 x)
        self.logit = np.zeros(c.n_ff, np.float32)  # (n_ff,): fc2 z
        self.cold = np.zeros(c.n_ff, np.int32)  # (n_ff,): the predicted cold ids, the first nc of them
        self.no_mask = np.zeros(0, np.float32)  # no hot part
        self.audit = audit
        if audit is not None:
            from .sparsity import KernelSelector
            self.truth = KernelSelector(net, audit)
        self.counts = np.zeros((c.n_layer, 4), np.int64)  # predicted active, of which hot, truly active, both
        self.tokens = 0

    def set_thresholds(self, thresholds: list[float]) -> None:
        """Per-layer logit thresholds in place of the bundle's (what `calibrate --predictors` searches over)."""
        self.thr = [np.float32(t) for t in thresholds]
        self.running.thresholds = [float(t) for t in thresholds]

    # --- decode: one token -----------------------------------------------------------------------------
    def ffn(self, i: int, x: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        """out = layer i's FFN output for residual x (n_embd,) and normed input xn, on the predicted neurons."""
        L, hot = self.net.layers[i], self.hot
        mask = hot.mask_np[i] if hot is not None else self.no_mask
        fc1 = self.fc1[i]
        nc, nh = predict_split(fc1.W, fc1.X, self.fc2t[i].W, self.thr[i], x, self.hot_pos[i], self.z[i],
                               self.logit, self.cold, mask)
        if nh:
            hot.launch(i, xn)
        self.net.ffn(L, xn, out, self.cold[:nc])
        if nh:
            hot.collect(out)
        cnt = self.counts[i]
        cnt[0] += nc + nh
        cnt[1] += nh
        if self.audit is not None:
            true = self.truth(i, x, xn)  # true active ids
            cnt[2] += len(true)
            cnt[3] += int(np.count_nonzero(self.logit[true] >= self.thr[i]))
        if i == self.c.n_layer - 1:
            self.tokens += 1

    # --- batched forwards ------------------------------------------------------------------------------
    def mask(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """bool (T, n_ff): layer i's predicted active neurons for residuals x (T, n_embd)."""
        return self.running.active(i, x.float())

    # --- statistics ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.counts[:] = 0
        self.tokens = 0
        if self.audit is not None:
            self.audit.reset()

    def stats(self) -> dict:
        """DESIGN.md's metrics over the decode steps since `reset` (short prompts are prefilled by decode steps),
        per layer and averaged over layers; None where no token went through a step (a long prompt and -n 1)."""
        device = None if self.hot is None else str(self.hot.dev)  # where gpu_share's neurons ran
        if not self.tokens:
            keys = ("predicted_sparsity", "gpu_share") + (AUDIT_KEYS if self.audit is not None else ())
            return {"tokens": 0, **dict.fromkeys(keys), "hot_device": device, "per_layer": []}
        n = self.tokens * self.c.n_ff
        pred, hot, true, both = (self.counts[:, k].astype(np.float64) for k in range(4))
        layers = [{"layer": i, "predicted_sparsity": 1 - pred[i] / n} for i in range(self.c.n_layer)]
        out = {"tokens": self.tokens, "predicted_sparsity": float(np.mean(1 - pred / n)),
               "gpu_share": float(hot.sum() / pred.sum()) if pred.sum() else 0.0, "hot_device": device}
        if self.audit is not None:
            from predictors.metrics import from_counts
            for i, m in enumerate(layers):
                m.update(from_counts(both[i], pred[i], true[i], n))
            for k in AUDIT_KEYS:
                out[k] = float(np.mean([m[k] for m in layers]))
        out["per_layer"] = layers
        return out


class LayerOffload:
    """The layer-offload baseline (llama.cpp's -ngl): layers 0..k-1 whole and dense on a torch device (float16 on
    CUDA), the rest on the CPU kernels. Wraps a KernelModel's `forward`: prompts run batched on the CPU, and their
    keys and values are copied to the device, and the decode steps' keys and values back before the next batch. A
    decode step's device layers run as one CUDA graph, as llama.cpp's CUDA backend runs its layers."""

    def __init__(self, net, k: int, device: str):
        self.net, self.k, self.dev = net, k, torch.device(device)
        self.dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        mine = [n for n in net.mats if layer_of(n) in range(k)]  # layers 0..k-1's matrices
        tensors = {n: QTensor.from_float(net.dequant_rows(n, 0, net.mats[n].rows).numpy(), QT.F32) for n in mine}
        for i in range(k):
            L = net.layers[i]
            tensors[blk(i, "attn_norm")] = QTensor.from_float(L.attn_norm, QT.F32)
            tensors[blk(i, "ffn_norm")] = QTensor.from_float(L.ffn_norm, QT.F32)
            if net.c.attn_bias:  # bqkv: q's, k's and v's biases end to end
                parts = np.split(L.bqkv, np.cumsum([L.q.rows, L.k.rows]))
                tensors.update({blk(i, n, "bias"): QTensor.from_float(b, QT.F32) for n, b in zip(QKV, parts)})
        tm = TorchModel(dataclasses.replace(net.c, n_layer=k), tensors, net.n_ctx)
        tm.w = {n: w.to(self.dev, self.dtype) for n, w in tm.w.items()}
        tm.cos, tm.sin = tm.cos.to(self.dev, self.dtype), tm.sin.to(self.dev, self.dtype)
        tm.k_cache, tm.v_cache = tm.k_cache.to(self.dev, self.dtype), tm.v_cache.to(self.dev, self.dtype)
        self.tm = tm
        self.synced = net.n_ctx  # positions below this hold the same keys and values in the CPU and device caches
        pin = self.dev.type == "cuda"
        self.x_in = torch.zeros(1, net.c.n_embd, pin_memory=pin)  # decode staging buffers, allocated once
        self.x_out = torch.zeros(1, net.c.n_embd, pin_memory=pin)
        self.pos_in = torch.zeros(1, dtype=torch.int64, pin_memory=pin)
        self.span = torch.arange(net.n_ctx, device=self.dev)
        self.device_layers = Graphed(self.layers, self.dev)  # on CUDA captured at the first decoded token

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.tm.w.values())

    @torch.inference_mode()
    def forward(self, tokens: list[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        net, tm, k = self.net, self.tm, self.k
        if len(tokens) > 1 or all_logits:
            cpu_k, cpu_v = net.torch.k_cache, net.torch.v_cache
            done = slice(self.synced, pos)  # the decode steps' positions: written on the device only
            cpu_k[:k, :, done] = tm.k_cache[:, :, done].to("cpu", cpu_k.dtype)
            cpu_v[:k, ..., done] = tm.v_cache[..., done].to("cpu", cpu_v.dtype)
            out = net.forward(tokens, pos, all_logits)
            span = slice(pos, pos + len(tokens))
            tm.k_cache[:, :, span] = cpu_k[:k, :, span].to(self.dev, self.dtype)
            tm.v_cache[..., span] = cpu_v[:k, ..., span].to(self.dev, self.dtype)
            self.synced = pos + len(tokens)
            return out
        net.check_step(tokens[0], pos)  # on the device an index out of range would be an assert that ends the process
        self.synced = min(self.synced, pos)  # this step writes position pos on the device only
        self.x_in.numpy()[:] = net.embd.rows(np.array(tokens)).dequantize()
        self.pos_in[0] = pos
        self.device_layers()
        if self.dev.type == "cuda":
            torch.cuda.current_stream(self.dev).synchronize()  # x_out's copy back has landed
        net.x[:] = self.x_out.numpy()[0]
        return torch.from_numpy(net.step(tokens[0], pos, first=k).copy())

    def layers(self) -> None:
        """Layers 0..k-1 for one token from the staging buffers, queued: x_in (1, n_embd) and pos_in (1,) in, x_out
        out. Shapes do not depend on the position (attention reads the whole cache, positions after pos masked),
        so that on CUDA the step is one graph: launched op by op, a layer's ~40 kernels took about 1.2 ms on the
        H200 host."""
        tm, c, dt = self.tm, self.tm.c, self.dtype
        pos = self.pos_in.to(self.dev, non_blocking=True)  # (1,)
        seen = (self.span <= pos)[None]  # (1, n_ctx): keys at positions 0..pos
        cos, sin = tm.cos.index_select(0, pos), tm.sin.index_select(0, pos)  # (1, hd/2)
        # the residual (1, n_embd) stays float32, the layers' inputs and weights are dt: in float16 the residual's
        # steps near SmolLM2's 25,000 would be 16 wide
        x = self.x_in.to(self.dev, non_blocking=True)
        for i in range(self.k):
            h = rms_norm(x, tm.w[blk(i, "attn_norm")], c.rms_eps).to(dt)
            q, kk, v = tm.qkv(i, h)  # (1, H, hd), (1, Hkv, hd), (1, Hkv, hd)
            q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
            tm.k_cache[i].index_copy_(1, pos, kk.transpose(0, 1))  # k_cache[i] (Hkv, n_ctx, hd)
            tm.v_cache[i].index_copy_(2, pos, v.permute(1, 2, 0))  # v_cache[i] (Hkv, hd, n_ctx)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), tm.k_cache[i], tm.v_cache[i].transpose(1, 2),
                                               attn_mask=seen, enable_gqa=c.n_head != c.n_head_kv)  # (H, 1, hd)
            x = x + tm.mm(o.transpose(0, 1).reshape(1, c.n_embd), blk(i, "attn_output")).float()
            x = x + tm.down(i, tm.ffn(i, rms_norm(x, tm.w[blk(i, "ffn_norm")], c.rms_eps).to(dt))).float()
        self.x_out.copy_(x, non_blocking=True)

    def next_logits(self, tokens: list[int], pos: int) -> np.ndarray:
        return self.forward(tokens, pos).numpy()
