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
    memory     the samples stay as profiled: float16 inputs, active masks bit-packed (`Masks`), and each batch is
               made from them (the same values as from float32 and bool copies); contributions are kept for the
               active labels of the training split only, in its order (`active_values`). At n_embd 4096, n_ff 11008
               that is 9.6 KB per sample, plus 4 bytes per active label with contribution weighting; the SVD start
               makes the training inputs float64 for their second moment (32 KB per sample for a moment), as always

The array-level API knows nothing of files: the CLI reads the profile and feeds the arrays.
"""
from __future__ import annotations

import dataclasses
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
VAL_FRAC, MAX_VAL = 0.1, 8192  # the validation split: this share of a layer's samples, at most this many rows
MIN_SAMPLES = 1000  # fewer samples a layer: train-predictors says its validation metrics say little
CHUNK = 1024  # rows a time when a pass over the samples makes temporaries of (rows, n_ff) or (rows, n_embd)
BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # np.packbits' big bit order
POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)  # (256,) bits set


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


def held_out(n: int, val_frac: float = VAL_FRAC, max_val: int = MAX_VAL) -> int:
    """How many of n rows `split_rows` holds out to validate; none are left to train on when it is n."""
    return min(max_val, max(1, round(n * val_frac)))


def split_rows(n: int, val_frac: float, max_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, validation) row indices."""
    n_val = held_out(n, val_frac, max_val)
    if n - n_val < 1:
        raise ValueError(f"{n} samples are too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


# --- samples as stored -------------------------------------------------------------------------------------
def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """bool (B, n) from masks packed by np.packbits(axis=-1): uint8 (B, ceil(n / 8)), on any device."""
    return (bits.unsqueeze(-1) & BITS.to(bits.device)).ne(0).flatten(1)[:, :n].contiguous()  # (B, nb, 8) -> (B, n)


@dataclasses.dataclass(frozen=True)
class Masks:
    """Active masks of N samples bit-packed along the neurons, as profiles store them: 1 bit a label."""
    bits: torch.Tensor  # uint8 (N, ceil(n_ff / 8)), np.packbits(mask, axis=-1); a numpy array is taken as well
    n_ff: int

    def __post_init__(self):
        object.__setattr__(self, "bits", torch.as_tensor(self.bits))
        if self.bits.dtype != torch.uint8 or self.bits.ndim != 2 or self.bits.shape[1] != (self.n_ff + 7) // 8:
            raise ValueError(f"packed masks {self.bits.dtype} {tuple(self.bits.shape)}: expected uint8 "
                             f"(N, {(self.n_ff + 7) // 8}) for {self.n_ff} neurons")

    @staticmethod
    def pack(y) -> Masks:
        y = np.asarray(y, dtype=bool)  # (N, n_ff)
        if y.ndim != 2:
            raise ValueError(f"masks of shape {y.shape}: expected (N, n_ff)")
        return Masks(torch.from_numpy(np.packbits(y, axis=-1)), y.shape[1])

    def __len__(self) -> int:
        return len(self.bits)

    def rows(self, idx) -> torch.Tensor:
        """bool (len(idx), n_ff): the masks of rows idx (a tensor of indices, or a slice)."""
        return unpack_bits(self.bits[idx], self.n_ff)

    def counts(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 (len(idx),): the active labels of each of rows idx (popcounts of their bytes, padding bits out)."""
        bits, idx, out = self.bits.cpu().numpy(), np.asarray(idx), np.empty(len(idx), np.int64)
        pad = (1 << -self.n_ff % 8) - 1  # the low bits of the last byte past n_ff
        for a in range(0, len(idx), CHUNK):
            b = bits[idx[a:a + CHUNK]]  # (b, nb)
            out[a:a + CHUNK] = POPCOUNT[b].sum(1) - POPCOUNT[b[:, -1] & pad]
        return torch.from_numpy(out)


def spans(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The indices of the ranges [starts[k], starts[k] + lengths[k]) one after the other: int64 (lengths.sum(),)."""
    ends = lengths.cumsum(0)  # (K,)
    return torch.arange(int(ends[-1]) if len(ends) else 0, device=starts.device) + \
        torch.repeat_interleave(starts - (ends - lengths), lengths)


def active_values(blocks, masks: Masks, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 (P,): C[rows][Y[rows]] without the dense (N, n_ff) arrays: the values of the active labels of `rows`,
    row after row in that order, each row's by neuron; row k's start at offsets[k] (offsets (len(rows) + 1,)).

    blocks: C (N, n_ff) as consecutive blocks of rows (float (B, n_ff) each, all N rows in order)."""
    where = torch.full((len(masks),), -1, dtype=torch.int64)  # (N,) each row's place in `rows`, -1 if absent
    where[rows] = torch.arange(len(rows))
    out = torch.empty(int(offsets[-1]), dtype=torch.float32)
    n = 0
    for block in blocks:
        block = torch.as_tensor(np.asarray(block), dtype=torch.float32)  # (B, n_ff)
        if block.ndim != 2 or block.shape[1] != masks.n_ff or n + len(block) > len(masks):
            raise ValueError(f"contributions of rows {n}.. of shape {tuple(block.shape)}: expected (B, {masks.n_ff}) "
                             f"blocks of {len(masks)} rows in all")
        for a in range(0, len(block), CHUNK):
            c = block[a:a + CHUNK]  # (b, n_ff)
            k = where[n + a:n + a + len(c)]  # (b,)
            y = masks.rows(slice(n + a, n + a + len(c)))  # (b, n_ff)
            y[k < 0] = False
            k = k[k >= 0]
            out[spans(offsets[k], offsets[k + 1] - offsets[k])] = c[y]
        n += len(block)
    if n != len(masks):
        raise ValueError(f"contributions of {n} rows for {len(masks)} samples")
    return out


def row_blocks(a, chunk: int = CHUNK):
    """An array (N, ...) as consecutive blocks of rows."""
    return (a[i:i + chunk] for i in range(0, len(a), chunk))


def scaled(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """float32 inputs from stored ones (float16 as profiled, or float32), divided by scale when given."""
    x = x.float()
    return x if scale is None else x / scale


def input_scale(X: torch.Tensor, rows: torch.Tensor) -> float:
    """The median rms of the inputs of `rows`: the typical scale of this layer's input."""
    rms = torch.empty(len(rows))  # (N_rows,) filled in place: small results kept between big temporaries would
    for a in range(0, len(rows), CHUNK):  # fragment the heap (1.4 GB more at 90k samples of 4096)
        rms[a:a + CHUNK] = scaled(X[rows[a:a + CHUNK]], None).pow(2).mean(1).sqrt()
    return float(rms.median().clamp(min=1e-12))


class TrainSet:
    """The training split as stored, each batch made when asked: inputs over the layer's scale, masks unpacked,
    contribution weights (if any) scattered in. Weights and batches live on `device`; the samples on the CPU.

    Each active label's weight is pos_weight x its contribution over their mean, capped at WEIGHT_CAP."""

    def __init__(self, X: torch.Tensor, masks: Masks, rows: torch.Tensor, scale: float, device, C=None):
        self.X, self.masks, self.rows, self.scale, self.device = X, masks, rows, scale, torch.device(device)
        counts = masks.counts(rows)  # (N_train,) active labels a row
        pos = float(counts.sum())
        self.pos_weight = torch.tensor((len(rows) * masks.n_ff - pos) / max(pos, 1.0), device=self.device)
        self.offsets = self.weights = None
        if C is not None:
            offsets = F.pad(counts.cumsum(0), (1, 0))  # (N_train + 1,)
            w = active_values(C, masks, rows, offsets).to(self.device)  # (P,)
            w.div_(w.mean().clamp(min=1e-30)).clamp_(max=WEIGHT_CAP).mul_(self.pos_weight)
            self.offsets, self.weights = offsets.to(self.device), w

    def __len__(self) -> int:
        return len(self.rows)

    def inputs(self, dtype=torch.float32) -> torch.Tensor:
        """All training inputs over the scale, (N_train, n_embd) of dtype on the CPU (for the SVD start)."""
        out = torch.empty((len(self.rows), self.X.shape[1]), dtype=dtype)
        for a in range(0, len(self.rows), CHUNK):
            out[a:a + CHUNK] = scaled(self.X[self.rows[a:a + CHUNK]], self.scale)
        return out

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs (B, n_embd), masks bool (B, n_ff) and label weights (B, n_ff) (None unweighted) of the training
        rows idx (B,) (positions in the split, on the device)."""
        r = self.rows[idx.cpu()]  # (B,) sample rows
        x = scaled(self.X[r], self.scale).to(self.device)
        y = unpack_bits(self.masks.bits[r].to(self.device), self.masks.n_ff)
        if self.weights is None:
            return x, y, None
        w = torch.ones(y.shape, device=self.device)
        w[y] = self.weights[spans(self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx])]
        return x, y, w


@torch.no_grad()
def val_logits(pred: Predictor, x: torch.Tensor, scale: float | None = None, chunk: int = 4096) -> torch.Tensor:
    """Logits (N_val, n_ff) on the predictor's device of stored inputs x (N_val, n_embd) (over scale, if given)."""
    pred.eval()
    dev = pred.fc1.weight.device
    return torch.cat([pred.logits(scaled(x[i:i + chunk], scale).to(dev)) for i in range(0, len(x), chunk)])


def fit(pred: Predictor, data: tuple, epochs: int, lr: float, batch_size: int, recall_target: float,
        patience: int, seed: int, bar_desc: str, progress: bool) -> tuple[float, int]:
    """Train in place, keeping the weights of the best validation score. Returns (best score, epochs run).
    data: (TrainSet, validation inputs as stored (N_val, n_embd), their masks bool (N_val, n_ff) on the device)."""
    train, x_va, y_va = data
    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * -(-len(train) // batch_size))
    warmup = max(1, steps // max(1, epochs))  # one epoch of linear warmup: a good SVD start is not thrown away
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator(device=train.device).manual_seed(seed)

    def score() -> float:
        logits = val_logits(pred, x_va, train.scale)  # (N_val, n_ff)
        return predicted_sparsity(logits, tune_threshold(logits, y_va, recall_target))

    best = score()
    best_state = {k: v.clone() for k, v in pred.state_dict().items()}
    stale, ran = 0, 0
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not progress or None, unit="ep")
    for _ in bar:
        pred.train()
        perm = torch.randperm(len(train), generator=gen, device=train.device)
        for i in range(0, len(perm), batch_size):
            x, y, w = train.batch(perm[i:i + batch_size])  # (B, n_embd), (B, n_ff), (B, n_ff) or None
            logits = pred.logits(x)  # (B, n_ff)
            if w is None:
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=train.pos_weight)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), weight=w)
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


def new_predictor(n_embd: int, n_ff: int, rank: int, init, train: TrainSet, seed: int) -> Predictor:
    """From the SVD of the linear map `init` (n_ff, n_embd), whitened by the training inputs, when given; else
    PyTorch's default initialisation, seeded."""
    if init is not None:  # E[x x^T] from the inputs made float64 at once, as always; they go before the SVD
        x = train.inputs(torch.float64)  # (N_train, n_embd)
        moment = x.T @ x / len(x)  # (n_embd, n_embd)
        del x
        return Predictor.from_linear(init, rank, moment=moment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Predictor(n_embd, n_ff, rank)


def train_layer(X, Y, rank: int | str = "auto", epochs: int = 10, lr: float = 1e-2, device: str = "cpu",
                init=None, recall_target: float = 0.99, *, max_rank: int | None = None,
                sparsity_goal: float = 0.9, batch_size: int = 256, val_frac: float = VAL_FRAC, max_val: int = MAX_VAL,
                patience: int = 3, seed: int = 0, desc: str = "layer", qtype: str = "F16",
                progress: bool = True, C=None) -> tuple[Predictor, float, dict]:
    """Train one layer's predictor. Returns (predictor on the CPU, logit threshold, validation metrics).

    X: float (N, n_embd) FFN inputs (raw residual, before the FFN norm), float16 (as profiles store them) or float32
    are kept as given, other types made float32; Y: bool (N, n_ff) true active masks, or `Masks`.
    C: None (every active label weighs the same), or the contributions of the active neurons (contribution weighting,
    see the module docstring): float (N, n_ff), or an iterable of float (B, n_ff) blocks of consecutive rows, all N
    in order (only the values of the training split's active labels are kept).
    init: None, or a linear map (n_ff, n_embd) to start from by SVD (`model.gate_map` for ReLU-family FFNs).
    rank: an int, or "auto" (see the module docstring); max_rank tops the auto ladder (default: `rank_cap` for a
    gated FFN; pass rank_cap(..., ffn_matrices=2) for a plain one). epochs 0 keeps the starting point and only
    tunes the threshold. qtype: the predictor type decoding reads (engine.config.PREDICTOR_TYPES). Metrics: recall,
    precision, predicted_sparsity, actual_sparsity (metrics.py), rank, threshold, epochs (of the kept rank), n_train,
    n_val, seconds (all ranks tried).
    """
    t0 = time.perf_counter()
    X = torch.as_tensor(np.asarray(X))  # (N, n_embd)
    if X.dtype not in (torch.float16, torch.float32):
        X = X.float()
    masks = Y if isinstance(Y, Masks) else Masks.pack(Y)
    if X.ndim != 2 or len(X) != len(masks):
        raise ValueError(f"X {tuple(X.shape)} and {len(masks)} masks: expected (N, n_embd) and N")
    n_embd, n_ff = X.shape[1], masks.n_ff
    if init is not None and tuple(np.shape(init)) != (n_ff, n_embd):
        raise ValueError(f"init map {tuple(np.shape(init))} is not ({n_ff}, {n_embd})")
    if C is not None and hasattr(C, "shape"):  # one array: taken in blocks of rows
        C = row_blocks(C)
    tr, va = split_rows(len(X), val_frac, max_val, seed)
    scale = input_scale(X, tr)  # typical rms of this layer's input: trained on a unit-scale input, folded back below
    train = TrainSet(X, masks, tr, scale, device, C)
    x_va, y_va = X[va], masks.rows(va)  # (N_val, n_embd) as stored, (N_val, n_ff)
    data = (train, x_va, y_va.to(device))
    actual = 1.0 - float(y_va.float().mean())

    if rank == "auto":
        ranks = rank_ladder(max_rank or rank_cap(n_embd, n_ff))
    elif isinstance(rank, int) and rank >= 1:
        ranks = [rank]
    else:
        raise ValueError(f"rank must be a positive int or 'auto', got {rank!r}")

    best = None  # (score, predictor, epochs run)
    for r in ranks:
        pred = new_predictor(n_embd, n_ff, r, init, train, seed).to(device)
        score, ran = fit(pred, data, epochs, lr, batch_size, recall_target, patience, seed, f"{desc} r={r}", progress)
        if best is None or score > best[0]:
            best = (score, pred, ran)
        if score >= sparsity_goal * actual:
            break  # the smallest rank that is good enough

    _, pred, ran = best
    pred = pred.cpu()
    with torch.no_grad():
        pred.fc1.weight /= scale  # logits(x) = trained logits(x / scale): the raw residual goes in, as in PowerInfer
    pred.round_to(qtype)
    logits = val_logits(pred, x_va)  # (N_val, n_ff)
    threshold = tune_threshold(logits, y_va, recall_target)
    metrics = layer_metrics((logits >= threshold).numpy(), y_va.numpy())
    metrics.update(rank=pred.rank, threshold=threshold, epochs=ran, n_train=len(tr), n_val=len(va),
                   seconds=time.perf_counter() - t0)
    return pred, threshold, metrics
