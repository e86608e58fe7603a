"""`hotcold profile`: how often each FFN neuron is active on a corpus, and samples to train predictors on.

The model runs over the corpus in windows of ctx tokens; a hook on the FFN path counts, per layer and neuron,
the tokens on which the neuron was active (engine/sparsity.py's rule) and keeps a seeded uniform sample of
tokens: their FFN input and active mask. Output directory:

  manifest.json               model fingerprint, settings, sample format; "complete" once finished
  progress.npz                counts so far and windows done: the resume point, replaced after every window
  activation/activation_N.pt  1-D int64 tensor of length n_ff: tokens on which each neuron of layer N fired
                              (PowerInfer's layout)
  summary.json, report.txt    per-layer sparsity and skew, throughput (what --report prints)
  samples/x_WWWWWW.npy        (n_layer, S, n_embd) float16: FFN input = residual stream after attention,
                              before the FFN norm, of the S sampled tokens of window W
  samples/mask_WWWWWW.npy     (n_layer, S, ceil(n_ff / 8)) uint8: their active masks, np.packbits(axis=-1)
  samples/pos_WWWWWW.npy      (S,) int64: their positions in the corpus token stream
  activation_frequency.png    sorted activation-frequency curves of every layer (if matplotlib imports)

Every file is written to a temporary name and renamed, the progress record last: interrupted at any point,
the same command continues from the last finished window and ends with the same counts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import torch

from engine.config import HotcoldError, first_line
from engine.files import JSON_ERRORS, error_text, read_json, read_json_if, read_text, write_atomic, write_json
from engine.fingerprint import check_fingerprint, weights_sha256
from engine.sparsity import EXACT_ACTS, SparsityConfig, batched_net
from predictors.bundle import FORMAT as BUNDLE_FORMAT

SKEW_TOPS = (0.1, 0.2, 0.5)  # skew: share of all activations covered by the top 10/20/50% most frequent neurons
MANIFEST, PROGRESS, SUMMARY, REPORT = "manifest.json", "progress.npz", "summary.json", "report.txt"
PLOT = "activation_frequency.png"
SAMPLE_ARRAYS = ("x", "mask", "pos")


# --- corpus ---------------------------------------------------------------------------------------------
def read_corpus(paths: list[str]) -> list[str]:
    """Documents: a text file is one; a .jsonl file gives the `text` field of each line. Empty files refused."""
    docs: list[str] = []
    for path in paths:
        text = read_text(path, "corpus")
        found = jsonl_texts(path, io.StringIO(text, newline="")) if path.lower().endswith(".jsonl") else [text]
        found = [d for d in found if d.strip()]
        if not found:
            raise HotcoldError(f"{path}: empty corpus")
        docs += found
    return docs


def jsonl_texts(path: str, lines) -> list[str]:
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.removeprefix("\ufeff") if n == 1 else line)  # a BOM, as editors on Windows write
        except JSON_ERRORS as e:
            raise HotcoldError(f"{path}:{n}: invalid JSON ({error_text(e)})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise HotcoldError(f"{path}:{n}: no \"text\" string field")
        texts.append(obj["text"])
    return texts


def corpus_tokens(model, paths: list[str], need: int | None, ctx: int) -> list[int]:
    """The corpus as one token stream, at least one window of ctx long; tokenizing stops at `need` tokens."""
    if need is not None and need < ctx:
        raise HotcoldError(f"--tokens {need}: fewer than one window of --ctx {ctx}")
    tokens: list[int] = []
    for doc in read_corpus(paths):
        tokens += model.tokenize(doc, special=False, add_bos=False)
        if need is not None and len(tokens) >= need:
            break
    if len(tokens) < ctx:
        raise HotcoldError(f"{', '.join(paths)}: {len(tokens)} tokens of corpus, shorter than one window of --ctx "
                           f"{ctx}")
    return tokens


def sample_positions(n_tokens: int, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of min(cap, n_tokens) tokens drawn uniformly without replacement."""
    if cap >= n_tokens:
        return np.arange(n_tokens, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, cap, replace=False)).astype(np.int64)


# --- output directory -------------------------------------------------------------------------------------
def open_out_dir(out: str, manifest: dict) -> dict | None:
    """Check that `out` may receive this profile; the previous manifest when it is one to resume."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise HotcoldError(f"{out}: exists and is not a directory")
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):  # a new profile; the temporary of a first manifest killed as it was written is ours
        if os.path.isdir(out) and any(not n.startswith(MANIFEST + ".tmp") for n in os.listdir(out)):
            raise HotcoldError(f"{out}: not empty and holds no profile; choose another -o")
        return None
    old = read_manifest(out)
    check_fingerprint(old.get("fingerprint", {}), manifest["fingerprint"], out, "profile")
    if not isinstance(old.get("settings"), dict):
        raise HotcoldError(f"{path}: not a profile manifest (its settings are not a JSON object)")
    for k, v in manifest["settings"].items():
        if k not in old["settings"]:
            raise HotcoldError(f"{out}: holds a profile made by an older hotcold, which did not record {k}; choose "
                               "another -o to start a new one")
        if old["settings"][k] != v:
            was = old["settings"][k]
            values = f": {was} there, {v} now" if len(f"{was}{v}") < 40 else ""
            resume = f"-t {was} to resume it, or " if k == "threads" else ""
            raise HotcoldError(f"{out}: holds a profile made with other settings ({k} differs{values}); "
                               f"{resume}choose another -o to start a new one")
    return old


def load_progress(out: str, fp: dict, ctx: int, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts (n_layer, n_ff) and windows done of the resume point, checked against this run: rows[w] tokens of
    window w are sampled (len(rows) windows in all), and every sample chunk of a window done must be there."""
    path = os.path.join(out, PROGRESS)
    if not os.path.exists(path):
        return np.zeros((fp["n_layer"], fp["n_ff"]), dtype=np.int64), 0
    try:
        with np.load(path) as z:
            counts, done = z["counts"], z["windows_done"]
    except Exception as e:
        raise HotcoldError(f"{path}: unreadable progress record ({e}); delete {out} to start over") from None
    if done.shape != () or not np.issubdtype(done.dtype, np.integer) or not 0 <= done <= len(rows):
        problem = f"windows_done {done.item() if done.shape == () else done.shape}, expected 0 to {len(rows)}"
    else:
        done = int(done)
        problem = counts_problem(counts, (fp["n_layer"], fp["n_ff"]), done * ctx)
    if problem:
        raise HotcoldError(f"{path}: invalid progress record ({problem}); delete {out} to start over")
    for chunk in sample_chunks(out, rows[:done]):
        try:
            load_chunk(out, chunk, fp)
        except HotcoldError as e:
            raise HotcoldError(f"{e}; delete {out} to start over") from None
    return counts, done


def counts_problem(a, shape: tuple, n_tokens: int) -> str | None:
    """What is wrong with activation counts `a`, expected int64 of `shape`, each in [0, n_tokens]; None if nothing."""
    if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != shape:
        found = f"{a.dtype} {tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
        return f"counts {found}, expected int64 {shape}"
    if a.size and not 0 <= a.min() <= a.max() <= n_tokens:
        return f"counts outside 0 to {n_tokens}, the tokens profiled"
    return None


def save_array(path: str, a: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, a)
    write_atomic(path, write)


def save_progress(out: str, counts: np.ndarray, windows_done: int) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, counts=counts, windows_done=windows_done)
    write_atomic(os.path.join(out, PROGRESS), write)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
    write_atomic(path, write)


def sample_file(out: str, name: str, w: int) -> str:
    return os.path.join(out, "samples", f"{name}_{w:06d}.npy")


def sample_chunks(out: str, rows: np.ndarray) -> list[dict]:
    """The manifest's sample chunk entries: one for each window w with rows[w] > 0 sampled tokens."""
    return [{"window": w, "rows": int(r), **{k: os.path.relpath(sample_file(out, k, w), out) for k in SAMPLE_ARRAYS}}
            for w, r in enumerate(rows) if r]


def load_chunk(out: str, chunk, fp: dict, layer: int | None = None):
    """The arrays (x, mask, pos) of one sample chunk of profile `out`, memory-mapped, checked against the sample
    format of a model of fingerprint fp; with `layer`, that layer's FFN inputs float16 (rows, n_embd), checked
    finite, and bit-packed active masks uint8 (rows, ceil(n_ff / 8)), as stored (memory-mapped)."""
    manifest = os.path.join(out, MANIFEST)
    if not isinstance(chunk, dict) or not isinstance(chunk.get("rows"), int):
        raise HotcoldError(f"{manifest}: a sample chunk entry without a number of rows ({str(chunk)[:60]})")
    n_layer, rows, n_ff = fp["n_layer"], chunk["rows"], fp["n_ff"]
    want = {"x": (np.float16, (n_layer, rows, fp["n_embd"])), "mask": (np.uint8, (n_layer, rows, (n_ff + 7) // 8)),
            "pos": (np.int64, (rows,))}
    arrays, root = [], os.path.abspath(out)
    for name, (dtype, shape) in want.items():
        rel = chunk.get(name)
        path = os.path.join(out, rel) if isinstance(rel, str) else None
        if path is None or os.path.commonpath([root, os.path.abspath(path)]) != root:
            raise HotcoldError(f"{manifest}: sample file {rel!r} is not a path inside {out}")
        try:
            a = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise HotcoldError(f"{path}: no such file (a sample chunk of the profile)") from None
        except (OSError, ValueError, EOFError) as e:
            raise HotcoldError(f"{path}: unreadable sample chunk ({first_line(e)})") from None
        if a.dtype != dtype or a.shape != shape:
            raise HotcoldError(f"{path}: a sample chunk of {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}")
        arrays.append(a)
    if layer is None:
        return arrays
    x = arrays[0][layer]  # (rows, n_embd)
    if not np.isfinite(x).all():
        raise HotcoldError(f"{os.path.join(out, chunk['x'])}: non-finite FFN inputs of layer {layer}")
    return x, arrays[1][layer]


# --- the profile ------------------------------------------------------------------------------------------
def profile_settings(model, tokens: list[int], ctx: int, n_windows: int, cap: int, seed: int,
                     sparsity: SparsityConfig) -> dict:
    """What the counts depend on: resuming is allowed only when all of it is the same. That includes how the model
    runs (the backend, the cache type and the thread count each move activations near the threshold), all of its
    weights (the fingerprint reads layer 0's FFN only) and its hyperparameters (a FATReLU threshold, the rope base)."""
    used = np.asarray(tokens[:n_windows * ctx], dtype=np.int32)
    return {"ctx": ctx, "windows": n_windows, "tokens": n_windows * ctx,
            "tokens_sha256": hashlib.sha256(used.tobytes()).hexdigest()[:16], "seed": seed,
            "samples_per_layer": cap, "thresholds": sparsity.thresholds, "backend": model.backend,
            "cache_type": model.cache_type, "threads": torch.get_num_threads(),
            "weights_sha256": weights_sha256(model.ckpt.tensors),
            "config": json.loads(json.dumps(dataclasses.asdict(model.config)))}  # as the manifest reads back


def run_profile(model, tokens: list[int], out: str, ctx: int = 512, n_tokens: int | None = None,
                sparsity: SparsityConfig | None = None, cap: int = 100_000, seed: int = 0,
                on_window=None, progress: bool = True) -> dict:
    """Profile `tokens` into directory `out` (resuming what it holds); returns the summary.

    on_window(w), if given, is called after window w is saved (tests interrupt there)."""
    from tqdm import tqdm
    c = model.config
    if sparsity is None:
        if c.act not in EXACT_ACTS:
            raise HotcoldError(f"a {c.act} model has no natural zeros: pass --sparsity CONFIG "
                               "(made by hotcold calibrate)")
        sparsity = SparsityConfig.exact(c, model.fingerprint)
    if ctx > model.n_ctx:
        raise HotcoldError(f"--ctx {ctx} exceeds the model context {model.n_ctx}")
    n_windows = min(len(tokens), n_tokens or len(tokens)) // ctx
    path = model.ckpt.path  # absolute: train-predictors reads it from anywhere
    manifest = {"fingerprint": model.fingerprint, "model": os.path.abspath(path) if os.path.exists(path) else path,
                "settings": profile_settings(model, tokens, ctx, n_windows, cap, seed, sparsity),
                "complete": False, "samples": sample_format(c)}
    positions = sample_positions(n_windows * ctx, cap, seed)
    if open_out_dir(out, manifest) is None:  # every check passed: only now is anything written (the manifest first,
        write_json(os.path.join(out, MANIFEST), manifest)  # so that a profile killed now is resumed, not refused)
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    counts, done = load_progress(out, model.fingerprint, ctx, np.bincount(positions // ctx, minlength=n_windows))
    if 0 < done < n_windows:
        print(f"resuming: {done} of {n_windows} windows profiled in {out}", file=sys.stderr)
    model.set_sparsity(sparsity)
    bar = tqdm(total=n_windows * ctx, initial=done * ctx, unit="tok", desc="profile", disable=not progress or None,
               file=sys.stderr)
    elapsed, dense_s = 0.0, None
    try:
        for w in range(done, n_windows):
            window = tokens[w * ctx:(w + 1) * ctx]
            pos = positions[(positions >= w * ctx) & (positions < (w + 1) * ctx)]  # (S,)
            t0 = time.perf_counter()
            xs, masks = profile_window(model, window, counts, torch.from_numpy(pos - w * ctx))
            elapsed += time.perf_counter() - t0
            if len(pos):
                for name, a in zip(SAMPLE_ARRAYS, (xs, masks, pos)):
                    save_array(sample_file(out, name, w), a)
            save_progress(out, counts, w + 1)  # the commit point of window w
            if dense_s is None:
                dense_s = dense_time(model, window)
            bar.update(ctx)
            if on_window is not None:
                on_window(w)
    finally:
        bar.close()
        model.set_sparsity(None)
    speed = {"tokens_profiled": (n_windows - done) * ctx, "profile_tok_s": (n_windows - done) * ctx / elapsed
             if elapsed else None, "dense_prefill_tok_s": ctx / dense_s if dense_s else None}
    return finalize(out, manifest, counts, positions, speed)


def profile_window(model, window: list[int], counts: np.ndarray, rows: torch.Tensor):
    """Run one window; add its active counts to counts (n_layer, n_ff); samples of the `rows` positions."""
    c, sp, net = model.config, model.sparsity, batched_net(model.net)
    xs = np.zeros((c.n_layer, len(rows), c.n_embd), dtype=np.float16)
    masks = np.zeros((c.n_layer, len(rows), (c.n_ff + 7) // 8), dtype=np.uint8)

    def hook(i: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # x (T, n_embd), h (T, n_ff)
        m = sp.mask(i, h)  # (T, n_ff): h comes through the sparsifier, so this is its mask again
        counts[i] += m.sum(0).numpy()
        if len(rows):
            xs[i] = x[rows].half().numpy()
            masks[i] = np.packbits(m[rows].numpy(), axis=-1)
        return h

    with net.hooked(hook):
        net.forward(window, 0)
    return xs, masks


def dense_time(model, window: list[int]) -> float:
    """Seconds of a plain dense prefill of the window: the profiler's speed reference."""
    with batched_net(model.net).hooked(None, dense=True) as net:
        t0 = time.perf_counter()
        net.forward(window, 0)
        return time.perf_counter() - t0


def sample_format(c) -> dict:
    return {"x": {"dtype": "float16", "shape": ["n_layer", "rows", c.n_embd],
                  "what": "FFN input: residual stream after attention, before the FFN norm"},
            "mask": {"dtype": "uint8", "shape": ["n_layer", "rows", (c.n_ff + 7) // 8], "n_ff": c.n_ff,
                     "what": "active mask, np.packbits(mask, axis=-1) (big bit order); np.unpackbits to read"},
            "pos": {"dtype": "int64", "shape": ["rows"], "what": "token positions in the corpus stream"}}


def finalize(out: str, manifest: dict, counts: np.ndarray, positions: np.ndarray, speed: dict) -> dict:
    """PowerInfer's activation files, the sample chunk list, the summary; the manifest marked complete."""
    ctx, n_windows = manifest["settings"]["ctx"], manifest["settings"]["windows"]
    os.makedirs(os.path.join(out, "activation"), exist_ok=True)
    for i, layer in enumerate(counts):
        write_atomic(os.path.join(out, "activation", f"activation_{i}.pt"),
                     lambda tmp, a=layer: torch.save(torch.from_numpy(a.copy()), tmp))
    rows = np.bincount(positions // ctx, minlength=n_windows)
    manifest["samples"]["chunks"] = sample_chunks(out, rows)
    manifest["samples"]["rows"] = int(rows.sum())
    old = read_json_if(os.path.join(out, SUMMARY), "summary") or {}
    summary = {**summarize(counts, n_windows * ctx), "model": manifest["model"],
               "speed": speed if speed["tokens_profiled"] else old.get("speed", speed)}
    write_json(os.path.join(out, SUMMARY), summary)
    write_text(os.path.join(out, REPORT), format_report(summary) + "\n")
    manifest["complete"] = True
    write_json(os.path.join(out, MANIFEST), manifest)
    return {**summary, "plot": plot(out, counts, n_windows * ctx)}


# --- report -----------------------------------------------------------------------------------------------
def summarize(counts: np.ndarray, n_tokens: int) -> dict:
    """Per layer: sparsity (inactive share of neuron-token pairs) and skew (activations of the top neurons)."""
    n_ff = counts.shape[1]
    ranked = -np.sort(-counts, axis=1)  # (n_layer, n_ff), most frequent first
    total = np.maximum(counts.sum(1), 1)
    skew = {f"top{int(t * 100)}": (ranked[:, :max(1, round(t * n_ff))].sum(1) / total).tolist() for t in SKEW_TOPS}
    sparsity = (1 - counts.sum(1) / (n_tokens * n_ff)).tolist()
    return {"tokens": n_tokens, "n_ff": n_ff, "sparsity": sparsity, "mean_sparsity": float(np.mean(sparsity)),
            "skew": skew}


def profiled_model(manifest: dict, profile: str, given: str | None) -> str | None:
    """-m, or else the model the profile recorded (None: the default model), refused in one line where it is gone."""
    model = given or manifest.get("model")
    if given is None and model is not None and not os.path.exists(model):
        raise HotcoldError(f"{model}: the model profile {profile} was made with is not there; give -m MODEL")
    return model


def read_manifest(out: str) -> dict:
    """The profile manifest in `out`; a predictor bundle's (the same file name) is refused as such."""
    m = read_json(os.path.join(out, MANIFEST), "profile manifest")
    if m.get("format") == BUNDLE_FORMAT:
        raise HotcoldError(f"{out}: a predictor bundle, not a profile directory")
    return m


def finished_manifest(out: str) -> dict:
    """The manifest of the finished profile `out`, checked for what its readers take from it."""
    if not os.path.isdir(out):
        raise HotcoldError(f"{out}: no such profile directory")
    path = os.path.join(out, MANIFEST)
    m = read_manifest(out)
    fp, settings, samples = m.get("fingerprint"), m.get("settings"), m.get("samples", {})
    dims = ("n_layer", "n_embd", "n_ff")
    if not (isinstance(fp, dict) and all(isinstance(fp.get(k), int) and fp[k] > 0 for k in dims)
            and isinstance(settings, dict) and isinstance(settings.get("tokens"), int)
            and isinstance(samples, dict) and isinstance(samples.get("chunks", []), list)):
        raise HotcoldError(f"{path}: not a profile manifest (no fingerprint with n_layer, n_embd and n_ff, settings "
                           "with tokens, or list of sample chunks)")
    if not m.get("complete"):
        raise HotcoldError(f"{out}: the profile is not finished; run the same profile command to resume it")
    return m


def load_counts(out: str) -> tuple[dict, np.ndarray]:
    """The manifest of the finished profile `out` and its activation counts (n_layer, n_ff), checked."""
    manifest = finished_manifest(out)
    fp, settings = manifest["fingerprint"], manifest["settings"]
    counts = []
    for i in range(fp["n_layer"]):
        f = os.path.join(out, "activation", f"activation_{i}.pt")
        try:
            t = torch.load(f, weights_only=True)
        except FileNotFoundError:
            raise HotcoldError(f"{f}: no such file (the profile's activation counts of layer {i})") from None
        except Exception as e:  # torch raises many kinds for a truncated or foreign file
            raise HotcoldError(f"{f}: unreadable activation counts ({type(e).__name__})") from None
        a = t.numpy() if isinstance(t, torch.Tensor) and t.dtype == torch.int64 else t
        problem = counts_problem(a, (fp["n_ff"],), settings["tokens"])
        if problem:
            raise HotcoldError(f"{f}: not activation counts of this profile ({problem})")
        counts.append(a)
    return manifest, np.stack(counts)


def format_report(summary: dict) -> str:
    tops = list(summary["skew"])
    lines = [f"model: {summary['model']}", f"{summary['tokens']} tokens profiled, {summary['n_ff']} neurons a layer",
             "layer  sparsity  " + "  ".join(f"{t:>6}" for t in tops)]
    for i, s in enumerate(summary["sparsity"]):
        lines.append(f"{i:5d}  {s:8.3f}  " + "  ".join(f"{summary['skew'][t][i]:6.3f}" for t in tops))
    lines.append(f" mean  {summary['mean_sparsity']:8.3f}  " +
                 "  ".join(f"{np.mean(summary['skew'][t]):6.3f}" for t in tops))
    sp = summary.get("speed") or {}
    if sp.get("profile_tok_s") and sp.get("dense_prefill_tok_s"):
        lines.append(f"profiling: {sp['profile_tok_s']:.1f} tok/s; dense prefill {sp['dense_prefill_tok_s']:.1f} "
                     f"tok/s (profiling took {sp['dense_prefill_tok_s'] / sp['profile_tok_s']:.2f}x its time)")
    return "\n".join(lines)


def report(out: str) -> dict:
    """The summary of the finished profile `out`, from its counts (its speed from summary.json), plot redrawn."""
    manifest, counts = load_counts(out)
    speed = read_json(os.path.join(out, SUMMARY), "summary").get("speed")
    summary = {**summarize(counts, manifest["settings"]["tokens"]), "model": manifest.get("model"),
               "speed": speed if isinstance(speed, dict) else {}}
    return {**summary, "plot": plot(out, counts, manifest["settings"]["tokens"])}


def plot(out: str, counts: np.ndarray, n_tokens: int) -> str | None:
    """Sorted activation-frequency curves, one per layer, to a PNG; None when matplotlib is missing or the file
    cannot be written (a note says why: the report stands without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hotcold: note: no plot: matplotlib is not installed (.venv/bin/pip install -e '.[plot]')",
              file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rank = np.arange(counts.shape[1]) / counts.shape[1]
    for i, layer in enumerate(counts):
        ax.plot(rank, -np.sort(-layer) / n_tokens, color=plt.cm.viridis(i / max(1, len(counts) - 1)), lw=0.8)
    ax.set(xlabel="neuron rank (share of n_ff, most frequent first)", ylabel="activation frequency",
           title="FFN activation frequency per layer (dark: first layer)")
    path = os.path.join(out, PLOT)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    except HotcoldError as e:
        print(f"hotcold: note: no plot: {e}", file=sys.stderr)
        path = None
    plt.close(fig)
    return path


# --- command line -----------------------------------------------------------------------------------------
def cmd_profile(args) -> None:
    from tools.cli import emit_json, load_model
    if args.report and (args.files or args.out):
        raise HotcoldError("--report DIR prints a finished profile; it takes no -f or -o (profile with those alone)")
    if args.report:
        summary = report(args.report)
    elif not args.files or not args.out:
        raise HotcoldError("profile needs -f CORPUS and -o DIR (or --report DIR)")
    else:
        model = load_model(args, n_ctx=args.ctx)
        sparsity = SparsityConfig.load(args.sparsity, model.fingerprint) if args.sparsity else None
        tokens = corpus_tokens(model, args.files, args.tokens, args.ctx)
        summary = run_profile(model, tokens, args.out, args.ctx, args.tokens, sparsity, args.samples_per_layer,
                              args.seed, progress=not args.json)
        want = args.tokens or len(tokens)
        if summary["tokens"] < want:
            short = (f"the corpus has {len(tokens)}" if len(tokens) < want else f"whole windows of --ctx {args.ctx}")
            asked = f"--tokens {args.tokens}" if args.tokens else f"the corpus's {len(tokens)}"
            print(f"hotcold: note: {summary['tokens']} tokens profiled, fewer than {asked} ({short})", file=sys.stderr)
    if args.json:
        emit_json(summary)
    else:
        print(format_report(summary))


def add_command(sub) -> None:
    from tools.cli import add_model_args, at_least
    p = sub.add_parser("profile", help="count FFN neuron activations over a corpus; save predictor samples")
    add_model_args(p, ctx=False)
    p.add_argument("-f", "--file", dest="files", nargs="+", metavar="CORPUS",
                   help="corpus: text files or .jsonl with a text field")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="output directory (resumed when it holds this profile unfinished)")
    p.add_argument("--tokens", type=at_least(1), default=None, metavar="N",
                   help="tokens to profile, in whole windows of --ctx (default: the whole corpus's)")
    p.add_argument("--ctx", type=at_least(2), default=512, help="window size in tokens (default 512)")
    p.add_argument("--sparsity", default=None, metavar="CONFIG", help="sparsity config (needed for SiLU models)")
    p.add_argument("--samples-per-layer", type=at_least(0), default=100_000, metavar="CAP",
                   help="tokens sampled for predictor training (default 100000)")
    p.add_argument("--seed", type=at_least(0), default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--report", metavar="DIR", default=None, help="print the report of a finished profile")
    p.add_argument("--json", action="store_true", help="the summary as JSON: tokens, n_ff, per-layer sparsity, "
                   "mean_sparsity, skew, model, speed, plot")
    p.set_defaults(func=cmd_profile)
