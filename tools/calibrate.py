"""`hotcold calibrate`: per-layer thresholds on the FFN contribution score, for a target sparsity or for a
perplexity bound on held-out text (the "PPL-p% sparsity" of the Sparsing Law).

1. Statistics: a dense pass over the first --tokens tokens of the corpus keeps a seeded sample of tokens' hidden
   activations h per layer. Their contribution scores |h_i| * ||down[:, i]||, sorted, turn a sparsity level into
   a threshold (its quantile); the CETT curve of a layer is, at each level of LEVELS, the mean over tokens of
   ||sum of the skipped neurons' outputs|| / ||FFN output||.
2. A method turns one number, the mean level m over layers, into per-layer levels:
   quantile  every layer at m (CATS-style quantiles, of the contribution score);
   cett      one CETT value c for all layers, each layer at the level where its CETT curve reaches c, and c set
             by binary search so that the mean level is m;
   greedy    TEAL style: starting dense, repeatedly raise by one grid step the level of whichever layer costs
             least. A layer's cost is the KL divergence from the dense model when that layer alone is sparsified
             (measured at COST_LEVELS on one window, with exact activations), shaped in between by CETT^2.
   On SmolLM2 (calibrated on tiny-shakespeare, wikitext-2 chunks 0-7) quantile measured best, so it is the
   default: greedy was level with it up to 40% sparsity and worse above (+4.8% against +3.0% perplexity at 53%
   sparsity), cett far worse (+3.5% against +1.7% at 39%).
3. --target-sparsity S takes m = S. --ppl-increase P binary-searches the largest m whose perplexity on held-out
   text (the last --heldout-tokens tokens of the corpus, never seen in 1) is at most (1 + P/100) times dense,
   and whose mean KL divergence from the dense model there is at most log(1 + P/100) (see `calibrate`).

With --predictors BUNDLE --ppl-increase P, the same bound is met by predictors instead (`calibrate_predictors`):
every layer's logit threshold moves by one shared offset, binary-searched, with the held-out text scored through
the predictor runtime as decoding runs it; the result is a bundle with those thresholds ("predictor-driven
PPL-P% sparsity", its predicted sparsity).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from engine.api import perplexity_of
from engine.config import HotcoldError
from engine.files import check_replaceable, check_writable, exists_error, read_json, write_json
from engine.sparsity import SparsityConfig, batched_net, contribution, down_norms, down_rows
from tools.profile import corpus_tokens, sample_positions

METHODS = ("quantile", "cett", "greedy")
MAX_LEVEL = 0.95
LEVELS = np.round(np.arange(0.0, MAX_LEVEL + 1e-9, 0.025), 4)  # (39,) the grid of per-layer sparsity levels
CETT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # CETT curves are measured here
COST_LEVELS = (0.5, 0.8)  # greedy: each layer's KL is measured alone at these levels
COST_TOKENS = 256  # over the first this many calibration tokens
KEEP_TOKENS = 1024  # tokens whose h is kept per layer for the score quantiles
CETT_TOKENS = 128  # of which this many give CETT values
SEARCH_TOL = 0.01  # binary search on the mean level stops at this width
TOP_K = 128  # dense log-probabilities kept per held-out position for the KL bound


@dataclass
class Stats:
    net: object  # the model's batched TorchModel, for the down projections
    scores: list[torch.Tensor]  # per layer: sorted contribution scores of the kept tokens, (KEEP * n_ff,)
    h: torch.Tensor  # (n_layer, CETT_TOKENS, n_ff) float16: hidden activations of some kept tokens
    norms: torch.Tensor  # (n_layer, n_ff): ||down[:, i]||
    cett: np.ndarray | None = None  # (n_layer, len(LEVELS)): CETT curves, non-decreasing (cett, greedy)
    cost: np.ndarray | None = None  # (n_layer, len(LEVELS)): greedy's KL cost of each layer alone

    def threshold(self, i: int, level: float) -> float:
        """Layer i's threshold at this quantile of its scores (level 0: the exact rule h != 0)."""
        sc = self.scores[i]
        return 0.0 if level <= 0 else float(sc[min(int(round(level * (len(sc) - 1))), len(sc) - 1)])

    def thresholds(self, levels) -> list[float]:
        return [self.threshold(i, s) for i, s in enumerate(levels)]

    def layer_cett(self, i: int, levels) -> list[float]:
        """Mean over tokens of ||sum of skipped neurons' outputs|| / ||FFN output|| at each level."""
        h, d = self.h[i].float(), down_rows(self.net, i)  # (T, n_ff), (n_ff, n_embd)
        sc = contribution(h, self.norms[i])
        full = (h @ d).norm(dim=1).clamp(min=1e-30)  # (T,)
        return [float((((h * (sc <= self.threshold(i, s))) @ d).norm(dim=1) / full).mean()) for s in levels]

    def cett_of(self, levels) -> float:
        """Mean over layers of the CETT at these per-layer levels."""
        return float(np.mean([self.layer_cett(i, [s])[0] for i, s in enumerate(levels)]))

    def measure_cett_curves(self) -> None:
        curves = [np.interp(LEVELS, CETT_GRID, self.layer_cett(i, CETT_GRID)) for i in range(len(self.scores))]
        self.cett = np.maximum.accumulate(np.stack(curves), axis=1)


# --- statistics -------------------------------------------------------------------------------------------
@torch.inference_mode()
def collect(model, tokens: list[int], ctx: int, seed: int) -> Stats:
    """Dense pass over `tokens` in windows of ctx, keeping a seeded sample of tokens' h in every layer."""
    c, net = model.config, batched_net(model.net)
    n_windows = len(tokens) // ctx
    pos = torch.from_numpy(sample_positions(n_windows * ctx, KEEP_TOKENS, seed))
    H = torch.zeros(c.n_layer, len(pos), c.n_ff, dtype=torch.float16)  # kept hidden activations
    model.set_sparsity(None)
    for w in bar(n_windows, "statistics", "window"):
        sel = (pos >= w * ctx) & (pos < (w + 1) * ctx)
        rows = pos[sel] - w * ctx

        def hook(i: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # h (T, n_ff)
            H[i, sel] = h[rows].half()
            return h

        with net.hooked(hook):
            net.forward(tokens[w * ctx:(w + 1) * ctx], 0)
    norms = down_norms(net)  # (n_layer, n_ff)
    scores = [contribution(H[i].float(), norms[i]).flatten().sort().values for i in range(c.n_layer)]
    sub = torch.from_numpy(np.random.default_rng(seed).permutation(len(pos))[:CETT_TOKENS])
    return Stats(net, scores, H[:, sub].clone(), norms)


@torch.inference_mode()
def measure_costs(model, stats: Stats, window: list[int]) -> None:
    """Greedy's costs: KL(dense || one layer sparsified) at COST_LEVELS, with exact (unquantized) activations
    so that a tiny change does not flip 8-bit roundings downstream; in between, KL ~ alpha * CETT^2."""
    c, net = model.config, batched_net(model.net)
    x8, net.x8 = net.x8, {}
    try:
        model.set_sparsity(None)
        dense = torch.log_softmax(net.forward(window, 0, all_logits=True).double(), -1)  # (T, n_vocab)
        alpha = np.zeros((c.n_layer, len(COST_LEVELS)))
        for i in bar(c.n_layer, "greedy costs", "layer"):
            for j, s in enumerate(COST_LEVELS):
                levels = np.zeros(c.n_layer)
                levels[i] = s
                model.set_sparsity(SparsityConfig(stats.thresholds(levels), model.fingerprint))
                sparse = torch.log_softmax(net.forward(window, 0, all_logits=True).double(), -1)
                kl = float((dense.exp() * (dense - sparse)).sum(-1).mean())
                alpha[i, j] = max(kl, 0.0) / max(np.interp(s, LEVELS, stats.cett[i]) ** 2, 1e-12)
    finally:
        net.x8 = x8
        model.set_sparsity(None)
    stats.cost = np.stack([np.interp(LEVELS, COST_LEVELS, alpha[i]) * stats.cett[i] ** 2
                           for i in range(c.n_layer)])


# --- methods: mean level m -> per-layer levels -------------------------------------------------------------
def cett_levels(stats: Stats, c: float) -> np.ndarray:
    """Each layer's level where its CETT curve reaches c."""
    ramp = LEVELS * 1e-9  # strictly increasing for np.interp where a curve is flat
    return np.array([np.interp(c, cv + ramp, LEVELS) for cv in stats.cett]).clip(0, MAX_LEVEL)


def greedy_path(stats: Stats) -> list[np.ndarray]:
    """Level vectors from dense upwards, each one grid step above the last in its cheapest layer."""
    idx = np.zeros(len(stats.cost), dtype=int)
    top = int(np.searchsorted(LEVELS, MAX_LEVEL))
    path = [LEVELS[idx]]
    while (idx < top).any():
        step = np.where(idx < top, stats.cost[np.arange(len(idx)), np.minimum(idx + 1, top)] -
                        stats.cost[np.arange(len(idx)), idx], np.inf)
        idx[int(np.argmin(step))] += 1
        path.append(LEVELS[idx])
    return path


def method_levels(stats: Stats, method: str, m: float, path: list[np.ndarray] | None) -> np.ndarray:
    n = len(stats.scores)
    if method == "quantile":
        return np.full(n, m)
    if method == "greedy":
        return path[min(int(round(m * (len(path) - 1) / MAX_LEVEL)), len(path) - 1)]
    lo, hi = 0.0, 1.0  # cett: the CETT value whose levels average m
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cett_levels(stats, mid).mean() < m else (lo, mid)
    return cett_levels(stats, lo)


# --- search -----------------------------------------------------------------------------------------------
def bar(n: int, desc: str = "held-out chunks", unit: str = "chunk"):
    """range(n) with a progress bar on a terminal (an evaluation of held-out text, the statistics pass and greedy's
    costs take tens of seconds each), cleared when done so that the next log line follows."""
    from tqdm import tqdm
    return tqdm(range(n), desc=desc, unit=unit, leave=False, disable=None, file=sys.stderr)


@dataclass
class Heldout:
    """Held-out text scored as `perplexity` scores it (second half of each ctx chunk, from its own prefix),
    plus the dense model's top-TOP_K log-probabilities there, for the KL divergence of a sparse model."""
    tokens: list[int]
    ctx: int
    dense: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per chunk: (values, ids), each (ctx/2-1, K)

    @torch.inference_mode()
    def score(self, model, cfg: SparsityConfig | None, steps: bool | None = None) -> dict:
        """{"ppl", "kl", "sparsity"} of the model under cfg, or through its predictor runtime where one is installed
        (its predicted sparsity); None without a runtime: dense, which records the reference. steps as in
        `Model.scored_logits` (default: decode steps with predictors; without, the prefix batched, then the scored
        positions)."""
        model.set_sparsity(cfg)
        model.reset_counts()
        nll, kl, n = 0.0, 0.0, 0
        top = []
        try:
            for k, logp, chunk_nll in model.chunk_logprobs(self.tokens, self.ctx, bar(len(self.tokens) // self.ctx),
                                                           steps):  # logp (S, n_vocab)
                nll, n = nll + chunk_nll, n + len(logp)
                if self.dense is None:
                    top.append(logp.topk(min(TOP_K, logp.shape[1]), dim=-1))
                else:
                    kl += float(top_kl(*self.dense[k], logp).sum())
            sparsity = model.measured_sparsity() or 0.0
        finally:
            model.set_sparsity(None)
        if self.dense is None:
            self.dense = top
        return {"ppl": perplexity_of(nll, n), "kl": kl / n, "sparsity": sparsity}


def top_kl(p_log: torch.Tensor, ids: torch.Tensor, q_log_all: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over p's top tokens plus one bucket for the rest (a lower bound, tight when
    the top holds most of p). p_log, ids (S, K); q_log_all (S, n_vocab) -> (S,)."""
    q_log = q_log_all.gather(1, ids)
    p, q = p_log.exp(), q_log.exp()
    p_rest, q_rest = (1 - p.sum(1)).clamp(min=1e-12), (1 - q.sum(1)).clamp(min=1e-12)
    return (p * (p_log - q_log)).sum(1) + p_rest * (p_rest.log() - q_rest.log())


def bound_report(r: dict, dense: float) -> str:
    return (f"ppl {r['ppl']:.4f} ({100 * (r['ppl'] / dense - 1):+.2f}%), "
            f"KL {r['kl']:.5f} ({100 * math.expm1(min(r['kl'], 700)):+.2f}%)")


class Journal:
    """The evaluations of a search, kept in a file beside its output (OUT.progress.json) so that an interrupted
    calibrate resumes: the binary search is deterministic, so the same command, given the results it already had,
    visits the same points and computes only the ones it lacks. `key` is what the results depend on; a file with
    another key is started over. path None: nothing is kept."""

    def __init__(self, path: str | None, key: dict, log):
        self.path, self.key, self.results = path, key, {}
        if path is not None and os.path.exists(path):
            try:
                data = read_json(path, "calibrate progress file")
            except HotcoldError as e:  # unreadable: started over, and replaced at the first result
                log(f"{e}: started over")
                data = {"key": key}
            old = data.get("key") if isinstance(data.get("key"), dict) else {}
            if old != key:
                log(f"{path}: saved by a search with other settings "
                    f"({', '.join(k for k in sorted(set(key) | set(old)) if old.get(k) != key.get(k))}): started over")
            saved = data.get("results") if old == key else None
            self.results = {k: r for k, r in saved.items() if result_ok(r)} if isinstance(saved, dict) else {}
            if isinstance(saved, dict) and len(self.results) < len(saved):
                log(f"{path}: saved evaluations unreadable: {len(saved) - len(self.results)}; computed again")
        if self.results:
            log(f"resuming: {len(self.results)} evaluations saved in {path}")

    def __call__(self, x: float, compute) -> tuple[dict, bool]:
        """(compute(x), or the saved result for x; whether it was saved)."""
        k = repr(float(x))
        if k in self.results:
            return self.results[k], True
        self.results[k] = r = compute(x)
        if self.path is not None:
            write_json(self.path, {"key": self.key, "results": self.results})
        return r, False


def result_ok(r) -> bool:
    """Whether a journal's saved result holds the numbers an evaluation gives."""
    return isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                       for k in ("ppl", "kl", "sparsity"))


def digest(obj) -> str:
    """A short sha256 of obj's JSON (token lists, manifests): what a journal key holds in place of the data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def largest_within(evaluate, lo: float, hi: float, tol: float, dense: float, limit: float):
    """Binary search for the largest x in [lo, hi] whose evaluate(x) keeps perplexity, and exp(mean KL from dense),
    within `limit` times dense (both taken to grow with x). Returns (x, its result), or (None, None)."""
    best, res = None, None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        r = evaluate(mid)
        if r["ppl"] <= dense * limit and r["kl"] <= math.log(limit):
            lo, best, res = mid, mid, r
        else:
            hi = mid
    return best, res


def calibrate(model, tokens: list[int], heldout: list[int], ctx: int, method: str,
              target_sparsity: float | None = None, ppl_increase: float | None = None, seed: int = 0,
              log=None, progress: str | None = None) -> tuple[SparsityConfig, dict]:
    """Thresholds by `method` for a target mean sparsity, or for held-out perplexity at most ppl_increase
    percent above dense. The bound also holds for exp(mean KL from the dense model) - 1: calibration text
    that the model finds easy (tiny-shakespeare: +0.35% at 40% sparsity where wikitext-2 rises 1.7%) would
    otherwise admit thresholds that cost far more on other text; the KL is the perplexity rise to expect on
    text the model predicts well. progress: the `Journal` file (None: none kept)."""
    log = log or (lambda msg: None)
    log(f"statistics over {len(tokens) // ctx * ctx} tokens")
    stats = collect(model, tokens, ctx, seed)
    path = None
    if method != "quantile":
        stats.measure_cett_curves()
    if method == "greedy":
        log(f"greedy: per-layer costs over {min(COST_TOKENS, ctx)} tokens, {len(COST_LEVELS)} levels a layer")
        measure_costs(model, stats, tokens[:min(COST_TOKENS, ctx)])
        path = greedy_path(stats)
    held = Heldout(heldout, ctx)
    dense = finite_dense(held.score(model, None)["ppl"])
    log(f"held-out perplexity, dense: {dense:.4f}")
    journal = Journal(progress, {"model": model.fingerprint, "tokens": digest(tokens), "heldout": digest(heldout),
                                 "ctx": ctx, "method": method, "seed": seed, "dense": dense}, log)

    def evaluate(m: float) -> dict:
        r, saved = journal(m, lambda m: held.score(
            model, SparsityConfig(stats.thresholds(method_levels(stats, method, m, path)),
                                  model.fingerprint)))
        log(f"mean level {m:.3f}: sparsity {r['sparsity']:.3f}, {bound_report(r, dense)}{' (saved)' if saved else ''}")
        return r

    if target_sparsity is not None:
        m, res = target_sparsity, evaluate(target_sparsity)
    else:
        m, res = largest_within(evaluate, 0.0, MAX_LEVEL, SEARCH_TOL, dense, 1 + ppl_increase / 100)
        if m is None:  # not even the smallest level: dense
            m, res = 0.0, {"ppl": dense, "kl": 0.0, "sparsity": 0.0}
    levels = method_levels(stats, method, m, path)
    cett = stats.cett_of(levels)
    summary = {"sparsity": res["sparsity"], "ppl_dense": dense, "ppl_sparse": res["ppl"], "cett": cett,
               "kl": res["kl"], "method": method}
    target = {"sparsity": target_sparsity} if target_sparsity is not None else {"ppl_increase": ppl_increase}
    cfg = SparsityConfig(stats.thresholds(levels), model.fingerprint, method, cett, [float(s) for s in levels],
                         {"target": target, "tokens": len(tokens), "heldout_tokens": len(heldout), "ctx": ctx,
                          "seed": seed, **{k: summary[k] for k in ("sparsity", "ppl_dense", "ppl_sparse", "kl")}})
    return cfg, summary


OFFSET_RANGE = (-8.0, 8.0)  # predictor logit offsets searched (log-odds: from nearly all active to nearly none)
OFFSET_TOL = 0.05


def calibrate_predictors(model, bundle, heldout: list[int], ctx: int, ppl_increase: float, log=None,
                         progress: str | None = None):
    """The bundle with every layer's threshold moved by the largest offset (fewest predicted neurons) at which
    held-out perplexity through the predictor runtime is at most ppl_increase percent above dense, and exp(mean
    KL from dense) - 1 as well (see `calibrate`); progress as there. Returns (bundle, summary)."""
    from dataclasses import replace
    log = log or (lambda msg: None)
    held = Heldout(heldout, ctx)
    # the reference through the same decode steps, so that the bound measures the predictors and not the kernels'
    # rounding (activations to 8 bits, as ggml does): SmolLM2's held-out perplexity is 25.063 batched, 25.123 so
    dense = finite_dense(held.score(model, None, steps=True)["ppl"])
    log(f"held-out perplexity, dense (decode steps): {dense:.4f}")
    model.set_predictors(bundle)
    base = list(bundle.thresholds)
    journal = Journal(progress, {"model": model.fingerprint, "heldout": digest(heldout), "ctx": ctx, "dense": dense,
                                 "bundle": digest({"thresholds": base, "training": bundle.training}),
                                 "predictor_type": model.runtime.qtype}, log)

    def score(offset: float) -> dict:
        model.runtime.set_thresholds([t + offset for t in base])
        return held.score(model, None)  # through the runtime, decode steps, against the dense reference

    def evaluate(offset: float) -> dict:
        r, saved = journal(offset, score)
        log(f"offset {offset:+.3f}: predicted sparsity {r['sparsity']:.3f}, {bound_report(r, dense)}"
            f"{' (saved)' if saved else ''}")
        return r

    best, res = largest_within(evaluate, *OFFSET_RANGE, OFFSET_TOL, dense, 1 + ppl_increase / 100)
    if best is None:
        raise HotcoldError(f"no threshold offset down to {OFFSET_RANGE[0]} keeps held-out perplexity within "
                           f"{ppl_increase}% of dense with these predictors")
    summary = {"predicted_sparsity": res["sparsity"], "ppl_dense": dense, "ppl_sparse": res["ppl"], "kl": res["kl"],
               "offset": best}
    tuned = {"ppl_increase": ppl_increase, "heldout_tokens": len(heldout), "ctx": ctx, **summary}
    out = replace(bundle, thresholds=[t + best for t in base], training={**bundle.training, "ppl_tuned": tuned},
                  path=None)
    return out, summary


# --- command line -----------------------------------------------------------------------------------------
def split_corpus(model, files: list[str], n_stats: int, n_heldout: int, ctx: int) -> tuple[list[int], list[int]]:
    """Statistics from the start of the corpus, held-out text from its end; they never overlap. n_stats 0: held-out
    text alone (calibrate --predictors)."""
    if 0 < n_stats < ctx or n_heldout < ctx:
        both = "--tokens and --heldout-tokens must each" if n_stats else "--heldout-tokens must"
        raise HotcoldError(f"{both} hold one window of --ctx {ctx}")
    tokens = corpus_tokens(model, files, None, ctx)
    if len(tokens) < n_stats + n_heldout:
        stats = f"--tokens {n_stats} plus " if n_stats else ""
        raise HotcoldError(f"{', '.join(files)}: {len(tokens)} tokens, fewer than {stats}--heldout-tokens {n_heldout}")
    return tokens[:n_stats], tokens[len(tokens) - n_heldout:]


def finite_dense(ppl: float) -> float:
    """The dense perplexity a bound is relative to: refused when it is past a float (no bound means anything)."""
    if not math.isfinite(ppl):
        raise HotcoldError("the dense model's perplexity on the held-out text is past a float: its logits are far out "
                           "of range, so no perplexity bound can be calibrated")
    return ppl


def progress_path(out: str) -> str:
    """Where calibrate keeps its evaluations until -o is written (`Journal`): beside it."""
    return os.path.normpath(out) + ".progress.json"


def drop_progress(out: str) -> None:
    """-o is written: its evaluations are no longer needed."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(progress_path(out))


def cmd_calibrate(args) -> None:
    from tools.cli import emit_json, load_model
    if args.target_sparsity is not None and not 0 <= args.target_sparsity <= MAX_LEVEL:
        raise HotcoldError(f"--target-sparsity must be between 0 and {MAX_LEVEL}")
    if args.ppl_increase is not None and not 0 < args.ppl_increase < math.inf:  # NaN too
        raise HotcoldError("--ppl-increase must be a positive percentage")
    if args.bundle is not None and args.ppl_increase is None:
        raise HotcoldError("--predictors takes --ppl-increase (the thresholds are tuned to a perplexity bound)")
    if args.bundle is not None and args.method is not None:
        raise HotcoldError(f"--method {args.method}: with --predictors, calibrate tunes one offset on the bundle's "
                           "thresholds; the methods set a sparsity config's")
    if args.bundle is None and args.force:
        raise HotcoldError("--force: overwrites a bundle at -o (--predictors); a sparsity config is replaced anyway")
    if args.bundle is None and os.path.isdir(args.out):  # refused before the long part, not at its end
        raise HotcoldError(f"{args.out}: is a directory (the sparsity config is a JSON file)")
    if args.bundle is not None:
        from predictors.bundle import check_bundle_out
        check_bundle_out(args.out)
    else:
        check_replaceable(args.out, "a sparsity config", lambda p: "thresholds" in read_json(p, "sparsity config"))
    check_writable(args.out)
    check_writable(progress_path(args.out))  # beside it: the parent of a bundle directory
    method = args.method or "quantile"
    model = load_model(args, n_ctx=args.ctx)
    n_stats = 0 if args.bundle is not None else args.tokens  # predictors are tuned on held-out text alone
    tokens, heldout = split_corpus(model, args.files, n_stats, args.heldout_tokens, args.ctx)

    def log(msg: str) -> None:
        print(f"calibrate: {msg}", file=sys.stderr, flush=True)

    if args.bundle is not None:
        return calibrate_bundle(args, model, heldout, log)

    cfg, summary = calibrate(model, tokens, heldout, args.ctx, method, args.target_sparsity, args.ppl_increase,
                             args.seed, log, progress_path(args.out))
    cfg.calibration["corpus"] = args.files
    cfg.save(args.out)
    drop_progress(args.out)
    if args.json:
        emit_json(summary)
    else:
        print(f"{args.out}: {method}, sparsity {summary['sparsity']:.3f} on held-out text, perplexity "
              f"{summary['ppl_dense']:.4f} -> {summary['ppl_sparse']:.4f} "
              f"({100 * (summary['ppl_sparse'] / summary['ppl_dense'] - 1):+.2f}%), CETT {summary['cett']:.3f}")


def calibrate_bundle(args, model, heldout: list[int], log) -> None:
    """calibrate --predictors: thresholds of a bundle for a perplexity bound, written as a new bundle."""
    from predictors.bundle import MANIFEST, load_bundle, model_fingerprint
    from tools.cli import emit_json
    if os.path.exists(os.path.join(args.out, MANIFEST)) and not args.force:
        raise exists_error(args.out, "a bundle is already there", progress_path(args.out))
    bundle = load_bundle(args.bundle, model_fingerprint(model.ckpt))
    tuned, summary = calibrate_predictors(model, bundle, heldout, args.ctx, args.ppl_increase, log,
                                          progress_path(args.out))
    tuned.save(args.out)
    drop_progress(args.out)
    if args.json:
        emit_json(summary)
    else:
        print(f"{args.out}: predicted sparsity {summary['predicted_sparsity']:.3f} on held-out text, perplexity "
              f"{summary['ppl_dense']:.4f} -> {summary['ppl_sparse']:.4f} "
              f"({100 * (summary['ppl_sparse'] / summary['ppl_dense'] - 1):+.2f}%), threshold offset "
              f"{summary['offset']:+.3f}")


def add_command(sub) -> None:
    from tools.cli import add_model_args, at_least, between, number
    p = sub.add_parser("calibrate", help="sparsity thresholds for a target sparsity or a perplexity bound")
    add_model_args(p, ctx=False)
    p.add_argument("-f", "--file", dest="files", nargs="+", required=True, metavar="CORPUS",
                   help="calibration corpus (not the evaluation text): text files or .jsonl with a text field")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-sparsity", type=between(0, MAX_LEVEL), default=None, metavar="S",
                      help="mean sparsity over layers, 0..0.95")
    goal.add_argument("--ppl-increase", type=number(0, above=True), default=None, metavar="P",
                      help="percent by which held-out perplexity may rise (PPL-p%% sparsity)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="quantile (default: measured best on SmolLM2), cett or greedy")
    p.add_argument("--tokens", type=at_least(1), default=4096, metavar="N",
                   help="tokens for the score statistics (default 4096)")
    p.add_argument("--heldout-tokens", type=at_least(1), default=4096, metavar="N",
                   help="tokens at the corpus end for the perplexity bound (default 4096)")
    p.add_argument("--ctx", type=at_least(4), default=512,
                   help="window size in tokens (default 512); held-out chunks score their second half")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the statistics' token sample (default 0)")
    p.add_argument("--predictors", dest="bundle", default=None, metavar="BUNDLE",
                   help="tune this predictor bundle's thresholds to --ppl-increase instead; -o is then a bundle")
    p.add_argument("--force", action="store_true", help="overwrite the bundle at -o (--predictors)")
    p.add_argument("-o", "--out", required=True, metavar="CONFIG", help="sparsity config to write (JSON), or "
                   "with --predictors the tuned bundle (a directory)")
    p.add_argument("--json", action="store_true", help='print {"sparsity", "ppl_dense", "ppl_sparse", "kl", "cett", '
                   '"method"} (with --predictors: {"predicted_sparsity", "ppl_dense", "ppl_sparse", "kl", "offset"})')
    p.set_defaults(func=cmd_calibrate)

