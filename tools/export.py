"""`hotcold export` and `hotcold inspect`: one GGUF file that carries a model and its predictors, and a look inside.

--format powerinfer (DESIGN.md, "PowerInfer's file formats"): OUT.powerinfer.gguf, GGUF v3 with its magic then
overwritten by PWRI; llama keys and tokenizer (architecture bamboo for dReLU, PowerInfer's graph for it);
output.weight written even when tied; blk.N.ffn_down_t in place of ffn_down; blk.N.fc1/fc2 (F16) under one
powerinfer.sparse_threshold, per-layer thresholds folded into fc2; our manifest under hotcold.predictors.manifest.
With --split also OUT.gpuidx, copied to OUT.powerinfer.gguf.generated.gpuidx: the name PowerInfer looks for; its
split.vram_capacity is what the hot rows take in this file's types.

--format gguf: OUT.gguf, a standard llama.cpp file. llama.cpp refuses a file holding tensors it does not use
("wrong number of tensors"), so a bundle travels in two keys it ignores: hotcold.predictors.manifest (manifest.json)
and hotcold.predictors.safetensors (predictors.safetensors in base64: gguf-py reads a string in one piece but a
numeric array element by element).

Each file is written tensor by tensor to a temporary name, read back (every tensor's type, shape and crc32; then
loaded as a checkpoint whose tokenizer must encode a probe text as the source's does) and only then renamed.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import GGMLQuantizationType as QT

from engine.config import KEY_ACT, KEY_ACT_THRESHOLD, LAYER_TENSORS, QKV, HotcoldError, blk
from engine.files import check_writable, exists_error, refuse_directories, write_all
from engine.fingerprint import fingerprint
from engine.loader import (GPU_INDEX_ARCH, KEY_BUNDLE_MANIFEST, KEY_BUNDLE_TENSORS, KEY_SPARSE_THRESHOLD,
                           POWERINFER_ACT, POWERINFER_SUFFIX, PWRI, Checkpoint, field_value, gpuidx_paths,
                           load_checkpoint, open_gguf, resolve)
from engine.qtensor import AS_BLOCKS, AS_NATIVE, QTensor
from engine.tokenizer import (END_KEYS, END_NAMES, PRE_ALIASES, PRE_TOKENIZERS, TOKEN_CONTROL, TOKEN_NORMAL,
                              TOKEN_UNUSED, TOKEN_USER_DEFINED, Tokenizer)
from tools.cli import MODEL_HELP, add_lora_args, adapters, emit_json, lora_merged
from tools.split import check_out_prefix, read_gpuidx, read_model_split, write_gpuidx

OUTTYPES = {"f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
FILE_TYPES = {QT.F16: LlamaFileType.MOSTLY_F16, QT.Q8_0: LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
              QT.Q4_1: LlamaFileType.MOSTLY_Q4_1}
POWERINFER_ARCH = {act: arch for arch, act in POWERINFER_ACT.items()}  # FFN activation -> PowerInfer's graph
# the types PowerInfer's sparse FFN kernels take (its CUDA ones assert on others) for ffn_gate, ffn_up, ffn_down_t:
# other --outtypes store these three as F16
POWERINFER_FFN_TYPES = (QT.F16, QT.Q4_0)
POWERINFER_SPARSE = ("ffn_gate.weight", "ffn_up.weight", "ffn_down_t.weight")
POWERINFER_WARP = 32  # PowerInfer's CUDA FFN takes a layer's hot rows 32 at a time (it asserts on a prompt of 100+)
COPIED_KEYS = ("general.", "tokenizer.")  # taken from a GGUF source as they are, except:
OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
UINT32_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", *END_KEYS)
# what tells the pre-tokenizers apart (numerals past ASCII: smollm's digits one at a time)
PROBE = "Hello world! It's 2024: 12345 cats,\n\n  naïve café, 東京 — don't <s> stop</s> ²³ ½ ١٢"


# --- what goes into the file -------------------------------------------------------------------------------
@dataclass
class Out:
    """One tensor to write: its source and how it is stored."""
    name: str
    src: QTensor
    qtype: QT
    transpose: bool = False  # ffn_down <-> ffn_down_t

    @property
    def shape(self) -> tuple[int, ...]:  # numpy order
        return tuple(self.src.shape[::-1] if self.transpose else self.src.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size

    def data(self) -> np.ndarray:
        """The stored form: the source's own bytes when type and layout stay, or the kernels' form of them when it is
        of the type (Q4_K as Q4_1, IQ4 as Q8_0: `QTensor.converted`), or Q4_0, Q5_0 and Q3_K blocks as the Q8_0
        blocks of the same values (`QTensor.as_q8_0`), so nothing is rounded twice. Values past the range of the
        type's f16 scales: one line naming the tensor."""
        if not self.transpose:
            n = self.src
            if self.qtype in (AS_NATIVE.get(n.qtype), AS_BLOCKS.get(n.qtype)) and len(n.shape) == 2:
                n = n.converted()
            if self.qtype == QT.Q8_0 and n.qtype in (QT.Q4_0, QT.Q5_0, QT.Q3_K):
                n = n.as_q8_0()
            if n.qtype == self.qtype:
                return np.ascontiguousarray(n.data)
        from engine import kernels  # numba's, on first use
        a = kernels.values(self.src)
        with np.errstate(over="ignore"):  # said below, in one line
            out = QTensor.from_float(a.T if self.transpose else a, self.qtype)
        if self.qtype != QT.F32 and not out.finite():
            raise HotcoldError(f"tensor {self.name}: values up to {np.abs(a).max():.4g} pass what {self.qtype.name} "
                               "holds (its f16 numbers end at 65504)")
        return out.data


def stored_type(shape: tuple[int, ...], qtype: QT) -> QT:
    """1-D tensors are F32; a matrix whose rows are not whole qtype blocks falls back to F16, as in llama.cpp."""
    if len(shape) == 1:
        return QT.F32
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else QT.F16


def plan(ckpt: Checkpoint, qtype: QT, powerinfer: bool, predictors: list | None = None) -> list[Out]:
    """The tensors of the file in llama.cpp's order; PowerInfer's layout (explicit output, ffn_down_t, fc1/fc2)."""
    t = ckpt.tensors

    def out(name: str, src: QTensor, transpose: bool = False) -> Out:
        q = qtype
        if powerinfer and qtype not in POWERINFER_FFN_TYPES and name.endswith(POWERINFER_SPARSE):
            q = QT.F16
        return Out(name, src, stored_type(src.shape[::-1] if transpose else src.shape, q), transpose)

    items = [out("token_embd.weight", t["token_embd.weight"]), out("output_norm.weight", t["output_norm.weight"])]
    if ckpt.config.rope_freqs is not None:  # Llama 3.1's per-frequency factors, as llama.cpp reads them
        items.append(out("rope_freqs.weight", QTensor.from_float(np.array(ckpt.config.rope_freqs, np.float32))))
    if powerinfer or "output.weight" in t:  # PowerInfer's loader requires output.weight even when tied
        items.append(out("output.weight", t.get("output.weight", t["token_embd.weight"])))
    for i in range(ckpt.config.n_layer):
        items += [out(blk(i, n), t[blk(i, n)]) for n in LAYER_TENSORS if n != "ffn_down" and blk(i, n) in t]
        items += [out(blk(i, n, "bias"), t[blk(i, n, "bias")]) for n in QKV if blk(i, n, "bias") in t]  # Qwen2's,
        # which llama.cpp's llama graph adds where a file has them (the rows in its pair layout, as the weights')
        stored_t = blk(i, "ffn_down_t") in t  # the source may itself be a PowerInfer file
        down = t[blk(i, "ffn_down_t" if stored_t else "ffn_down")]
        items.append(out(blk(i, "ffn_down_t" if powerinfer else "ffn_down"), down, transpose=stored_t != powerinfer))
        if predictors is not None:
            p = predictors[i]
            items += [Out(blk(i, n), QTensor.from_float(w.detach().float().numpy()), QT.F16)
                      for n, w in (("fc1", p.fc1.weight), ("fc2", p.fc2.weight))]  # (rank, n_embd), (n_ff, rank)
    return items


def add_model_keys(wr: GGUFWriter, ckpt: Checkpoint, qtype: QT) -> None:
    """Hyperparameters from the config (under wr's architecture); general.* and the tokenizer from the source."""
    c = ckpt.config
    wr.add_block_count(c.n_layer)
    wr.add_context_length(c.n_ctx_train)
    wr.add_embedding_length(c.n_embd)
    wr.add_feed_forward_length(c.n_ff)
    wr.add_head_count(c.n_head)
    wr.add_head_count_kv(c.n_head_kv)
    wr.add_rope_dimension_count(c.head_dim)
    wr.add_rope_freq_base(c.rope_base)
    if c.rope_scale != 1.0:
        wr.add_rope_scaling_type(RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(c.rope_scale)
    wr.add_layer_norm_rms_eps(c.rms_eps)
    wr.add_vocab_size(c.n_vocab)
    wr.add_file_type(FILE_TYPES[qtype])
    if qtype != QT.F16:  # the block layout version, as llama.cpp's quantize writes it
        wr.add_quantization_version(GGML_QUANT_VERSION)
    wr.add_string(KEY_ACT, c.act)
    wr.add_float32(KEY_ACT_THRESHOLD, c.act_threshold)
    if os.path.isdir(ckpt.path):
        wr.add_name(os.path.basename(os.path.normpath(ckpt.path)))
        add_keys(wr, hf_tokenizer_keys(ckpt))
        return
    for key, f in open_gguf(ckpt.path).fields.items():
        if key.startswith(COPIED_KEYS) and key not in OWN_KEYS:
            copy_key(wr, key, f)


def copy_key(wr: GGUFWriter, key: str, f) -> None:
    """A key of a GGUFReader (its field f) into a GGUFWriter, of the same type."""
    wr.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)


def add_keys(wr: GGUFWriter, keys: dict) -> None:
    """Python values under GGUF's types: lists are arrays, ints INT32 except token ids (UINT32, as llama.cpp reads)."""
    for key, v in keys.items():
        if key in UINT32_KEYS:
            wr.add_uint32(key, v)
        elif isinstance(v, list):
            wr.add_key_value(key, v, GGUFValueType.ARRAY, GGUFValueType.get_type(v[0]))
        else:
            wr.add_key_value(key, v, GGUFValueType.get_type(v))


def hf_tokenizer_keys(ckpt: Checkpoint) -> dict:
    """tokenizer.ggml.* of an HF directory's byte-level BPE tokenizer; the pre-tokenizer is the first of ours that
    encodes PROBE as the HF tokenizer does. Ids past the tokenizer up to n_vocab are UNUSED padding tokens."""
    tok, where = ckpt.tokenizer, ckpt.path
    spec = json.loads(tok.tk.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise HotcoldError(f"{where}: only byte-level BPE tokenizers (GPT-2 style) are converted from Hugging Face "
                           "directories; convert this one with llama.cpp's convert_hf_to_gguf.py")
    if not model.get("merges"):  # gguf-py writes no empty array, and llama.cpp needs the key
        raise HotcoldError(f"{where}: its BPE tokenizer has no merges, which gguf-py cannot write (an empty array)")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > ckpt.config.n_vocab:
        raise HotcoldError(f"{where}: token ids are not 0..{ckpt.config.n_vocab - 1} without gaps")
    added = tok.tk.get_added_tokens_decoder()
    types = [TOKEN_CONTROL if i in tok.special_ids else TOKEN_USER_DEFINED if i in added else TOKEN_NORMAL
             for i in range(len(tokens))]
    pad = range(len(tokens), ckpt.config.n_vocab)
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in pad],
            "tokenizer.ggml.token_type": types + [TOKEN_UNUSED] * len(pad),
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
            "tokenizer.ggml.add_bos_token": bool(tok.add_bos), "tokenizer.ggml.add_eos_token": bool(tok.add_eos)}
    keys.update({k: v for k, v in (("tokenizer.ggml.bos_token_id", tok.bos_id), ("tokenizer.ggml.eos_token_id",
                 tok.eos_id), ("tokenizer.chat_template", tok.chat_template)) if v is not None})
    # generation_config.json's other end tokens: llama.cpp finds those of END_NAMES itself
    ends = sorted(tok.stop_ids - {tok.eos_id} - {vocab[t] for t in END_NAMES if t in vocab})
    keys.update(zip(END_KEYS, ends))
    if len(ends) > len(END_KEYS):
        print(f"hotcold: note: {where}: tokens {ends[len(END_KEYS):]} end generation there, not in the GGUF (it has "
              f"keys for {len(END_KEYS)} end tokens besides EOS)", file=sys.stderr)
    want = tok.encode(PROBE, add_bos=False)
    for pre in PRE_TOKENIZERS:
        keys["tokenizer.ggml.pre"] = pre
        if Tokenizer.from_gguf(keys, where).encode(PROBE, add_bos=False) == want:
            return keys
    raise HotcoldError(f"{where}: its pre-tokenizer is none of {', '.join(PRE_TOKENIZERS)}; convert it with "
                       "llama.cpp's convert_hf_to_gguf.py")


# --- writing and reading back ------------------------------------------------------------------------------
def write_gguf(path: str, arch: str, write_keys, items: list[Out], magic: bytes) -> dict[str, int]:
    """GGUF at path, each tensor converted when its turn comes (one in memory at a time); magic overwritten
    afterwards when it is not GGUF's. Returns each tensor's crc32."""
    from tqdm import tqdm
    wr = GGUFWriter(path, arch)
    write_keys(wr)
    for it in items:
        wr.add_tensor_info(it.name, it.shape, np.dtype(np.float32), it.nbytes, raw_dtype=it.qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    crcs = {}
    for it in tqdm(items, desc="export", unit="tensor", file=sys.stderr, disable=None):
        data = it.data()
        crcs[it.name] = zlib.crc32(data)
        wr.write_tensor_data(data)
    wr.close()
    if magic != b"GGUF":
        with open(path, "r+b") as fh:
            fh.write(magic)
    return crcs


def verify(path: str, items: list[Out], crcs: dict[str, int], source: Checkpoint, predictors: bool) -> None:
    """Read the file back: tensor names, types, shapes and bytes as written; it loads; same tokens; predictors."""
    tensors = open_gguf(path).tensors
    if [t.name for t in tensors] != [it.name for it in items]:
        raise HotcoldError(f"{path}: reads back {len(tensors)} tensors, {len(items)} were written")
    for t, it in zip(tensors, items):
        if (QT(int(t.tensor_type)), tuple(reversed(t.shape.tolist()))) != (it.qtype, it.shape) or \
                zlib.crc32(np.ascontiguousarray(t.data)) != crcs[it.name]:
            raise HotcoldError(f"{path}: tensor {it.name} reads back differently from what was written")
    ckpt = load_checkpoint(path)
    if ckpt.tokenizer.encode(PROBE) != source.tokenizer.encode(PROBE):
        raise HotcoldError(f"{path}: the written tokenizer encodes text differently from {source.path}'s")
    if predictors and ckpt.predictors is None:
        raise HotcoldError(f"{path}: the predictors do not read back")


def write_model(path: str, ckpt: Checkpoint, qtype: QT, powerinfer: bool, bundle, split_paths: list[str] = (),
                split: dict | None = None) -> dict:
    """OUT.powerinfer.gguf or OUT.gguf through a verified temporary file, renamed together with the GPU split's
    .gpuidx files (`write_split_file`) when a split is given, else with old ones at split_paths removed (a stale
    split beside the new model would be read with it). Returns what it wrote about predictors."""
    from predictors.bundle import fold_thresholds
    keys, preds, info = {}, None, {}
    if bundle is not None:
        manifest, tensors = bundle.files()
        if powerinfer:
            preds, t, effective = fold_thresholds(bundle.predictors, bundle.thresholds)
            manifest["export"] = info = {"sparse_threshold": t, "effective_thresholds": effective}
            keys[KEY_SPARSE_THRESHOLD] = float(t)
        else:
            keys[KEY_BUNDLE_TENSORS] = base64.b64encode(tensors).decode("ascii")
        keys[KEY_BUNDLE_MANIFEST] = json.dumps(manifest)
        info["ranks"] = bundle.ranks
    items = plan(ckpt, qtype, powerinfer, preds)
    if split is not None:  # PowerInfer checks split.vram_capacity against the VRAM left: the hot rows as stored here
        split = dict(split, ffn_gpu_bytes=hot_row_bytes(items, split))
    arch = POWERINFER_ARCH[effective_act(ckpt.config)] if powerinfer else "llama"

    def write_keys(wr: GGUFWriter) -> None:
        add_model_keys(wr, ckpt, qtype)
        add_keys(wr, keys)

    def write(tmp: str) -> None:
        crcs = write_gguf(tmp, arch, write_keys, items, PWRI if powerinfer else b"GGUF")
        verify(tmp, items, crcs, ckpt, bundle is not None)

    if split is None:
        write_all([(path, write)], stale=split_paths)
    else:
        write_all([(path, write)] + [(p, lambda tmp: write_split_file(tmp, split)) for p in split_paths])
    return info


# --- PowerInfer's constraints and its GPU split ----------------------------------------------------------
def effective_act(c) -> str:
    return "relu" if c.act == "fatrelu" and c.act_threshold == 0 else c.act


def check_powerinfer(ckpt: Checkpoint) -> None:
    c = ckpt.config
    if effective_act(c) not in POWERINFER_ARCH:
        why = (f"FATReLU's threshold {c.act_threshold} would be lost (PowerInfer's graph applies plain ReLU)"
               if c.act == "fatrelu" else f"its FFN activation {c.act} never gives exact zeros")
        raise HotcoldError(f"{ckpt.path}: cannot export for PowerInfer: its sparse path skips the FFN neurons whose "
                           f"ReLU output is exactly zero, and {why}; use --format gguf")
    if not c.ffn_gated:
        raise HotcoldError(f"{ckpt.path}: cannot export for PowerInfer: its llama graph needs a gated FFN (ffn_gate)")
    if c.attn_bias:
        raise HotcoldError(f"{ckpt.path}: cannot export for PowerInfer: hotcold writes attention biases (Qwen2's) "
                           "for llama.cpp only; use --format gguf")
    if c.rope_freqs is not None:
        raise HotcoldError(f"{ckpt.path}: cannot export for PowerInfer: its llama.cpp predates the rope frequency "
                           "factors (rope_freqs) of this model")


def hot_row_bytes(items: list[Out], split: dict) -> int:
    """The bytes of the split's hot rows of ffn_gate, ffn_up and ffn_down_t in the types this file stores them in
    (the split itself prices them in float16, as our runtime holds them)."""
    per_neuron = [sum(o.nbytes // o.shape[0] for o in items if o.name in (blk(i, "ffn_gate"), blk(i, "ffn_up"),
                                                                         blk(i, "ffn_down_t")))
                  for i in range(split["n_layer"])]
    return sum(len(ids) * b for ids, b in zip(split["gpu_neurons"], per_neuron))


def write_split_file(path: str, split: dict) -> None:
    """PowerInfer's .gpuidx, read back as the runtime reads it. Written at OUT.gpuidx and again at
    OUT.powerinfer.gguf.generated.gpuidx (a file, not a link: PowerInfer rewrites that one in place when it solves a
    split)."""
    write_gpuidx(path, split)
    back = read_gpuidx(path, split["n_ff"])
    if len(back) != split["n_layer"] or any(not np.array_equal(b, g) for b, g in zip(back, split["gpu_neurons"])):
        raise HotcoldError(f"{path}: the GPU split reads back differently from what was written")


# --- commands ------------------------------------------------------------------------------------------------
def cmd_export(args) -> None:
    from predictors.bundle import load_bundle, model_fingerprint
    ckpt = lora_merged(load_checkpoint(args.model), args)  # llama-export-lora's merge
    if adapters(args) and not args.predictors:
        from engine.lora import check_carried
        check_carried(ckpt)
    powerinfer = args.format == "powerinfer"
    base = args.out.removesuffix(".gguf").removesuffix(".powerinfer")  # -o out/model.gguf: out/model's files
    check_out_prefix(base, "out/model")
    if not powerinfer and base != args.out.removesuffix(".gguf"):
        raise HotcoldError(f"{args.out}: --format gguf writes llama.cpp's GGUF, OUT.gguf; {POWERINFER_SUFFIX} names "
                           "--format powerinfer's file")
    path = base + (POWERINFER_SUFFIX if powerinfer else ".gguf")
    split_paths = gpuidx_paths(path) if powerinfer else []
    if powerinfer:
        check_powerinfer(ckpt)
    elif args.split:
        raise HotcoldError("--split: a GPU split is PowerInfer's (.gpuidx); it goes with --format powerinfer")
    bundle = load_bundle(args.predictors, model_fingerprint(ckpt)) if args.predictors else ckpt.predictors
    if powerinfer and bundle is None:
        raise HotcoldError("--format powerinfer needs --predictors BUNDLE: PowerInfer reads blk.N.fc1/fc2 from the "
                           "model file")
    split = None
    if args.split is not None:  # OUT.json of hotcold split; OUT or OUT.gpuidx name it too
        js = args.split if args.split.endswith(".json") else args.split.removesuffix(".gpuidx") + ".json"
        if js != args.split and not os.path.exists(js):
            raise HotcoldError(f"{args.split}: --split reads the JSON of hotcold split beside it, {js}, which does "
                               "not exist")
        split = read_model_split(js, ckpt.config, fingerprint(ckpt.config, ckpt.tensors), ckpt.path)
        for i, ids in enumerate(split["gpu_neurons"]):
            if len(ids) % POWERINFER_WARP and len(ids) != ckpt.config.n_ff:
                n_ff = ckpt.config.n_ff
                fix = (f"hotcold split --group {POWERINFER_WARP}" if n_ff % POWERINFER_WARP == 0 else
                       f"this model's {n_ff} neurons are no multiple of it: all of a layer or none, --group {n_ff}")
                raise HotcoldError(f"{js}: layer {i} has {len(ids)} neurons on the GPU; PowerInfer's CUDA kernels "
                                   f"take a layer's hot rows {POWERINFER_WARP} at a time ({fix})")
    refuse_directories([path] + split_paths)
    existing = [p for p in [path] + split_paths if os.path.exists(p)]  # without --split, old splits are stale
    if existing and not args.force:
        raise exists_error(existing[0])
    check_writable(path)  # -o out/smol: out/ is made as the files are written
    info = write_model(path, ckpt, OUTTYPES[args.outtype], powerinfer, bundle, split_paths, split)
    ranks = info.get("ranks")
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {args.outtype}"
          + (f", predictors of rank {min(ranks)}-{max(ranks)}" if ranks else ", no predictors")
          + (f", sparse_threshold {info['sparse_threshold']:g}" if "sparse_threshold" in info else "") + ")")
    if split is not None:
        print(f"wrote {split_paths[0]}, copied to {split_paths[1]} for PowerInfer")
    effective = info.get("effective_thresholds")  # powerinfer: the per-layer thresholds under one
    moved = [f"{i} ({a:g} -> {b:g})" for i, (a, b) in enumerate(zip(bundle.thresholds, effective)) if a != b] \
        if effective else []
    if moved:
        print(f"hotcold: note: one sparse_threshold cannot carry these thresholds exactly; lowered (recall can only "
              f"rise) in layers {', '.join(moved)}", file=sys.stderr)
    pre = field_value(open_gguf(path), "tokenizer.ggml.pre", "default") if powerinfer else "gpt-2"
    if PRE_ALIASES.get(pre, pre) != "gpt-2":  # the key came to llama.cpp after PowerInfer's fork (its default: GPT-2's)
        print(f"hotcold: note: PowerInfer splits text before BPE as GPT-2 does and knows no tokenizer.ggml.pre "
              f"({pre!r}): some text tokenizes differently there (smollm: digits one at a time)", file=sys.stderr)
    odd = sorted({r for r in ranks or () if r % 32})
    if powerinfer and odd and args.outtype == "f16":  # fc2's rows are `rank` values long
        print(f"hotcold: note: PowerInfer's quantize would store fc1/fc2 in blocks of 32 values, which fc2's rows of "
              f"ranks {', '.join(map(str, odd))} do not fill; quantize with --outtype q4_0 here instead",
              file=sys.stderr)
    if not powerinfer and ckpt.config.act != "silu":
        print(f"hotcold: note: llama.cpp runs every llama FFN as SiLU; this {ckpt.config.act} model gives the right "
              "outputs in hotcold (and PowerInfer, --format powerinfer) only", file=sys.stderr)


def field_summary(f, whole: bool = False):
    """A GGUF key's value; unless whole (--json: each key keeps its type), a short description of it when it is a
    long array or a long string."""
    if f.types[0] == GGUFValueType.ARRAY and len(f.data) > 8 and not whole:
        return f"[{len(f.data)} x {f.types[-1].name}]"
    if f.types[0] == GGUFValueType.STRING and len(f.parts[f.data[0]]) > 120 and not whole:
        return f"<string of {len(f.parts[f.data[0]])} bytes>"
    return f.contents()


def predictor_summary(bundle) -> dict:
    return {"n_layer": len(bundle.predictors), "ranks": bundle.ranks, "thresholds": bundle.thresholds,
            "n_params": bundle.n_params, "predictor_type": bundle.predictor_type, "metrics": bundle.metrics,
            "sparsity": bundle.sparsity, "corpus": bundle.corpus, "training": bundle.training}


def inspect_file(path: str, whole: bool = False) -> dict:
    """What a GGUF file (ours, PowerInfer's model or .gpuidx, llama.cpp's) or a predictor directory holds; whole:
    long strings (the chat template) and arrays (the vocabulary) given whole, not described."""
    from predictors.bundle import MANIFEST, TENSORS, load_bundle, pt_files, read_powerinfer_dir
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, n)) for n in (MANIFEST, TENSORS)):  # ours, maybe incomplete
            b = load_bundle(path)
            return {"path": path, "kind": "bundle", "fingerprint": b.fingerprint, "predictors": predictor_summary(b)}
        if not pt_files(path):
            reads = "inspect reads GGUF files and predictor directories"
            if os.path.exists(os.path.join(path, "config.json")):  # PowerInfer's predictor directory has one too
                raise HotcoldError(f"{path}: a Hugging Face model directory; {reads} (hotcold export -m {path} -o OUT "
                                   "--format gguf makes a GGUF of it)")
            raise HotcoldError(f"{path}: a directory without predictors ({MANIFEST}, or PowerInfer's model_N.pt); "
                               f"{reads}")
        preds, thresholds = read_powerinfer_dir(path)
        return {"path": path, "kind": "powerinfer predictors", "predictors": {
            "n_layer": len(preds), "ranks": [p.rank for p in preds], "thresholds": thresholds,
            "n_params": sum(p.n_params for p in preds)}}
    r = open_gguf(path)
    magic, arch = r.data[:4].tobytes(), field_value(r, "general.architecture")
    info = {"path": path, "kind": "gpuidx" if arch == GPU_INDEX_ARCH else "powerinfer" if magic == PWRI else
            "gguf", "magic": magic.decode(), "version": int(field_value(r, "GGUF.version")), "architecture": arch,
            "bytes": os.path.getsize(path),
            "metadata": {k: field_summary(f, whole) for k, f in r.fields.items() if not k.startswith("GGUF.")},
            "tensors": [{"name": t.name, "type": QT(int(t.tensor_type)).name,
                         "shape": [int(n) for n in reversed(t.shape.tolist())], "bytes": int(t.n_bytes)}
                        for t in r.tensors]}
    if info["kind"] == "gpuidx":
        info["gpu_neurons"] = [int(np.sum(t.data)) for t in r.tensors if t.name.endswith(".gpu_idx")]
    else:
        try:
            ckpt = load_checkpoint(path)
        except HotcoldError as e:  # what hotcold refuses to run is what one inspects to see why
            info["loads"] = str(e)
        else:
            info["predictors"] = predictor_summary(ckpt.predictors) if ckpt.predictors is not None else None
            info["gpuidx"] = ckpt.gpuidx
            folded = json.loads(field_value(r, KEY_BUNDLE_MANIFEST, "{}")).get("export", {})  # our PowerInfer export's
            if info["predictors"] and isinstance(folded, dict) and "effective_thresholds" in folded:
                info["predictors"]["effective_thresholds"] = folded["effective_thresholds"]
    return info


def format_inspect(info: dict) -> str:
    from predictors.metrics import METRIC_KEYS
    mib = f", {info['bytes'] / 2**20:.1f} MiB" if "bytes" in info else ""
    head = f"{info['path']}: {info['kind']}"
    if "magic" in info:
        head += (f" (GGUF v{info['version']}, magic {info['magic']}, architecture {info['architecture']}, "
                 f"{len(info['tensors'])} tensors{mib})")
    lines = [head]
    if "metadata" in info:
        lines += ["metadata:"] + [f"  {k} = {v}" for k, v in info["metadata"].items()]
        width = max((len(t["name"]) for t in info["tensors"]), default=0)
        lines += ["tensors:"] + [f"  {t['name']:<{width}}  {t['type']:<5} {str(tuple(t['shape'])):<16} "
                                 f"{t['bytes'] / 2**10:10.1f} KiB" for t in info["tensors"]]
    if "gpu_neurons" in info:
        lines.append("GPU neurons per layer: " + " ".join(map(str, info["gpu_neurons"])))
    p = info.get("predictors")
    if p:
        kind = f", decoded as {p['predictor_type']} by default" if "predictor_type" in p else ""
        folded = p.get("effective_thresholds")  # each layer's, scaled into fc2 for the one threshold PowerInfer takes
        lines.append(f"predictors: {p['n_layer']} layers, {p['n_params'] / 1e6:.2f} M parameters{kind}" + (
            f"; thresholds folded into fc2 under sparse_threshold {p['thresholds'][0]:+.4f}" if folded else ""))
        for i, (rank, t) in enumerate(zip(p["ranks"], folded or p["thresholds"])):
            m = p.get("metrics", [])[i] if i < len(p.get("metrics", [])) else {}
            extra = " ".join(f"{k} {m[k]:.4f}" for k in METRIC_KEYS if k in m)
            if extra and m.get("threshold", t) != t:  # thresholds moved since (calibrate --predictors)
                extra += f" (on validation at threshold {m['threshold']:+.4f})"
            lines.append(f"  layer {i:>3}: rank {rank:>5}, threshold {t:+.4f}  {extra}".rstrip())
    elif "predictors" in info:
        lines.append("predictors: none")
    if info.get("gpuidx"):
        lines.append(f"GPU split: {info['gpuidx']}")
    if "loads" in info:
        lines.append(f"hotcold does not run it: {info['loads']}")
    return "\n".join(lines)


def cmd_inspect(args) -> None:
    info = inspect_file(resolve(args.file), whole=args.json)  # the default model's name too
    if args.json:
        emit_json(info)
    else:
        print(format_inspect(info))


def add_command(sub) -> None:
    p = sub.add_parser("export", help="write a model and its predictors as one GGUF for PowerInfer or llama.cpp")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("--predictors", default=None,
                   help="predictor bundle (hotcold train-predictors); default: the ones the model file carries")
    p.add_argument("--split", default=None, help="a `hotcold split` result (OUT.json): writes PowerInfer's .gpuidx")
    p.add_argument("-o", "--out", required=True, help="writes OUT.powerinfer.gguf (--format gguf: OUT.gguf); a "
                   ".gguf or .powerinfer.gguf suffix of OUT is dropped")
    p.add_argument("--format", choices=("powerinfer", "gguf"), default="powerinfer",
                   help="powerinfer: PowerInfer's sparse GGUF (default); gguf: llama.cpp's, predictors in hotcold keys")
    p.add_argument("--outtype", choices=tuple(OUTTYPES), default="f16", help="matrix storage (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_lora_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="metadata, tensors and predictors of a GGUF file or a predictor bundle")
    p.add_argument("file", help="GGUF (also PowerInfer's .powerinfer.gguf and .gpuidx), bundle directory, or "
                   "smollm2-135m (the default model)")
    p.add_argument("--json", action="store_true", help="print every key whole, as its type, in one JSON object")
    p.set_defaults(func=cmd_inspect)
