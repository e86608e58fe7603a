"""The activation predictor of one layer, in PowerInfer's shape, and its SVD starting point.

    logits = fc2 @ relu(fc1 @ x)      fc1: (rank, n_embd), fc2: (n_ff, rank), no biases
    neuron i predicted active  <=>  logits_i >= threshold

x is the FFN input as PowerInfer feeds it: the residual stream after attention, *before* the FFN RMSNorm.

Input normalisation (a deliberate choice): none. The predictor takes the raw residual, because exported fc1/fc2
must work alone on PowerInfer's input and a per-token 1/rms(x) cannot be folded into weights. Little is lost:
without biases the predictor is positively homogeneous, logits(c x) = c logits(x) for c > 0, and so is the truth
it imitates for a ReLU FFN (the sign of the gate pre-activation does not depend on rms(x)), so at threshold 0 the
decision is exactly scale-free; only a nonzero tuned threshold sees a token's scale. Measured on SmolLM2 with
ReLU in place of SiLU (20k tokens of wiki.test, rank 128, 10 epochs at lr 3e-3, recall 0.95), predicted/actual
sparsity on later text: raw 0.823 / 0.743 against per-token-normalised 0.829 / 0.740 on layers 10 / 28; from
the SVD start alone, 0.712 / 0.656 against 0.748 / 0.649. What does matter is the overall scale, for training:
train.py divides by a per-layer constant, then folds it into fc1. No model code does I/O: files live in bundle.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import HotcoldError


class Predictor(nn.Module):
    """fc1 (n_embd -> rank, no bias), ReLU, fc2 (rank -> n_ff, no bias): one FFN layer's activation predictor."""

    def __init__(self, n_embd: int, n_ff: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, rank, bias=False)  # weight (rank, n_embd)
        self.fc2 = nn.Linear(rank, n_ff, bias=False)  # weight (n_ff, rank)

    @property
    def n_embd(self) -> int:
        return self.fc1.in_features

    @property
    def n_ff(self) -> int:
        return self.fc2.out_features

    @property
    def rank(self) -> int:
        return self.fc1.out_features

    @property
    def n_params(self) -> int:
        return self.rank * (self.n_embd + self.n_ff)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, n_embd) raw residual -> (T, n_ff) scores; a neuron is active when its score >= threshold."""
        return self.fc2(F.relu(self.fc1(x)))  # (T, rank) -> (T, n_ff)

    forward = logits

    @torch.no_grad()
    def active(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """bool (T, n_ff): the neurons predicted active for x (T, n_embd), any float dtype or a numpy array."""
        x = torch.as_tensor(x, dtype=self.fc1.weight.dtype)
        if x.shape[-1:] != (self.n_embd,):
            raise HotcoldError(f"predictor input of shape {tuple(x.shape)}, expected (..., {self.n_embd})")
        return self.logits(x) >= threshold

    @torch.no_grad()
    def round_to_half(self) -> Predictor:
        """Round the weights to float16 values (kept float32): what bundles store is what thresholds are tuned on."""
        for p in self.parameters():
            p.copy_(p.half().float())
        return self

    def round_to(self, qtype: str) -> Predictor:
        """Round the weights to the values the kernels hold in qtype (engine.config.PREDICTOR_TYPES; fc1 and fc2^T
        block-quantized as engine.hybrid.predictor_matrix stores them for the decode step), then to float16 values,
        as bundles store them. The kernels' quantization of these values agrees to within 5e-4 of a block's range."""
        if qtype != "F16":
            from engine.hybrid import load_kernel_weights, predictor_matrix
            load_kernel_weights(self, predictor_matrix(self.fc1.weight, qtype),
                                predictor_matrix(self.fc2.weight.T, qtype))
        return self.round_to_half()

    @staticmethod
    def from_weights(fc1: torch.Tensor, fc2: torch.Tensor) -> Predictor:
        """A float32 predictor from fc1 (rank, n_embd) and fc2 (n_ff, rank), as stored by bundles and PowerInfer."""
        if fc1.ndim != 2 or fc2.ndim != 2 or fc2.shape[1] != fc1.shape[0]:
            raise ValueError(f"fc1 {tuple(fc1.shape)} and fc2 {tuple(fc2.shape)} do not chain: "
                             "expected (rank, n_embd) and (n_ff, rank)")
        p = Predictor(fc1.shape[1], fc2.shape[0], fc1.shape[0])
        with torch.no_grad():
            p.fc1.weight.copy_(fc1)
            p.fc2.weight.copy_(fc2)
        return p

    @staticmethod
    def from_linear(m: torch.Tensor | np.ndarray, rank: int, x: torch.Tensor | None = None,
                    moment: torch.Tensor | None = None) -> Predictor:
        """A predictor whose logits are the best rank/2 approximation of the linear map m (n_ff, n_embd).

        With a truncated SVD m ~ U S V^T (rank/2 terms), A = S^1/2 V^T and B = U S^1/2, the pair
        fc1 = [A; -A], fc2 = [B, -B] passes a linear map through the ReLU exactly:
        fc2 relu(fc1 x) = B relu(A x) - B relu(-A x) = B A x, since relu(a) - relu(-a) = a.

        x (N, n_embd): samples of the input. Then the approximation is best on them rather than on all of
        R^n_embd: the SVD is taken of m L, L L^T = E[x x^T], and A = S^1/2 V^T L^-1 (whitened SVD), so that
        E ||m x - B A x||^2 is the smallest a rank-rank/2 map reaches. Residual streams fill few directions
        strongly, so this keeps far more of the gate's signal at a small rank. moment (n_embd, n_embd): E[x x^T]
        (x.T @ x / N in float64) in place of x, so that the samples need not be held through the SVD.
        """
        if rank < 2 or rank % 2:
            raise ValueError(f"SVD initialisation needs an even rank >= 2, got {rank}")
        m = torch.as_tensor(m, dtype=torch.float64)  # (n_ff, n_embd)
        h = rank // 2
        if h > min(m.shape):
            raise ValueError(f"rank {rank} exceeds twice the rank of a {tuple(m.shape)} map")
        if x is not None:
            x = torch.as_tensor(x, dtype=torch.float64)  # (N, n_embd)
            moment = x.T @ x / len(x)  # (n_embd, n_embd)
        if moment is None:
            white, unwhite = None, None
        else:
            lam, q = torch.linalg.eigh(torch.as_tensor(moment, dtype=torch.float64))  # moment = q diag(lam) q^T
            lam = lam.clamp(min=1e-6 * float(lam.max().clamp(min=1e-30)))
            white = q * lam.sqrt()[None, :]  # L (n_embd, n_embd), L L^T = E[x x^T]
            unwhite = (q / lam.sqrt()[None, :]).T  # L^-1
        u, s, vh = torch.linalg.svd(m if white is None else m @ white, full_matrices=False)  # (n_ff,k) (k,) (k,n_embd)
        root = s[:h].sqrt()
        a = root[:, None] * vh[:h]  # (h, n_embd)
        if unwhite is not None:
            a = a @ unwhite
        b = u[:, :h] * root[None, :]  # (n_ff, h)
        return Predictor.from_weights(torch.cat([a, -a]).float(), torch.cat([b, -b], 1).float())


def gate_map(w_gate: torch.Tensor | np.ndarray, ffn_norm: torch.Tensor | np.ndarray) -> torch.Tensor:
    """W_gate diag(ffn_norm): (n_ff, n_embd). The gate pre-activation is gate_map @ x / rms(x) for the raw residual
    x, so its sign (what a ReLU-family FFN's activity hangs on) is the sign of gate_map @ x: a starting point for
    `Predictor.from_linear`. For a plain FFN, pass W_up. Read-only arrays (views of the file) are copied."""
    w, g = (torch.as_tensor(np.array(a, np.float32) if isinstance(a, np.ndarray) and not a.flags.writeable else a,
                            dtype=torch.float32) for a in (w_gate, ffn_norm))  # (n_ff, n_embd), (n_embd,)
    if w.ndim != 2 or g.shape != (w.shape[1],):
        raise ValueError(f"gate {tuple(w.shape)} and norm {tuple(g.shape)} do not match")
    return w * g[None, :]
