"""Train one layer's predictor from samples: FFN inputs X (N, n_embd) and their true active masks Y (N, n_ff).

    split      a seeded validation split is held out (val_frac of the rows, at most max_val)
    scale      inputs are divided by their median rms for training, and the factor is folded into fc1 at the
               end: raw residuals (rms 25 and outliers of 600 in SmolLM2's late layers) otherwise make the
               logits so large that training stalls; a constant folds exactly, a per-token 1/rms would not
    start      the whitened SVD of `init` (model.Predictor.from_linear), or PyTorch's default initialisation
    loss       binary cross-entropy with pos_weight = inactive / active labels of the training split (Deja Vu):
               the rare active neurons weigh as much in total as the common inactive ones. Weighted by
               contribution (`WEIGHTINGS`), each active label weighs pos_weight x its neuron's |h_i| ||down_i|| over
               the mean of those (capped at WEIGHT_CAP): a miss costs what the neuron would have added to the output.
               On the fine-tuned ReLU SmolLM2 that took the predicted sparsity within +1% perplexity from 29% to 53%
    score      after every epoch (and before the first, so that a good SVD start is never lost) the logit
               threshold is tuned on the validation split to keep recall_target of the active neurons, and the
               score is the predicted sparsity it reaches there: at a fixed recall, the share of neurons skipped
    schedule   AdamW, one epoch of linear warmup (so that a good start is not thrown away), cosine decay
    stopping   the best-scoring weights are kept; `patience` epochs without improvement stop training
    shipping   the kept weights are rounded to what decoding reads (qtype: float16 values, or Q8_0 / Q4_1 blocks;
               `Predictor.round_to`) and the threshold is tuned once more on them
    rank       a fixed R, or "auto": the smallest rank of the ladder 32, 64, 128, ... (up to max_rank, by default
               the largest that keeps the predictor within 10% of a gated FFN's parameters) whose predicted
               sparsity reaches sparsity_goal x the actual sparsity at the recall target; when none does, the
               rank with the highest predicted sparsity

The array-level API knows nothing of files: the CLI reads the profile and feeds the arrays.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import HotcoldError

from .metrics import layer_metrics, predicted_sparsity, tune_threshold
from .model import Predictor

BUDGET = 0.10  # predictor parameters per layer / FFN parameters per layer
LADDER_START = 32
WEIGHTINGS = ("count", "contribution")  # how active labels weigh in the loss (see the module docstring)
WEIGHT_CAP = 20.0  # contribution weighting: an active label weighs at most this many mean active labels


def rank_cap(n_embd: int, n_ff: int, ffn_matrices: int = 3, budget: float = BUDGET) -> int:
    """The largest rank (a multiple of 8) whose predictor has at most `budget` x the FFN's parameters.

    ffn_matrices: 3 for a gated FFN (gate, up, down), 2 for a plain one."""
    r = int(budget * ffn_matrices * n_embd * n_ff // (n_embd + n_ff))
    r -= r % 8
    if r < 8:
        raise HotcoldError(f"a predictor budget of {budget:.0%} of the FFN parameters leaves no room for rank 8")
    return r


def rank_ladder(cap: int) -> list[int]:
    """32, 64, 128, ... below cap, then cap itself."""
    ladder, r = [], LADDER_START
    while r < cap:
        ladder.append(r)
        r *= 2
    return ladder + [cap]


def split_rows(n: int, val_frac: float, max_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, validation) row indices."""
    n_val = min(max_val, max(1, round(n * val_frac)))
    if n - n_val < 1:
        raise ValueError(f"{n} samples are too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def val_logits(pred: Predictor, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    pred.eval()
    return torch.cat([pred.logits(x[i:i + chunk]) for i in range(0, len(x), chunk)])  # (N_val, n_ff)


def fit(pred: Predictor, data: tuple, epochs: int, lr: float, batch_size: int, recall_target: float,
        patience: int, seed: int, bar_desc: str, progress: bool, c_tr: torch.Tensor | None = None) -> tuple[float, int]:
    """Train in place, keeping the weights of the best validation score. Returns (best score, epochs run).
    c_tr: (N_train, n_ff) contributions of the active neurons (0 elsewhere); given, each active label weighs by its
    contribution over their mean (capped at WEIGHT_CAP) instead of equally."""
    x_tr, y_tr, x_va, y_va = data
    pos = float(y_tr.sum())
    pos_weight = torch.tensor((y_tr.numel() - pos) / max(pos, 1.0), device=x_tr.device)
    if c_tr is not None:  # each active label's weight, once: pos_weight x its contribution over the mean, capped
        c_tr = pos_weight * (c_tr / c_tr[y_tr].mean().clamp(min=1e-30)).clamp(max=WEIGHT_CAP)
    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * -(-len(x_tr) // batch_size))
    warmup = max(1, steps // max(1, epochs))  # one epoch of linear warmup: a good SVD start is not thrown away
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator(device=x_tr.device).manual_seed(seed)

    def score() -> float:
        logits = val_logits(pred, x_va)  # (N_val, n_ff)
        return predicted_sparsity(logits, tune_threshold(logits, y_va, recall_target))

    best = score()
    best_state = {k: v.clone() for k, v in pred.state_dict().items()}
    stale, ran = 0, 0
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not progress or None, unit="ep")
    for _ in bar:
        pred.train()
        perm = torch.randperm(len(x_tr), generator=gen, device=x_tr.device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            logits = pred.logits(x_tr[idx])  # (B, n_ff)
            if c_tr is None:
                loss = F.binary_cross_entropy_with_logits(logits, y_tr[idx].float(), pos_weight=pos_weight)
            else:
                y = y_tr[idx]
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), weight=torch.where(y, c_tr[idx], 1.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        ran += 1
        s = score()
        if s > best:
            best, stale = s, 0
            best_state = {k: v.clone() for k, v in pred.state_dict().items()}
        else:
            stale += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", sparsity=f"{s:.3f}", best=f"{best:.3f}")
        if stale >= patience:
            break
    pred.load_state_dict(best_state)
    return best, ran


def new_predictor(n_embd: int, n_ff: int, rank: int, init, x_tr: torch.Tensor, seed: int) -> Predictor:
    """From the SVD of the linear map `init` (n_ff, n_embd), whitened by the training inputs, when given; else
    PyTorch's default initialisation, seeded."""
    if init is not None:
        return Predictor.from_linear(init, rank, x_tr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Predictor(n_embd, n_ff, rank)


def train_layer(X, Y, rank: int | str = "auto", epochs: int = 10, lr: float = 1e-2, device: str = "cpu",
                init=None, recall_target: float = 0.99, *, max_rank: int | None = None,
                sparsity_goal: float = 0.9, batch_size: int = 256, val_frac: float = 0.1, max_val: int = 8192,
                patience: int = 3, seed: int = 0, desc: str = "layer", qtype: str = "F16",
                progress: bool = True, C=None) -> tuple[Predictor, float, dict]:
    """Train one layer's predictor. Returns (predictor on the CPU, logit threshold, validation metrics).

    X: float (N, n_embd) FFN inputs (raw residual, before the FFN norm); Y: bool (N, n_ff) true active masks.
    C: None (every active label weighs the same), or float (N, n_ff) contributions of the active neurons, 0 elsewhere
    (contribution weighting, see the module docstring).
    init: None, or a linear map (n_ff, n_embd) to start from by SVD (`model.gate_map` for ReLU-family FFNs).
    rank: an int, or "auto" (see the module docstring); max_rank tops the auto ladder (default: `rank_cap` for a
    gated FFN; pass rank_cap(..., ffn_matrices=2) for a plain one). epochs 0 keeps the starting point and only
    tunes the threshold. qtype: the predictor type decoding reads (engine.config.PREDICTOR_TYPES). Metrics: recall,
    precision, predicted_sparsity, actual_sparsity (metrics.py), rank, threshold, epochs (of the kept rank), n_train,
    n_val, seconds (all ranks tried).
    """
    t0 = time.perf_counter()
    X = torch.as_tensor(np.asarray(X), dtype=torch.float32)  # (N, n_embd)
    Y = torch.as_tensor(np.asarray(Y), dtype=torch.bool)  # (N, n_ff)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)}: expected (N, n_embd) and (N, n_ff)")
    n_embd, n_ff = X.shape[1], Y.shape[1]
    if init is not None and tuple(np.shape(init)) != (n_ff, n_embd):
        raise ValueError(f"init map {tuple(np.shape(init))} is not ({n_ff}, {n_embd})")
    tr, va = split_rows(len(X), val_frac, max_val, seed)
    scale = float(X[tr].pow(2).mean(1).sqrt().median().clamp(min=1e-12))  # typical rms of this layer's input
    x_tr, x_va = X[tr] / scale, X[va] / scale  # trained on a unit-scale input, folded back below
    data = tuple(a.to(device) for a in (x_tr, Y[tr], x_va, Y[va]))
    c_tr = None if C is None else torch.as_tensor(np.asarray(C), dtype=torch.float32)[tr].to(device)
    actual = 1.0 - float(Y[va].float().mean())

    if rank == "auto":
        ranks = rank_ladder(max_rank or rank_cap(n_embd, n_ff))
    elif isinstance(rank, int) and rank >= 1:
        ranks = [rank]
    else:
        raise ValueError(f"rank must be a positive int or 'auto', got {rank!r}")

    best = None  # (score, predictor, epochs run)
    for r in ranks:
        pred = new_predictor(n_embd, n_ff, r, init, x_tr, seed).to(device)
        score, ran = fit(pred, data, epochs, lr, batch_size, recall_target, patience, seed,
                         f"{desc} r={r}", progress, c_tr)
        if best is None or score > best[0]:
            best = (score, pred, ran)
        if score >= sparsity_goal * actual:
            break  # the smallest rank that is good enough

    _, pred, ran = best
    pred = pred.cpu()
    with torch.no_grad():
        pred.fc1.weight /= scale  # logits(x) = trained logits(x / scale): the raw residual goes in, as in PowerInfer
    pred.round_to(qtype)
    logits = val_logits(pred, X[va])  # (N_val, n_ff)
    threshold = tune_threshold(logits, Y[va], recall_target)
    metrics = layer_metrics((logits >= threshold).numpy(), Y[va].numpy())
    metrics.update(rank=pred.rank, threshold=threshold, epochs=ran, n_train=len(tr), n_val=len(va),
                   seconds=time.perf_counter() - t0)
    return pred, threshold, metrics
