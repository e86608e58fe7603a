"""Which FFN neurons are active: the rule, the per-layer thresholds that set it, and the file that keeps them.

A neuron i is active for a token when its contribution score |h_i| * ||down[:, i]|| is above its layer's
threshold, h = act(gate x) * up x being the FFN's hidden activation. Threshold 0 means the exact rule of
ReLU-family models, h_i != 0: skipping the other neurons changes nothing. SiLU models have no natural zeros;
their thresholds are calibrated (tools/calibrate.py) and saved as JSON together with the fingerprint of the
model they were calibrated on, so that a config is never applied to another model.

`Sparsifier` is what the engine runs: it zeroes the inactive neurons of h before the down projection (a
kernel path skips their rows instead) and counts how many stayed active. The profiler uses its `mask`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .config import HotcoldError, ModelConfig, blk, finite_number
from .files import read_json, write_json
from .fingerprint import check_fingerprint

if TYPE_CHECKING:
    import torch

EXACT_ACTS = ("relu", "fatrelu", "drelu")  # activations with natural zeros: h_i != 0 is exact
CONFIG_KEYS = ("thresholds", "fingerprint")  # required in a sparsity JSON


@dataclass
class SparsityConfig:
    thresholds: list[float]  # per layer, on the contribution score; 0 = the exact rule h_i != 0
    fingerprint: dict  # of the model it belongs to (see `fingerprint`)
    method: str = "exact"  # how the thresholds were found: exact | quantile | cett | greedy | profile (read back)
    cett: float | None = None  # mean CETT of the skipped neurons over the calibration tokens
    layer_sparsity: list[float] = field(default_factory=list)  # on the calibration tokens
    calibration: dict = field(default_factory=dict)  # corpus, tokens, target, measured perplexities

    @staticmethod
    def exact(c: ModelConfig, fp: dict) -> SparsityConfig:
        return SparsityConfig([0.0] * c.n_layer, fp)

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @staticmethod
    def load(path: str, expected: dict) -> SparsityConfig:
        """Read a sparsity JSON and refuse it unless it was made for the model of fingerprint `expected`."""
        obj = read_json(path, "sparsity config")
        missing = [k for k in CONFIG_KEYS if k not in obj]
        if missing:
            raise HotcoldError(f"{path}: not a sparsity config (no {missing[0]!r})")
        known = set(SparsityConfig.__dataclass_fields__)
        return SparsityConfig(**{k: v for k, v in obj.items() if k in known}).check(expected, path)

    def check(self, expected: dict, where: str) -> SparsityConfig:
        """self, unless made for another model than fingerprint `expected` or its thresholds are not one finite
        number >= 0 a layer."""
        check_fingerprint(self.fingerprint, expected, where, "sparsity config")
        thr = self.thresholds
        if not isinstance(thr, (list, tuple)) or len(thr) != expected["n_layer"] or not all(
                finite_number(t) and t >= 0 for t in thr):
            raise HotcoldError(f"{where}: thresholds must be {expected['n_layer']} finite numbers >= 0")
        return self


def batched_net(net):
    """The TorchModel that runs batched forwards: the net itself, or the kernel engine's prefill."""
    return getattr(net, "torch", net)


def attach(net, sp: Sparsifier | None) -> None:
    """Threshold a model's FFN path with `sp` (None: dense): batched forwards, and the kernel engine's decode."""
    batched_net(net).sparsity = sp
    if hasattr(net, "threshold_ffn"):
        net.threshold_ffn = None if sp is None else KernelSelector(net, sp)


def down_rows(net, i: int) -> torch.Tensor:
    """Layer i's down projection of a TorchModel as one output row per neuron: (n_ff, n_embd)."""
    c = net.c
    if net.down_t:
        return net.rows(blk(i, "ffn_down_t"), 0, c.n_ff)
    return net.rows(blk(i, "ffn_down"), 0, c.n_embd).T


def down_norms(net) -> torch.Tensor:
    """||down[:, i]|| of every neuron of a TorchModel: (n_layer, n_ff)."""
    import torch
    return torch.stack([down_rows(net, i).norm(dim=1) for i in range(net.c.n_layer)])


def contribution(h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The score |h_i| * ||down[:, i]||: (T, n_ff) for h (T, n_ff) and norm (n_ff,)."""
    return h.abs() * norm


class Sparsifier:
    """Zeroes inactive neurons of h in the FFN path and counts the active ones per layer."""

    def __init__(self, thresholds: list[float], norms: torch.Tensor):
        self.thresholds = [float(t) for t in thresholds]
        self.norms = norms  # (n_layer, n_ff)
        # active and all neuron-token pairs per layer (numpy: a decode step adds its counts, layer by layer)
        self.active, self.seen = np.zeros(len(thresholds)), np.zeros(len(thresholds))

    def mask(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Active neurons of layer i: bool (T, n_ff) for h (T, n_ff)."""
        t = self.thresholds[i]
        return h != 0 if t <= 0 else contribution(h, self.norms[i]) > t

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        m = self.mask(i, h)  # (T, n_ff)
        self.active[i] += int(m.sum())
        self.seen[i] += m.numel()
        return h.masked_fill(~m, 0.0)

    def reset(self) -> None:
        self.active[:] = 0
        self.seen[:] = 0

    def layer_sparsity(self) -> list[float]:
        return (1 - self.active / np.maximum(self.seen, 1)).tolist()

    def sparsity(self) -> float:
        """Inactive / all neurons, per layer averaged over tokens, then over layers (DESIGN.md: Metrics)."""
        return float(np.mean(self.layer_sparsity()))


def truth_rule(bundle, net) -> Sparsifier:
    """What "active" meant in the labels `bundle` was trained on, for auditing it on the TorchModel net: its sparsity
    config's thresholds, or h != 0 where it has none (for a SiLU model that is every neuron: refused)."""
    c, where = net.c, bundle.path or "predictor bundle"
    thr = bundle.sparsity.get("thresholds")
    if thr is None and c.act not in EXACT_ACTS:
        raise HotcoldError(f"{where}: trained without a sparsity config, and a {c.act} model has no natural zeros: "
                           "which neurons are active is not defined (train with --sparsity CONFIG)")
    thr = [0.0] * c.n_layer if thr is None else thr
    if len(thr) != c.n_layer:
        raise HotcoldError(f"{where}: its sparsity config has {len(thr)} thresholds for {c.n_layer} layers")
    return Sparsifier(thr, down_norms(net))


class KernelSelector:
    """The kernel engine's decode hooks under thresholds: `ffn`, a layer's FFN over the neurons above its threshold
    (what decoding runs), and, called, the active ids of one token (the reference `ffn` is tested against, and the
    truth of an audit), which runs the gate and up rows once more to know h."""

    def __init__(self, net, sp: Sparsifier):
        self.net, self.sp = net, sp
        n_ff = net.c.n_ff
        self.g = np.zeros(n_ff, np.float32)  # scratch, allocated once
        self.u = np.zeros(n_ff, np.float32)
        self.h = np.zeros(n_ff, np.float32)
        self.ids = np.zeros(n_ff, np.int32)
        self.norms = np.ascontiguousarray(sp.norms.numpy(), np.float32)  # (n_layer, n_ff)
        self.runs = {}  # layer -> kernels.scored_ffn_runner's run, bound on first use (it builds down_t)

    def ffn(self, i: int, xn: np.ndarray, out: np.ndarray) -> None:
        """out = layer i's FFN for normed input xn over the neurons above the threshold: h computed once for all
        (the score needs it), down only for the active ones; counted as `Sparsifier` counts."""
        run = self.runs.get(i)
        if run is None:
            from .kernels import scored_ffn_runner
            L, net = self.net.layers[i], self.net
            run = self.runs[i] = scored_ffn_runner(L.gate, L.up, L.down_t, net.act, net.threshold, L.down, net.nt)
        n = run(xn, out, self.norms[i], self.sp.thresholds[i], self.ids, self.h)
        self.sp.active[i] += n
        self.sp.seen[i] += self.h.size

    def __call__(self, i: int, x: np.ndarray, xn: np.ndarray) -> np.ndarray:
        import torch

        from .kernels import matvec
        from .model import ffn_activation
        c, layer = self.net.c, self.net.layers[i]
        matvec(layer.up, xn, self.u)
        u = torch.from_numpy(self.u)[None]  # (1, n_ff)
        if layer.gate is None:
            h = ffn_activation(u, None, c.act, c.act_threshold)
        else:
            matvec(layer.gate, xn, self.g)
            h = ffn_activation(torch.from_numpy(self.g)[None], u, c.act, c.act_threshold)
        return np.flatnonzero(self.sp(i, h)[0].numpy()).astype(np.int32)
