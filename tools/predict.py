"""`hotcold train-predictors` and `hotcold eval-predictors`: predictors from a profile, measured on new text.

train-predictors reads a finished profile (tools/profile.py: samples/x_W.npy FFN inputs, samples/mask_W.npy
bit-packed active masks, every window), trains one predictor per layer with `predictors.train.train_layer`
(SVD start from the gate for ReLU-family FFNs), and writes a bundle (predictors/bundle.py) that carries the model
fingerprint, the corpus (the profile's settings) and the sparsity config that defined "active", so that later
commands need no --sparsity.

    budget    predictor parameters <= 10% of the layer's FFN parameters (train.rank_cap: rank 120 for SmolLM2);
              --rank auto climbs the ladder 32, 64, ... up to that cap. The bytes decoding reads are reported
              beside it, by --predictor-type: against a Q4_1 FFN, F16 predictors are 3.2x the parameter share,
              Q8_0 1.7x, Q4_1 the same share
    weighting by default each active label weighs by |h_i| ||down[:, i]|| (`contribution_blocks`: the FFN recomputed
              from the profiled input with the model's weights), so that the predictor learns which active neurons
              matter to the output; --weighting count weighs them all the same (predictors/train.py)
    resuming  each finished layer is saved at once under BUNDLE/partial/ (layer_NNN.safetensors + .json, keyed
              by the model, profile and training settings); the same command run again skips those layers, and a
              finished bundle with the same key is taken as done. --layers trains a subset; the bundle is
              written once every layer is done

eval-predictors runs the model (torch path, dense) over windows of text and, at every layer, compares the
predictor's mask on the FFN input (residual before the FFN norm) with the true mask by the bundle's sparsity rule.
Confusion counts are summed per layer, so the metrics are DESIGN.md's: per layer over all tokens, then the mean
over layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.config import PREDICTOR_TYPES, HotcoldError, as_int, blk
from engine.files import check_writable, read_json, write_atomic, write_json
from engine.fingerprint import check_fingerprint, weights_sha256
from engine.sparsity import EXACT_ACTS, SparsityConfig
from predictors.bundle import PARTIAL
from tools.profile import finished_manifest, load_chunk, profiled_model


def weight_bytes(qtype: str) -> float:
    """Bytes per weight of a GGUF type (gguf's block table): F16 2, Q8_0 34/32, Q4_1 20/32."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return size / block


# --- model and profile ------------------------------------------------------------------------------------
def load_profile(path: str) -> dict:
    """The manifest of a finished profile with samples."""
    m = finished_manifest(path)
    if not m.get("samples", {}).get("chunks"):
        raise HotcoldError(f"{path}: the profile holds no training samples")
    return m


def layer_samples(profile: str, manifest: dict, layer: int):
    """X float16 (N, n_embd) FFN inputs and their active masks (predictors.train.Masks, bit-packed) of one layer,
    over every window, as the profile stores them; read chunk by chunk into one array each."""
    from predictors.train import Masks
    fp, chunks = manifest["fingerprint"], manifest["samples"]["chunks"]
    n = sum(len(load_chunk(profile, ch, fp)[2]) for ch in chunks)  # every chunk checked, its rows counted
    X = np.empty((n, fp["n_embd"]), np.float16)
    bits = np.empty((n, (fp["n_ff"] + 7) // 8), np.uint8)
    a = 0
    for ch in chunks:
        x, b = load_chunk(profile, ch, fp, layer)
        X[a:a + len(x)], bits[a:a + len(x)] = x, b
        a += len(x)
    return X, Masks(torch.from_numpy(bits), fp["n_ff"])


def warm_samples(profile: str, manifest: dict, layer: int, piece: int = 1 << 20) -> None:
    """Read one layer's samples into the page cache, not into this process: the next layer then loads from memory
    (train-predictors calls it in another thread while a layer trains)."""
    buf = memoryview(bytearray(piece))
    for ch in manifest["samples"]["chunks"]:
        for a in load_chunk(profile, ch, manifest["fingerprint"])[:2]:  # x, mask: (n_layer, rows, ...) memory-mapped
            size = a[0].nbytes
            with open(a.filename, "rb") as fh:
                fh.seek(a.offset + layer * size)
                while size > 0 and (n := fh.readinto(buf[:min(size, piece)])):
                    size -= n


def ffn_tensors(ckpt, layer: int) -> list:
    return [ckpt.tensors[blk(layer, n)] for n in ("ffn_gate", "ffn_up", "ffn_down", "ffn_down_t")  # PowerInfer: down_t
            if blk(layer, n) in ckpt.tensors]


def budget_rank(ckpt, layer: int) -> int:
    """The largest rank whose predictor has at most 10% (train.BUDGET) of the layer's FFN parameters
    (train.rank_cap)."""
    from predictors.train import rank_cap
    c = ckpt.config
    return rank_cap(c.n_embd, c.n_ff, len(ffn_tensors(ckpt, layer)))


def init_map(ckpt, layer: int):
    """The SVD starting point: the gate (up for a plain FFN) times the FFN norm, for activations with zeros."""
    from predictors.model import gate_map
    c = ckpt.config
    if c.act not in EXACT_ACTS:
        return None
    w = np.array(ckpt.tensors[blk(layer, "ffn_gate" if c.ffn_gated else "ffn_up")].dequantize())
    return gate_map(w, np.array(ckpt.tensors[blk(layer, "ffn_norm")].dequantize()))


@torch.no_grad()
def contribution_blocks(ckpt, layer: int, X: np.ndarray, chunk: int = 8192):
    """Each neuron's contribution |h_i| * ||down[:, i]|| for FFN inputs X (N, n_embd) (raw residuals, float16 or
    float32: the FFN norm applied here), float32 (B, n_ff) blocks of `chunk` rows in order. Computed a block at a
    time as it always was (the same rows in each matrix product: row sums may round otherwise)."""
    from engine.model import ffn_activation, rms_norm
    from engine.sparsity import contribution
    c = ckpt.config

    def w(name):
        return torch.from_numpy(np.array(ckpt.tensors[blk(layer, name)].dequantize(), np.float32))
    up, norm = w("ffn_up"), w("ffn_norm")
    gate = w("ffn_gate") if c.ffn_gated else None
    down = w("ffn_down").norm(dim=0) if blk(layer, "ffn_down") in ckpt.tensors else w("ffn_down_t").norm(dim=1)

    def hidden(x: np.ndarray) -> torch.Tensor:  # (B, n_embd) -> h (B, n_ff); its temporaries go on return
        xn = rms_norm(torch.from_numpy(np.asarray(x, np.float32)), norm, c.rms_eps)  # (B, n_embd)
        u = xn @ up.T
        return ffn_activation(u, None, c.act, c.act_threshold) if gate is None else \
            ffn_activation(xn @ gate.T, u, c.act, c.act_threshold)
    for a in range(0, len(X), chunk):
        yield contribution(hidden(X[a:a + chunk]), down)  # (B, n_ff): only this is held while it is used


def profile_sparsity(manifest: dict, engine_fp: dict, path: str | None) -> SparsityConfig:
    """The sparsity config the profile's labels were made with: from --sparsity, checked against the profile's
    thresholds, or rebuilt from them."""
    thr = manifest["settings"]["thresholds"]
    if path:
        cfg = SparsityConfig.load(path, engine_fp)
        if [float(t) for t in cfg.thresholds] != [float(t) for t in thr]:
            raise HotcoldError(f"{path}: thresholds differ from those the profile was made with")
        return cfg
    return SparsityConfig(list(thr), engine_fp, method="exact" if all(t <= 0 for t in thr) else "profile")


# --- training ---------------------------------------------------------------------------------------------
def settings_key(fp: dict, manifest: dict, opts: dict) -> str:
    blob = json.dumps([fp, manifest["settings"], manifest["samples"].get("rows"), opts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def partial_paths(out: str, i: int) -> tuple[str, str]:
    base = os.path.join(out, PARTIAL, f"layer_{i:03d}")
    return base + ".safetensors", base + ".json"


def load_partial(out: str, i: int) -> tuple[str, tuple] | None:
    """(settings key, (predictor, threshold, metrics)) of a layer an unfinished run saved; None if none or damaged
    (a damaged leftover is retrained, not fatal)."""
    from predictors.model import Predictor
    st, js = partial_paths(out, i)
    if not (os.path.exists(st) and os.path.exists(js)):
        return None
    try:
        meta = read_json(js, "partial layer")
        t = load_file(st)
        pred = Predictor.from_weights(t["fc1"].float(), t["fc2"].float())
        return meta["key"], (pred, float(meta["threshold"]), meta["metrics"])
    except Exception:
        return None


def save_partial(out: str, i: int, key: str, pred, threshold: float, metrics: dict) -> None:
    st, js = partial_paths(out, i)
    os.makedirs(os.path.dirname(st), exist_ok=True)
    t = {"fc1": pred.fc1.weight.detach().half().contiguous(), "fc2": pred.fc2.weight.detach().half().contiguous()}
    write_atomic(st, lambda tmp: Path(tmp).write_bytes(save_tensors(t)))  # save_file made it 0600, unlike the bundle
    write_json(js, {"key": key, "threshold": threshold, "metrics": metrics})


def kept_work(out: str, fp: dict, key: str, n_layer: int, force: bool) -> dict:
    """{layer: (predictor, threshold, metrics)} that `out` holds from these settings: the layers of a finished bundle,
    or of an unfinished run. Work from other settings, another profile or another model is refused (nothing is
    lost unasked); with force it is redone, the old bundle kept until the new one replaces it."""
    from predictors.bundle import MANIFEST, load_bundle
    retrain = "--force retrains, or give a new directory"

    def other(what: str) -> HotcoldError:
        return HotcoldError(f"{out}: holds {what} trained with other settings or from another profile or model; "
                            f"{retrain}")

    done = {}
    # beside partial/, bundle files are a save cut short between its renames: the partial layers hold that run's work
    if os.path.exists(os.path.join(out, MANIFEST)) and not os.path.isdir(os.path.join(out, PARTIAL)):
        try:
            b = load_bundle(out, fp)
        except HotcoldError as e:  # another model's, or damaged
            if not force:
                raise HotcoldError(f"{e}; {retrain}") from None
            b = None
        if b is not None and b.training.get("key") == key:
            done = {i: (p, t, m) for i, (p, t, m) in enumerate(zip(b.predictors, b.thresholds, b.metrics))}
        elif not force:
            raise other("a bundle")  # with --force it stays until the new one replaces it whole
    for i in range(n_layer):
        part = None if i in done else load_partial(out, i)
        if part is not None and part[0] == key:
            done[i] = part[1]
        elif part is not None and not force:
            raise other("layers of an unfinished run")
        elif part is not None:
            for path in partial_paths(out, i):
                os.remove(path)
    return done


def train_predictors(ckpt, profile: str, out: str, recall: float = 0.99, rank="auto", epochs: int = 10,
                     device: str = "cpu", layers: list[int] | None = None, sparsity_path: str | None = None,
                     lr: float = 1e-2, seed: int = 0, progress: bool = True, log=None, threads: int = 1,
                     qtype: str = "F16", weighting: str = "contribution", force: bool = False) -> dict:
    """Train the predictors of `ckpt` from the profile at `profile` into bundle directory `out`, for decoding to
    read them as qtype (engine.config.PREDICTOR_TYPES; recorded in the bundle as training["predictor_type"]).

    Returns {"per_layer": [metrics + layer, rank, budget], the metrics' means over those layers, "complete": bool,
    "trained": [layers trained now], "bundle": out or None, "budget": {...}}. What `out` holds is resumed
    (`kept_work`); force: even if it was trained otherwise, by retraining it."""
    from engine.hybrid import torch_device
    from engine.fingerprint import fingerprint
    from predictors.bundle import Bundle, check_bundle_out, model_fingerprint
    from predictors.metrics import summarize
    from predictors.train import BUDGET, MIN_SAMPLES, WEIGHTINGS, held_out, train_layer
    from tqdm import tqdm
    log = log or (lambda s: print(s, file=sys.stderr))
    c = ckpt.config
    manifest = load_profile(profile)
    engine_fp = fingerprint(c, ckpt.tensors)
    check_fingerprint(manifest.get("fingerprint", {}), engine_fp, profile, "profile")
    profiled = manifest.get("settings", {}).get("weights_sha256")
    if profiled is not None and profiled != weights_sha256(ckpt.tensors):  # the fingerprint reads layer 0's FFN only
        raise HotcoldError(f"{profile}: profiled on other weights than {ckpt.path}'s (a fine-tune, or LoRA adapters: "
                           "give the -m and --lora the profile was made with)")
    rows = manifest["samples"].get("rows")
    few = isinstance(rows, int) and rows < MIN_SAMPLES  # a tenth is held out to validate: the metrics need rows
    more = "profile more --tokens (or raise --samples-per-layer)"
    if few and rows - held_out(rows) < 1:
        raise HotcoldError(f"{profile}: {rows} training sample{'' if rows == 1 else 's'} a layer, too few to hold out "
                           f"a validation split: {more}")
    fp = model_fingerprint(ckpt)
    check_bundle_out(out)
    check_writable(out)
    torch_device(device, "--device")
    if not 0 < recall <= 1:  # NaN too
        raise HotcoldError(f"--recall {recall}: expected a share of the active neurons, in (0, 1]")
    rank = rank if rank == "auto" else as_int(rank, "rank")
    if rank != "auto" and rank > min(c.n_embd, c.n_ff):
        raise HotcoldError(f"--rank {rank}: above the rank of a layer's {c.n_ff} x {c.n_embd} gate map "
                           f"({min(c.n_embd, c.n_ff)})")
    if rank != "auto" and rank % 2 and c.act in EXACT_ACTS:
        raise HotcoldError(f"--rank {rank}: predictors of a {c.act} model start from the gate's SVD as [A; -A], "
                           "which needs an even rank")
    sparsity = profile_sparsity(manifest, engine_fp, sparsity_path)
    want = sorted(set(range(c.n_layer) if layers is None else layers))
    bad = [i for i in want if not 0 <= i < c.n_layer]
    if bad:
        raise HotcoldError(f"--layers: layer {bad[0]} does not exist (the model has {c.n_layer})")
    if qtype not in PREDICTOR_TYPES:
        raise HotcoldError(f"predictor type {qtype!r}: expected one of {', '.join(PREDICTOR_TYPES)}")
    if weighting not in WEIGHTINGS:
        raise HotcoldError(f"weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    opts = {"recall": recall, "rank": rank, "epochs": epochs, "lr": lr, "seed": seed, "budget": BUDGET,
            "predictor_type": qtype, "weighting": weighting}
    key = settings_key(fp, manifest, opts)
    done = kept_work(out, fp, key, c.n_layer, force)
    todo = [i for i in want if i not in done]
    if done and want:
        log(f"resuming: {len([i for i in want if i in done])} of {len(want)} layers already trained in {out}")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    pool = ThreadPoolExecutor(1)  # reads the next layer's samples into the page cache while one trains
    try:
        for k, i in enumerate(tqdm(todo, desc="train-predictors", unit="layer", disable=not progress or None,
                                   file=sys.stderr)):
            X, Y = layer_samples(profile, manifest, i)  # float16 (N, n_embd), bit-packed masks (N, n_ff)
            if k + 1 < len(todo):
                pool.submit(warm_samples, profile, manifest, todo[k + 1])
            cap = budget_rank(ckpt, i) if rank == "auto" else None  # a given rank is reported against it
            pred, thr, m = train_layer(X, Y, rank, epochs, lr, device,
                                       init_map(ckpt, i), recall, max_rank=cap, seed=seed, desc=f"layer {i}",
                                       qtype=qtype, progress=progress,
                                       C=contribution_blocks(ckpt, i, X) if weighting == "contribution" else None)
            del X, Y  # before the next layer's are read
            save_partial(out, i, key, pred, thr, m)
            done[i] = (pred, thr, m)
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(saved)
    per_layer = []
    for i in want:
        pred, _, m = done[i]
        ffn = ffn_tensors(ckpt, i)
        per_layer.append({**m, "layer": i, "rank": pred.rank, "predictor_params": pred.n_params,
                          "ffn_params": sum(int(np.prod(t.shape)) for t in ffn),
                          "predictor_bytes": round(weight_bytes(qtype) * pred.n_params),
                          "ffn_bytes": sum(t.nbytes for t in ffn)})
    complete = all(i in done for i in range(c.n_layer))
    res = {**summarize(per_layer), "trained": todo, "complete": complete, "bundle": None}  # means over layers too
    if complete:
        preds, thrs, mets = zip(*(done[i] for i in range(c.n_layer)))
        corpus = {"profile": os.path.abspath(profile), "model": manifest.get("model"), **manifest["settings"],
                  "rows": manifest["samples"].get("rows")}
        corpus.pop("thresholds", None)
        training = {**opts, "device": device, "key": key}
        Bundle(list(preds), list(thrs), fp, list(mets), dataclasses.asdict(sparsity), corpus, training).save(out)
        shutil.rmtree(os.path.join(out, PARTIAL), ignore_errors=True)
        res["bundle"] = out
    tot = {k: sum(m[k] for m in per_layer) for k in ("predictor_params", "ffn_params", "predictor_bytes", "ffn_bytes")}
    res["budget"] = {**tot, "predictor_type": qtype, "share": tot["predictor_params"] / max(tot["ffn_params"], 1),
                     "bytes_share": tot["predictor_bytes"] / max(tot["ffn_bytes"], 1), "limit": BUDGET}
    if few:
        log(f"hotcold: note: {profile}: {rows} training samples a layer; the recall and sparsity reported are "
            f"measured on {held_out(rows)} of them: {more} for predictors worth using")
    return res


def format_train(res: dict) -> str:
    from predictors.metrics import format_table
    b = res["budget"]
    lines = [format_table(res["per_layer"]),
             f"predictor parameters: {b['predictor_params']:,} = {b['share']:.1%} of the FFN's "
             f"({b['ffn_params']:,}); budget {b['limit']:.0%}"
             + ("" if b["share"] <= b["limit"] + 1e-9 else "  ** OVER BUDGET **"),
             f"predictor bytes in {b['predictor_type']}: {b['predictor_bytes']:,} = {b['bytes_share']:.1%} of the FFN "
             f"bytes as stored "
             f"({b['ffn_bytes']:,})"]
    if res["complete"]:
        n = len(res["trained"])
        lines.append(f"bundle written: {res['bundle']} ({n} layer{'' if n == 1 else 's'} trained now)")
    else:
        lines.append("bundle not written yet: some layers are untrained (run without --layers to finish)")
    return "\n".join(lines)


# --- evaluation -------------------------------------------------------------------------------------------
def eval_predictors(model, bundle, tokens: list[int], ctx: int = 256, n_tokens: int | None = None,
                    progress: bool = True) -> dict:
    """Recall, precision, predicted and actual sparsity of `bundle` on `tokens`, running `model` densely."""
    from engine.sparsity import batched_net, truth_rule
    from predictors.metrics import from_counts, summarize
    from tqdm import tqdm
    c = model.config
    net = batched_net(model.net)
    rule = truth_rule(bundle, net)
    n_windows = min(len(tokens), n_tokens or len(tokens)) // ctx
    if n_windows < 1:
        raise HotcoldError(f"{len(tokens)} tokens of text, shorter than one window of --ctx {ctx}")
    counts = np.zeros((c.n_layer, 4), dtype=np.int64)  # true positives, predicted active, truly active, all

    def hook(i: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # x (T, n_embd), h (T, n_ff)
        true = rule.mask(i, h)  # (T, n_ff)
        pred = bundle.active(i, x.float())  # (T, n_ff)
        counts[i] += [int((pred & true).sum()), int(pred.sum()), int(true.sum()), true.numel()]
        return h

    with net.hooked(hook, dense=True):  # the truth is the dense FFN's mask
        for w in tqdm(range(n_windows), desc="eval-predictors", unit="win", disable=not progress or None,
                      file=sys.stderr):
            net.forward(tokens[w * ctx:(w + 1) * ctx], 0)
    per_layer = []
    for i, (tp, pp, ap, n) in enumerate(counts):
        per_layer.append({"layer": i, **from_counts(tp, pp, ap, n), "rank": bundle.predictors[i].rank})
    res = summarize(per_layer)
    res["tokens"] = n_windows * ctx
    return res


# --- command line -----------------------------------------------------------------------------------------
def parse_layers(v: str) -> list[int]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]."""
    out = []
    for part in v.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected layer numbers such as 0,3,5-7, got {v!r}") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"range {part} runs backwards")
        if hi >= 10**6:
            raise argparse.ArgumentTypeError(f"layer {hi}: no model has that many")
        out += list(range(lo, hi + 1))
    return out


def rank_arg(text: str) -> str | int:
    """An argparse type: auto or an integer >= 2."""
    if text != "auto" and not (text.isascii() and text.isdigit() and int(text) >= 2):
        raise argparse.ArgumentTypeError(f"expected auto or a number >= 2, got {text!r}")
    return text if text == "auto" else int(text)


def cmd_train(args) -> None:
    from engine.loader import load_checkpoint
    from tools.cli import lora_merged
    manifest = load_profile(args.profile)
    model = profiled_model(manifest, args.profile, args.model)
    ckpt = lora_merged(load_checkpoint(model), args)
    res = train_predictors(ckpt, args.profile, args.out, args.recall, args.rank, args.epochs, args.device,
                           args.layers, args.sparsity, progress=not args.json, threads=args.threads,
                           qtype=args.predictor_type, weighting=args.weighting, force=args.force)
    if args.json:
        from tools.cli import emit_json
        emit_json(res)
    else:
        print(format_train(res))


def cmd_eval(args) -> None:
    from engine.api import Model, set_threads
    from engine.loader import load_checkpoint
    from predictors.bundle import load_bundle, model_fingerprint
    from predictors.metrics import format_table
    from tools.profile import corpus_tokens
    from tools.cli import lora_merged
    set_threads(args.threads)
    ckpt = lora_merged(load_checkpoint(args.model), args)
    if args.bundle is not None:
        bundle = load_bundle(args.bundle, model_fingerprint(ckpt))
    elif ckpt.predictors is not None:  # an export's own predictors, as they ship
        from engine.lora import check_carried
        check_carried(ckpt)  # (with --lora: unless the adapters leave their FFN)
        bundle = ckpt.predictors
    else:
        raise HotcoldError(f"{ckpt.path}: holds no predictors; give --bundle BUNDLE")
    model = Model(ckpt, args.ctx, backend="torch")
    tokens = corpus_tokens(model, args.files, args.tokens, args.ctx)
    res = eval_predictors(model, bundle, tokens, args.ctx, args.tokens, progress=not args.json)
    if args.json:
        from tools.cli import emit_json
        emit_json(res)
    else:
        print(format_table(res["per_layer"]))
        ratio = res["predicted_sparsity"] / res["actual_sparsity"] if res["actual_sparsity"] else None
        print(f"{res['tokens']} held-out tokens; predicted / actual sparsity "
              + ("n/a (nothing inactive)" if ratio is None else f"{ratio:.3f}"))


def add_command(sub) -> None:
    from predictors.train import WEIGHTINGS
    from tools.cli import add_lora_args, add_model_args, at_least, share
    p = sub.add_parser("train-predictors", help="train per-layer activation predictors from a profile")
    p.add_argument("--profile", required=True, help="profile directory (hotcold profile -o)")
    p.add_argument("-o", "--out", required=True, help="bundle directory (resumed when it holds finished layers)")
    p.add_argument("-m", "--model", default=None, help="model (default: the one the profile recorded)")
    add_lora_args(p)
    p.add_argument("--recall", type=share, default=0.99, help="recall target on validation (default 0.99)")
    p.add_argument("--rank", type=rank_arg, default="auto", help="auto (default: the smallest good rank within the "
                   "budget) or a number >= 2, even for ReLU-family models")
    p.add_argument("--epochs", type=at_least(1), default=10, help="epochs per rank tried (default 10)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--layers", type=parse_layers, default=None, help="train only these layers, e.g. 0,2,5-7")
    p.add_argument("--sparsity", default=None, help="the sparsity config the profile was made with (recorded)")
    p.add_argument("--predictor-type", choices=PREDICTOR_TYPES, default="F16", help="how decoding will read the "
                   "weights: F16 (default), Q8_0 or Q4_1 (the bytes read per token: 2, 1.06, 0.63 per weight); the "
                   "weights are rounded to that type and the thresholds tuned on them")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="contribution",
                   help="contribution (default): each active label weighs by what its neuron adds to the FFN output, "
                   "|h_i| ||down_i|| (recomputed from the profiled inputs); count: every active label the same")
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="torch threads for training (default: all "
                   "cores); the next layer's samples are read into the page cache meanwhile in another thread")
    p.add_argument("--force", action="store_true", help="retrain what --out holds from other settings, another "
                   "profile or another model (refused otherwise)")
    p.add_argument("--json", action="store_true", help="print the result (per layer: rank, threshold, metrics) as "
                   "one JSON object")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-predictors", help="recall and sparsity of a predictor bundle on new text")
    add_model_args(p, ctx=False, backend=False)  # it runs the torch reference, batched
    add_lora_args(p)
    p.add_argument("--bundle", help="predictor bundle directory (default: the predictors inside the model file, "
                   "an export's)")
    p.add_argument("-f", "--file", dest="files", nargs="+", required=True, metavar="CORPUS",
                   help="held-out text or .jsonl")
    p.add_argument("--tokens", type=at_least(1), default=None, metavar="N",
                   help="tokens to evaluate (default: the whole text)")
    p.add_argument("--ctx", type=at_least(2), default=256, help="window size in tokens (default 256)")
    p.add_argument("--json", action="store_true", help="print recall, precision, predicted and actual sparsity, "
                   "their means and per layer, as one JSON object")
    p.set_defaults(func=cmd_eval)
