"""What identifies a model: the fingerprint that profiles, splits, sparsity configs and bundles record, and the
hashes of stored tensors that long jobs and bundles check on resume."""
from __future__ import annotations

import hashlib

import numpy as np

from .config import HotcoldError, ModelConfig, blk

FINGERPRINT_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")  # layer 0's, hashed as stored
HASH_BYTES = 1 << 20  # per tensor, hashed whole up to this size; beyond, evenly spaced rows of about this size
LATER_KEYS = ("act_threshold", "rope")  # fingerprint keys that files written before them lack


def fingerprint(c: ModelConfig, tensors: dict) -> dict:
    """What identifies a model for profiles, splits and sparsity configs: its shape, activation (and threshold), rope
    and layer 0's FFN."""
    sha = hashlib.sha256()
    for name in FINGERPRINT_TENSORS:
        t = tensors.get(blk(0, name))
        if t is not None:
            sha.update(np.ascontiguousarray(t.data).data)
    return {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_ff": c.n_ff, "act": c.act, "act_threshold": c.act_threshold,
            "rope": rope_key(c), "ffn0_sha256": sha.hexdigest()[:16]}


def rope_key(c: ModelConfig) -> str:
    """The rope settings in one string: the same weights under another rope (Llama 3.1's factors, a linear scale)
    feed the FFNs other inputs, so their profiles, thresholds and predictors do not carry over."""
    freqs = ("none" if c.rope_freqs is None else
             hashlib.sha256(np.asarray(c.rope_freqs, np.float64).tobytes()).hexdigest()[:8])
    return f"base {float(c.rope_base)!r}, scale {float(c.rope_scale)!r}, freqs {freqs}"


def tensors_sha256(tensors: dict, names) -> str:
    """A sha256 of the named tensors as stored (name, type, shape, `sample_bytes`); names missing are skipped."""
    sha = hashlib.sha256()
    for name in names:
        t = tensors.get(name)
        if t is not None:
            sha.update(f"{name} {t.qtype.name} {tuple(t.shape)}".encode())
            sha.update(sample_bytes(t.data))
    return sha.hexdigest()[:16]


def sample_bytes(a: np.ndarray) -> bytes:
    """The raw bytes of a stored tensor, or of evenly spaced rows of it when it is bigger than HASH_BYTES."""
    a = np.ascontiguousarray(a)
    if a.nbytes <= HASH_BYTES or a.ndim < 2:
        return a.tobytes()
    n = max(1, HASH_BYTES * a.shape[0] // a.nbytes)  # rows to take
    return a[np.linspace(0, a.shape[0] - 1, n).round().astype(np.int64)].tobytes()


def weights_sha256(tensors: dict) -> str:
    """A sha256 of every tensor as stored (name, type, shape, `sample_bytes`): it tells apart models that `fingerprint`
    (layer 0's FFN) and a bundle's (the FFN) take for one, a fine-tune of attention alone say. Long jobs record it:
    a resume must continue on the same weights."""
    return tensors_sha256(tensors, sorted(tensors))


def check_fingerprint(found: dict, expected: dict, path: str, what: str) -> None:
    """Refuse `what` at `path` when it was made for another model, naming the first difference (keys added to
    fingerprints later, LATER_KEYS, are compared where the file has them)."""
    if not isinstance(found, dict):
        raise HotcoldError(f"{path}: not a {what} (its fingerprint is not a JSON object)")
    for k, v in expected.items():
        if found.get(k) != v and (k in found or k not in LATER_KEYS):
            raise HotcoldError(f"{path}: {what} of another model ({k} {found.get(k)!r}, this model has {v!r})")
