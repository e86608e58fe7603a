"""LoRA adapters (llama.cpp's --lora, --lora-scaled), merged into the weights at load.

An adapter is llama.cpp's GGUF (general.type "adapter", adapter.type "lora", adapter.lora.alpha; tensors
NAME.lora_a (rank, cols) and NAME.lora_b (rows, rank), as convert_lora_to_gguf.py writes them) or a PEFT directory
(adapter_config.json, adapter_model.safetensors). Each adapted weight W becomes W + scale * alpha / rank * B @ A (alpha
0: scale alone, as llama.cpp; PEFT's use_rslora: alpha / sqrt(rank)). B's rows follow the model's Q/K layout as its
weights do: PEFT's and Qwen2 GGUF adapters' rotate halves and are turned to pairs here, as the loader turns the weights.
A merged block-quantized matrix is stored as Q8_0 (finer than the 4-bit types: requantizing W + delta adds less than
its own rounding), F16 and F32 ones as they were, BF16 ones as F32.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .config import HotcoldError, finite_number, hf_to_gguf_name
from .files import error_text, read_json
from .loader import HALVES_ARCHS, Checkpoint, field_value, open_gguf, rotary_halves_to_pairs, tensor_from_reader
from .qtensor import QTensor

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def gguf_adapter(path: str, arch: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, bool]:
    """{weight name: (A (rank, cols), B (rows, rank))} float32, alpha, whether B's Q/K rows rotate halves."""
    r = open_gguf(path)
    kind, lora = field_value(r, "general.type"), field_value(r, "adapter.type")
    if kind != "adapter" or lora != "lora":
        raise HotcoldError(f"{path}: not a LoRA adapter (general.type {kind!r}, adapter.type {lora!r}; llama.cpp's "
                           "convert_lora_to_gguf.py writes one)")
    if field_value(r, "adapter.alora.invocation_tokens") is not None:
        raise HotcoldError(f"{path}: an activated LoRA (adapter.alora.invocation_tokens), which applies from its "
                           "invocation tokens on; hotcold merges plain LoRA into the weights")
    its = field_value(r, "general.architecture")
    if its != arch:
        raise HotcoldError(f"{path}: an adapter of a {its} model; this model is {arch}")
    alpha = field_value(r, "adapter.lora.alpha", 0.0)
    if not finite_number(alpha):
        raise HotcoldError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        base, _, ab = t.name.rpartition(".")
        if ab not in ("lora_a", "lora_b"):
            raise HotcoldError(f"{path}: tensor {t.name} is not a LoRA matrix (NAME.lora_a or NAME.lora_b)")
        parts.setdefault(base, {})[ab] = tensor_from_reader(t).dequantize()
    return pairs(parts, path, "lora_a", "lora_b"), float(alpha), arch in HALVES_ARCHS


def peft_adapter(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, bool]:
    """A PEFT directory's LoRA: as gguf_adapter, B's Q/K rows in HF's rotate-half layout; alpha / rank is PEFT's
    scaling (rsLoRA's alpha / sqrt(rank) given as the alpha that gives it)."""
    from safetensors import safe_open
    cfg = read_json(os.path.join(path, PEFT_CONFIG), "PEFT adapter config")
    where = os.path.join(path, PEFT_CONFIG)
    kind = cfg.get("peft_type", "LORA") if isinstance(cfg, dict) else cfg
    if kind != "LORA":
        raise HotcoldError(f"{where}: not a LoRA adapter (peft_type {kind!r})")
    for key in ("use_dora", "fan_in_fan_out", "alora_invocation_tokens", "layer_replication"):
        if cfg.get(key):
            raise HotcoldError(f"{where}: {key} is set; hotcold merges plain LoRA (B @ A) into the weights")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise HotcoldError(f"{where}: {key} is set; hotcold takes one rank and alpha for every module and no "
                               "whole modules")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and finite_number(alpha) and alpha > 0):
        raise HotcoldError(f"{where}: r {rank!r} and lora_alpha {alpha!r}: a rank of at least 1 and a number above 0")
    weights = os.path.join(path, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        raise HotcoldError(f"{path}: no {PEFT_WEIGHTS}")
    parts: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(weights, framework="pt") as st:
            for name in st.keys():
                if name.endswith(".base_layer.weight"):  # the layer itself (PEFT saves lm_head's): the model has it,
                    continue  # as llama.cpp's converter skips it
                base, ab = name.removeprefix("base_model.model."), None
                for tag in ("lora_A", "lora_B"):
                    if f".{tag}." in base:
                        base, ab = base.replace(f".{tag}.", ".").replace(".default.", "."), tag
                g = hf_to_gguf_name(base) if ab else None
                if g is None or not g.endswith(".weight"):
                    raise HotcoldError(f"{weights}: tensor {name} is not a LoRA matrix of a known weight")
                parts.setdefault(g, {})[ab] = st.get_tensor(name).float().numpy()
    except HotcoldError:
        raise
    except Exception as e:
        raise HotcoldError(f"{weights}: unreadable safetensors file ({error_text(e)})") from None
    mats = pairs(parts, weights, "lora_A", "lora_B")
    odd = next((n for n, (a, _) in mats.items() if a.shape[0] != rank), None)
    if odd is not None:
        raise HotcoldError(f"{weights}: {odd}'s rank is {mats[odd][0].shape[0]}, its config's r {rank}")
    alpha = alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # rsLoRA scales by alpha / sqrt(rank)
    return mats, float(alpha), True


def pairs(parts: dict, path: str, a: str, b: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for base, ab in parts.items():
        if set(ab) != {a, b}:
            raise HotcoldError(f"{path}: {base} has {' and '.join(sorted(ab))} without its {b if a in ab else a}")
        A, B = ab[a], ab[b]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise HotcoldError(f"{path}: {base}'s {a} {A.shape} and {b} {B.shape} are not of one rank")
        out[base] = (A.astype(np.float32), B.astype(np.float32))
    if not out:
        raise HotcoldError(f"{path}: an adapter with no LoRA matrices")
    return out


def check_carried(ckpt: Checkpoint) -> None:
    """The predictors ckpt's file carries, once adapters are merged into ckpt: refused where they changed the FFN the
    predictors were trained on (their fingerprint: every layer's gate and up)."""
    from predictors.bundle import model_fingerprint
    if ckpt.predictors is not None and ckpt.predictors.fingerprint != model_fingerprint(ckpt):
        raise HotcoldError(f"{ckpt.path}: the predictors it carries were trained without the LoRA adapter, which "
                           "changes their FFN; --no-predictors, or --predictors trained with it")


def apply_lora(ckpt: Checkpoint, adapters: list[tuple[str, float]]) -> None:
    """Merge each (path, scale) adapter into ckpt.tensors, in place (llama.cpp sums several the same way), one
    matrix at a time (float32: its weights and the sum of its deltas). Scale 0 leaves a matrix as it is."""
    if isinstance(adapters, (str, bytes)) or not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in adapters):
        raise HotcoldError(f"lora = {adapters!r}: a list of (adapter path, scale) pairs")
    c, terms = ckpt.config, {}  # tensor name -> [(factor, A, B)]
    for path, scale in adapters:
        if not isinstance(path, (str, os.PathLike)) or not finite_number(scale):
            raise HotcoldError(f"LoRA adapter {path!r} at scale {scale!r}: a path and a finite number")
        if not os.path.exists(path):
            raise HotcoldError(f"{path}: no such file or directory")
        mats, alpha, halves = peft_adapter(path) if os.path.isdir(path) else gguf_adapter(path, c.arch)
        for name, (A, B) in mats.items():
            t = ckpt.tensors.get(name)
            flip = t is None and name.endswith("ffn_down.weight") and name + "_t" not in ckpt.tensors and \
                name.replace("ffn_down", "ffn_down_t") in ckpt.tensors  # PowerInfer's layout: down transposed
            if flip:
                name, A, B = name.replace("ffn_down", "ffn_down_t"), B.T, A.T  # (B A).T = A.T B.T
                t = ckpt.tensors[name]
            if name == "token_embd.weight":
                raise HotcoldError(f"{path}: adapts token_embd.weight; hotcold merges no adapter into the token "
                                   "embeddings")
            if t is None:
                why = " (this model ties output.weight to token_embd.weight)" if name == "output.weight" else ""
                raise HotcoldError(f"{path}: adapts {name}, which this model has no place for{why}")
            if (B.shape[0], A.shape[1]) != t.shape:
                raise HotcoldError(f"{path}: {name}'s B @ A is {(B.shape[0], A.shape[1])}, the model's {name} "
                                   f"{t.shape}: an adapter of another model")
            if halves and (".attn_q." in name or ".attn_k." in name):
                B = rotary_halves_to_pairs(B, c.n_head if ".attn_q." in name else c.n_head_kv)
            k = scale * alpha / A.shape[0] if alpha else scale  # A: (rank, cols)
            if k:
                terms.setdefault(name, []).append((k, A, B))
    for name, ts in terms.items():
        t = ckpt.tensors[name]
        w = np.array(t.dequantize(), np.float32)  # (rows, cols), a copy
        for k, A, B in ts:
            w += k * (B @ A)
        ckpt.tensors[name] = QTensor.from_float(w, t.remade_type)
