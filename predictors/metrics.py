"""How good a predictor is, by DESIGN.md's definitions, and the threshold that trades recall for sparsity.

Per layer, over the flattened (tokens x neurons) masks:
  recall             = truly active neurons predicted active / truly active neurons
  precision          = truly active among predicted active / predicted active
  predicted sparsity = neurons the predictor skips / all neurons
  actual sparsity    = inactive neurons / all neurons
Every token has n_ff neurons, so the flattened means equal the per-token means averaged over tokens. Model-level
numbers average the layers. They are counted directly: scikit-learn's recall_score and precision_score give the
same numbers (a test says so) but take 2 GB and 32 s on 8192 tokens of 11008 neurons.
"""
from __future__ import annotations

import math

import numpy as np
import torch

METRIC_KEYS = ("recall", "precision", "predicted_sparsity", "actual_sparsity")


def tune_threshold(logits: torch.Tensor, labels: torch.Tensor, recall_target: float) -> float:
    """The highest threshold t at which `logits >= t` keeps at least recall_target of the true positives.

    logits (T, n_ff) float, labels (T, n_ff) bool. The highest such t skips the most neurons. With no positives
    at all, t lies just above every logit: nothing needs predicting.
    """
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall target {recall_target} is not in (0, 1]")
    pos = logits[labels].float()  # (P,)
    if pos.numel() == 0:
        top = logits.max().float()
        return float(torch.nextafter(top, top + 1))
    k = min(pos.numel(), max(1, math.ceil(recall_target * pos.numel() - 1e-9)))  # positives to keep
    return float(torch.kthvalue(pos, pos.numel() - k + 1).values)  # the k-th largest positive logit


def predicted_sparsity(logits: torch.Tensor, threshold: float) -> float:
    return float((logits < threshold).float().mean())


def layer_metrics(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> dict:
    """Recall, precision, predicted and actual sparsity of one layer's masks: bool (T, n_ff) each (counted; see the
    module's docstring)."""
    if np.shape(pred) != np.shape(true):
        raise ValueError(f"predicted mask {np.shape(pred)} and true mask {np.shape(true)} differ in shape")
    p, t = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)  # (T, n_ff)
    return from_counts(int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t)), p.size)


def from_counts(both: float, predicted: float, true: float, n: float) -> dict:
    """The metrics from counts over n (token, neuron) pairs: both predicted and truly active, predicted active,
    truly active (what decoding and eval-predictors count as they go)."""
    return {"recall": both / true if true else 1.0,  # nothing active: nothing was missed
            "precision": both / predicted if predicted else 1.0,  # nothing predicted: nothing was wrong
            "predicted_sparsity": 1.0 - predicted / n if n else float("nan"),
            "actual_sparsity": 1.0 - true / n if n else float("nan")}


def summarize(per_layer: list[dict]) -> dict:
    """Model-level metrics: each of METRIC_KEYS averaged over layers, with the per-layer list kept."""
    out = {k: float(np.mean([m[k] for m in per_layer])) if per_layer else float("nan") for k in METRIC_KEYS}
    out["per_layer"] = per_layer
    return out


def format_table(per_layer: list[dict]) -> str:
    """The per-layer table the CLI prints: recall, precision, predicted/actual sparsity, rank, time; then the mean."""
    head = (f"{'layer':>5} {'rank':>5} {'recall':>7} {'precision':>9} {'pred.sp':>7} {'act.sp':>7} {'ratio':>6} "
            f"{'secs':>6}")
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict) -> str:
        ratio = f"{m['predicted_sparsity'] / m['actual_sparsity']:>6.3f}" if m["actual_sparsity"] > 0 else f"{'n/a':>6}"
        rank = f"{m['rank']:>5}" if "rank" in m else f"{'':>5}"
        secs = f"{m['seconds']:>6.1f}" if "seconds" in m else f"{'':>6}"
        return (f"{name:>5} {rank} {m['recall']:>7.4f} {m['precision']:>9.4f} {m['predicted_sparsity']:>7.4f} "
                f"{m['actual_sparsity']:>7.4f} {ratio} {secs}")

    lines += [row(str(m.get("layer", i)), m) for i, m in enumerate(per_layer)]
    if per_layer:
        mean = summarize(per_layer)
        if all("seconds" in m for m in per_layer):
            mean["seconds"] = float(sum(m["seconds"] for m in per_layer))  # total, not mean
        lines += ["-" * len(head), row("all", mean)]
    return "\n".join(lines)
