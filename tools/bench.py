"""`hotcold bench`: prefill and decode speed, bytes read per token, and (`--compare`) our dense and sparse
decode next to llama.cpp on the same GGUF and thread count, with the memory bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

LLAMACPP_PYTHON = "HOTCOLD_LLAMACPP_PYTHON"  # names an interpreter with llama-cpp-python for the llama.cpp row
LLAMACPP_TIMEOUT = 600  # seconds for that interpreter's run
BENCH_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual budget, "
              "and a small village by the river prepares for the spring festival. ")
SPARSITY_LEVELS = [0.1, 0.5, 0.9]  # bench --compare's sparse rows
REPETITIONS = 5  # bench's timed runs (-r), as llama-bench's
ROUNDS = 3  # --compare's and --hybrid's rows: each one's best of this many runs (-r), the rows taking turns


def sparsity_levels(text: str) -> list[float]:
    """An argparse type: comma-separated shares of FFN neurons skipped, each in (0, 1)."""
    try:
        levels = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.1,0.5,0.9, got {text!r}") from None
    if not all(0 < v < 1 for v in levels):
        raise argparse.ArgumentTypeError(f"each level must be in (0, 1), got {text}")
    return levels


def prompt_ids(model, n: int) -> list[int]:
    ids = model.tokenize(BENCH_TEXT, special=False, add_bos=False)
    return (ids * (n // len(ids) + 1))[:n]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_bandwidth(mib: int = 256) -> float:
    """Read bandwidth in GB/s: a parallel sum over an array far larger than the caches."""
    from numba import njit, prange

    from engine.kernels import CACHED  # where the kernels' cache goes (nowhere, where none can be written)

    @njit(parallel=True, cache=CACHED, fastmath=True)
    def total(a):  # vectorized: a scalar add chain would time the adder (~5 GB/s a core), not the memory
        s = np.float32(0.0)
        for i in prange(a.size):
            s += a[i]
        return s

    a = np.ones(mib * 2**20 // 4, np.float32)
    total(a)
    best = min(_timed(lambda: total(a)) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


class RandomActive:
    """A sparse-decode speed fixture: per layer, a fresh random active set of (1 - sparsity) * n_ff neurons each
    token, cycling through 16 precomputed sets so that no set stays in cache."""

    def __init__(self, n_layer: int, n_ff: int, sparsity: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        k = int(round((1 - sparsity) * n_ff))
        self.sets = [[np.sort(rng.choice(n_ff, k, replace=False)).astype(np.int32) for _ in range(16)]
                     for _ in range(n_layer)]
        self.t = 0

    def __call__(self, layer: int, x, xn):
        if layer == 0:
            self.t += 1
        return self.sets[layer][self.t % 16]


def decode_speed(model, ids: list[int], n: int) -> dict:
    """The stats of one timed run after the warm-up (repeated_speed's)."""
    return repeated_speed(model, ids, n, 1)[0]


def spread(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as llama-bench's avg_ts and stddev_ts."""
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def repeated_speed(model, ids: list[int], n: int, reps: int) -> tuple[dict, dict]:
    """A warm-up, then reps runs of n >= 2 tokens: the last run's stats, and the runs' prefill and decode tok/s
    (mean, sd, samples), llama-bench's -r."""
    model.generate(ids, 4, ignore_stop=True)  # warm-up: the same prefill path (steps or torch), then decode
    runs = [model.generate(ids, n, ignore_stop=True).stats for _ in range(reps)]
    speeds = {}
    for key in ("prefill_tok_s", "decode_tok_s"):
        xs = [r[key] for r in runs]
        speeds[key] = dict(zip(("mean", "sd"), spread(xs)), samples=xs)
    return runs[-1], speeds


def ffn_ms_per_token(net, select, reps: int = 10) -> float:
    """Time of the FFN kernels alone for one token over all layers (the best of reps)."""
    rng = np.random.default_rng(0)
    xn = rng.standard_normal(net.c.n_embd).astype(np.float32)
    out = np.zeros(net.c.n_embd, np.float32)

    def one():
        for i, L in enumerate(net.layers):
            net.ffn(L, xn, out, select(i, None, xn) if select else None)

    one()
    return min(_timed(one) for _ in range(reps)) * 1e3


def llamacpp_decode(path: str, threads: int, ids: list[int], n: int) -> dict | None:
    """llama.cpp's prefill and greedy decode speed: run by the interpreter named in $HOTCOLD_LLAMACPP_PYTHON (a
    separate environment that has llama-cpp-python, see the README), else by llama-cpp-python imported here; None
    when neither is there."""
    from engine.config import HotcoldError  # here, not above: the child runs this file alone, without the engine
    python = os.environ.get(LLAMACPP_PYTHON)
    if not python:
        try:
            return llamacpp_here(path, threads, ids, n)
        except (ValueError, RuntimeError) as e:
            raise HotcoldError(f"{path}: llama.cpp could not run it ({e})") from None
    what = f"${LLAMACPP_PYTHON}={python}: llama.cpp run"
    env = {k: v for k, v in os.environ.items() if k != LLAMACPP_PYTHON}  # the child measures, never hands on
    try:
        res = subprocess.run([python, os.path.abspath(__file__), path, str(threads), str(n)] + [str(i) for i in ids],
                             capture_output=True, text=True, timeout=LLAMACPP_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        raise HotcoldError(f"{what} timed out after {LLAMACPP_TIMEOUT} s") from None
    except OSError as e:
        raise HotcoldError(f"{what} failed ({e.strerror}: {python})") from None
    if res.returncode != 0:
        how = (f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0 else
               f"exit code {res.returncode}")
        last = (res.stderr.strip().splitlines() or [""])[-1]
        raise HotcoldError(f"{what} failed ({how}) {last}".rstrip())
    try:
        out = json.loads((res.stdout.strip().splitlines() or [""])[-1])  # the result is the last line
    except ValueError:
        out = ""
    if out is None:
        raise HotcoldError(f"{what}: that interpreter has no llama-cpp-python")
    if not isinstance(out, dict) or "decode_tok_s" not in out:
        raise HotcoldError(f"{what} printed no result")
    return out


def llamacpp_reads(path: str) -> bool:
    """Whether llama.cpp can open the model: a GGUF file, not a Hugging Face directory nor PowerInfer's (PWRI)."""
    from engine.loader import file_magic
    return os.path.isfile(path) and file_magic(path) == b"GGUF"


def llamacpp_here(path: str, threads: int, ids: list[int], n: int) -> dict | None:
    """llamacpp_decode in this process (None without llama-cpp-python). Greedy tokens by an argmax over the
    logits, as our decode takes them: llama-cpp-python's `sample` spent 0.5-0.6 ms a token in Python here."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + n + 8, n_threads=threads, verbose=False)
    n_vocab = llm.n_vocab()
    t = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(ids) / (t1 - t), "decode_tok_s": n / (t2 - t1)}


def time_to_first_token(args, n_ctx: int) -> float:
    """Seconds from starting a new `hotcold generate -n 1` process (JIT cache warm: this run compiled) to its exit:
    imports, loading, prefill and the first token."""
    from tools.cli import adapters

    def given(key: str) -> str:  # the child runs in the checkout: files named relative to the user's folder made whole
        v = str(getattr(args, key))
        return os.path.abspath(v) if key in ("model", "sparsity", "predictors", "split") and os.path.exists(v) else v

    cmd = [sys.executable, "-m", "tools.cli", "generate", "-p", "Hello", "-n", "1", "--temperature", "0", "-c",
           str(n_ctx)]
    cmd += (["-m", given("model")] if args.model else []) + ["-t", str(args.threads)]
    cmd += ["--no-predictors"] if args.no_predictors else []
    for f, scale in adapters(args):
        cmd += ["--lora-scaled", os.path.abspath(f), repr(scale)]
    for key in ("backend", "cache_type", "sparsity", "predictors", "split", "gpu_budget", "hot_device",
                "predictor_type"):  # the model as this bench runs it (no --audit-recall: it only slows the step)
        if getattr(args, key, None) is not None:
            cmd += ["--" + key.replace("_", "-"), given(key)]
    from engine.config import HotcoldError
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where tools.cli is importable
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise HotcoldError("time to first token: `hotcold generate -n 1` failed: "
                           + (res.stderr.strip().splitlines() or ["(no output)"])[-1])
    return time.perf_counter() - t


def bench_model(args, n_ctx: int):
    """load_model for a context of n_ctx tokens (--prompt-tokens + -n and more); past the model's training context
    the refusal names those flags, which set it."""
    from engine.api import ContextTooLong
    from engine.config import HotcoldError
    from tools.cli import load_model
    try:
        return load_model(args, n_ctx=n_ctx)
    except ContextTooLong as e:
        raise HotcoldError(f"{e} (bench's context: --prompt-tokens {args.prompt_tokens} + -n {args.n})") from None


def run_bench(args) -> dict:
    from tools.cli import adapters
    import engine.cpu  # noqa: F401  (numba and torch imported before the baseline: loading a model with predictors
    import torch  # noqa: F401           or a sparsity config imports torch, and its libraries are not the model's)
    import numba
    numba.njit(lambda: 0)()  # numba's compiler (50 MB) started before the baseline too: a sparsity config's load
    rss0 = rss_bytes()  # runs a kernel, and the model's memory would count it
    t0 = time.perf_counter()
    model = bench_model(args, args.prompt_tokens + args.n)  # what generate takes for n tokens after the prompt
    load_s = time.perf_counter() - t0
    model_rss = rss_bytes() - rss0
    ids = prompt_ids(model, args.prompt_tokens)
    rt = model.runtime
    audit = None if rt is None else rt.audit
    if audit is not None:  # the speed is timed without the audit's extra pass; an audited run gives its statistics
        rt.audit = None
    try:
        stats, speeds = repeated_speed(model, ids, args.n, args.repetitions or REPETITIONS)
    finally:
        if audit is not None:
            rt.audit = audit
    run_rss = rss_bytes() - rss0  # + the kernels' machine code (loaded on the first step), the prefill's buffers
    if audit is not None:
        audited = model.generate(ids, args.n, ignore_stop=True).stats
    bpt = model.decode_bytes_per_token()
    skipped = stats.get("predicted_sparsity", stats.get("sparsity"))  # the FFN share the decode steps skipped
    if skipped and model.backend == "kernels":  # what they read: active rows, and the predictors' own weights
        rt = model.runtime
        bpt = (model.net.decode_bytes_per_token(skipped, all_rows=rt is None)
               + (sum(m.nbytes for m in rt.fc1 + rt.fc2t) if rt else 0))
    path = model.ckpt.path
    res = {"model": path, "backend": model.backend, "threads": args.threads,
           "kv_cache": model.cache_type, "lora": [{"path": f, "scale": s} for f, s in adapters(args)],
           "prompt_tokens": len(ids),
           "decode_tokens": stats["generated_tokens"], "repetitions": args.repetitions or REPETITIONS,
           "prefill_tok_s": speeds["prefill_tok_s"]["mean"], "prefill_tok_s_sd": speeds["prefill_tok_s"]["sd"],
           "decode_tok_s": speeds["decode_tok_s"]["mean"], "decode_tok_s_sd": speeds["decode_tok_s"]["sd"],
           "samples": {k: v["samples"] for k, v in speeds.items()}, "bytes_per_token": bpt,
           "decode_gb_s": bpt * speeds["decode_tok_s"]["mean"] / 1e9, "load_s": load_s,
           "model_rss_bytes": model_rss, "run_rss_bytes": run_rss,
           "ttft_s": time_to_first_token(args, min(64, model.config.n_ctx_train)),
           "file_bytes": os.path.getsize(path) if os.path.isfile(path) else None}
    if model.sparsity is not None:  # the measured share of FFN neurons the sparsity config skipped
        res["sparsity"] = stats["sparsity"]
    if rt is not None:  # the predictors' statistics over the decoded tokens (audited: recall too), as generate's
        from engine.config import AUDIT_KEYS
        keys = ("tokens", "predicted_sparsity", "gpu_share", "hot_device") + AUDIT_KEYS + ("per_layer",)
        ps = audited if audit is not None else stats
        res["predictors"] = {k: ps[k] for k in keys if k in ps}
    if args.compare:
        res["compare"] = compare(model, args, ids, args.repetitions or ROUNDS)
    return res


def compare(model, args, ids: list[int], rounds: int = ROUNDS) -> dict:
    """Rows of decode tok/s: dense, sparse at each level (random active sets), llama.cpp; bandwidth share.
    Each row's decode speed and FFN time (llama.cpp's too) are the best of `rounds` runs, the rows taking turns,
    so that a slow spell of a shared machine does not land on one row."""
    model.install_runtime(None)  # the rows time the kernels' own FFN: predictors or a sparsity config would choose
    model.set_sparsity(None)  # the neurons instead
    net = model.net
    bw = memory_bandwidth()
    levels = [0.0] + list(args.sparsity_levels)
    selects = [RandomActive(net.c.n_layer, net.c.n_ff, s) if s > 0 else None for s in levels]
    speed, ffn_ms, ref = [0.0] * len(levels), [float("inf")] * len(levels), None
    path = model.ckpt.path
    gguf = llamacpp_reads(path)
    for _ in range(rounds):
        # llama.cpp first: an interpreter in $HOTCOLD_LLAMACPP_PYTHON that cannot run it fails before our rows run
        r = llamacpp_decode(path, args.threads, ids, args.n) if gguf else None
        if r is not None and (ref is None or r["decode_tok_s"] > ref["decode_tok_s"]):
            ref = r
        for k, select in enumerate(selects):
            net.select = select
            speed[k] = max(speed[k], decode_speed(model, ids, args.n)["decode_tok_s"])
            ffn_ms[k] = min(ffn_ms[k], ffn_ms_per_token(net, select))
        net.select = None
    rows = []
    for s, tok_s, ms in zip(levels, speed, ffn_ms):
        bpt = net.decode_bytes_per_token(s)
        rows.append({"engine": "hotcold dense" if s == 0 else f"hotcold sparse {s:.0%}", "sparsity": s,
                     "decode_tok_s": tok_s, "bytes_per_token": bpt, "bandwidth_share": bpt * tok_s / 1e9 / bw,
                     "ffn_ms_per_token": ms})
    if ref is not None:
        rows.append({"engine": "llama.cpp dense", "sparsity": 0.0, "decode_tok_s": ref["decode_tok_s"],
                     "bytes_per_token": os.path.getsize(path), "bandwidth_share":
                         os.path.getsize(path) * ref["decode_tok_s"] / 1e9 / bw, "ffn_ms_per_token": None})
        for r in rows:
            r["vs_llamacpp"] = r["decode_tok_s"] / ref["decode_tok_s"]
    skipped = None if ref is not None else ("the model is not a llama.cpp GGUF file" if not gguf else
                                             "llama-cpp-python is not installed (pip install 'hotcold[bench]', or "
                                             f"make llamacpp and {LLAMACPP_PYTHON}=.venv-llamacpp/bin/python)")
    return {"bandwidth_gb_s": bw, "rows": rows, "llamacpp": ref is not None, "llamacpp_skipped": skipped,
            "rounds": rounds}


def format_bench(r: dict) -> str:
    runs = r["repetitions"]
    pm = f" ({runs} runs: mean ± sd)" if runs > 1 else ""
    lines = [f"model: {r['model']}  backend: {r['backend']}  threads: {r['threads']}  KV cache: {r['kv_cache']}",
             f"prefill: {r['prompt_tokens']} tokens at {r['prefill_tok_s']:.1f}"
             + (f" ± {r['prefill_tok_s_sd']:.1f}" if runs > 1 else "") + f" tok/s{pm}",
             f"decode:  {r['decode_tokens']} tokens at {r['decode_tok_s']:.1f}"
             + (f" ± {r['decode_tok_s_sd']:.1f}" if runs > 1 else "") + " tok/s, "
             f"{r['bytes_per_token'] / 1e6:.1f} MB of weights read per token ({r['decode_gb_s']:.1f} GB/s)"
             + (f", FFN sparsity {r['sparsity']:.1%}" if r.get("sparsity") is not None else ""),
             f"load: {r['load_s']:.2f} s, resident memory of the model: {r['model_rss_bytes'] / 1e6:.1f} MB"
             + (f" (GGUF file {r['file_bytes'] / 1e6:.1f} MB, {r['model_rss_bytes'] / r['file_bytes']:.2f}x)"
                if r.get("file_bytes") else "") + f"; {r['run_rss_bytes'] / 1e6:.1f} MB after decoding (with the "
             "kernels' machine code and the prefill's buffers)",
             f"time to first token of a new process (JIT cache warm): {r['ttft_s']:.2f} s"]
    if r.get("predictors"):  # null rates when no token went through a decode step (-n 1 after a batched prompt)
        p = r["predictors"]
        hot = p.get("hot_device")  # none: all on the CPU kernels, no GPU share to give
        where = f" (the hot part on {hot})" if hot else " (all on the CPU kernels)"
        rates = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in p.items()
                          if isinstance(v, float) and (hot or k != "gpu_share"))
        lines.append("predictors: " + (rates + where if rates else "no decode step, no statistics"))
    cmp = r.get("compare")
    if cmp:
        lines.append(f"\nmemory read bandwidth (measured now): {cmp['bandwidth_gb_s']:.1f} GB/s")
        if cmp["llamacpp_skipped"]:
            lines.append(f"llama.cpp: {cmp['llamacpp_skipped']}; skipped")
        lines.append(f"{'engine':<22}{'tok/s':>8}{'vs llama.cpp':>14}{'MB/token':>10}{'of bandwidth':>14}"
                     f"{'FFN ms/token':>14}")
        for row in cmp["rows"]:
            vs = f"{row['vs_llamacpp']:.2f}x" if "vs_llamacpp" in row else "n/a"
            ffn = f"{row['ffn_ms_per_token']:.2f}" if row["ffn_ms_per_token"] is not None else "-"
            lines.append(f"{row['engine']:<22}{row['decode_tok_s']:>8.1f}{vs:>14}{row['bytes_per_token'] / 1e6:>10.1f}"
                         f"{row['bandwidth_share']:>14.0%}{ffn:>14}")
        lines.append("sparse rows use random active sets (a speed fixture: no quality claim); tok/s and FFN ms: "
                     f"best of {cmp['rounds']} interleaved runs")
    return "\n".join(lines)


def cmd_bench(args) -> None:
    from engine.config import HotcoldError
    from tools.cli import emit_json
    if (args.hybrid or args.compare) and args.backend != "kernels":
        raise HotcoldError(f"--backend {args.backend}: bench {'--hybrid' if args.hybrid else '--compare'} times the "
                           "kernels")
    if args.hybrid and args.compare:
        raise HotcoldError("--compare: bench --hybrid measures rows of its own; run bench --compare apart")
    if args.sparsity_levels is not None and not args.compare:
        raise HotcoldError("--sparsity-levels: the sparsities of --compare's rows; it goes with --compare")
    args.sparsity_levels = args.sparsity_levels or SPARSITY_LEVELS
    if args.hybrid:
        return __import__("tools.bench_hybrid").bench_hybrid.main_hybrid(args)
    res = run_bench(args)
    if args.json:
        emit_json(res)
    else:
        print(format_bench(res))


def add_command(sub) -> None:
    from tools.cli import add_model_args, add_runtime_args, at_least
    p = sub.add_parser("bench", help="prefill and decode speed")
    add_model_args(p, ctx=False)  # the context is what the run needs
    p.add_argument("-n", type=at_least(2), default=128,
                   help="tokens to generate, the first from the prefill (default 128)")
    p.add_argument("--prompt-tokens", type=at_least(1), default=128, help="prefill length (default 128)")
    p.add_argument("-r", "--repetitions", type=at_least(1), default=None,
                   help=f"timed runs after a warm-up: prefill and decode tok/s as their mean ± standard deviation, as "
                   f"llama-bench's -r (default {REPETITIONS}); --compare and --hybrid: each row's best of this many "
                   f"runs, the rows taking turns (default {ROUNDS})")
    p.add_argument("--compare", action="store_true",
                   help="dense and sparse decode next to llama.cpp (if llama-cpp-python is installed)")
    p.add_argument("--sparsity-levels", type=sparsity_levels, default=None,
                   help=f"FFN sparsities for --compare's sparse rows (default {','.join(map(str, SPARSITY_LEVELS))})")
    p.add_argument("--hybrid", action="store_true", help="the predictor runtime: speed against sparsity on a "
                   "FATReLU speed fixture, --predictors if given, and tok/s against the GPU budget with CUDA")
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    add_runtime_args(p)
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":  # the llama.cpp row in another interpreter: bench.py GGUF THREADS N IDS...
    print(json.dumps(llamacpp_here(sys.argv[1], int(sys.argv[2]), [int(i) for i in sys.argv[4:]], int(sys.argv[3]))))
