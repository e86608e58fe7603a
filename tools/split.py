"""Neuron placement: which FFN neurons of which layers live on the GPU under a memory budget.

The budget first pays for what always goes to the GPU, in PowerInfer's order: attention weights and norms,
predictors, the output matrix and norm (PowerInfer loads them before its split, and uses a split only where they fit),
KV cache. The rest buys FFN neurons. Each layer's neurons are sorted by activation frequency and
placed in groups of `group` (kernel efficiency); a group's value is the activations it serves, its cost the
bytes of its gate, up and down rows. Maximising the served activations under the budget is a 0/1 knapsack whose
items all cost the same (groups divide a layer, and every layer's neurons weigh alike), which the most valuable
groups solve exactly (`solve`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from engine.api import check_context, default_ctx
from engine.config import DEFAULT_CTX, HotcoldError
from engine.files import check_replaceable, check_writable, read_json, write_all
from engine.fingerprint import check_fingerprint, fingerprint

GPU_BYTES = 2  # hot rows live on the GPU in float16 (matrices priced so)
NORM_BYTES = 4  # norms stay float32
GROUP = 32  # neurons placed together, by default


def group_values(counts: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Neurons sorted by count (descending) and the summed count of each consecutive group of that order."""
    order = np.argsort(-counts, kind="stable")
    return order, counts[order].reshape(-1, group).sum(1)


def solve(counts: list[np.ndarray], budget_groups: int, group: int = GROUP) -> list[np.ndarray]:
    """Sorted GPU neuron ids per layer maximising the summed counts placed, with at most budget_groups groups of
    `group` neurons (group divides every layer's count of neurons).

    Every group costs the same, so no feasible set holds more than k = budget_groups groups, and a set of k that
    leaves out a group more valuable than one it holds gains by swapping the two: the k most valuable groups (ties in
    any order) reach the maximum. The test checks it against trying every set."""
    orders, values = zip(*(group_values(np.asarray(c, np.float64), group) for c in counts))
    v = np.concatenate(values)
    chosen = np.zeros(len(v), bool)
    chosen[np.argsort(-v, kind="stable")[:max(budget_groups, 0)]] = True
    out, start = [], 0
    for order, vals in zip(orders, values):
        pick = chosen[start:start + len(vals)]
        start += len(vals)
        ids = np.concatenate([order[g * group:(g + 1) * group] for g in np.flatnonzero(pick)] or [np.zeros(0, int)])
        out.append(np.sort(ids).astype(np.int32))
    return out


def fixed_gpu_bytes(c, n_ctx: int, predictor_bytes: int) -> dict[str, int]:
    """What goes to the GPU before any FFN neuron, in order (the output matrix too where the model ties it to the
    embedding: PowerInfer's files hold it)."""
    kv = c.n_head_kv * c.head_dim
    attn = c.n_layer * ((2 * c.n_embd * c.n_embd + 2 * kv * c.n_embd) * GPU_BYTES + 2 * c.n_embd * NORM_BYTES)
    return {"attention": attn, "predictors": predictor_bytes,
            "output": c.n_vocab * c.n_embd * GPU_BYTES + c.n_embd * NORM_BYTES,
            "kv_cache": 2 * c.n_layer * n_ctx * kv * GPU_BYTES}


def size_text(n: int) -> str:
    """Bytes in binary units, e.g. 1.5 MiB."""
    unit = next(u for u in range(4, -1, -1) if n >= 1024 ** u or u == 0)
    return f"{n} B" if unit == 0 else f"{n / 1024 ** unit:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def neuron_bytes(c) -> int:
    return (3 if c.ffn_gated else 2) * c.n_embd * GPU_BYTES


def plan(c, counts: list[np.ndarray], *, gpu_budget: int | None = None, hot_fraction: float | None = None,
         group: int = GROUP, n_ctx: int = DEFAULT_CTX, predictor_bytes: int = 0) -> dict:
    """The split as a JSON-able dict: per layer the sorted GPU neuron ids, and what the budget paid for."""
    if c.n_ff % group:  # a ragged last group would cost less than the others: a knapsack no longer solved by order
        raise HotcoldError(f"--group {group} must divide the {c.n_ff} FFN neurons of a layer")
    nb = neuron_bytes(c)
    ffn_total = c.n_layer * c.n_ff * nb
    if hot_fraction is not None:
        if not 0 <= hot_fraction <= 1:
            raise HotcoldError(f"--hot-fraction {hot_fraction} is not between 0 and 1")
        fixed, budget = {}, int(hot_fraction * ffn_total)
    else:
        fixed = fixed_gpu_bytes(c, n_ctx, predictor_bytes)
        budget = int(gpu_budget) - sum(fixed.values())
        if budget < 0:
            raise HotcoldError(f"GPU budget of {size_text(gpu_budget)} does not hold the parts that always go "
                               f"to the GPU ({size_text(sum(fixed.values()))}: "
                               + ", ".join(f"{k} {size_text(v)}" for k, v in fixed.items()) + ")")
    gpu = solve(counts, budget // (group * nb), group)
    served = sum(float(np.asarray(cn)[g].sum()) for cn, g in zip(counts, gpu))
    total = sum(float(np.asarray(cn).sum()) for cn in counts)
    return {"n_layer": c.n_layer, "n_ff": c.n_ff, "group": group, "gpu_budget": gpu_budget,
            "hot_fraction": hot_fraction, "fixed_bytes": fixed, "ffn_budget_bytes": budget,
            "ffn_gpu_bytes": sum(len(g) for g in gpu) * nb,
            "gpu_share_expected": served / total if total else 0.0,
            "gpu_neurons": [g.tolist() for g in gpu]}


def write_gpuidx(path: str, split: dict) -> None:
    """PowerInfer's GPU index: GGUF `generic.gpu_index`, per layer gpu_idx (0/1 of n_ff) then gpu_bucket, I32 as
    PowerInfer's ggml numbers it (engine.loader.PWRI_INT_TYPES). split.vram_capacity: the bytes of the hot FFN rows;
    PowerInfer compares it with the memory left once the dense tensors and the KV cache are on the GPU. Written in
    place: callers write a temporary file (`write_all`)."""
    import struct

    from gguf import GGMLQuantizationType as QT, GGUFWriter

    from engine.loader import GPU_INDEX_ARCH, KEY_VRAM_CAPACITY, PWRI, PWRI_INT_TYPES, open_gguf
    wr = GGUFWriter(path, GPU_INDEX_ARCH)
    wr.add_block_count(split["n_layer"])
    wr.add_uint64(KEY_VRAM_CAPACITY, int(split["ffn_gpu_bytes"]))
    for i, ids in enumerate(split["gpu_neurons"]):
        idx = np.zeros(split["n_ff"], np.int32)
        idx[ids] = 1
        wr.add_tensor(f"blk.{i}.gpu_idx", idx)
        wr.add_tensor(f"blk.{i}.gpu_bucket", np.asarray(ids, np.int32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    i32 = next(k for k, t in PWRI_INT_TYPES.items() if t == QT.I32)
    types = [t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4]) for t in open_gguf(path).tensors]
    with open(path, "r+b") as fh:
        fh.write(PWRI)
        for off in types:  # each tensor's type field: name length, name, n_dims and dims come before it
            fh.seek(off)
            fh.write(struct.pack("<I", i32))


def read_gpuidx(path: str, n_ff: int) -> list[np.ndarray]:
    """The GPU neuron ids per layer of PowerInfer's .gpuidx (see `write_gpuidx`) for a model of n_ff neurons a layer:
    where gpu_idx is 1. gpu_bucket, which PowerInfer's later splitters always write (early ones for MoE only), must
    name the same neurons."""
    from engine.loader import GPU_INDEX_ARCH, field_value, open_gguf
    r = open_gguf(path)
    arch = field_value(r, "general.architecture")
    if arch != GPU_INDEX_ARCH:  # a model given as the split
        raise HotcoldError(f"{path}: a GGUF of architecture {arch!r}, not a PowerInfer GPU index ({GPU_INDEX_ARCH})")
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    n = len([k for k in data if k.endswith(".gpu_idx")])
    ids = []
    for i in range(n):
        idx, bucket = data.get(f"blk.{i}.gpu_idx"), data.get(f"blk.{i}.gpu_bucket")
        if idx is None:
            raise HotcoldError(f"{path}: not a PowerInfer GPU index (no blk.{i}.gpu_idx)")
        integers = idx.dtype.kind in "iu" and (bucket is None or bucket.dtype.kind in "iu")
        if not integers or idx.shape != (n_ff,):
            raise HotcoldError(f"{path}: blk.{i}.gpu_idx is not {n_ff} integers, one per FFN neuron of the model, or "
                               f"blk.{i}.gpu_bucket not integers")
        if not np.isin(idx, (0, 1)).all():
            raise HotcoldError(f"{path}: blk.{i}.gpu_idx holds values other than 0 and 1")
        if bucket is not None and not np.array_equal(np.sort(bucket), np.flatnonzero(idx)):
            raise HotcoldError(f"{path}: blk.{i}.gpu_bucket and blk.{i}.gpu_idx name different neurons")
        ids.append(np.flatnonzero(idx))
    return ids


def check_out_prefix(prefix: str, example: str) -> None:
    """-o of export and split: a file name without its suffix, not a directory."""
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise HotcoldError(f"{prefix}: a directory; -o takes a file name without its suffix, e.g. {example}")


def split_outputs(prefix: str) -> tuple[str, str]:
    """PREFIX.json and PREFIX.gpuidx (PREFIX may end in .json), refused before any work if they cannot be written."""
    check_out_prefix(prefix, "out/split")
    prefix = prefix[:-5] if prefix.endswith(".json") else prefix
    check_replaceable(prefix + ".json", "a hotcold split", read_split)
    check_replaceable(prefix + ".gpuidx", "a .gpuidx", is_gpuidx)
    check_writable(prefix + ".json")
    return prefix + ".json", prefix + ".gpuidx"


def is_gpuidx(path: str) -> bool:
    from engine.loader import GPU_INDEX_ARCH, field_value, open_gguf
    return field_value(open_gguf(path), "general.architecture") == GPU_INDEX_ARCH


def write_split(prefix: str, split: dict) -> tuple[str, str]:
    """PREFIX.json (ours) and PREFIX.gpuidx (PowerInfer's), written to temporary files and renamed together."""
    js, gi = split_outputs(prefix)
    write_all([(js, lambda tmp: Path(tmp).write_text(json.dumps(split))), (gi, lambda tmp: write_gpuidx(tmp, split))])
    return js, gi


def read_split(path: str) -> dict:
    split = read_json(path, "hotcold split")
    if "gpu_neurons" not in split:
        raise HotcoldError(f"{path}: not a hotcold split (no gpu_neurons)")
    try:
        ids = [np.asarray(g) for g in split["gpu_neurons"]]
        if not all(g.ndim == 1 and (g.size == 0 or g.dtype.kind in "iu") for g in ids):
            raise ValueError("expected a list of integer ids per layer")
    except (ValueError, TypeError) as e:
        raise HotcoldError(f"{path}: not a hotcold split (gpu_neurons: {e})") from None
    split["gpu_neurons"] = [g.astype(np.int64) for g in ids]
    return split


def read_model_split(path: str, c, fp: dict, model_path: str) -> dict:
    """A `hotcold split` JSON made for the model of config c and fingerprint fp (engine.fingerprint.fingerprint):
    its shape, its neuron ids, and its fingerprint where recorded (splits written before it are checked by shape)."""
    split = read_split(path)
    if (split.get("n_layer"), split.get("n_ff")) != (c.n_layer, c.n_ff):
        raise HotcoldError(f"{path}: a split of another model ({split.get('n_layer')} layers x {split.get('n_ff')} "
                           f"neurons; {model_path} has {c.n_layer} x {c.n_ff})")
    from engine.hybrid import check_hot
    split["gpu_neurons"] = check_hot(split["gpu_neurons"], c, path, model_path)
    if "fingerprint" in split:
        check_fingerprint(split["fingerprint"], fp, path, "split")
    return split


def hot_neurons(model, bundle, split_path: str | None, gpu_budget: int | None, hot_device: str,
                n_ctx: int) -> tuple[object, list[np.ndarray] | None, str | None]:
    """(bundle, hot neuron ids per layer or None, torch device for them or None) for the runtime's options.

    bundle: a path or Bundle; the hot set comes from a split file, or is solved for gpu_budget from the counts
    of the profile the bundle was trained on (a budget of 0: nothing is hot). hot_device auto: CUDA if present, else
    nothing is hot."""
    import torch
    from engine.hybrid import check_hot, torch_device
    from engine.loader import GGUF_MAGICS, file_magic
    from predictors.bundle import Bundle, load_bundle, model_fingerprint
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, model_fingerprint(model.ckpt))
    c = model.config
    if hot_device != "auto":
        torch_device(hot_device, "--hot-device")
    device = "cuda" if hot_device == "auto" and torch.cuda.is_available() else hot_device
    if gpu_budget == 0:  # no GPU memory: every neuron on the CPU (`hotcold split` refuses it: nothing to place)
        return bundle, None, None
    if split_path is None and gpu_budget is None:
        split_path = model.ckpt.gpuidx if device != "auto" else None  # PowerInfer's split beside an export
        if split_path is None:
            if hot_device != "auto":
                print(f"hotcold: --hot-device {hot_device} without --split or --gpu-budget: every neuron runs on the "
                      f"CPU", file=sys.stderr)
            return bundle, None, None
    # the split read, or solved, even where no GPU will use it: a command refused on one machine is on every one;
    # a .gpuidx is known by its magic too (an unreadable file is said by the JSON reader)
    if split_path is not None and (split_path.endswith(".gpuidx") or file_magic(split_path) in GGUF_MAGICS):
        hot = check_hot(read_gpuidx(split_path, c.n_ff), c, split_path, model.ckpt.path)
    elif split_path is not None:
        hot = read_model_split(split_path, c, model.fingerprint, model.ckpt.path)["gpu_neurons"]
    else:
        from tools.profile import load_counts
        profile = bundle.corpus.get("profile")
        if not profile or not os.path.isdir(profile):
            raise HotcoldError(f"--gpu-budget needs the activation counts of the profile the predictors were trained "
                               f"on ({profile or 'not recorded in the bundle'}); run hotcold split and pass --split")
        manifest, counts = load_counts(profile)
        check_fingerprint(manifest["fingerprint"], model.fingerprint, profile, "profile")
        split = plan(c, list(counts), gpu_budget=gpu_budget, n_ctx=n_ctx, group=math.gcd(GROUP, c.n_ff),
                     predictor_bytes=GPU_BYTES * bundle.n_params)  # these commands have no --group
        hot = [np.asarray(g, np.int32) for g in split["gpu_neurons"]]
    if device == "auto":
        print("hotcold: note: no CUDA device: every neuron runs on the CPU", file=sys.stderr)
        return bundle, None, None
    return bundle, hot, device


def cmd_split(args) -> None:
    from engine.loader import load_checkpoint
    from tools.profile import load_counts, profiled_model
    if args.hot_fraction is not None and (args.predictors or args.predictor_bytes):  # a share of the FFN alone
        raise HotcoldError("--predictors and --predictor-bytes price a --gpu-budget; --hot-fraction is a share of "
                           "the FFN bytes alone")
    split_outputs(args.out)  # refused before the profile is read and the split solved
    manifest, counts = load_counts(args.profile)
    ckpt = load_checkpoint(profiled_model(manifest, args.profile, args.model), values=False)
    n_ctx = default_ctx(ckpt.config) if args.ctx is None else args.ctx
    check_context(ckpt, n_ctx)
    fp = fingerprint(ckpt.config, ckpt.tensors)
    check_fingerprint(manifest["fingerprint"], fp, args.profile, "profile")  # shape (the counts' too) and weights
    predictor_bytes = args.predictor_bytes
    if args.predictors is not None:
        from predictors.bundle import load_bundle, model_fingerprint
        predictor_bytes = GPU_BYTES * load_bundle(args.predictors, model_fingerprint(ckpt)).n_params
    split = plan(ckpt.config, list(counts), gpu_budget=args.gpu_budget, hot_fraction=args.hot_fraction,
                 group=args.group, n_ctx=n_ctx, predictor_bytes=predictor_bytes)
    split["model"], split["fingerprint"] = ckpt.path, fp
    js, gi = write_split(args.out, split)
    if args.json:
        from tools.cli import emit_json
        emit_json({k: v for k, v in split.items() if k != "gpu_neurons"} | {"json": js, "gpuidx": gi})
        return
    per_layer = " ".join(str(len(g)) for g in split["gpu_neurons"])
    print(f"GPU neurons per layer: {per_layer}\n"
          f"FFN on GPU: {size_text(split['ffn_gpu_bytes'])} of a {size_text(split['ffn_budget_bytes'])} "
          f"FFN budget; expected share of activations served by the GPU: {split['gpu_share_expected']:.1%}\n"
          f"wrote {js} and {gi}")


def add_command(sub) -> None:
    from tools.cli import at_least, between, size
    p = sub.add_parser("split", help="place hot FFN neurons on the GPU under a memory budget")
    p.add_argument("--profile", required=True, help="a finished `hotcold profile` directory")
    p.add_argument("-m", "--model", default=None, help="default: the model the profile recorded")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gpu-budget", type=size, default=None, help="GPU memory, e.g. 512M or 8G")
    g.add_argument("--hot-fraction", type=between(0, 1), default=None,
                   help="share of the FFN bytes to place on the GPU")
    p.add_argument("--group", type=at_least(1), default=GROUP, help=f"neurons placed together (default {GROUP})")
    p.add_argument("--ctx", type=at_least(1), default=None,
                   help=f"context whose KV cache the GPU holds (default {DEFAULT_CTX}, or the model's training "
                   "context if shorter)")
    pb = p.add_mutually_exclusive_group()
    pb.add_argument("--predictors", default=None, help="the predictor bundle whose bytes (in float16) the GPU holds")
    pb.add_argument("--predictor-bytes", type=size, default=0,
                    help="bytes of predictors kept on the GPU, e.g. 20M (default 0)")
    p.add_argument("-o", "--out", required=True, help="writes OUT.json (ours) and OUT.gpuidx (PowerInfer's)")
    p.add_argument("--json", action="store_true", help="print the split's budget, bytes and expected GPU share "
                   "(not its neuron ids) and the two paths written, as one JSON object")
    p.set_defaults(func=cmd_split)
