"""The Python API the CLI uses: `load(model) -> Model`, then `generate`, `tokenize`, `perplexity`.

Shaped like llama-cpp-python's `Llama` where that fits. torch is imported where a path needs it (the batched
forward, perplexity, sparsity, predictors), so that generating from a short prompt on the kernels never does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import BACKENDS, CACHE_TYPES, DEFAULT_CTX, POOLINGS, HotcoldError, as_int, set_threads
from .grammar import constrained_pick, token_tables, worth_trying
from .loader import Checkpoint, load_checkpoint
from .sampling import Sampler, breaker_tokens
from .state import load_state, save_state, shift_context

if TYPE_CHECKING:
    import torch

    from .sparsity import SparsityConfig

BOTH_HOOKS = "--sparsity with --predictors: the predictor bundle carries its own sparsity config"


def token_logprob(logits: np.ndarray, tok: int, top: int) -> dict:
    """Token tok's log-probability under logits (n_vocab,), the model's own (log-softmax in float64, before any
    sampling rule), and the `top` likeliest tokens' ([[id, logprob], ...], best first)."""
    z = logits.astype(np.float64)
    z -= z.max()
    z -= math.log(np.exp(z).sum())
    best = np.argpartition(-z, top - 1)[:top] if 0 < top < z.size else np.arange(z.size if top else 0)
    best = best[np.argsort(-z[best], kind="stable")]
    return {"id": int(tok), "logprob": float(z[tok]), "top": [[int(i), float(z[i])] for i in best]}


def normalized(v: np.ndarray, norm: float) -> np.ndarray:
    """Vectors along the last axis normalized as llama.cpp's --embd-normalize: 2 Euclidean, 1 taxicab, p > 2 the
    p-norm, 0 scaled so that the largest magnitude is 32760 (its int16 range), -1 as they are."""
    if norm < 0:
        return v
    a = np.abs(v.astype(np.float64))
    scale = a.max(-1, keepdims=True) / 32760.0 if norm == 0 else (a ** norm).sum(-1, keepdims=True) ** (1 / norm)
    return (v / np.where(scale > 0, scale, 1.0)).astype(np.float32)


def perplexity_of(nll: float, n: int) -> float:
    """exp(mean negative log-likelihood); inf where that is past a float (logits far out of range)."""
    try:
        return math.exp(nll / n)
    except OverflowError:
        return math.inf


class StopText:
    """A continuation's text as it streams, cut before the first of the stop strings (llama-cpp-python's `stop`):
    text that may be the start of one is held back until it is not."""

    def __init__(self, stops, on_text: Callable[[str], None] | None):
        stops = [stops] if isinstance(stops, str) else [] if stops is None else list(stops)  # one string: one stop
        if not all(isinstance(t, str) for t in stops):
            raise HotcoldError(f"stop strings: strings, not {stops!r}")
        self.stops, self.on_text = [t for t in stops if t], on_text  # an empty one is none, as in llama.cpp's server
        self.text, self.shown = "", 0  # the text so far; how much of it on_text has had

    def add(self, piece: str) -> bool:
        """Take the next piece of text; True once a stop string is in the text (then cut before the one that starts
        first)."""
        old = len(self.text)
        self.text += piece
        cut = min((i for i in (self.text.find(t, max(0, old - len(t) + 1)) for t in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.show(cut)
            return True
        held = max((k for t in self.stops for k in range(1, min(len(t), len(self.text) + 1))
                    if self.text.endswith(t[:k])), default=0)
        self.show(len(self.text) - held)
        return False

    def show(self, upto: int) -> None:
        if upto > self.shown and self.on_text is not None:
            self.on_text(self.text[self.shown:upto])
        self.shown = max(self.shown, upto)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: dict = field(default_factory=dict)
    logprobs: list[dict] | None = None  # generate(logprobs=k): token_logprob's of each generated token

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "stats": self.stats, **({} if self.logprobs is None else {"logprobs": self.logprobs})}


def load(model: str | Checkpoint | None = None, n_ctx: int | None = None, threads: int | None = None,
         sparsity: str | SparsityConfig | None = None, backend: str = "kernels", predictors=None,
         cache_type: str = "f16", lora: list[tuple[str, float]] = ()) -> Model:
    """model: a GGUF file, a model directory, the default's name or None, or a Checkpoint already loaded from one.
    n_ctx: the context in tokens (default: DEFAULT_CTX, or the model's training context if shorter; longer than
    that is refused: RoPE past it is not what the model learned); predictors: a bundle path or
    predictors.bundle.Bundle (default: the one embedded in an exported model; False: none, or the caller's own
    `set_predictors` with a split); cache_type: the kernel backend's KV cache, "f16"
    or "f32" (the torch backend's is float32); lora: (adapter path, scale) pairs merged into the weights
    (engine.lora; a Checkpoint given keeps its own tensors)."""
    set_threads(threads)
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if lora:
        from .lora import apply_lora, check_carried
        ckpt = replace(ckpt, tensors=dict(ckpt.tensors))
        apply_lora(ckpt, lora)
        if predictors is None:  # the file's own, as below
            check_carried(ckpt)
    m = Model(ckpt, n_ctx, sparsity, backend, cache_type)
    predictors = predictors if predictors is not None else getattr(m.ckpt, "predictors", None)
    if predictors is not False and predictors is not None:
        m.set_predictors(predictors)
    return m


def default_ctx(c) -> int:
    """The context when none is given: DEFAULT_CTX, or the model's training context (ModelConfig c) if shorter."""
    return min(DEFAULT_CTX, c.n_ctx_train)


class ContextTooLong(HotcoldError):
    """A context or window longer than the model was trained on."""


def check_context(ckpt: Checkpoint, n_ctx: int) -> None:
    """Refuse a window longer than the model was trained on: RoPE past it is not what the model learned."""
    if n_ctx > ckpt.config.n_ctx_train:
        raise ContextTooLong(f"{ckpt.path}: a context of {n_ctx} tokens is longer than the "
                             f"{ckpt.config.n_ctx_train} the model was trained on")


class Model:
    def __init__(self, ckpt: Checkpoint, n_ctx: int | None = None, sparsity: str | SparsityConfig | None = None,
                 backend: str = "kernels", cache_type: str = "f16"):
        if cache_type not in CACHE_TYPES:
            raise HotcoldError(f"cache type {cache_type!r}: expected one of {', '.join(CACHE_TYPES)}")
        if backend not in BACKENDS:
            raise HotcoldError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        n_ctx = default_ctx(ckpt.config) if n_ctx is None else as_int(n_ctx, "n_ctx")
        if n_ctx < 2:
            raise HotcoldError(f"n_ctx = {n_ctx}: a context of at least 2 tokens")
        check_context(ckpt, n_ctx)  # bench names its flags in this message (tools.bench.bench_model)
        self.ckpt, self.config, self.tokenizer = ckpt, ckpt.config, ckpt.tokenizer
        self.n_ctx, self.backend = n_ctx, backend
        self.cache_type = cache_type if backend == "kernels" else "f32"  # the torch backend's cache is float32
        self.runtime = None  # engine.hybrid.Runtime once predictors are set
        self.sparsity = None  # engine.sparsity.Sparsifier once a sparsity config is set
        self.kv_ids: list[int] = []  # the tokens whose keys and values fill the cache's first positions (`generate`)
        try:
            if backend == "kernels":
                from .cpu import KernelModel
                self.net = KernelModel(self.config, ckpt.tensors, n_ctx, cache_type)
                ckpt.drop_pages()
            else:
                from .model import TorchModel
                self.net = TorchModel(self.config, ckpt.tensors, n_ctx)
        except (MemoryError, RuntimeError) as e:  # torch's allocator: RuntimeError "can't allocate memory"
            if isinstance(e, RuntimeError) and "allocate" not in str(e):
                raise
            kv = sum(math.prod(s) for s in self.config.kv_shapes(n_ctx)) * (2 if self.cache_type == "f16" else 4)
            raise HotcoldError(f"{ckpt.path}: out of memory for the model and a context of {n_ctx} tokens (its KV "
                               f"cache alone {kv / 2**30:.2f} GiB; lower --ctx)") from None
        if sparsity is not None:
            self.set_sparsity(sparsity)

    @cached_property
    def fingerprint(self) -> dict:
        """Identifies the model to its sparsity configs and profiles (engine/fingerprint.py)."""
        from .fingerprint import fingerprint
        return fingerprint(self.config, self.ckpt.tensors)

    def set_sparsity(self, sparsity: str | SparsityConfig | None) -> None:
        """Skip FFN neurons below a sparsity config's thresholds (a JSON path or a config); None: dense."""
        if sparsity is not None and self.runtime is not None:
            raise HotcoldError(BOTH_HOOKS)
        from .sparsity import Sparsifier, SparsityConfig, attach, batched_net, down_norms
        if isinstance(sparsity, str):
            sparsity = SparsityConfig.load(sparsity, self.fingerprint)
        elif isinstance(sparsity, SparsityConfig):
            sparsity.check(self.fingerprint, "sparsity config")
        elif sparsity is not None:
            raise HotcoldError(f"sparsity: a config's path or a SparsityConfig, not {type(sparsity).__name__}")
        self.sparsity = None if sparsity is None else Sparsifier(sparsity.thresholds,
                                                                  down_norms(batched_net(self.net)))
        attach(self.net, self.sparsity)
        self.kv_ids = []  # computed with the FFN as it was

    def set_predictors(self, bundle, hot: list | None = None, device: str | None = None, audit: bool = False,
                       qtype: str | None = None) -> None:
        """Decode with predictors (a bundle path or Bundle) choosing each token's FFN neurons; hot[i] are layer i's
        neuron ids computed on torch `device` ("cuda", or "cpu" to exercise the split without a GPU), the rest on
        the CPU kernels. audit: also compute the true active sets, for recall and precision in the stats.
        qtype: how the kernels store the predictor weights (config.PREDICTOR_TYPES; default: the type the bundle was
        trained for)."""
        from predictors.bundle import Bundle, load_bundle, model_fingerprint
        from .hybrid import Runtime, check_hot, torch_device
        from .sparsity import batched_net, truth_rule
        if self.sparsity is not None:
            raise HotcoldError(BOTH_HOOKS)
        if self.backend != "kernels":
            raise HotcoldError("--predictors runs on the kernel backend (drop --backend torch)")
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, model_fingerprint(self.ckpt))
        if hot is not None:
            hot = check_hot(hot, self.config, "hot", self.ckpt.path)
            if device is None:
                raise HotcoldError("hot neurons without a device to run them on (device='cuda' or 'cpu')")
            torch_device(device, "hot device")
        rule = truth_rule(bundle, batched_net(self.net)) if audit else None
        self.install_runtime(Runtime(self.net, bundle, hot, device, rule, qtype or bundle.predictor_type))

    def install_runtime(self, rt) -> None:
        """Decode through the predictor runtime rt (engine.hybrid.Runtime), or densely with None: the kernels' steps
        and the batched prefill both."""
        from .sparsity import batched_net
        self.runtime = self.net.runtime = rt
        batched_net(self.net).predict = rt.mask if rt is not None else None
        self.kv_ids = []  # computed with the FFN as it was

    # --- text <-> ids -------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise HotcoldError(f"tokenize takes a string, not {type(text).__name__}")
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.check_ids(ids))

    # --- forward ------------------------------------------------------------------------------------
    def logits(self, tokens: list[int], pos: int = 0, all_logits: bool = True) -> torch.Tensor:
        """Teacher-forced logits (T, n_vocab) of `tokens` placed at positions pos.. (cache reused below pos)."""
        tokens, pos = self.check_ids(tokens), as_int(pos, "pos")
        if not tokens:
            raise HotcoldError("no tokens")
        if pos < 0 or pos + len(tokens) > self.n_ctx:
            raise HotcoldError(f"positions {pos}..{pos + len(tokens) - 1} are outside the context of {self.n_ctx}")
        del self.kv_ids[pos:]
        out = self.net.forward(tokens, pos, all_logits)
        if len(self.kv_ids) == pos:
            self.kv_ids += tokens
        return out

    def embed(self, ids: list[int], pooling: str = "mean", normalize: float = 2) -> np.ndarray:
        """A text's embedding (n_embd,) float32, as llama.cpp's: the hidden states after the output norm, pooled over
        its tokens (mean; last: the last token's; cls: the first's; none: every token's, (T, n_embd)), then
        `normalized` (2: to unit length). The dense FFN's (not with a sparsity config or predictors). The KV cache's
        positions are overwritten and not reused after (`kv_ids` empty)."""
        ids = self.check_ids(ids)
        if self.sparsity is not None or self.runtime is not None:
            raise HotcoldError("embeddings come from the dense FFN: not with --sparsity or predictors")
        if pooling not in POOLINGS:
            raise HotcoldError(f"pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        if not ids:
            raise HotcoldError("no tokens to embed (an empty text)")
        if len(ids) > self.n_ctx:
            raise HotcoldError(f"text of {len(ids)} tokens does not fit the context of {self.n_ctx} (raise --ctx)")
        del self.kv_ids[:]  # (a generate that reused them would split its prompt elsewhere than a fresh one)
        x = self.net.hidden(ids, 0).double().numpy()  # (T, n_embd)
        v = {"mean": lambda: x.mean(0), "last": lambda: x[-1], "cls": lambda: x[0], "none": lambda: x}[pooling]()
        return normalized(v.astype(np.float32), normalize)

    def save_state(self, path: str, n: int | None = None) -> int:
        """The KV cache's first n positions (default: all `kv_ids`) to a prompt cache file (engine.state)."""
        return save_state(self, path, n)

    def load_state(self, path: str) -> int:
        """The KV cache's first positions from a prompt cache file; `generate(reuse_cache=True)` then computes only
        what follows the part of them the prompt begins with. Returns how many tokens the file held."""
        return load_state(self, path)

    def prompt_logprobs(self, ids: list[int], top: int) -> list[dict]:
        """token_logprob of each token of ids after the first, given those before it (teacher-forced `logits`; the
        cache then holds ids, which a `generate(reuse_cache=True)` continuing them reuses)."""
        ids = self.check_ids(ids)
        logits = self.logits(ids).float().numpy()  # (T, n_vocab)
        return [token_logprob(logits[t - 1], ids[t], top) for t in range(1, len(ids))]

    def check_sampler(self, sampler) -> None:
        """A Sampler's logit biases are on tokens of the vocabulary (else HotcoldError, before anything runs), and
        it knows the vocabulary's tokens that hold a DRY sequence breaker."""
        ids = getattr(sampler, "bias_ids", np.zeros(0))
        if ids.size and ids.max() >= self.config.n_vocab:
            raise HotcoldError(f"logit bias: token id {ids.max()} is outside the vocabulary of {self.config.n_vocab}")
        if getattr(sampler, "dry_multiplier", 0):
            sampler.breaker_ids = breaker_tokens(self.tokenizer, self.config.n_vocab, sampler.dry_sequence_breakers)

    def check_ids(self, ids) -> list[int]:
        """ids as a list of ints, each in the vocabulary; else HotcoldError (torch and numpy would read -1 as the
        last row)."""
        if isinstance(ids, str):
            raise HotcoldError("token ids, not a string (model.tokenize(text) gives them)")
        a = np.asarray(ids)
        if a.size and a.dtype.kind not in "iu" or a.ndim != 1:
            raise HotcoldError("token ids: a list of integers")
        bad = a[(a < 0) | (a >= self.config.n_vocab)]
        if bad.size:
            raise HotcoldError(f"token id {bad[0]} is outside the vocabulary of {self.config.n_vocab}")
        return a.tolist()

    def check_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's ids as a list; HotcoldError unless they are in the vocabulary, at least one, and leave room
        in the context for a token."""
        prompt_ids = self.check_ids(prompt_ids)
        if not prompt_ids:
            raise HotcoldError("empty prompt")
        if len(prompt_ids) >= self.n_ctx:
            raise HotcoldError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.n_ctx}"
                               " (raise --ctx)")
        return prompt_ids

    def generate(self, prompt_ids: list[int], n: int = 128, sampler: Sampler | None = None,
                 on_text: Callable[[str], None] | None = None, ignore_stop: bool = False,
                 reuse_cache: bool = False, stop: tuple[str, ...] | list[str] = (),
                 logprobs: int | None = None, grammar=None, context_shift: bool = False, keep: int = 0) -> Completion:
        """Prefill the prompt (batched, or by decode steps when short), then decode one token at a time until a
        stop token, a stop string (the text ends before it), n tokens (-1: no limit, as llama.cpp's -n -1) or the
        end of the context (stats["stop"]: "stop_token", "stop_string", "length" or "context").
        reuse_cache: the prompt's first tokens that are still in the KV cache (`kv_ids`: what the last generate or
        `logits` put there, the prompt and every generated token but the last) are not computed again
        (stats["cached_tokens"]; the last prompt token always is, for its logits), as llama-cpp-python's generate
        does: a conversation's next turn prefills only its new tokens.
        logprobs=k: each generated token's log-probability and the k likeliest tokens' (`token_logprob`), in
        Completion.logprobs. grammar (engine.grammar.JsonGrammar, or engine.gbnf.Gbnf: a GBNF grammar or a JSON
        schema's): the text keeps to it, sampled as llama.cpp samples under a grammar (`constrained_pick`); a stop
        token only once the text is whole.
        context_shift: at the end of the context, forget half of the positions after the prompt's first `keep`
        tokens (-1: the whole prompt; a BOS is always kept) and go on, as llama.cpp's --context-shift
        (engine.state.shift_context; stats["context_shifts"]); n = -1 then runs to a stop token."""
        sampler = sampler or Sampler(temperature=0.0)
        prompt_ids, n = self.check_prompt(prompt_ids), as_int(n, "n")
        self.check_sampler(sampler)
        if n < -1:
            raise HotcoldError(f"n = {n}: a count of tokens to generate, at least 0 (-1: to the end of the context)")
        if logprobs is not None and as_int(logprobs, "logprobs") < 0:
            raise HotcoldError(f"logprobs = {logprobs}: a count of likeliest tokens, at least 0")
        lps = None if logprobs is None else []
        if grammar is not None:
            self.check_grammar(sampler, ignore_stop)
            self.token_tables  # built now (0.5 s the first time), not in the decode's time
        state = None if grammar is None else grammar.start
        if context_shift:
            keep = as_int(keep, "keep")
            bos = prompt_ids[0] == self.tokenizer.bos_id
            keep = len(prompt_ids) if keep < 0 else min(len(prompt_ids), keep + bos)
        asked = (math.inf if context_shift else self.n_ctx) if n == -1 else n  # -1: what the context holds
        n = asked if context_shift else min(asked, self.n_ctx - len(prompt_ids))
        shifts = 0
        stream, shown = self.tokenizer.stream(), StopText(stop, on_text)
        self.reset_counts()
        cached = self.cached_prefix(prompt_ids) if reuse_cache else 0
        del self.kv_ids[cached:]  # what follows is overwritten now
        t0 = time.perf_counter()
        logits = self.net.next_logits(prompt_ids[cached:], cached)  # (n_vocab,)
        self.kv_ids = list(prompt_ids)
        t1 = time.perf_counter()
        out: list[int] = []
        pos = len(prompt_ids)
        context = list(prompt_ids)  # what the penalties of a Sampler look back on
        hit = False  # a stop string
        banned = sorted(self.tokenizer.stop_ids) if ignore_stop else []  # llama.cpp's --ignore-eos: never sampled
        # (by a Sampler; a callable of the caller's may still pick one: it is taken as any token then)
        while len(out) < n:
            raw = logits.copy() if lps is not None else None  # the model's, before the bans
            logits[banned] = -np.inf
            if grammar is not None:
                if np.isnan(logits).any():  # named, not taken for "no token goes on"
                    raise HotcoldError(self.not_finite(len(out)))
                maybe = worth_trying(grammar, state, self.token_tables.first)  # (n_vocab,)
                maybe[sorted(self.tokenizer.stop_ids)] = grammar.complete(state)
                tok = constrained_pick(sampler, logits, context, maybe, lambda t: self.allows(grammar, state, t),
                                       lambda: grammar.sure(state, self.token_tables))
                state = state if tok in self.tokenizer.stop_ids else grammar.advance(state, self.tokenizer.piece(tok))
            else:
                tok = sampler(logits, context) if isinstance(sampler, Sampler) else sampler(logits)
            context.append(tok)
            if len(context) > 2 * self.n_ctx:  # (with context_shift) the samplers look back a context at most
                del context[:-self.n_ctx]
            if not math.isfinite(logits[tok]) and tok not in banned:  # NaN logits: argmax and the draw land on one
                raise HotcoldError(self.not_finite(len(out)))
            out.append(tok)
            if lps is not None:
                lps.append(token_logprob(raw, tok, logprobs))
            hit = shown.add(stream.step(tok))
            if hit or (tok in self.tokenizer.stop_ids and not ignore_stop) or len(out) == n:
                break
            if pos == self.n_ctx - 1:  # full, as llama.cpp counts it (with context_shift): make room, or stop
                discard = (pos - keep) // 2
                if not discard:
                    break
                shift_context(self, keep, discard)
                pos, shifts = pos - discard, shifts + 1
            logits = self.net.next_logits([tok], pos)
            self.kv_ids.append(tok)
            pos += 1
        t2 = time.perf_counter()
        decoded = max(len(out) - 1, 0)  # forward passes after the prefill
        hit = hit or shown.add(stream.end())  # the end: a character cut off by the last token (U+FFFD, as decode)
        shown.show(len(shown.text))  # and the text held back
        stop = ("stop_string" if hit else "stop_token" if out and out[-1] in self.tokenizer.stop_ids and not ignore_stop
                else "length" if len(out) >= asked else "context")
        stats = {"prompt_tokens": len(prompt_ids), "cached_tokens": cached, "generated_tokens": len(out), "stop": stop,
                 "prefill_s": t1 - t0, "decode_s": t2 - t1,
                 "prefill_tok_s": (len(prompt_ids) - cached) / (t1 - t0),
                 "decode_tok_s": decoded / (t2 - t1) if decoded else None}  # None: no forward pass after the prefill
        if context_shift:
            stats["context_shifts"] = shifts
            if shifts:  # past `keep`, keys and values computed beside forgotten tokens: not for another prompt
                del self.kv_ids[keep:]
        if self.sparsity is not None:
            stats["sparsity"] = self.sparsity.sparsity()
        if self.runtime is not None:
            stats.update(self.runtime.stats())
        return Completion(shown.text, out, prompt_ids, stats, lps)

    def not_finite(self, k: int) -> str:
        return (f"token {k + 1}: the logits are not finite (the activations overflowed" + (
            "; an f16 KV cache holds values up to 65504: try --cache-type f32)" if self.cache_type == "f16" else ")"))

    def check_grammar(self, sampler, ignore_stop: bool) -> None:
        """Output under a grammar ends with an end token once its text is whole: a Sampler (the chain is applied to
        the tokens the grammar allows) that may sample one; else HotcoldError."""
        if not isinstance(sampler, Sampler):
            raise HotcoldError("a grammar (JSON output): with a Sampler, not a callable of the caller's")
        bias = dict(zip(sampler.bias_ids.tolist(), sampler.bias.tolist()))
        if ignore_stop or all(bias.get(t) == -math.inf for t in self.tokenizer.stop_ids):
            raise HotcoldError("output under a grammar (JSON output) ends with an end token once its text is whole: "
                               "not with ignore_eos, nor with every end token's logit biased to -inf")

    @cached_property
    def token_tables(self):
        return token_tables(self.tokenizer, self.config.n_vocab)

    def allows(self, grammar, state, t: int) -> bool:
        """Whether the grammar in `state` takes token t next: a stop token once the text is whole, else a token whose
        bytes go on with it (no control token: they have none)."""
        if t in self.tokenizer.stop_ids:
            return grammar.complete(state)
        piece = self.tokenizer.piece(t)
        return bool(piece) and t not in self.tokenizer.special_ids and grammar.advance(state, piece) is not None

    def cached_prefix(self, prompt_ids: list[int]) -> int:
        """How many of the prompt's first tokens `generate(reuse_cache=True)` takes from the cache: those that match
        `kv_ids`, all but the last prompt token at most."""
        k, n = 0, min(len(self.kv_ids), len(prompt_ids) - 1)
        while k < n and self.kv_ids[k] == prompt_ids[k]:
            k += 1
        return k

    def chunk_logprobs(self, tokens: list[int], ctx: int, chunks, steps: bool | None = None):
        """For each chunk k of `chunks` (llama.cpp's scheme): (k, logp, nll), logp the log-probabilities of its
        scored positions (ctx - 1 - ctx // 2, n_vocab) in float64, nll the negative log-likelihood of its tokens
        there. steps as in scored_logits."""
        import torch
        start = ctx // 2
        for k in chunks:
            chunk = self.chunk(tokens, k, ctx)
            logp = torch.log_softmax(self.scored_logits(chunk, start, steps).double(), -1)
            yield k, logp, -float(logp.gather(1, torch.as_tensor(chunk[start + 1:])[:, None]).sum())

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every layer and the output matrix (one embedding row aside)."""
        return self.net.decode_bytes_per_token()

    def perplexity(self, tokens: list[int], ctx: int = 512, chunks: int | None = None, first_chunk: int = 0,
                   progress: Callable[[int, float], None] | None = None,
                   each: Callable[[int, torch.Tensor], None] | None = None) -> dict:
        """llama.cpp's scheme: chunk k = tokens[k*ctx:(k+1)*ctx]; score its second half from its own prefix.
        each(k, logp): every chunk's log-probabilities (scored positions, n_vocab) in float64, as they come."""
        tokens = self.check_ids(tokens)
        scored = self.chunk_range(len(tokens), ctx, chunks, first_chunk)
        nll, count = 0.0, 0
        self.reset_counts()
        for k, logp, chunk_nll in self.chunk_logprobs(tokens, ctx, scored):
            nll, count = nll + chunk_nll, count + len(logp)
            if each is not None:
                each(k, logp)
            if progress is not None:
                progress(k, perplexity_of(nll, count))
        return {"ppl": perplexity_of(nll, count), "chunks": list(scored), "scored_tokens": count,
                **self.sparsity_stats()}

    def chunk_range(self, n_tokens: int, ctx: int, chunks: int | None = None, first_chunk: int = 0,
                    source: str = "the text") -> range:
        """The chunks `perplexity` scores in n_tokens tokens of `source` (named in the error when there are none)."""
        n_tokens, ctx = as_int(n_tokens, "n_tokens"), as_int(ctx, "ctx")
        first_chunk = as_int(first_chunk, "first_chunk")
        chunks = None if chunks is None else as_int(chunks, "chunks")
        if n_tokens < 0:
            raise HotcoldError(f"n_tokens {n_tokens}: a count of tokens, 0 or more")
        if ctx < 4:
            raise HotcoldError(f"--ctx {ctx}: a chunk needs at least 4 tokens")
        if first_chunk < 0 or (chunks is not None and chunks < 1):
            raise HotcoldError(f"chunks {chunks} from chunk {first_chunk}: at least one, from chunk 0 or later")
        if ctx > self.n_ctx:
            raise HotcoldError(f"--ctx {ctx}: longer than the model context {self.n_ctx}")
        available = n_tokens // ctx
        if available <= first_chunk:
            raise HotcoldError(f"{source}: {n_tokens} tokens hold {available} chunks of --ctx {ctx}, so none from "
                               f"--first-chunk {first_chunk}")
        return range(first_chunk, available if chunks is None else min(available, first_chunk + chunks))

    def measured_sparsity(self) -> float | None:
        """The FFN sparsity since reset_counts: the predictors' predicted sparsity where a runtime runs the FFN (None
        when no token went through a decode step), else the sparsity config's measured one; None for the dense
        model."""
        if self.runtime is not None:
            return self.runtime.stats()["predicted_sparsity"]
        return self.sparsity.sparsity() if self.sparsity is not None else None

    def sparsity_stats(self) -> dict:
        """What perplexity and hellaswag report of the FFN since reset_counts: the runtime's "stats" (predictors) and
        the "sparsity" of measured_sparsity, each where there is one."""
        res = {} if self.runtime is None else {"stats": self.runtime.stats()}
        sparsity = self.measured_sparsity()
        return res if sparsity is None else {**res, "sparsity": sparsity}

    def reset_counts(self) -> None:
        """Zero the sparsity config's and the runtime's counts: each generate or perplexity reports its own."""
        for hook in (self.sparsity, self.runtime):
            if hook is not None:
                hook.reset()

    def chunk(self, tokens: list[int], k: int, ctx: int) -> list[int]:
        """Chunk k of llama.cpp's perplexity scheme: tokens[k*ctx:(k+1)*ctx], its first token BOS where the model
        adds one."""
        chunk, bos = tokens[k * ctx:(k + 1) * ctx], self.tokenizer.bos_id
        return [bos] + chunk[1:] if self.tokenizer.add_bos and bos is not None else chunk

    def scored_logits(self, chunk: list[int], start: int, steps: bool | None = None,
                      prefix_held: bool = False) -> torch.Tensor:
        """Logits at positions start .. len(chunk)-2 of a teacher-forced chunk: (len(chunk) - 1 - start, n_vocab).
        The prefix chunk[:start] batched, then with steps (default: with predictors), as generation runs, one decode
        step per scored token (each counted in the runtime's statistics), else the scored positions in one more
        batch: the output matrix runs on those alone (half the chunk's logits, which the whole chunk in one batch
        computed and dropped). prefix_held: the caller's last call had this prefix (another continuation after it),
        whose keys and values the cache still holds: not computed again."""
        import torch
        if not prefix_held:
            self.kv_ids = []
            self.net.forward(chunk[:start], 0)  # ids checked by the caller
        if not (self.runtime is not None if steps is None else steps):
            return self.net.forward(chunk[start:-1], start, all_logits=True)
        return torch.stack([self.net.forward([chunk[p]], p) for p in range(start, len(chunk) - 1)])
