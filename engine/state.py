"""The KV cache as state: prompt caches (llama.cpp's --prompt-cache), the cache's first positions and their tokens in
a file, so that a later run whose prompt begins with those tokens does not compute them again; and the context shift
(llama.cpp's --context-shift), which forgets positions to make room.

The file is an .npz: `header` (UTF-8 JSON: format, the model's fingerprint, the cache type), `ids` (n,) int32, and
the keys (n_layer, Hkv, n, hd) and transposed values (n_layer, Hkv, hd, n) of positions 0..n-1, as the engines keep
them (config.kv_shapes).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np

from .config import HotcoldError
from .files import refuse_directories, write_atomic

FORMAT = "hotcold prompt cache 1"
SAMPLE = 4096  # bytes of each tensor's beginning and end that identify the model


def arrays(net):
    """The net's KV cache as numpy arrays that write through (the torch backend's tensors share their memory)."""
    k, v = net.k_cache, net.v_cache
    return (k, v) if isinstance(k, np.ndarray) else (k.numpy(), v.numpy())


def shift_context(model, keep: int, discard: int) -> None:
    """Forget the cached positions keep..keep+discard-1 and move the ones after them back by discard, as llama.cpp's
    context shift: the values as they are, the keys rotated back by discard positions (RoPE's rotations compose,
    R(p - d) = R(-d) R(p); in float32, as llama.cpp's K-shift, then stored as the cache's type)."""
    import torch

    from .model import apply_rope
    n = len(model.kv_ids)
    k, v = (a.view(np.float16) if a.dtype == np.uint16 else a for a in arrays(model.net))
    cos, sin = (torch.from_numpy(t) for t in model.config.rope_angles([-discard]))  # (1, hd/2)
    moved = torch.from_numpy(k[:, :, keep + discard:n].astype(np.float32))  # (L, Hkv, n - keep - discard, hd)
    k[:, :, keep:n - discard] = apply_rope(moved.reshape(-1, 1, k.shape[-1]), cos, sin).reshape(moved.shape).numpy()
    v[..., keep:n - discard] = v[..., keep + discard:n]  # (numpy copies overlapping slices as if through a buffer)
    del model.kv_ids[keep:keep + discard]


def identity(model) -> dict:
    """What the keys and values depend on beyond the fingerprint (layer 0's FFN): every tensor as stored, by its
    name, type, shape and first and last SAMPLE bytes (a fine-tune moves them all)."""
    sha = hashlib.sha256()
    for name, t in sorted(model.ckpt.tensors.items()):
        data = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)
        sha.update(f"{name} {t.qtype.name} {tuple(t.shape)}".encode())
        sha.update(data[:SAMPLE].tobytes() + data[-SAMPLE:].tobytes())
    return {**model.fingerprint, "tensors": sha.hexdigest()[:16]}


def check_dense(model) -> None:
    if model.sparsity is not None or model.runtime is not None:
        raise HotcoldError("a prompt cache holds the dense FFN's keys and values: not with --sparsity or predictors")


def save_state(model, path: str, n: int | None = None) -> int:
    """The first n positions the KV cache holds (`kv_ids`; default all of them) to path, written to a temporary
    file and renamed; returns how many."""
    check_dense(model)
    refuse_directories([path])
    n = len(model.kv_ids) if n is None else min(n, len(model.kv_ids))
    k, v = arrays(model.net)
    header = {"format": FORMAT, "model": identity(model), "cache_type": model.cache_type}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                     ids=np.array(model.kv_ids[:n], np.int32), k=k[:, :, :n], v=v[..., :n])
    write_atomic(path, write)
    return n


def load_state(model, path: str) -> int:
    """Fill the KV cache's first positions from a file `save_state` wrote for this model and cache type; returns
    how many tokens it held (`kv_ids` then lists them)."""
    check_dense(model)
    if os.path.isdir(path):
        raise HotcoldError(f"{path}: a directory, not a prompt cache")
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(f["header"].tobytes())
            ids, k, v = f["ids"], f["k"], f["v"]
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise HotcoldError(f"{path}: not a hotcold prompt cache, or a truncated one ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HotcoldError(f"{path}: not a hotcold prompt cache")
    if header.get("model") != identity(model):
        raise HotcoldError(f"{path}: a prompt cache of another model")
    if header.get("cache_type") != model.cache_type:
        raise HotcoldError(f"{path}: a prompt cache of a {header.get('cache_type')} KV cache; this one is "
                           f"{model.cache_type} (--cache-type, --backend)")
    n = len(ids)
    mine_k, mine_v = arrays(model.net)
    if n >= model.n_ctx:
        raise HotcoldError(f"{path}: holds {n} tokens, which leave no room in the context of {model.n_ctx} (raise "
                           "--ctx)")
    if k.shape != mine_k.shape[:2] + (n, mine_k.shape[3]) or v.shape != mine_v.shape[:3] + (n,) or \
            k.dtype != mine_k.dtype or v.dtype != mine_v.dtype:
        raise HotcoldError(f"{path}: a prompt cache whose keys and values do not fit this model's cache")
    model.check_ids(ids.tolist())
    del model.kv_ids[:]
    mine_k[:, :, :n], mine_v[..., :n] = k, v
    model.kv_ids = ids.tolist()
    return n
