"""The one config dataclass, the name tables, and the error type every edge raises."""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import asdict, dataclass

import numpy as np

ACTS = ("silu", "relu", "fatrelu", "drelu")  # FFN activation kinds (DESIGN.md: Models and activations)
# how decoding stores predictor weights (engine/hybrid.py; GGUF type names). A bundle is trained for one of them
# (train-predictors --predictor-type): its weights lie on that type's grid and its thresholds were tuned on them,
# so it runs in that type by default
PREDICTOR_TYPES = ("F16", "Q8_0", "Q4_1")
# KV cache element types (--cache-type): f16 bits, as llama.cpp's default (half the bytes attention reads), or
# float32 (the torch reference's)
CACHE_TYPES = {"f16": np.uint16, "f32": np.float32}
AUDIT_KEYS = ("recall", "precision", "actual_sparsity")  # what the predictor runtime adds to its statistics under audit
DEFAULT_CTX = 2048  # tokens of context when none is given (or the model's training context if shorter)
BACKENDS = ("kernels", "torch")  # numba kernels on the stored blocks | the float32 torch reference
POOLINGS = ("mean", "last", "cls", "none")  # an embedding from the tokens' hidden states (llama.cpp's --pooling)


class HotcoldError(Exception):
    """A user-facing failure: the CLI prints its one-line message and exits with code 2."""


@dataclass(frozen=True)
class ModelConfig:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int = 2048
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    act: str = "silu"  # one of ACTS
    act_threshold: float = 0.0  # FATReLU threshold
    ffn_gated: bool = True  # False: down(act(up x))
    tied_embeddings: bool = False
    arch: str = "llama"
    rope_scale: float = 1.0  # linear rope scaling: positions divided by it (GGUF rope.scaling.factor)
    rope_freqs: tuple[float, ...] | None = None  # per rotary pair, its frequency divided by it (Llama 3.1's rope_freqs)
    attn_bias: bool = False  # biases added to q, k and v (Qwen2's)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_shapes(self, n_ctx: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The KV cache, one layout for both engines: keys (n_layer, Hkv, n_ctx, hd), values transposed
        (n_layer, Hkv, hd, n_ctx). A decode step's scores and weighted value sums then both run over contiguous
        positions (values by position were 2x slower: each position's sum updated the whole output row)."""
        return ((self.n_layer, self.n_head_kv, n_ctx, self.head_dim),
                (self.n_layer, self.n_head_kv, self.head_dim, n_ctx))

    def rope_tables(self, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of the rotary angles of positions 0..n_ctx-1: float32 (n_ctx, head_dim / 2)."""
        return self.rope_angles(np.arange(n_ctx))

    def rope_angles(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of the rotary angles of the positions (P,) (negative ones too: a rotation back): float32
        (P, head_dim / 2), computed in float64."""
        half = self.head_dim // 2
        inv = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / self.head_dim)  # (hd/2,)
        if self.rope_freqs is not None:
            inv /= np.asarray(self.rope_freqs, dtype=np.float64)
        ang = (np.asarray(positions, dtype=np.float64) / self.rope_scale)[:, None] * inv[None, :]  # (P, hd/2)
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


# --- model metadata: ModelConfig field -> GGUF key (after "ARCH.") and its default; -> HF config.json key -------
# (a GGUF without vocab_size takes token_embd's rows, one without head_count_kv takes head_count)
GGUF_KEYS = {"n_vocab": ("vocab_size", None), "n_embd": ("embedding_length", None),
             "n_ff": ("feed_forward_length", None), "n_layer": ("block_count", None),
             "n_head": ("attention.head_count", None), "n_head_kv": ("attention.head_count_kv", None),
             "n_ctx_train": ("context_length", None), "rope_base": ("rope.freq_base", 10000.0),
             "rms_eps": ("attention.layer_norm_rms_epsilon", None)}  # None: required, as llama.cpp requires it
# (defaults: transformers' LlamaConfig's; a config.json without num_key_value_heads has as many as heads)
HF_KEYS = {"n_vocab": ("vocab_size", None), "n_embd": ("hidden_size", None), "n_ff": ("intermediate_size", None),
           "n_layer": ("num_hidden_layers", None), "n_head": ("num_attention_heads", None),
           "n_head_kv": ("num_key_value_heads", None), "n_ctx_train": ("max_position_embeddings", 2048),
           "rope_base": ("rope_theta", 10000.0), "rms_eps": ("rms_norm_eps", 1e-6),
           "act_threshold": ("hidden_act_param", 0.0), "tied_embeddings": ("tie_word_embeddings", False)}
COUNTS = ("n_vocab", "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_ctx_train")  # integers >= 1
FLOATS = ("rope_base", "rms_eps", "act_threshold", "rope_scale")


def as_int(v, what: str) -> int:
    """v as an int (numpy's too); HotcoldError for a bool, a float, a string or None."""
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise HotcoldError(f"{what} = {v!r}: an integer") from None


_threads: dict[str, int] = {}  # "n": the count set_threads last asked for


def set_threads(n: int | None) -> None:
    """Threads of the numba kernels and of torch, at most numba's limit, the machine's cores (torch took
    `-t 100000` as given: one prefill-sized product ran 100x slower). None: as they are."""
    if n is None:
        return
    if as_int(n, "threads") < 1:
        raise HotcoldError(f"threads = {n}: at least 1")
    try:  # NUMBA_NUM_THREADS=0 or a threading layer that is not installed fail here
        import numba
        _threads["n"] = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(_threads["n"])
    except (ValueError, ImportError) as e:
        raise HotcoldError(f"numba: {first_line(e)} (see the NUMBA_* environment variables)") from None
    torch_threads()


def torch_threads() -> None:
    """torch's threads to what set_threads asked, once torch is imported: called where engine code computes with
    torch (TorchModel, the predictor Runtime), as torch imported after numba's OpenMP pool started takes OpenMP's
    default, every core (`generate -t 1` prefilled on all of them)."""
    torch = sys.modules.get("torch")
    if torch is not None and "n" in _threads and torch.get_num_threads() != _threads["n"]:
        torch.set_num_threads(_threads["n"])


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (torch and tokenizers add paragraphs), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def finite_number(v) -> bool:
    """A value read from a file (JSON, GGUF metadata) that is a finite number: not a bool, a string or None."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and finite(v)


def checked_config(where: str, keys: dict[str, str], **values) -> ModelConfig:
    """A ModelConfig from the values a file gives, checked before anything divides by them. HotcoldError naming
    `where` (the file) and the key a value came from (`keys`: field -> key) unless every count is an integer
    (not bool or str) of at least 1, the floats are finite, rms eps and rope base above 0, the heads split evenly
    into an even head size, and flags are booleans."""
    def bad(f: str, why: str):
        raise HotcoldError(f"{where}: {keys.get(f, f)} {why}")

    for f, v in values.items():
        if v is None and f != "rope_freqs":  # which is None without frequency factors
            bad(f, "has no value")
        if f in COUNTS and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            bad(f, f"is {v!r}, expected an integer")
        if f in COUNTS and v < 1:
            bad(f, f"is {v}, expected at least 1")
        if f in FLOATS and not finite_number(v):
            bad(f, f"is {v!r}, expected a finite number")
        if f in ("ffn_gated", "tied_embeddings", "attn_bias") and not isinstance(v, bool):
            bad(f, f"is {v!r}, expected true or false")
    c = ModelConfig(**{f: int(v) if f in COUNTS else float(v) if f in FLOATS else v for f, v in values.items()})
    for f in ("rms_eps", "rope_base", "rope_scale"):
        if getattr(c, f) <= 0:
            bad(f, f"is {getattr(c, f)}, expected above 0")
    if c.n_head % c.n_head_kv:
        bad("n_head_kv", f"is {c.n_head_kv}, which does not divide {keys.get('n_head')} {c.n_head}")
    if c.n_embd % c.n_head:
        bad("n_embd", f"is {c.n_embd}, not a multiple of {keys.get('n_head')} {c.n_head}")
    if c.head_dim % 2:  # rotary embedding turns pairs of a head's dimensions
        bad("n_embd", f"is {c.n_embd}: over {keys.get('n_head')} {c.n_head}, heads of {c.head_dim} dimensions, "
                      "expected an even number")
    f = c.rope_freqs
    if f is not None and not (len(f) == c.head_dim // 2 and all(finite(v) and v > 0 for v in f)):
        bad("rope_freqs", f"holds {len(f)} values, expected {c.head_dim // 2} finite ones above 0 (half a head)")
    return c


# --- GGUF tensor names are the canonical names inside the engine -------------------------------------------
def blk(i: int, name: str, part: str = "weight") -> str:
    return f"blk.{i}.{name}.{part}"


def layer_of(name: str) -> int | None:
    """i of a layer's tensor blk.i.*, None for the others."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() else None


LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
QKV = ("attn_q", "attn_k", "attn_v")  # with ModelConfig.attn_bias, each has a bias blk.N.NAME.bias


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, in numpy order (rows, cols)."""
    kv = c.n_head_kv * c.head_dim
    per_layer = {
        "attn_norm": (c.n_embd,), "ffn_norm": (c.n_embd,),
        "attn_q": (c.n_embd, c.n_embd), "attn_k": (kv, c.n_embd), "attn_v": (kv, c.n_embd),
        "attn_output": (c.n_embd, c.n_embd),
        "ffn_gate": (c.n_ff, c.n_embd), "ffn_up": (c.n_ff, c.n_embd), "ffn_down": (c.n_embd, c.n_ff),
    }
    if not c.ffn_gated:
        del per_layer["ffn_gate"]
    shapes = {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    for i in range(c.n_layer):
        shapes.update({blk(i, k): v for k, v in per_layer.items()})
        if c.attn_bias:
            shapes.update({blk(i, k, "bias"): per_layer[k][:1] for k in QKV})
    return shapes


# --- Hugging Face -> GGUF, used at the loading edge only ----------------------------------------------------
HF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}  # -> arch


def hf_to_gguf_name(name: str) -> str | None:
    """The GGUF name of an HF tensor (a bias too, which the loader then refuses, as anything else it has no place
    for, under its own name); None for rotary inv_freq buffers, which the config recomputes."""
    if name in HF_TOP:
        return HF_TOP[name]
    parts = name.split(".")
    if parts[-1] == "inv_freq":
        return None
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers" and parts[-1] in ("weight", "bias"):
        key = ".".join(parts[3:-1])
        if key in HF_LAYER:
            return f"blk.{int(parts[2])}.{HF_LAYER[key]}.{parts[-1]}"
    return name if parts[0] in ("model", "lm_head") else None  # another file's (a LoRA adapter, Mistral's own)


# --- GGUF metadata keys of our own (llama.cpp ignores unknown keys) --------------------------------------
KEY_ACT = "hotcold.ffn_act"
KEY_ACT_THRESHOLD = "hotcold.ffn_act_threshold"
