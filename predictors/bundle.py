"""Predictor bundles (our format) and PowerInfer predictor directories (theirs), read and written.

A bundle is a directory:

  predictors.safetensors   blk.N.fc1.weight (rank_N, n_embd), blk.N.fc2.weight (n_ff, rank_N): F16 when the
                           weights are float16 values (train_layer rounds them so), else F32; ranks may differ
  manifest.json            {"format": "hotcold-predictors", "version": 1,
                            "fingerprint": model_fingerprint(ckpt),  the model the predictors were trained for
                            "tensors_sha256": of predictors.safetensors, so that a mismatched pair is caught,
                            "layers": [{"rank", "threshold", "metrics": {...}}],  validation metrics per layer
                            "sparsity": {...}, "corpus": {...}, "training": {...}}  how the labels were made

Both files are written to a temporary name and renamed, the manifest last. Loading checks the fingerprint before
anything else, so a bundle is never applied to another model (a SiLU model and its ReLU twin share weights but
not activations, so the activation is part of the fingerprint).

A PowerInfer directory holds model_N.pt state dicts ({"fc1.weight", "fc2.weight"}) and an optional config.json
{"sparse_threshold": T}. PowerInfer has one threshold for all layers, ours are per layer: the predictors are
positively homogeneous (no biases), so fc2 scaled by c > 0 moves layer N's threshold t to c t, and scaling each
layer's fc2 by T / t_N gives all of them the same T (see `fold_thresholds`).
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from engine.config import PREDICTOR_TYPES, HotcoldError, blk, finite, finite_number, first_line
from engine.files import json_writer, read_json, write_all, write_atomic, write_json
from engine.fingerprint import check_fingerprint, rope_key, tensors_sha256

from .model import Predictor

FORMAT, VERSION = "hotcold-predictors", 1
TENSORS, MANIFEST = "predictors.safetensors", "manifest.json"
PARTIAL = "partial"  # train-predictors' finished layers, until the bundle is written
PI_CONFIG = "config.json"
FOLD_MAX_SCALE = 256.0  # largest factor fold_thresholds puts on fc2 (PowerInfer stores it as F16)


# --- which model a bundle belongs to ---------------------------------------------------------------------
def model_fingerprint(ckpt) -> dict:
    """Architecture, dimensions, activation, rope, and a sha256 of every layer's ffn_gate and ffn_up as stored.

    ckpt: an engine.loader.Checkpoint (anything with .config and .tensors of QTensors). The same model stored in
    another format (Q4_1 GGUF against F32 safetensors) hashes differently: its predictors would differ too."""
    c = ckpt.config
    ffn = tensors_sha256(ckpt.tensors, [blk(i, n) for i in range(c.n_layer) for n in ("ffn_gate", "ffn_up")])
    return {"arch": c.arch, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_ff": c.n_ff, "act": c.act,
            "act_threshold": c.act_threshold, "rope": rope_key(c), "ffn_gated": c.ffn_gated,
            "ffn_sha256": ffn}  # a plain FFN: no gate


# --- our bundle ----------------------------------------------------------------------------------------
def check_bundle_out(out: str) -> None:
    """A directory a bundle may be written to: new, or holding a bundle's files alone (and their temporaries, left by
    a killed write). Anything else there, a profile say, is refused rather than mixed with a bundle."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise HotcoldError(f"{out}: exists and is not a directory")
    ours = (TENSORS, MANIFEST, PARTIAL)
    stranger = next((n for n in sorted(os.listdir(out)) if n.split(".tmp")[0] not in ours), None) \
        if os.path.isdir(out) else None
    if stranger is not None:
        raise HotcoldError(f"{out}: holds {stranger!r}, so it is not a predictor bundle; give a new or empty "
                           "directory")


@dataclass
class Bundle:
    predictors: list[Predictor]
    thresholds: list[float]  # per layer, on the logits: active when logits >= threshold
    fingerprint: dict  # model_fingerprint of the model trained for
    metrics: list[dict] = field(default_factory=list)  # per layer, on the validation split
    sparsity: dict = field(default_factory=dict)  # the sparsity config that defined "active" in the labels
    corpus: dict = field(default_factory=dict)  # what the samples came from
    training: dict = field(default_factory=dict)  # recall target, epochs, lr, ...
    path: str | None = None  # where it was loaded from

    def __post_init__(self):
        self.thresholds = [float(t) for t in self.thresholds]
        where = self.path or "predictor bundle"
        fp = self.fingerprint
        if not (len(self.predictors) == len(self.thresholds) == fp.get("n_layer")):
            raise HotcoldError(f"{where}: {len(self.predictors)} predictors and {len(self.thresholds)} thresholds "
                               f"for a model of {fp.get('n_layer')} layers")
        for i, p in enumerate(self.predictors):
            if (p.n_embd, p.n_ff) != (fp.get("n_embd"), fp.get("n_ff")):
                raise HotcoldError(f"{where}: layer {i} predictor maps {p.n_embd} -> {p.n_ff}, the model has "
                                   f"n_embd {fp.get('n_embd')} and n_ff {fp.get('n_ff')}")
        if not all(np.isfinite(self.thresholds)):
            raise HotcoldError(f"{where}: thresholds must be finite numbers")

    @property
    def ranks(self) -> list[int]:
        return [p.rank for p in self.predictors]

    @property
    def predictor_type(self) -> str:
        """The predictor type it was trained for (engine.config.PREDICTOR_TYPES): what decoding reads by default."""
        return self.training.get("predictor_type", "F16")

    @property
    def n_params(self) -> int:
        return sum(p.n_params for p in self.predictors)

    def active(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """bool (T, n_ff): layer's neurons predicted active for FFN inputs x (T, n_embd)."""
        if not 0 <= layer < len(self.predictors):
            raise HotcoldError(f"layer {layer}: the bundle has layers 0-{len(self.predictors) - 1}")
        return self.predictors[layer].active(x, self.thresholds[layer])

    def save(self, path: str) -> None:
        """predictors.safetensors and manifest.json naming its sha256, renamed together once both are written (a
        failure leaves the bundle that was there whole)."""
        manifest, data = self.files()
        os.makedirs(path, exist_ok=True)
        write_all([(os.path.join(path, TENSORS), lambda tmp: pathlib.Path(tmp).write_bytes(data)),
                   (os.path.join(path, MANIFEST), json_writer(manifest))])

    def files(self) -> tuple[dict, bytes]:
        """The manifest and the bytes of predictors.safetensors, as `save` writes them (and export embeds them)."""
        tensors = {}
        for i, p in enumerate(self.predictors):
            for name, w in (("fc1", p.fc1.weight), ("fc2", p.fc2.weight)):
                w = w.detach().float().cpu()
                half = w.half()
                tensors[blk(i, name)] = half if torch.equal(half.float(), w) else w.contiguous()
        data = save_tensors(tensors, metadata={"format": FORMAT})
        layers = [{"rank": p.rank, "threshold": t, "metrics": self.metrics[i] if i < len(self.metrics) else {}}
                  for i, (p, t) in enumerate(zip(self.predictors, self.thresholds))]
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                    "tensors_sha256": hashlib.sha256(data).hexdigest(), "layers": layers, "sparsity": self.sparsity,
                    "corpus": self.corpus, "training": self.training}
        return manifest, data


def manifest_problem(m: dict) -> str | None:
    """What is missing or of the wrong type in a bundle manifest, or None."""
    for key, kind in (("fingerprint", dict), ("tensors_sha256", str), ("layers", list)):
        if not isinstance(m.get(key), kind):
            return f"{key!r} missing or not a {kind.__name__}"
    for key in ("sparsity", "corpus", "training"):
        if not isinstance(m.get(key, {}), dict):
            return f"{key!r} not an object"
    for i, layer in enumerate(m["layers"]):
        if not (isinstance(layer, dict) and isinstance(layer.get("rank"), int) and finite_number(layer.get("threshold"))
                and isinstance(layer.get("metrics", {}), dict)):
            return f"layer {i}: expected {{'rank': int, 'threshold': finite number, 'metrics': {{...}}}}"
    thr = m.get("sparsity", {}).get("thresholds")
    if thr is not None and not (isinstance(thr, list) and len(thr) == len(m["layers"]) and all(
            finite_number(t) for t in thr)):
        return f"sparsity thresholds: expected a finite number for each of the {len(m['layers'])} layers listed"
    for i, layer in enumerate(m["layers"]):
        bad = next((k for k, v in layer.get("metrics", {}).items() if not (finite_number(v) or v is None)), None)
        if bad is not None:
            return f"layer {i}: metric {bad!r} is not a finite number"
    qtype = m.get("training", {}).get("predictor_type", "F16")
    if qtype not in PREDICTOR_TYPES:
        return f"training predictor_type {qtype!r}, expected one of {', '.join(PREDICTOR_TYPES)}"
    return None


def load_bundle(path: str, expect_fingerprint: dict | None = None) -> Bundle:
    """Read a bundle; with expect_fingerprint, refuse one trained for another model (HotcoldError, one line), and
    take a PowerInfer predictor directory too (model_N.pt, config.json), for a model of its shapes."""
    mpath, st = os.path.join(path, MANIFEST), os.path.join(path, TENSORS)
    if not os.path.isdir(path):
        raise HotcoldError(f"{path}: no such predictor bundle (a directory with {MANIFEST} and {TENSORS})")
    if not os.path.exists(mpath) and pt_files(path) and expect_fingerprint is not None:
        preds, thresholds = read_powerinfer_dir(path)  # no fingerprint there: the shapes alone are checked
        sha = hashlib.sha256()  # what tells two such directories apart (calibrate's resume key reads `training`)
        for p in preds:
            sha.update(p.fc1.weight.detach().numpy().tobytes() + p.fc2.weight.detach().numpy().tobytes())
        return Bundle(preds, thresholds, expect_fingerprint, path=path,
                      training={"source": "PowerInfer predictor directory", "weights_sha256": sha.hexdigest()[:16]})
    if not os.path.exists(mpath) and os.path.isdir(os.path.join(path, PARTIAL)):
        raise HotcoldError(f"{path}: an unfinished bundle (layers untrained: train-predictors was stopped, or given "
                           "--layers): run train-predictors again with the same settings, without --layers")
    m = read_json(mpath, "predictor bundle manifest")
    check_manifest(m, mpath)
    if expect_fingerprint is not None:
        check_fingerprint(m["fingerprint"], expect_fingerprint, path, "predictor bundle")
    if not os.path.exists(st):
        raise HotcoldError(f"{st}: no such file (the bundle is incomplete)")
    try:
        data = pathlib.Path(st).read_bytes()
    except OSError as e:
        raise HotcoldError(f"{st}: unreadable ({e.strerror})") from None
    return from_files(m, data, st, path)


def check_manifest(m: dict, where: str) -> None:
    if m.get("format") != FORMAT:
        raise HotcoldError(f"{where}: not a predictor bundle manifest (format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise HotcoldError(f"{where}: bundle version {m.get('version')!r}, this hotcold reads version {VERSION}")
    problem = manifest_problem(m)
    if problem:
        raise HotcoldError(f"{where}: not a predictor bundle manifest ({problem})")


def from_files(m: dict, data: bytes, st: str, path: str) -> Bundle:
    """The bundle of a checked manifest m and the safetensors bytes it names (st: where they come from, for errors;
    path: the bundle's)."""
    if hashlib.sha256(data).hexdigest() != m["tensors_sha256"]:
        raise HotcoldError(f"{st}: does not match {MANIFEST} (tensors_sha256 differs); rewrite the bundle")
    try:
        tensors = load_tensors(data)
    except SafetensorError as e:
        raise HotcoldError(f"{st}: unreadable safetensors ({e})") from None
    layers = m["layers"]
    preds = []
    for i, layer in enumerate(layers):
        fc1, fc2 = tensors.get(blk(i, "fc1")), tensors.get(blk(i, "fc2"))
        if fc1 is None or fc2 is None:
            raise HotcoldError(f"{st}: missing {blk(i, 'fc1' if fc1 is None else 'fc2')}")
        pred = from_weights(fc1, fc2, f"{st}: layer {i}")  # two matrices that chain, finite
        if pred.rank != layer.get("rank"):
            raise HotcoldError(f"{st}: {blk(i, 'fc1')} has rank {pred.rank}, the manifest says {layer.get('rank')}")
        preds.append(pred)
    return Bundle(preds, [layer["threshold"] for layer in layers], m["fingerprint"],
                  [layer.get("metrics", {}) for layer in layers], m.get("sparsity", {}), m.get("corpus", {}),
                  m.get("training", {}), path)


def from_weights(fc1: torch.Tensor, fc2: torch.Tensor, where: str) -> Predictor:
    fc1, fc2 = fc1.float(), fc2.float()
    if not (fc1.isfinite().all() and fc2.isfinite().all()):
        raise HotcoldError(f"{where}: weights that are not finite (NaN or inf)")
    try:
        return Predictor.from_weights(fc1, fc2)
    except ValueError as e:
        raise HotcoldError(f"{where}: {e}") from None


# --- PowerInfer predictor directories ------------------------------------------------------------------
def fold_thresholds(predictors: list[Predictor], thresholds: float | list[float]) -> tuple[list[Predictor], float,
                                                                                                list[float]]:
    """Per-layer thresholds folded into fc2 scales under one global threshold T, as PowerInfer wants.

    Returns (scaled copies, T, the threshold each original predictor effectively gets). fc2 times T / t_N is exact
    for the layers of T's sign: when they span at most a factor F^2 (F = FOLD_MAX_SCALE), T is their geometric
    mean, so that every scale lies within [1/F, F] and float16 keeps fc2's precision; spread wider, T = +1 (all
    at least 1/F) or -1, exact for the layers at least 1/F in size. Any other layer gets T / F, where T < 0:
    lower than it asked for, so its recall can only rise (and its sparsity fall a little); the returned list says so.
    """
    ts = [float(thresholds)] * len(predictors) if np.isscalar(thresholds) else [float(t) for t in thresholds]
    if len(ts) != len(predictors):
        raise ValueError(f"{len(ts)} thresholds for {len(predictors)} predictors")
    if not all(map(finite, ts)):
        raise HotcoldError(f"thresholds {ts}: each must be a finite number")
    if len(set(ts)) <= 1:
        return list(predictors), (ts[0] if ts else 0.0), ts
    sign = 1.0 if min(ts) > 0 else -1.0
    same = [sign * t for t in ts if sign * t > 0]  # sizes of the thresholds of T's sign
    if same and max(same) <= FOLD_MAX_SCALE ** 2 * min(same):
        t_all = sign * math.sqrt(min(same) * max(same))
    else:
        t_all = 1.0 if min(ts) >= 1.0 / FOLD_MAX_SCALE else -1.0
    exact = [t_all * t > 0 and t_all / t <= FOLD_MAX_SCALE for t in ts]
    scales = [t_all / t if e else FOLD_MAX_SCALE for t, e in zip(ts, exact)]
    out = [Predictor.from_weights(p.fc1.weight.detach(), p.fc2.weight.detach() * c) for p, c in zip(predictors, scales)]
    return out, t_all, [t if e else t_all / FOLD_MAX_SCALE for t, e in zip(ts, exact)]


def write_powerinfer_dir(path: str, predictors: list[Predictor], threshold: float | list[float]) -> list[float]:
    """model_N.pt ({"fc1.weight", "fc2.weight"}, float32) and config.json {"sparse_threshold": T}.

    threshold: one for all layers, or one per layer (folded into fc2, see `fold_thresholds`). Returns the
    threshold each layer effectively gets, which differs from the one asked for only where folding was inexact."""
    scaled, t, effective = fold_thresholds(predictors, threshold)
    os.makedirs(path, exist_ok=True)
    for i, f in pt_files(path).items():
        if i >= len(scaled):  # left by an earlier export of a deeper model: would read as extra layers
            os.remove(f)
    for i, p in enumerate(scaled):
        sd = {"fc1.weight": p.fc1.weight.detach().float().contiguous(),
              "fc2.weight": p.fc2.weight.detach().float().contiguous()}
        write_atomic(os.path.join(path, f"model_{i}.pt"), lambda tmp, sd=sd: torch.save(sd, tmp))
    write_json(os.path.join(path, PI_CONFIG), {"sparse_threshold": t})
    return effective


def pt_files(path: str) -> dict[int, str]:
    """{N: path of model_N.pt} in a directory."""
    names = (os.path.basename(f) for f in glob.glob(os.path.join(path, "model_*.pt")))
    found = (re.fullmatch(r"model_(\d+)\.pt", n) for n in names)
    return {int(m.group(1)): os.path.join(path, m.group(0)) for m in found if m}


def read_powerinfer_dir(path: str) -> tuple[list[Predictor], list[float]]:
    """Predictors model_0.pt .. model_{L-1}.pt and the threshold of config.json (0 without one) for every layer."""
    files = pt_files(path)
    if not files:
        raise HotcoldError(f"{path}: not a PowerInfer predictor directory (no model_N.pt files)")
    if len(files) != max(files) + 1:  # not range(max + 1): a stray model_99999999999.pt
        gap = next(i for i in range(len(files) + 1) if i not in files)
        raise HotcoldError(f"{path}: model_{gap}.pt is missing (found layers up to {max(files)})")
    preds = []
    for i in range(len(files)):
        try:
            sd = torch.load(files[i], map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch's own errors alike: the file is not a plain state dict
            raise HotcoldError(f"{files[i]}: unreadable predictor ({type(e).__name__}: {first_line(e)})") from None
        if not (isinstance(sd, dict) and set(sd) == {"fc1.weight", "fc2.weight"}
                and all(isinstance(v, torch.Tensor) for v in sd.values())):
            found = {repr(k): type(v).__name__ for k, v in sd.items()} if isinstance(sd, dict) else type(sd).__name__
            raise HotcoldError(f"{files[i]}: expected a state dict of two tensors, fc1.weight and fc2.weight (no "
                               f"biases), found {found}")
        preds.append(from_weights(sd["fc1.weight"], sd["fc2.weight"], files[i]))
    t = 0.0
    if os.path.exists(os.path.join(path, PI_CONFIG)):
        t = read_json(os.path.join(path, PI_CONFIG), "PowerInfer predictor config").get("sparse_threshold", 0.0)
        if not finite_number(t):
            raise HotcoldError(f"{os.path.join(path, PI_CONFIG)}: sparse_threshold must be a finite number, "
                               f"got {t!r}")
    return preds, [float(t)] * len(preds)
