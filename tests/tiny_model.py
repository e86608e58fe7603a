"""A tiny random LLaMA written both as an HF directory and as a GGUF file, for loader and engine tests."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from engine.config import KEY_ACT, KEY_ACT_THRESHOLD, ModelConfig
from engine.qtensor import QTensor

SPECIALS = ["<s>", "</s>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = sorted(ByteLevel.alphabet())
    tokens = SPECIALS + chars + ["".join(m) for m in MERGES]
    return {t: i for i, t in enumerate(tokens)}, MERGES


def tiny_config(act: str = "silu", threshold: float = 0.0, **kw) -> ModelConfig:
    vocab, _ = tiny_vocab()
    base = dict(n_vocab=len(vocab), n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=256,
                rope_base=10000.0, rms_eps=1e-5, act=act, act_threshold=threshold, tied_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def tiny_weights(c: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights, Q/K in GGUF's adjacent-pair rotary layout."""
    from engine.config import expected_shapes
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(c).items():
        if name.endswith(".bias"):  # q, k, v biases (attn_bias)
            w[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return w


def hf_tokenizer() -> Tokenizer:
    vocab, merges = tiny_vocab()
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tk


HF_ACT_NAMES = {"silu": "silu", "relu": "relu", "fatrelu": "fatrelu", "drelu": "dReLU"}


def hf_rotary_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order of HF's rotate-half Q/K taken from the GGUF one, written from the two definitions (not from the
    engine): within a head of hd rows, HF turns dim j with dim j + hd/2, GGUF (llama.cpp) turns 2j with 2j + 1.
    So HF row h*hd + a*hd/2 + j is GGUF row h*hd + 2j + a, a in {0, 1}."""
    hd = rows // n_head
    idx = np.empty(rows, dtype=np.int64)
    for h in range(n_head):
        for a in range(2):
            for j in range(hd // 2):
                idx[h * hd + a * hd // 2 + j] = h * hd + 2 * j + a
    return idx


# transformers' Llama names, written out here: the loader's own table (engine.config.HF_LAYER) is what is tested
HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                  "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_to_hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, i, key, part = name.split(".")
    return f"model.layers.{i}.{HF_LAYER_NAMES[key]}.{part}"


def halves(name: str, a: np.ndarray, c: ModelConfig) -> np.ndarray:
    """A Q or K weight's or bias's rows in the rotate-half layout (HF's, and Qwen2 GGUF files'); others as they are."""
    if ".attn_q." in name or ".attn_k." in name:
        return a[hf_rotary_rows(a.shape[0], c.n_head if ".attn_q." in name else c.n_head_kv)]
    return a


def write_hf(path: str, c: ModelConfig, w: dict[str, np.ndarray]) -> str:
    os.makedirs(path, exist_ok=True)
    qwen = c.arch == "qwen2"
    cfg = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen else "llama", "vocab_size": c.n_vocab,
           "hidden_size": c.n_embd, "intermediate_size": c.n_ff, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head_kv,
           "max_position_embeddings": c.n_ctx_train, "rope_theta": c.rope_base, "rms_norm_eps": c.rms_eps,
           "hidden_act": HF_ACT_NAMES[c.act], "tie_word_embeddings": c.tied_embeddings,
           "torch_dtype": "float32"}
    if c.act == "fatrelu":
        cfg["hidden_act_param"] = c.act_threshold
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    tensors = {}
    for name, a in w.items():
        tensors[gguf_to_hf_name(name)] = torch.from_numpy(np.ascontiguousarray(halves(name, a, c)))
    names = sorted(tensors)  # two shards, as big checkpoints come
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, os.path.join(path, "model-00002-of-00002.safetensors"))
    hf_tokenizer().save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                   "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<s>assistant: {% endif %}"}, fh)
    return path


def rewrite_gguf(src: str, dst: str, keys: dict | None = None, tensor=None) -> str:
    """A copy of GGUF file src (a PowerInfer file's magic kept) with metadata keys replaced or added, {name: (value,
    GGUFValueType)}, None dropping a key; tensor(name, array), where given, returns the array kept, None (dropped) or
    a new array (written as its dtype: float32 as F32)."""
    from gguf import GGUFValueType
    from engine.loader import open_gguf
    r, keys = open_gguf(src), keys or {}
    wr = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture" and keys.get(name, ()) is not None:
            value, vtype = keys.get(name, (f.contents(), f.types[0]))
            wr.add_key_value(name, value, vtype, f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for name, kv in keys.items():
        if name not in r.fields and kv is not None:
            wr.add_key_value(name, *kv)
    for t in r.tensors:
        new = tensor(t.name, t.data) if tensor else t.data
        if new is t.data:
            wr.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        elif new is not None:
            wr.add_tensor(t.name, new)
    wr.write_header_to_file(), wr.write_kv_data_to_file(), wr.write_tensors_to_file(), wr.close()
    with open(src, "rb") as fh, open(dst, "r+b") as out:
        out.write(fh.read(4))
    return dst


def write_gguf(path: str, c: ModelConfig, w: dict[str, np.ndarray], qtype: QT = QT.F32,
               arch: str = "llama", drop: str | None = None, reshape: str | None = None, pre: str = "gpt2") -> str:
    """The same model as GGUF; 2-D weights stored as `qtype`. `drop`/`reshape` break one tensor for error tests.
    arch qwen2: Q and K rows rotate halves, as llama.cpp's converter leaves Qwen2's. pre: the pre-tokenizer's name
    (llama.cpp itself knows GPT-2's as "gpt-2")."""
    vocab, merges = tiny_vocab()
    wr = GGUFWriter(path, arch)
    wr.add_block_count(c.n_layer)
    wr.add_context_length(c.n_ctx_train)
    wr.add_embedding_length(c.n_embd)
    wr.add_feed_forward_length(c.n_ff)
    wr.add_head_count(c.n_head)
    wr.add_head_count_kv(c.n_head_kv)
    wr.add_rope_freq_base(c.rope_base)
    wr.add_layer_norm_rms_eps(c.rms_eps)
    wr.add_vocab_size(c.n_vocab)
    wr.add_string(KEY_ACT, c.act)
    wr.add_float32(KEY_ACT_THRESHOLD, c.act_threshold)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(list(vocab))
    wr.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    wr.add_token_merges([f"{a} {b}" for a, b in merges])
    wr.add_bos_token_id(0)
    wr.add_eos_token_id(1)
    wr.add_add_bos_token(True)
    for name, a in w.items():
        a = halves(name, a, c) if arch == "qwen2" else a
        if name == drop:
            continue
        if name == reshape:
            a = a[: a.shape[0] // 2]
        if a.ndim == 2 and qtype != QT.F32:
            q = QTensor.from_float(a, qtype)
            wr.add_tensor(name, q.data, raw_shape=q.data.shape, raw_dtype=qtype)
        else:
            wr.add_tensor(name, a)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


DIGIT_LIMIT = hasattr(sys, "get_int_max_str_digits")  # Python 3.10.7+: json refuses integers past 4300 digits
CAT_TEXT = "the cat sat on the mat, and then the dog ate in the hat. " * 12  # about 350 tokens


def tiny_models(d, specs) -> tuple[dict, str]:
    """GGUF files of tiny random models, one per (act, seed) of `specs`, and a small corpus, in directory d:
    ({(act, seed): path}, corpus path)."""
    paths = {}
    for act, seed in specs:
        c = tiny_config(act)
        paths[act, seed] = write_gguf(os.path.join(d, f"{act}{seed}.gguf"), c, tiny_weights(c, seed))
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w") as fh:
        fh.write(CAT_TEXT)
    return paths, corpus


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread and lose much to it on a busy machine: a module that
    imports this fixture runs on one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
