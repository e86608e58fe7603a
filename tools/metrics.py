"""The server's GET /metrics (`hotcold server --metrics`): llama-server's Prometheus metrics, in its names, so that a
dashboard made for llama-server reads hotcold's, and the FFN sparsity of the decode steps beside them.
"""
from __future__ import annotations

import contextlib
import threading

# name -> (type, help), in the order llama-server writes them
METRICS = {
    "llamacpp:prompt_tokens_total": ("counter", "Number of prompt tokens processed."),
    "llamacpp:prompt_seconds_total": ("counter", "Prompt process time"),
    "llamacpp:tokens_predicted_total": ("counter", "Number of generation tokens processed."),
    "llamacpp:tokens_predicted_seconds_total": ("counter", "Predict process time"),
    "llamacpp:n_decode_total": ("counter", "Total number of llama_decode() calls"),
    "llamacpp:prompt_tokens_seconds": ("gauge", "Average prompt throughput in tokens/s."),
    "llamacpp:predicted_tokens_seconds": ("gauge", "Average generation throughput in tokens/s."),
    "llamacpp:kv_cache_usage_ratio": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "llamacpp:kv_cache_tokens": ("gauge", "KV-cache tokens."),
    "llamacpp:requests_processing": ("gauge", "Number of requests processing."),
    "llamacpp:requests_deferred": ("gauge", "Number of requests deferred."),
    "hotcold:ffn_sparsity": ("gauge", "Share of FFN neurons the decode steps of the last reply with any skipped "
                             "(predictors or a sparsity config; 0 dense)."),
}


class Metrics:
    """Totals since the server started; the throughput gauges over the replies since the last scrape (0 with none),
    as llama-server resets its bucket at each one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.total = dict.fromkeys(("prompt_tokens", "prompt_s", "predicted", "predicted_s", "decodes"), 0.0)
        self.bucket = dict.fromkeys(("prompt_tokens", "prompt_s", "predicted", "predicted_s"), 0.0)
        self.sparsity = 0.0
        self.waiting = 0  # requests waiting for the model: the deferred ones

    @contextlib.contextmanager
    def turn(self, model_lock: threading.Lock):
        """model_lock held around a request's turn, the request counted as deferred while it waits for it."""
        with self.lock:
            self.waiting += 1
        try:
            model_lock.acquire()
        finally:
            with self.lock:
                self.waiting -= 1
        try:
            yield
        finally:
            model_lock.release()

    def record(self, stats: dict) -> None:
        """One reply's generate stats."""
        computed = stats["prompt_tokens"] - stats["cached_tokens"]
        steps = max(stats["generated_tokens"] - 1, 0)  # forward passes after the prefill
        with self.lock:
            for d in (self.total, self.bucket):
                d["prompt_tokens"] += computed
                d["prompt_s"] += stats["prefill_s"]
            self.total["predicted"] += stats["generated_tokens"]
            self.total["predicted_s"] += stats["decode_s"]
            self.total["decodes"] += (computed > 0) + steps
            self.bucket["predicted"] += stats["generated_tokens"]
            self.bucket["predicted_s"] += stats["decode_s"]
            measured = [stats[k] for k in ("predicted_sparsity", "sparsity") if k in stats]  # none: a dense model
            if not measured or measured[0] is not None:  # null: no decode step to measure, the last value stays
                self.sparsity = measured[0] if measured else 0.0

    def scrape(self, kv_tokens: int, n_ctx: int, processing: bool) -> str:
        """The Prometheus text exposition of every metric; starts a new bucket."""
        with self.lock:
            t, b = self.total, self.bucket
            values = [t["prompt_tokens"], t["prompt_s"], t["predicted"], t["predicted_s"], t["decodes"],
                      b["prompt_tokens"] / b["prompt_s"] if b["prompt_s"] else 0.0,
                      b["predicted"] / b["predicted_s"] if b["predicted_s"] else 0.0,  # as llama-server's
                      kv_tokens / n_ctx, kv_tokens, int(processing), self.waiting, self.sparsity]
            self.bucket = dict.fromkeys(b, 0.0)
        lines = []
        for (name, (kind, text)), v in zip(METRICS.items(), values):
            v = int(v) if float(v).is_integer() else float(v)  # counts exact, times as Python writes floats
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {v}"]
        return "\n".join(lines) + "\n"
