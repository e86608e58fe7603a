"""`hotcold bench --hybrid`: the predictor runtime's decode speed.

1. Speed against sparsity on the CPU. A speed fixture, not a model: the model's weights (SmolLM2's by default) with
   FATReLU thresholds set for 50/70/90% FFN sparsity, and predictors made without training (the whitened SVD of each
   layer's gate map, threshold tuned to recall 0.95 on the fixture's own activations). Its text means nothing, so it
   makes no quality claim; predicted and actual sparsity, recall and precision come from one more run of the timed
   tokens, audited.
2. With `--predictors` (a trained bundle for `-m`): that model with its predictors, beside its dense decode.
3. With CUDA: tokens/s against the GPU budget (0/25/50/100% of the FFN as float16 hot rows), next to CPU only
   and to the layer-offload baseline (whole dense layers on the GPU in the same VRAM, as llama.cpp's -ngl).
   Without CUDA those rows are skipped and the output says so.

Each speed is the best of ROUNDS runs (`bench -r N`: N), taken in turns with the configurations it is compared with.
The dense model as given, and CPU only in the GPU table, are compared with every row, take part in every group, and
keep their best over all of them (a best of more runs: if anything, a bias against the other rows).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from engine.config import AUDIT_KEYS
from tools.bench import ROUNDS  # each speed is the best of this many runs, the configurations taking turns

FIXTURE_SPARSITY = (0.5, 0.7, 0.9)
FIXTURE_RECALL = 0.95
SAMPLE_TOKENS = 256  # activations the fixture's thresholds and predictors are fitted on
GPU_FRACTIONS = (0.0, 0.25, 0.5, 1.0)


@torch.inference_mode()
def gate_samples(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer the FFN inputs x (T, n_embd) and gate pre-activations g (T, n_ff) of a dense batched run."""
    from engine.config import blk
    from engine.model import rms_norm
    from engine.sparsity import batched_net
    net, c = batched_net(model.net), model.config
    xs, gs = [None] * c.n_layer, [None] * c.n_layer

    def hook(i, x, h):
        xn = rms_norm(x, net.w[blk(i, "ffn_norm")], c.rms_eps)
        xs[i], gs[i] = x.clone(), net.mm(xn, blk(i, "ffn_gate"))
        return h

    with net.hooked(hook):
        net.forward(ids, 0)
    return xs, gs


def quantile(gs: list[torch.Tensor], q: float) -> float:
    """The q-quantile of the pooled gate pre-activations (a seeded subsample when there are very many)."""
    g = torch.cat([g.flatten() for g in gs])
    return float(torch.quantile(g[torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:2**24]], q))


def fatrelu_fixture(ckpt, ids: list[int], sparsity: float, gs, rounds: int = 2):
    """(checkpoint with FATReLU at the threshold that skips `sparsity` of the sampled neurons, its predictors).

    The threshold starts at the quantile of the dense model's gate pre-activations gs, then is re-measured on the
    fixture's own activations `rounds` times (thresholding changes the residual stream, so the quantile moves);
    the predictors are fitted on the last round's samples."""
    from engine.api import Model
    from predictors.bundle import Bundle, model_fingerprint
    from predictors.metrics import tune_threshold
    from predictors.model import Predictor
    from tools.predict import budget_rank, init_map
    t = quantile(gs, sparsity)
    for k in range(rounds + 1):
        fx = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, act="fatrelu", act_threshold=t))
        xs, gs = gate_samples(Model(fx, len(ids) + 1, backend="torch"), ids)
        if k < rounds:
            t = quantile(gs, sparsity)
    preds, thrs = [], []
    for i, (x, g) in enumerate(zip(xs, gs)):
        p = Predictor.from_linear(init_map(fx, i), budget_rank(ckpt, i), x).round_to_half()  # float16, as stored
        preds.append(p)
        with torch.no_grad():
            thrs.append(tune_threshold(p.logits(x), g > t, FIXTURE_RECALL))
    return fx, Bundle(preds, thrs, model_fingerprint(fx))


def audited(model, bundle, ids: list[int], qtype: str, n: int) -> dict:
    """Predicted sparsity, recall, precision and actual sparsity of the predictors decoding n tokens after ids (the
    timed runs' tokens: the same predictions, with the true active sets besides); the model is left dense."""
    model.set_predictors(bundle, audit=True, qtype=qtype)
    try:
        stats = model.generate(ids, n, ignore_stop=True).stats
        return {k: stats[k] for k in ("predicted_sparsity",) + AUDIT_KEYS}
    finally:
        Setup(model).apply()


def run_hybrid(args) -> dict:
    from engine.api import Model
    from engine.config import HotcoldError
    from engine.loader import load_checkpoint
    from tools.bench import bench_model, prompt_ids
    from tools.cli import runtime_flags_given
    given = runtime_flags_given(args, ("--split", "--gpu-budget", "--audit-recall", "--hot-device", "--sparsity",
                                       "--no-predictors"))
    if given:
        raise HotcoldError(f"{given[0]}: bench --hybrid chooses its own GPU shares and audits every row; drop it")
    n_ctx = args.prompt_tokens + args.n
    ckpt = load_checkpoint(args.model)
    room = max(n_ctx, min(SAMPLE_TOKENS + 8, ckpt.config.n_ctx_train))  # for the fixture's samples too
    base = bench_model(argparse_copy(args, model=ckpt, predictors=None, predictor_type=None, no_predictors=True),
                       room)  # dense, also when the file carries predictors
    ids = prompt_ids(base, args.prompt_tokens)
    qt, rounds = args.predictor_type, args.repetitions or ROUNDS
    res = {"model": base.ckpt.path, "threads": args.threads, "kv_cache": base.cache_type,
           "predictor_type": qt or "F16", "decode_tokens": args.n, "rounds": rounds, "dense_tok_s": None,
           "fixture": [], "given": None, "gpu": None}
    # every speed is timed in turns with the configurations it is compared with (best_speeds); the dense model as
    # given takes part in each group and keeps its best over all of them
    dense, speed = {"dense": Setup(base)}, {}
    if args.predictors is not None:
        from tools.split import hot_neurons
        given, _, _ = hot_neurons(base, args.predictors, None, None, "auto", n_ctx)
        rt = Setup.predictors(base, given, qtype=qt)
        st = best_speeds({**dense, "given": Setup(base, runtime=rt)}, ids, args.n, speed, rounds)["given"]
        res["given"] = {"bundle": args.predictors, "predictor_type": rt.qtype, "decode_tok_s": st["decode_tok_s"],
                        **audited(base, given, ids, qt, args.n)}
    if base.config.act == "silu" and base.config.ffn_gated:
        sample = prompt_ids(base, min(SAMPLE_TOKENS, base.n_ctx - 8))
        _, gs = gate_samples(base, sample)
        for s in FIXTURE_SPARSITY:  # one fixture model at a time: each holds a copy of the weights
            fx, bundle = fatrelu_fixture(base.ckpt, sample, s, gs)
            model = Model(fx, n_ctx, cache_type=res["kv_cache"])
            runs = {**dense, (s, "dense"): Setup(model),
                    (s, "predictors"): Setup(model, runtime=Setup.predictors(model, bundle, qtype=qt))}
            best_speeds(runs, ids, args.n, speed, rounds)
            if torch.cuda.is_available() and s == max(FIXTURE_SPARSITY):
                res["gpu"] = gpu_rows(runs, s, bundle, gs, qt, ids, args.n, speed, rounds)
            pred = speed[s, "predictors"]
            res["fixture"].append({"target_sparsity": s, "threshold": fx.config.act_threshold,
                                   "dense_tok_s": speed[s, "dense"]["decode_tok_s"],
                                   "predictor_tok_s": pred["decode_tok_s"],
                                   **audited(model, bundle, ids, qt, args.n)})
            del model, runs
    if "dense" not in speed:  # nothing to compare with
        best_speeds(dense, ids, args.n, speed, rounds)
    res["dense_tok_s"] = speed["dense"]["decode_tok_s"]
    for row in res["fixture"]:
        row["vs_dense"] = row["predictor_tok_s"] / res["dense_tok_s"]
    return res


class Setup:
    """One configuration to time: `model` decoding on its own kernels with `runtime` (None: dense, the prompt too),
    or through `device_net` (a LayerOffload around those kernels). Configurations share models; `apply` installs
    this one (what Model.set_predictors installs, or its absence)."""

    def __init__(self, model, runtime=None, device_net=None):
        self.model, self.net, self.runtime, self.device_net = model, model.net, runtime, device_net

    @staticmethod
    def predictors(model, bundle, hot=None, device=None, qtype=None):
        """The Runtime that set_predictors makes (the model is left dense: Setup.apply installs it when timed)."""
        model.set_predictors(bundle, hot, device, qtype=qtype)
        rt = model.runtime
        Setup(model).apply()
        return rt

    def apply(self, dense: bool = False) -> None:
        """Install this configuration; with dense, the model's plain dense decode on its own kernels."""
        m = self.model
        m.net = self.net
        m.install_runtime(None if dense else self.runtime)
        if self.device_net is not None and not dense:
            m.net = self.device_net


def best_speeds(runs: dict, ids: list[int], n: int, best: dict | None = None, rounds: int = ROUNDS) -> dict:
    """best (updated, or a new dict): key -> the decode stats of the fastest run of each Setup in runs, over its runs
    in best before and `rounds` more here, the setups taking turns, so that a slow spell of a
    shared host does not land on one row (as `bench --compare`). The models are left dense."""
    from tools.bench import decode_speed
    best = {} if best is None else best
    try:
        for _ in range(rounds):
            for key, setup in runs.items():
                setup.apply()
                st = decode_speed(setup.model, ids, n)
                if key not in best or st["decode_tok_s"] > best[key]["decode_tok_s"]:
                    best[key] = st
    finally:
        for setup in runs.values():
            setup.apply(dense=True)
    return best


def gpu_rows(runs: dict, s: float, bundle, gs, qtype: str | None, ids: list[int], n: int, speed: dict,
             rounds: int = ROUNDS) -> list[dict]:
    """The GPU table for the fixture at sparsity s, whose (s, "dense") and (s, "predictors") Setups in runs are timed
    in speed already. Per GPU_FRACTIONS share f of the FFN: the hot neurons (the most frequently active on the samples)
    on CUDA, and as many whole dense float16 layers on CUDA as fit in the same VRAM (layer offload), timed in turns with
    CPU only (the predictors, no GPU). One share's VRAM at a time: each share's parts are freed before the next's."""
    import gc
    from engine.hybrid import LayerOffload
    from tools.split import plan
    cpu, dense = runs[s, "predictors"], runs[s, "dense"]
    model = cpu.model
    t = model.config.act_threshold
    counts = [(g > t).sum(0).numpy() for g in gs]  # (n_ff,) per layer
    per_layer = 2 * sum(m.rows * m.cols for name, m in cpu.net.mats.items() if name.startswith("blk.0."))
    rows = []
    for f in [f for f in GPU_FRACTIONS if f > 0]:
        hot = [np.asarray(h, np.int32) for h in plan(model.config, counts, hot_fraction=f)["gpu_neurons"]]
        rt = Setup.predictors(model, bundle, hot, "cuda", qtype)
        vram = rt.hot.nbytes() if rt.hot else 0
        k = int(min(model.config.n_layer, vram // per_layer))
        off = Setup(model, device_net=LayerOffload(cpu.net, k, "cuda")) if k else dense
        best_speeds({(s, "predictors"): cpu, ("hybrid", f): Setup(model, runtime=rt), ("offload", f): off},
                    ids, n, speed, rounds)
        rows.append({"ffn_fraction": f, "vram_bytes": vram, "decode_tok_s": speed["hybrid", f]["decode_tok_s"],
                     "gpu_share": speed["hybrid", f]["gpu_share"],
                     "hot_layer_us": hot_layer_us(rt.hot) if rt.hot else None,
                     "offload_layers": k, "offload_tok_s": speed["offload", f]["decode_tok_s"]})
        del rt, off
        gc.collect()  # the hot part's and the offloaded layers' device memory (graphs and views hold cycles)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    cpu_only = speed[s, "predictors"]  # the best over all the turns above
    rows.insert(0, {"ffn_fraction": 0.0, "vram_bytes": 0, "decode_tok_s": cpu_only["decode_tok_s"],
                    "gpu_share": 0.0, "hot_layer_us": None, "offload_layers": 0,
                    "offload_tok_s": speed[s, "dense"]["decode_tok_s"]})
    for r in rows:
        r["vs_cpu_only"] = r["decode_tok_s"] / cpu_only["decode_tok_s"]
        r["vs_offload"] = r["decode_tok_s"] / r["offload_tok_s"]
    return rows


def hot_layer_us(hot, rounds: int = 20) -> float:
    """Microseconds a layer's hot part takes from launch to collect (input sent, FFN on the hot rows, result back):
    what a decode step waits on per layer beside the CPU's cold part."""
    xn, out = np.ones(hot.c.n_embd, np.float32), np.zeros(hot.c.n_embd, np.float32)

    def all_layers():
        for i in range(len(hot.ids)):
            hot.launch(i, xn)
            hot.collect(out)

    all_layers()  # any layer not captured yet is captured here
    t = time.perf_counter()
    for _ in range(rounds):
        all_layers()
    return (time.perf_counter() - t) / (rounds * len(hot.ids)) * 1e6


def argparse_copy(args, **kw):
    import argparse
    return argparse.Namespace(**{**vars(args), **kw})


def format_hybrid(r: dict) -> str:
    lines = [f"model: {r['model']}  threads: {r['threads']}  KV cache: {r['kv_cache']}  "
             f"decode: {r['decode_tokens']} tokens (best of {r['rounds']} runs, taking turns)"
             + (f"  fixture predictor weights: {r['predictor_type']}" if r["fixture"] else ""),
             f"dense decode (the model as given): {r['dense_tok_s']:.1f} tok/s"]
    if r["given"]:
        g = r["given"]
        lines.append(f"with predictors {g['bundle']} ({g['predictor_type']}): {g['decode_tok_s']:.1f} tok/s "
                     f"({g['decode_tok_s'] / r['dense_tok_s']:.2f}x dense), predicted sparsity "
                     f"{g['predicted_sparsity']:.3f}, actual {g['actual_sparsity']:.3f}, recall {g['recall']:.3f}, "
                     f"precision {g['precision']:.3f}")
    if r["fixture"]:
        lines += ["", "CPU speed against sparsity: speed fixture (the model's weights, FATReLU "
                  "thresholds; untrained SVD predictors; no quality claim)",
                  f"{'target':>7}{'threshold':>10}{'dense tok/s':>12}{'pred. tok/s':>12}{'vs dense':>9}"
                  f"{'pred.sp':>8}{'act.sp':>8}{'recall':>8}{'prec.':>7}"]
        for x in r["fixture"]:
            lines.append(f"{x['target_sparsity']:>7.0%}{x['threshold']:>10.3f}{x['dense_tok_s']:>12.1f}"
                         f"{x['predictor_tok_s']:>12.1f}{x['vs_dense']:>8.2f}x{x['predicted_sparsity']:>8.3f}"
                         f"{x['actual_sparsity']:>8.3f}{x['recall']:>8.3f}{x['precision']:>7.3f}")
        lines.append("vs dense: against the dense decode of the model as given")
    if r["gpu"] is None:
        lines += ["", "GPU budget rows: no CUDA device here, skipped"]
    else:
        lines += ["", f"hybrid on CUDA, {max(FIXTURE_SPARSITY):.0%} fixture: hot neurons = the most active, by budget",
                  f"{'FFN on GPU':>11}{'VRAM MB':>9}{'tok/s':>8}{'GPU share':>10}{'vs CPU only':>12}"
                  f"{'hot us/layer':>13}{'offload layers':>15}{'offload tok/s':>14}{'vs offload':>11}"]
        for x in r["gpu"]:
            us = "-" if x["hot_layer_us"] is None else f"{x['hot_layer_us']:.0f}"
            lines.append(f"{x['ffn_fraction']:>11.0%}{x['vram_bytes'] / 1e6:>9.1f}{x['decode_tok_s']:>8.1f}"
                         f"{x['gpu_share']:>10.1%}{x['vs_cpu_only']:>11.2f}x{us:>13}{x['offload_layers']:>15}"
                         f"{x['offload_tok_s']:>14.1f}{x['vs_offload']:>10.2f}x")
        lines += ["hot us/layer: one layer's hot part from launch to collect (x there, hot rows, y back)",
                  "offload: whole float16 layers on the GPU in the same VRAM (llama.cpp -ngl), dense"]
    return "\n".join(lines)


def main_hybrid(args) -> None:
    from tools.cli import emit_json
    res = run_hybrid(args)
    if args.json:
        emit_json(res)
    else:
        print(format_hybrid(res), file=sys.stdout)
