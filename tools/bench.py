"""`hotcold bench`: prefill and decode speed, and the weight bytes each decoded token reads."""
from __future__ import annotations

import time

BENCH_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual budget, "
              "and a small village by the river prepares for the spring festival. ")


def prompt_ids(model, n: int) -> list[int]:
    ids = model.tokenize(BENCH_TEXT, special=False, add_bos=False)
    return (ids * (n // len(ids) + 1))[:n]


def run_bench(args) -> dict:
    from tools.cli import load_model
    model = load_model(args, n_ctx=args.prompt_tokens + args.n + 1)
    ids = prompt_ids(model, args.prompt_tokens)
    model.generate(ids[:8], 4, ignore_stop=True)  # warm-up (JIT, allocator)
    t = time.perf_counter()
    out = model.generate(ids, args.n, ignore_stop=True)
    wall = time.perf_counter() - t
    bpt = model.decode_bytes_per_token()
    s = out.stats
    return {"model": model.ckpt.path, "threads": args.threads, "prompt_tokens": len(ids),
            "decode_tokens": s["generated_tokens"], "prefill_tok_s": s["prefill_tok_s"],
            "decode_tok_s": s["decode_tok_s"], "bytes_per_token": bpt,
            "decode_gb_s": bpt * s["decode_tok_s"] / 1e9, "wall_s": wall}


def format_bench(r: dict) -> str:
    return (f"model: {r['model']}  threads: {r['threads']}\n"
            f"prefill: {r['prompt_tokens']} tokens at {r['prefill_tok_s']:.1f} tok/s\n"
            f"decode:  {r['decode_tokens']} tokens at {r['decode_tok_s']:.1f} tok/s, "
            f"{r['bytes_per_token'] / 1e6:.1f} MB of weights read per token ({r['decode_gb_s']:.1f} GB/s)")
