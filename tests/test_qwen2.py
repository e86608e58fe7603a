"""Qwen2: a llama with q, k and v biases, whose GGUF files (and HF checkpoints) rotate halves of each head. Against a
forward written here from the architecture's definition, on the HF layout; from GGUF, HF and hotcold's own export."""
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine.api import load
from engine.tokenizer import PRE_TOKENIZERS
from tiny_model import halves, tiny_config, tiny_weights, write_gguf, write_hf
from tools.cli import main

IDS = list(range(2, 42))


def reference_logits(c, w: dict, ids: list[int]) -> np.ndarray:
    """Qwen2 as transformers defines it, in float64 on HF-layout weights (Q/K rows rotating halves): RMSNorm, q, k, v
    with biases, rotate_half RoPE, grouped-query causal attention, SwiGLU, tied or separate output matrix."""
    hw = {k: torch.from_numpy(halves(k, a, c)).double() for k, a in w.items()}
    hd, T = c.head_dim, len(ids)

    def norm(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + c.rms_eps) * g

    def rotate(x):  # (T, heads, hd): dims j and j + hd/2 turn together
        freq = c.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd/2)
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    x = hw["token_embd.weight"][ids]
    for i in range(c.n_layer):
        def lin(name, v):
            return v @ hw[f"blk.{i}.{name}.weight"].T + hw.get(f"blk.{i}.{name}.bias", 0)
        h = norm(x, hw[f"blk.{i}.attn_norm.weight"])
        q = rotate(lin("attn_q", h).view(T, c.n_head, hd))
        k = rotate(lin("attn_k", h).view(T, c.n_head_kv, hd)).repeat_interleave(c.n_head // c.n_head_kv, 1)
        v = lin("attn_v", h).view(T, c.n_head_kv, hd).repeat_interleave(c.n_head // c.n_head_kv, 1)
        s = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
        x = x + lin("attn_output", torch.einsum("hts,shd->thd", s, v).reshape(T, -1))
        h = norm(x, hw[f"blk.{i}.ffn_norm.weight"])
        x = x + lin("ffn_down", torch.nn.functional.silu(lin("ffn_gate", h)) * lin("ffn_up", h))
    return (norm(x, hw["output_norm.weight"]) @ hw.get("output.weight", hw["token_embd.weight"]).T).numpy()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    c = tiny_config(arch="qwen2", attn_bias=True, tied_embeddings=True)
    w = tiny_weights(c, seed=4)
    return {"config": c, "weights": w, "dir": d, "gguf": write_gguf(str(d / "q.gguf"), c, w, arch="qwen2"),
            "hf": write_hf(str(d / "hf"), c, w), "ref": reference_logits(c, w, IDS)}


def test_qwen2_from_gguf_and_hf_computes_its_definition(qwen):
    """GGUF (rows rotating halves, as llama.cpp's converter leaves Qwen2's) and an HF directory load to the same
    model, which computes the definition: the batched torch forward, and the kernels' decode steps with their biases."""
    ref = qwen["ref"]
    for path in (qwen["gguf"], qwen["hf"]):
        m = load(path, n_ctx=64, backend="torch")
        assert (m.config.arch, m.config.attn_bias) == ("qwen2", True)
        assert np.abs(m.logits(IDS).numpy() - ref).max() < 1e-4
        k = load(path, n_ctx=64)  # kernels, f16 KV cache
        steps = np.stack([k.net.step(t, p).copy() for p, t in enumerate(IDS)])
        assert np.abs(steps - ref).max() < 1e-2 and (steps.argmax(-1) == ref.argmax(-1)).all()
    from engine.hybrid import LayerOffload
    off = load(qwen["gguf"], n_ctx=64, cache_type="f32")
    off.net = LayerOffload(off.net, 1, "cpu")  # layer 0 in torch on a second "device", its biases with it
    steps = np.stack([off.net.forward([t], p).numpy() for p, t in enumerate(IDS)])
    assert np.abs(steps - ref).max() < 1e-2
    zeroed = {n: np.zeros_like(a) if n.endswith(".bias") else a for n, a in qwen["weights"].items()}
    assert np.abs(reference_logits(qwen["config"], zeroed, IDS) - ref).max() > 0.1  # the biases matter here


def test_quantized_qwen2_and_its_llama_export(qwen, capsys):
    """A Q8_0 file's Q/K rows move whole blocks; hotcold's export writes the model for llama.cpp as a llama with
    biases (its llama graph adds them), Q/K in pairs, and it loads back the same; PowerInfer's format is refused."""
    c, w, d, ref = qwen["config"], qwen["weights"], qwen["dir"], qwen["ref"]
    q8 = load(write_gguf(str(d / "q8.gguf"), c, w, QT.Q8_0, arch="qwen2"), n_ctx=64)
    assert q8.ckpt.tensors["blk.0.attn_q.weight"].qtype == QT.Q8_0
    got = q8.logits(IDS).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    assert main(["export", "-m", qwen["gguf"], "--format", "gguf", "-o", str(d / "out")]) == 0
    out = load(str(d / "out.gguf"), n_ctx=64, backend="torch")
    assert (out.config.arch, out.config.attn_bias) == ("llama", True)
    assert np.abs(out.logits(IDS).numpy() - ref).max() < 1e-2  # stored as F16
    capsys.readouterr()
    relu = tiny_config("relu", arch="qwen2", attn_bias=True)  # a sparse one: SiLU's refusal would come first
    path = write_gguf(str(d / "relu.gguf"), relu, tiny_weights(relu), arch="qwen2")
    assert main(["export", "-m", path, "-o", str(d / "pi")]) == 2
    assert "hotcold writes attention biases (Qwen2's) for llama.cpp only" in capsys.readouterr().err


def test_qwen2_pre_tokenizer_and_refusals(qwen, capsys):
    """Qwen2's pre-tokenizer splits digits one by one (llama-bpe's up to three); a sliding window, a llama's o_proj
    bias, a file with some of q, k and v's biases, and relufy of a biased model are refused in one line."""
    def pieces(pre, text):
        return [p for p, _ in PRE_TOKENIZERS[pre]().pre_tokenize_str(text)]
    assert pieces("qwen2", "I've 12345 cats") == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats"]
    assert pieces("llama-bpe", "I've 12345 cats") == ["I", "'ve", "Ġ", "123", "45", "Ġcats"]
    path = os.path.join(qwen["hf"], "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**cfg, "use_sliding_window": True}, fh)
    try:
        for key, why in (("use_sliding_window", "use_sliding_window is true; hotcold computes attention over the whole "
                          "context"), ("attention_bias", "attention_bias is true; hotcold computes q, k and v biases "
                                       "(Qwen2's), not o_proj's")):
            with open(path, "w") as fh:
                json.dump({**cfg, key: True}, fh)
            assert main(["generate", "-m", qwen["hf"], "-p", "hi", "-n", "1"]) == 2
            assert why in capsys.readouterr().err
    finally:
        with open(path, "w") as fh:
            json.dump(cfg, fh)
    c, w = qwen["config"], qwen["weights"]
    k_only = write_gguf(str(qwen["dir"] / "k.gguf"), c, {n: a for n, a in w.items() if n != "blk.0.attn_q.bias"},
                        arch="qwen2")
    assert main(["generate", "-m", k_only, "-p", "hi", "-n", "1"]) == 2
    assert "missing tensor blk.0.attn_q.bias" in capsys.readouterr().err  # q, k and v's, or none
    corpus = qwen["dir"] / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    assert main(["relufy", "-m", qwen["gguf"], "-f", str(corpus), "-o", str(qwen["dir"] / "r.gguf")]) == 2
    assert "relufy takes a llama model" in capsys.readouterr().err
    assert main(["export", "-m", qwen["gguf"], "--format", "gguf", "-o", str(qwen["dir"] / "as_llama")]) == 0
    capsys.readouterr()
    assert main(["relufy", "-m", str(qwen["dir"] / "as_llama.gguf"), "-f", str(corpus), "-o",
                 str(qwen["dir"] / "r.gguf")]) == 2  # a llama, but with the biases relufy's training has no place for
    assert "relufy trains llama models without attention biases" in capsys.readouterr().err
