"""llama.cpp's sampler chain: the logit biases, the repetition penalties and DRY on the context's tokens, then
top-n-sigma, top-k, typical, top-p, min-p, XTC and the temperature (dynamic with a range) on what is left, then a
draw; or, with mirostat, the temperature and mirostat v1 or v2 alone. Each step as llama.cpp's (src/llama-sampling
.cpp), in the order of its default --samplers.
"""
from __future__ import annotations

import functools
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np

from .config import HotcoldError, as_int

F32_MAX = float(np.finfo(np.float32).max)


def finite(v) -> float:
    """v as a float; nan for an integer past a float's range (math.isnan would raise OverflowError)."""
    try:
        return float(v)
    except OverflowError:
        return math.nan


DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default DRY sequence breakers


@dataclass
class Sampler:
    """llama.cpp's sampler chain and defaults (see the module's docstring); every step past the first three is off
    unless asked for."""
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off; keeps p >= min_p * max p
    seed: int | None = None  # None or negative: random
    repeat_penalty: float = 1.0  # 1: off; a recent token's logit is divided by it (positive) or multiplied (not)
    repeat_last_n: int = 64  # how many of the last tokens (the prompt's too) the penalties look at; 0: off, -1: all
    frequency_penalty: float = 0.0  # 0: off; subtracted from a recent token's logit once per time it occurs
    presence_penalty: float = 0.0  # 0: off; subtracted from the logit of each token that occurs
    logit_bias: dict | None = None  # {token id: added to its logit}; -inf: never that token
    top_n_sigma: float = -1.0  # <= 0: off; keeps logits >= max - n * their standard deviation
    typical_p: float = 1.0  # 1: off; locally typical sampling's mass
    xtc_probability: float = 0.0  # 0: off; how often XTC removes the likeliest tokens
    xtc_threshold: float = 0.1  # XTC removes the tokens at least this likely but the least of them (> 0.5: off)
    dynatemp_range: float = 0.0  # 0: off; the temperature then moves within temperature +- range with the entropy
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 0: off, 1 or 2: mirostat v1 or v2 after the temperature, in place of the rest of the chain
    mirostat_tau: float = 5.0  # the target surprise (bits)
    mirostat_eta: float = 0.1  # its learning rate
    dry_multiplier: float = 0.0  # 0: off; DRY's penalty, multiplier * base ** (repeat length - allowed length)
    dry_base: float = 1.75
    dry_allowed_length: int = 2  # repeats this long go unpunished
    dry_penalty_last_n: int = -1  # how many of the last tokens DRY looks at; 0: off, -1: all
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS  # a repeat does not run across a token holding one

    def __post_init__(self):
        penalties = ("repeat_penalty", "frequency_penalty", "presence_penalty")  # inf would make logits NaN
        reals = ("temperature", "top_p", "min_p", "top_n_sigma", "typical_p", "xtc_probability", "xtc_threshold",
                 "dynatemp_range", "dynatemp_exponent", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base")
        for name in reals + penalties:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) or (
                    name not in ("temperature", "top_p") and math.isinf(v)):
                raise HotcoldError(f"Sampler {name} = {v!r}: a number" + ("" if name in ("temperature", "top_p")
                                                                            else ", finite"))
        for name in ("min_p", "typical_p", "xtc_probability", "xtc_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise HotcoldError(f"Sampler {name} = {getattr(self, name)}: from 0 to 1")
        for name in ("dynatemp_range", "dynatemp_exponent", "mirostat_tau", "mirostat_eta", "dry_multiplier"):
            if getattr(self, name) < 0:
                raise HotcoldError(f"Sampler {name} = {getattr(self, name)}: at least 0")
        if self.repeat_penalty <= 0:
            raise HotcoldError(f"Sampler repeat_penalty = {self.repeat_penalty}: above 0 (1 is off)")
        if self.dry_base < 1:
            raise HotcoldError(f"Sampler dry_base = {self.dry_base}: at least 1")
        self.top_k = as_int(self.top_k, "Sampler top_k")
        self.mirostat = as_int(self.mirostat, "Sampler mirostat")
        if self.mirostat not in (0, 1, 2):
            raise HotcoldError(f"Sampler mirostat = {self.mirostat}: 0 (off), 1 or 2")
        self.dry_allowed_length = as_int(self.dry_allowed_length, "Sampler dry_allowed_length")
        if self.dry_allowed_length < 0:
            raise HotcoldError(f"Sampler dry_allowed_length = {self.dry_allowed_length}: at least 0")
        for name in ("repeat_last_n", "dry_penalty_last_n"):
            setattr(self, name, as_int(getattr(self, name), f"Sampler {name}"))
            if getattr(self, name) < -1:
                raise HotcoldError(f"Sampler {name} = {getattr(self, name)}: a count of tokens, 0 (off) or -1 (all)")
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(b, str) and b for b in breakers):
            raise HotcoldError(f"Sampler dry_sequence_breakers = {breakers!r}: strings that are not empty")
        self.dry_sequence_breakers = tuple(breakers)
        self.breaker_ids = np.zeros(0, np.int64)  # the tokens holding a breaker (`breaker_tokens`; the model sets them)
        self.seed = None if self.seed is None else as_int(self.seed, "Sampler seed")
        bias = self.logit_bias or {}
        if not isinstance(bias, dict):
            raise HotcoldError(f"Sampler logit_bias = {bias!r}: a dict of token id to bias")
        for i, v in bias.items():
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < 2 ** 31:
                raise HotcoldError(f"Sampler logit_bias: token id {i!r}, an integer from 0 to {2 ** 31 - 1}")
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(finite(v))
                                                                              or v == -math.inf):
                raise HotcoldError(f"Sampler logit_bias[{i}] = {v!r}: a number, or -inf (never that token)")
        self.bias_ids, self.bias = np.array(list(bias), np.int64), np.array(list(bias.values()), np.float64)
        self.rng = np.random.default_rng(self.seed if self.seed is not None and self.seed >= 0 else time.time_ns())
        self.mu = 2 * self.mirostat_tau  # mirostat's running surprise bound, as llama.cpp starts it

    @property
    def greedy(self) -> bool:
        """Whether the chain takes the top token: temperature <= 0 with mirostat, or with no step that can drop the
        top token (typical, XTC) or warm the distribution again (a dynamic temperature's range), as llama.cpp's."""
        return self.temperature <= 0 and (self.mirostat > 0 or self.typical_p >= 1 and self.xtc_probability <= 0
                                          and self.dynatemp_range <= 0)

    @property
    def reach(self) -> int | None:
        """How many of the likeliest tokens the chain can choose among (a grammar's search stops there): 1 greedy,
        top-k, or None: all (top-k off, or top-n-sigma or mirostat, which read every token's logit)."""
        if self.greedy:
            return 1
        return None if self.top_k <= 0 or self.top_n_sigma > 0 or self.mirostat else self.top_k

    def biased(self, logits: np.ndarray) -> np.ndarray:
        """logits (n_vocab,) with logit_bias added, as llama.cpp's logit-bias sampler gives them: the caller's array
        where there is none, else a copy."""
        if not self.bias.size:
            return logits
        if self.bias_ids.max() >= logits.size:
            raise HotcoldError(f"Sampler logit_bias: token id {self.bias_ids.max()} is outside the vocabulary of "
                               f"{logits.size}")
        out = logits.copy()
        z = logits[self.bias_ids] + self.bias  # float64
        out[self.bias_ids] = np.where(z < -F32_MAX, -np.inf, np.minimum(z, F32_MAX))  # float32: -inf is never
        return out

    def penalized(self, logits: np.ndarray, recent) -> np.ndarray:
        """logits (n_vocab,) after the penalties and DRY for the tokens `recent` (the context's, oldest first), as
        llama.cpp's penalties and DRY samplers give them (DRY not under mirostat, which takes neither): the caller's
        array where none applies, else a copy."""
        n = self.repeat_last_n
        off = self.repeat_penalty == 1 and self.frequency_penalty == 0 and self.presence_penalty == 0
        if self.mirostat or off or n == 0 or not len(recent):
            return self.dry(logits, recent)
        ids, counts = np.unique(np.asarray(recent[-n:] if n > 0 else recent), return_counts=True)
        z = logits[ids].astype(np.float64)
        out = logits.copy()
        z = np.where(z <= 0, z * self.repeat_penalty, z / self.repeat_penalty) - counts * self.frequency_penalty \
            - self.presence_penalty
        out[ids] = np.where(z == -np.inf, -np.inf, np.clip(z, -F32_MAX, F32_MAX))  # finite in float32 whatever the
        # penalties (1e39, 1e-40), but a token the logit biases ban
        return self.dry(out, recent)

    def dry(self, logits: np.ndarray, recent) -> np.ndarray:
        """DRY ("don't repeat yourself"): each token that would extend a repeat of the context's last tokens (at
        least dry_allowed_length of them, no breaker among them) loses multiplier * base ** (length - allowed) from
        its logit, the longest such repeat counting; breakers themselves are never punished."""
        n, allowed = self.dry_penalty_last_n, self.dry_allowed_length
        if not self.dry_multiplier or self.mirostat or n == 0:
            return logits
        last = list(recent[-n:] if n > 0 else recent)[::-1]  # the most recent first
        if len(last) <= allowed:
            return logits
        breakers = set(self.breaker_ids.tolist())
        limit = next((i for i, t in enumerate(last) if t in breakers), len(last))  # a repeat stops at a breaker
        if limit < allowed:
            return logits
        longest: dict[int, int] = {}  # token -> the longest repeat it would extend
        for i, z in enumerate(z_lengths(last)[1:], 1):  # the last z tokens also end i tokens back
            if min(z, limit) >= allowed and last[i - 1] not in breakers:  # last[i - 1] followed them there
                longest[last[i - 1]] = max(longest.get(last[i - 1], 0), min(z, limit))
        if not longest:
            return logits
        top = int(88.7228391 / math.log(self.dry_base)) if self.dry_base > 1.000001 else None  # pow past f32: clamped
        ids = np.array(list(longest), np.int64)
        ids = ids[ids < logits.size]
        exps = np.array([longest[t] - allowed for t in ids.tolist()], np.float64)
        out = logits.copy()
        z = logits[ids] - self.dry_multiplier * self.dry_base ** (exps if top is None else np.minimum(exps, top))
        out[ids] = np.where(logits[ids] == -np.inf, -np.inf, np.maximum(z, -F32_MAX))
        return out

    def __call__(self, logits: np.ndarray, recent=()) -> int:  # logits (n_vocab,); recent: the context's token ids
        return self.choose(self.penalized(self.biased(logits), recent))

    def choose(self, logits: np.ndarray) -> int:
        """The chain after the biases, penalties and DRY: greedy, mirostat, or a draw from `distribution` (at
        temperature <= 0 its likeliest token: typical or XTC may have dropped the top one)."""
        if self.greedy:
            if self.mirostat:  # the one candidate left by the temperature: surprise 0
                self.mu += self.mirostat_eta * self.mirostat_tau
            return int(np.argmax(logits))
        if self.mirostat:
            return self.mirostat_pick(logits)
        ids, p = self.distribution(logits)
        c = np.cumsum(p)
        return int(ids[min(np.searchsorted(c, self.rng.random() * c[-1], side="right"), c.size - 1)])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, p): the candidates and the weights the draw takes them by (not normalized; 0: dropped) after
        top-n-sigma, top-k, typical, top-p, min-p, XTC (its coin tossed here) and the temperature. Each step sees the
        probabilities of the tokens the steps before it left (their softmax at temperature 1, as llama.cpp's)."""
        if self.top_n_sigma > 0:
            logits = sigma_kept(logits, self.top_n_sigma)
        ids = np.argpartition(logits, -self.top_k)[-self.top_k:] if 0 < self.top_k < logits.size \
            else np.arange(logits.size)  # (k,) the candidates
        z = logits[ids].astype(np.float64)
        z -= z.max()  # <= 0: z / temperature cannot overflow to +inf
        keep = z > -np.inf  # (a banned token, or one top-n-sigma dropped: not a candidate)

        def probs() -> np.ndarray:  # the kept candidates' probabilities
            p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
            return p / p.sum()
        if self.typical_p < 1:  # the tokens whose surprise is nearest the entropy, up to typical_p of the mass
            p = probs()
            surprise = -np.log(np.where(keep & (p > 0), p, 1.0))
            entropy = float((p * surprise).sum())
            order = np.flatnonzero(keep)[np.argsort(np.abs(surprise - entropy)[keep], kind="stable")]
            n = int(np.searchsorted(np.cumsum(p[order]), self.typical_p, side="right")) + 1
            keep[order[n:]] = False
        if self.top_p < 1.0:
            p = probs()
            order = np.argsort(-p, kind="stable")
            keep[order[1:][(np.cumsum(p[order]) - p[order])[1:] >= self.top_p]] = False  # never the top candidate
        keep &= np.exp(z - z[keep].max()) >= self.min_p  # p / max p: keeps the top candidate (p = 1)
        if 0 < self.xtc_probability and self.xtc_threshold <= 0.5 and keep.sum() > 1 and \
                self.rng.random() <= self.xtc_probability:  # the likeliest tokens out but the least of them
            p = probs()
            over = int((p >= self.xtc_threshold).sum())  # how many are that likely
            keep[np.argsort(-p, kind="stable")[:max(over - 1, 0)]] = False
        t = self.temperature
        if self.dynatemp_range > 0 and keep.sum() > 1:  # from the entropy, between temperature -+ range
            p = probs()
            entropy = -float((p[p > 0] * np.log(p[p > 0])).sum())
            lo, hi = max(0.0, t - self.dynatemp_range), t + self.dynatemp_range
            t = lo + (hi - lo) * (entropy / math.log(keep.sum())) ** self.dynatemp_exponent
        with np.errstate(over="ignore", divide="ignore"):  # a tiny temperature: -inf for all but the top, as greedy
            p = np.where(keep, np.exp((z - z[keep].max()) / t), 0.0) if t > 0 else (
                (z == z[keep].max()) & keep).astype(np.float64)
        return ids, p

    def mirostat_pick(self, logits: np.ndarray) -> int:
        """Mirostat v1 or v2 after the temperature (llama.cpp's): the candidates cut to those whose surprise
        (-log2 p) the running bound mu allows (v2), or to the top k that Zipf's law and mu give (v1, from the 100
        likeliest), one drawn, and mu moved by eta times its surprise's distance from tau."""
        ids = np.flatnonzero(logits > -np.inf)
        z = logits[ids].astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order[0]])
        ids, p = ids[order][p > 0], p[p > 0] / p.sum()  # (past float64's range a token is not a candidate)
        if self.mirostat == 2:
            k = max(int(np.argmax(-np.log2(p) > self.mu)) if (-np.log2(p) > self.mu).any() else p.size, 1)
        else:
            m = min(100, p.size) - 1
            t = np.log(np.arange(2, m + 2) / np.arange(1, m + 1))
            b = np.log(p[:m] / p[1:m + 1])
            s = float((t * b).sum() / (t * t).sum()) if m else 1.0
            eps = s - 1
            with np.errstate(all="ignore"):
                k = (eps * 2 ** self.mu / (1 - float(logits.size) ** -eps)) ** (1 / s) if eps else math.inf
            k = max(int(min(k, p.size)), 1) if math.isfinite(k) else p.size
        p = p[:k] / p[:k].sum()
        c = np.cumsum(p)
        i = min(int(np.searchsorted(c, self.rng.random() * c[-1], side="right")), k - 1)
        self.mu -= self.mirostat_eta * (-math.log2(p[i]) - self.mirostat_tau)
        return int(ids[i])


@functools.lru_cache(maxsize=8)
def breaker_tokens(tokenizer, n_vocab: int, breakers: tuple[str, ...]) -> np.ndarray:
    """The tokens whose bytes hold one of DRY's sequence breakers: a repeat does not run across one (llama.cpp's
    restart sequences of one token). HotcoldError for a breaker that no token holds whole (llama.cpp also matches one
    split across tokens, which hotcold does not: refused rather than ignored)."""
    held = {b: [i for i in range(n_vocab) if b.encode() in tokenizer.piece(i)] for b in breakers}
    missing = [b for b, ids in held.items() if not ids]
    if missing:
        raise HotcoldError(f"DRY sequence breaker {missing[0]!r}: no token of the vocabulary holds it whole (hotcold "
                           "takes breakers that one token holds, such as single characters)")
    return np.unique(np.array([i for ids in held.values() for i in ids], np.int64))


def sigma_kept(logits: np.ndarray, n: float) -> np.ndarray:
    """top-n-sigma: logits below max - n * their standard deviation (over the finite ones) set to -inf."""
    finite_ = logits > -np.inf
    z = logits[finite_].astype(np.float64)
    if z.size <= 1:
        return logits
    return np.where(logits >= z.max() - n * z.std(), logits, -np.inf).astype(logits.dtype)


def z_lengths(seq: list) -> list[int]:
    """The Z-array of seq: z[i] = the length of the longest common prefix of seq and seq[i:] (z[0] = len(seq)), in
    linear time (DRY runs it on the context reversed: the repeats of its last tokens)."""
    n = len(seq)
    z, left, right = [n] + [0] * (n - 1), 0, 0
    for i in range(1, n):
        k = min(right - i, z[i - left]) if i < right else 0
        while i + k < n and seq[k] == seq[i + k]:
            k += 1
        z[i] = k
        if i + k > right:
            left, right = i, i + k
    return z
