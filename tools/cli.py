"""`hotcold` command line: argument parsing and printing only; the work is in engine/ and tools/."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import signal
import sys
import threading

from engine.config import BACKENDS, CACHE_TYPES, DEFAULT_CTX, PREDICTOR_TYPES, HotcoldError

# commands whose parsers live in other modules, imported only when one of them runs (or for the full --help):
# most import torch, which alone takes a second that `generate` from a short prompt does not need
COMMAND_MODULES = {"chat": "tools.chat", "bench": "tools.bench", "train-predictors": "tools.predict",
                   "eval-predictors": "tools.predict", "split": "tools.split", "profile": "tools.profile",
                   "calibrate": "tools.calibrate", "export": "tools.export", "inspect": "tools.export",
                   "relufy": "tools.relufy", "server": "tools.server", "embedding": "tools.embedding"}
MODEL_HELP = "GGUF file, Hugging Face directory, or smollm2-135m (default)"
SPARSITY_HELP = "sparsity config (hotcold calibrate): FFN neurons below its thresholds are skipped"


def at_least(lo: int, hi: int | None = None):
    """An argparse type: an integer >= lo (a count of threads, tokens or chunks), and <= hi if given."""
    def parse(text: str) -> int:
        v = int(text)
        if v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}" if hi is None else
                                             f"must be from {lo} to {hi}, got {v}")
        return v
    parse.__name__ = "int"  # argparse names it in "invalid int value: 'abc'"
    return parse


def number(lo: float = -math.inf, above: bool = False):
    """An argparse type: a finite float >= lo (> lo if above)."""
    want = f"a number {'>' if above else '>='} {lo:g}" if math.isfinite(lo) else "a finite number"

    def parse(text: str) -> float:
        v = float(text)
        if not math.isfinite(v) or v < lo or (above and v == lo):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


def between(lo: float, hi: float):
    """An argparse type: a number in [lo, hi]."""
    def parse(text: str) -> float:
        v = float(text)
        if not lo <= v <= hi:  # NaN too
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text}")
        return v
    parse.__name__ = "float"
    return parse


def share(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


share.__name__ = "float"


def size(text: str) -> int:
    """An argparse type: bytes from '1500000', '512M', '2.5G' (binary units)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    v = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        n = int(float(v[:-1]) * units[v[-1]]) if v and v[-1] in units else int(v)
    except (ValueError, OverflowError):  # NaN, inf
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}")
    return n


def grammar_type(make, from_file: bool):
    """An argparse type: the grammar `make` builds from the text (or from the file it names), its errors one line."""
    def parse(text: str):
        from engine.files import read_text
        try:
            return make(read_text(os.path.expanduser(text), "file") if from_file else text)
        except HotcoldError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "grammar"
    return parse


def schema_text(text: str):
    """llama.cpp's -j SCHEMA: the grammar of a JSON schema (engine.schema.grammar_for)."""
    from engine.schema import grammar_for
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise HotcoldError(f"not JSON ({e})") from None
    return grammar_for(schema)


def gbnf_text(text: str):
    from engine.gbnf import Gbnf
    return Gbnf(text)


def logit_bias(text: str) -> tuple[int, float]:
    """An argparse type: llama.cpp's TOKEN_ID(+|-)BIAS, such as 15043+1 or 15043-inf (never that token)."""
    digits = len(text) - len(text.lstrip("0123456789"))
    try:
        bias = float(text[digits:]) if digits and text[digits:digits + 1] in ("+", "-") else math.nan
    except ValueError:
        bias = math.nan
    if math.isnan(bias) or bias == math.inf:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID+BIAS or TOKEN_ID-BIAS, such as 15043+1 or 15043-inf, got "
                                         f"{text!r}")
    return int(text[:digits]), bias


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: the usage block only with -h."""

    def error(self, message: str):
        self.exit(2, f"hotcold: error: {message} ({self.prog} -h for usage)\n")


def add_model_args(p: argparse.ArgumentParser, ctx: bool = True, backend: bool = True) -> None:
    """-m, -t; --backend and --cache-type unless backend is False (tokenize loads no weights, eval-predictors always
    runs the batched torch reference); -c if ctx."""
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="CPU threads (default: all cores)")
    if backend:
        p.add_argument("--backend", choices=BACKENDS, default="kernels",
                       help="kernels: numba on the stored blocks (default); torch: the reference (float32 weights, "
                       "activations rounded as ggml rounds them)")
        p.add_argument("--cache-type", choices=tuple(CACHE_TYPES), default="f16",
                       help="KV cache of the kernel backend: f16 (default, as llama.cpp) or f32")
        add_lora_args(p)
    if ctx:
        p.add_argument("-c", "--ctx", type=at_least(2), default=None,
                       help=f"context size in tokens (default {DEFAULT_CTX}, or the model's training context if "
                       "shorter)")


# llama.cpp's sampler options and defaults: the Sampler field NAME, flag --NAME with dashes (generate, chat), and
# the request field NAME (server): (type, default, help)
SAMPLING = {
    "temperature": (number(0), 0.8, "0 = greedy (default 0.8)"),
    "top_k": (at_least(0), 40, "0 = off (default 40)"),
    "top_p": (share, 0.95, "1 = off (default 0.95)"),
    "min_p": (between(0, 1), 0.05, "keep tokens at least this share of the likeliest one's probability; 0 = off "
              "(default 0.05)"),
    "seed": (int, None, "sampling seed (default, or negative as in llama.cpp: random)"),
    "repeat_penalty": (number(0, above=True), 1.0, "divide the logit of each of the last --repeat-last-n tokens by "
                       "this (multiply a negative one); 1 = off (default 1.0)"),
    "repeat_last_n": (at_least(-1), 64, "how many of the last tokens, the prompt's included, the penalties look at; "
                      "0 = off, -1 = all (default 64)"),
    "frequency_penalty": (number(), 0.0, "subtract this from a recent token's logit for each time it occurs; 0 = off "
                          "(default 0.0)"),
    "presence_penalty": (number(), 0.0, "subtract this from the logit of each recent token; 0 = off (default 0.0)"),
    "dry_multiplier": (number(0), 0.0, "DRY: subtract this * --dry-base ** (length - --dry-allowed-length) from the "
                       "logit of a token that would extend a repeat of the last tokens; 0 = off (default 0.0)"),
    "dry_base": (number(1), 1.75, "DRY's base (default 1.75)"),
    "dry_allowed_length": (at_least(0), 2, "repeats this long go unpunished by DRY (default 2)"),
    "dry_penalty_last_n": (at_least(-1), -1, "how many of the last tokens DRY looks at; 0 = off, -1 = all (default "
                           "-1)"),
    "top_n_sigma": (number(), -1.0, "keep the tokens whose logit is at least the largest minus this many standard "
                    "deviations of the logits; <= 0 = off (default -1)"),
    "typical_p": (between(0, 1), 1.0, "locally typical sampling's mass; 1 = off (default 1.0)"),
    "xtc_probability": (between(0, 1), 0.0, "XTC: how often the likeliest tokens are removed, all but the least of "
                        "those at least --xtc-threshold likely; 0 = off (default 0.0)"),
    "xtc_threshold": (between(0, 1), 0.1, "XTC's threshold; above 0.5 = off (default 0.1)"),
    "dynatemp_range": (number(0), 0.0, "dynamic temperature: from the entropy, between --temperature minus and plus "
                       "this; 0 = off (default 0.0)"),
    "dynatemp_exponent": (number(0), 1.0, "dynamic temperature's exponent (default 1.0)"),
    "mirostat": (at_least(0, 2), 0, "1 or 2: mirostat v1 or v2 after the temperature, in place of the other "
                 "samplers and the penalties, as llama.cpp; 0 = off (default 0)"),
    "mirostat_tau": (number(0), 5.0, "mirostat's target entropy (default 5.0)"),
    "mirostat_eta": (number(0), 0.1, "mirostat's learning rate (default 0.1)"),
}
ALIASES = {"top_n_sigma": "--top-nsigma", "typical_p": "--typical", "dynatemp_exponent": "--dynatemp-exp",
           "mirostat_tau": "--mirostat-ent", "mirostat_eta": "--mirostat-lr"}  # llama.cpp's spellings of those flags


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    for name, (kind, default, text) in SAMPLING.items():
        flags = ["--" + name.replace("_", "-")] + ([ALIASES[name]] if name in ALIASES else [])
        p.add_argument(*flags, dest=name, type=kind, default=default, help=text)
    p.add_argument("--dry-sequence-breaker", action="append", default=None, metavar="TEXT", help="a DRY repeat does "
                   "not run across a token holding TEXT (repeatable; default: newline, colon, double quote, asterisk "
                   "as llama.cpp's; 'none' drops those before it; one token must hold it whole)")
    p.add_argument("-l", "--logit-bias", type=logit_bias, action="append", default=[], metavar="ID(+|-)BIAS",
                   help="add BIAS to token ID's logit before the other samplers, e.g. 15043+1, or 15043-inf: never "
                   "that token (repeatable; `hotcold tokenize` gives the ids)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("-j", "--json-schema", dest="grammar", type=grammar_type(schema_text, False), metavar="SCHEMA",
                      help="the text is JSON that the schema describes ('{}': any JSON object), as llama.cpp's -j: "
                      "only tokens that keep to it are sampled, and it ends when the JSON is whole")
    keep.add_argument("-jf", "--json-schema-file", dest="grammar", type=grammar_type(schema_text, True),
                      metavar="FILE", help="-j with the schema read from a file")
    keep.add_argument("--grammar", dest="grammar", type=grammar_type(gbnf_text, False), metavar="GBNF",
                      help="the text keeps to a GBNF grammar (llama.cpp's format, from its rule root)")
    keep.add_argument("--grammar-file", dest="grammar", type=grammar_type(gbnf_text, True), metavar="FILE",
                      help="--grammar read from a file (llama.cpp's grammars/*.gbnf)")


def checked_sampler(model, args):
    """The command's Sampler, its -l and -j checked against the model before anything runs (a bias outside the
    vocabulary; JSON output with no end token to end it)."""
    sampler = sampler_of(args)
    model.check_sampler(sampler)
    if args.grammar is not None:
        model.check_grammar(sampler, getattr(args, "ignore_eos", False))
    return sampler


def sampler_of(args, **given):
    """The Sampler of the command's sampling options, those `given` in their place (logit_bias: a dict)."""
    from engine.sampling import DRY_BREAKERS, Sampler
    bias: dict[int, float] = {}
    for i, v in args.logit_bias:  # the same token twice: both added, as llama.cpp's
        bias[i] = bias.get(i, 0.0) + v
    breakers = list(DRY_BREAKERS if args.dry_sequence_breaker is None else ())
    for b in args.dry_sequence_breaker or ():  # "none" clears those before it, as llama.cpp's
        breakers = [] if b == "none" else breakers + [b]
    return Sampler(**{name: given.get(name, getattr(args, name)) for name in SAMPLING},
                   logit_bias=given.get("logit_bias", bias),
                   dry_sequence_breakers=given.get("dry_sequence_breakers", tuple(breakers)))


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How the FFN is sparsified: a sparsity config, or predictors with a hot/cold split."""
    p.add_argument("--sparsity", default=None, help=SPARSITY_HELP)
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--predictors", default=None, help="predictor bundle (hotcold train-predictors): decode only the "
                    "FFN neurons it predicts active")
    pg.add_argument("--no-predictors", action="store_true", help="leave the predictors a model file carries (an "
                    "export's) unused: the dense FFN, or --sparsity's")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split", default=None, help="hot/cold split (hotcold split's OUT.json, or a PowerInfer "
                   ".gpuidx): hot neurons on the GPU")
    g.add_argument("--gpu-budget", type=size, default=None, help="GPU memory for a split solved now, e.g. 512M, from "
                   "the activation counts of the profile the predictors were trained on; 0: everything on the CPU")
    p.add_argument("--hot-device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where hot neurons run: auto = CUDA when available, else everything on the CPU kernels; "
                   "cpu = torch on the CPU (exercises the split without a GPU)")
    p.add_argument("--predictor-type", choices=PREDICTOR_TYPES, default=None,
                   help="how decoding stores the predictor weights it reads every token (default: the type the "
                   "bundle was trained for, train-predictors --predictor-type): F16, Q8_0 or Q4_1; a bundle "
                   "trained for F16 decides a little differently in the others")
    p.add_argument("--audit-recall", action="store_true", help="also compute the true active neurons (slower): "
                   "recall, precision and actual sparsity in the stats")


def runtime_flags_given(args, flags: tuple[str, ...]) -> list[str]:
    """Which of `flags`, options of `add_runtime_args` beside --predictors, the command line set."""
    given = {"--split": args.split is not None, "--gpu-budget": args.gpu_budget is not None,
             "--audit-recall": args.audit_recall, "--hot-device": args.hot_device != "auto",
             "--predictor-type": args.predictor_type is not None, "--sparsity": args.sparsity is not None,
             "--no-predictors": args.no_predictors}
    return [f for f in flags if given[f]]


COMPILE_NOTE = "hotcold: compiling the numba kernels for this CPU (a minute or so; they are cached for later runs)"


def note_compiles(stream=None) -> None:
    """At a terminal, one line on stderr when numba starts compiling (the first run after an install or update, a
    model of another weight type): a minute without output otherwise looks hung. Once per process."""
    stream = stream or sys.stderr
    if getattr(note_compiles, "on", False) or stream is None or not stream.isatty():  # None: stderr closed
        return
    from numba.core import event

    class Note(event.Listener):
        def on_start(self, ev):
            if not note_compiles.said:
                note_compiles.said = True
                cut = sys.stdout is not None and sys.stdout.isatty()  # a line of generate's own may be open there
                print(("\n" if cut else "") + COMPILE_NOTE, file=stream, flush=True)

        def on_end(self, ev):
            pass

    note_compiles.on, note_compiles.said = True, False
    event.register("numba:compile", Note())


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE", help="a LoRA adapter (llama.cpp's GGUF "
                   "adapter, or a PEFT directory) merged into the weights at load; repeatable")
    p.add_argument("--lora-scaled", action="append", nargs=2, default=[], metavar=("FILE", "SCALE"),
                   help="--lora with its delta scaled by SCALE; repeatable")


def adapters(args) -> list[tuple[str, float]]:
    """--lora and --lora-scaled as (path, scale) pairs."""
    out = [(f, 1.0) for f in getattr(args, "lora", [])]  # (commands without --backend load no adapter)
    for f, scale in getattr(args, "lora_scaled", []):
        try:
            out.append((f, float(scale)))
        except ValueError:
            raise HotcoldError(f"--lora-scaled {f} {scale}: the scale is not a number") from None
        if not math.isfinite(out[-1][1]):
            raise HotcoldError(f"--lora-scaled {f} {scale}: a finite scale")
    return out


def lora_merged(ckpt, args):
    """ckpt (an engine.loader.Checkpoint) with --lora's adapters merged into its tensors, for the commands that load
    a checkpoint rather than a model (export, train-predictors, eval-predictors)."""
    given = adapters(args)
    if given:
        from engine.lora import apply_lora
        apply_lora(ckpt, given)
    return ckpt


def load_model(args, n_ctx: int | None = None):
    """-m with the command's options. The commands with the runtime's options (add_runtime_args) decode through
    predictors, --predictors' or those the model file carries (not with --no-predictors), set once with the split;
    the others (profile, calibrate) run the model itself."""
    from engine.api import load
    note_compiles()
    model = load(args.model, n_ctx=n_ctx or args.ctx, threads=args.threads,
                 backend=args.backend, sparsity=getattr(args, "sparsity", None), cache_type=args.cache_type,
                 predictors=False, lora=adapters(args))
    if not hasattr(args, "predictors"):
        return model
    bundle = None if args.no_predictors else args.predictors if args.predictors is not None else model.ckpt.predictors
    if bundle is not None and bundle is model.ckpt.predictors and adapters(args):
        from engine.lora import check_carried
        check_carried(model.ckpt)
    if bundle is None:
        given = runtime_flags_given(args, ("--split", "--gpu-budget", "--audit-recall", "--hot-device",
                                           "--predictor-type"))
        if given and args.no_predictors:
            raise HotcoldError(f"{given[0]}: --no-predictors runs no predictors for it to go with")
        if given:
            raise HotcoldError(f"{given[0]} goes with --predictors (or a model exported with its predictors)")
        return model
    from tools.split import hot_neurons
    bundle, hot, device = hot_neurons(model, bundle, args.split, args.gpu_budget, args.hot_device, model.n_ctx)
    model.set_predictors(bundle, hot, device, args.audit_recall, args.predictor_type)
    return model


def strict(obj):
    """obj with each float that is not finite as None (null): strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"  # else \u escapes keep the text exact
    json.dump(strict(obj), sys.stdout, ensure_ascii=not utf8, allow_nan=False)
    sys.stdout.write("\n")


# --- commands -------------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    from engine.files import read_text
    from engine.tokenizer import valid_text
    if args.system is not None and not args.chat:
        raise HotcoldError("--system: the system message of --chat's template; it goes with --chat")
    if args.keep and not args.context_shift:
        raise HotcoldError("--keep: the prompt's tokens a context shift keeps; it goes with --context-shift")
    # -f as llama.cpp's: the file as it is but for one final newline; a bad file is named before the model loads
    text = args.prompt if args.file is None else read_text(args.file, "prompt file").removesuffix("\n")
    model = load_model(args)
    prompt = valid_text(text)
    if args.chat:
        system = None if args.system is None else valid_text(args.system)
        prompt = model.tokenizer.apply_chat_template(prompt, system)
    ids = model.tokenize(prompt)
    model.check_prompt(ids)  # before the prompt is echoed: a refused prompt prints nothing on stdout
    sampler = checked_sampler(model, args)
    reuse = prompt_cache(model, args, ids)
    if args.json:
        out = model.generate(ids, args.n, sampler, ignore_stop=args.ignore_eos, stop=args.stop,
                             grammar=args.grammar, reuse_cache=reuse, context_shift=args.context_shift,
                             keep=args.keep)
        emit_json(out.to_dict())
    else:
        sys.stdout.write(prompt)
        sys.stdout.flush()

        def on_text(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        out = model.generate(ids, args.n, sampler, on_text=on_text, ignore_stop=args.ignore_eos, stop=args.stop,
                             grammar=args.grammar, reuse_cache=reuse, context_shift=args.context_shift,
                             keep=args.keep)
        s = out.stats
        sys.stdout.write("\n")
        sys.stdout.flush()  # before the statistics on stderr
        rate = "n/a" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.1f}"
        cached = f" ({s['cached_tokens']} from the cache)" if s["cached_tokens"] else ""
        print(f"prefill: {s['prompt_tokens']} tokens{cached}, {s['prefill_tok_s']:.1f} tok/s | "
              f"decode: {s['generated_tokens']} tokens, {rate} tok/s"
              + (f" | FFN sparsity {s['sparsity']:.1%}" if s.get("sparsity") is not None else "")
              + (f" | context shifts: {s['context_shifts']}" if s.get("context_shifts") else ""), file=sys.stderr)
        if "predicted_sparsity" in s:
            print(format_runtime_stats(s), file=sys.stderr)
    if out.stats["stop"] == "context":
        why = "the kept prompt leaves nothing to forget: lower --keep or raise --ctx" if args.context_shift else \
            "raise --ctx, or --context-shift"
        print(f"hotcold: note: stopped at the end of the context of {model.n_ctx} tokens ({why})", file=sys.stderr)


def prompt_cache(model, args, ids: list[int]) -> bool:
    """--prompt-cache: the KV cache filled from the file where it exists (a note says how much of the prompt it
    holds); where the file does not hold the whole prompt, the rest computed and the prompt's keys and values written
    to it before generating (not with --prompt-cache-ro), as llama.cpp's; whether generate reuses the cache (then the
    prompt's last token is computed again by a decode step, the file or not, so every run says the same)."""
    from engine.files import check_writable
    from engine.state import check_dense
    if args.prompt_cache is None:
        if args.prompt_cache_ro:
            raise HotcoldError("--prompt-cache-ro: with --prompt-cache FILE")
        return False
    check_dense(model)
    if not args.prompt_cache_ro:
        check_writable(args.prompt_cache)
    whole = 0  # how many of the prompt's tokens the file holds
    if os.path.exists(args.prompt_cache) or args.prompt_cache_ro:
        held = model.load_state(args.prompt_cache)
        while whole < min(held, len(ids)) and model.kv_ids[whole] == ids[whole]:
            whole += 1
        print(f"prompt cache: {args.prompt_cache} holds {held} tokens, of which the prompt begins with {whole} (of "
              f"its {len(ids)})", file=sys.stderr)
    if whole < len(ids) and not args.prompt_cache_ro:
        model.generate(ids, 0, reuse_cache=True)  # the prompt alone, then written
        model.save_state(args.prompt_cache, len(ids))
    return True


def format_runtime_stats(s: dict) -> str:
    """The predictor runtime's statistics: per layer, then the means (audit columns when measured)."""
    if not s["tokens"]:
        return "predictors: no token went through a decode step (a long prompt is prefilled batched), no statistics"
    audit = "recall" in s
    from predictors.metrics import METRIC_KEYS  # train- and eval-predictors' columns, in their order and names
    cols = METRIC_KEYS if audit else ("predicted_sparsity",)
    head = {"predicted_sparsity": "pred.sp", "actual_sparsity": "act.sp"}
    lines = ["layer " + " ".join(f"{head.get(k, k):>9}" for k in cols)]
    lines += [f"{m['layer']:>5} " + " ".join(f"{m[k]:>9.4f}" for k in cols) for m in s["per_layer"]]
    lines.append("  all " + " ".join(f"{s[k]:>9.4f}" for k in cols))
    dev, tokens = s.get("hot_device"), f"({s['tokens']} tokens through decode steps)"
    hot = None if dev is None else "the GPU" if dev.startswith("cuda") else f"the hot device ({dev}, in torch)"
    lines.append(f"FFN neurons computed on {hot}: {s['gpu_share']:.1%}, on the CPU kernels: {1 - s['gpu_share']:.1%} "
                 f"{tokens}" if hot else f"FFN neurons all computed on the CPU kernels (no hot device) {tokens}")
    return "\n".join(lines)


def cmd_tokenize(args) -> None:
    from engine.loader import load_checkpoint
    tok = load_checkpoint(args.model, values=False).tokenizer
    ids = tok.encode(args.text, special=not args.no_special, add_bos=args.bos)
    if args.json:
        emit_json({"token_ids": ids, "pieces": [tok.tk.id_to_token(i) for i in ids]})
    else:
        print(" ".join(map(str, ids)))


def running_bar(total: int, desc: str, unit: str, quiet: bool, name: str, fmt: str):
    """A progress bar on stderr (none when quiet: --json) and its callback(k, value): a step, the running value
    shown as name=value."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, disable=quiet or None, file=sys.stderr)

    def step(k, value):
        bar.update(1)
        bar.set_postfix({name: format(value, fmt)})
    return bar, step


def hellaswag_cmd(args) -> None:
    """perplexity -f FILE --hellaswag (tools/hellaswag.py)."""
    from tools.hellaswag import hellaswag, read_tasks
    given = [f for f, v in (("--chunks", args.chunks), ("--first-chunk", args.first_chunk),
                            ("--kl-divergence-base", args.kl_divergence_base), ("--kl-divergence", args.kl_divergence))
             if v]
    if given or not args.file or len(args.file) > 1:
        raise HotcoldError(f"{given[0] if given else '-f'}: --hellaswag scores the tasks of one file, -f FILE"
                           + (f", not {given[0]}" if given else ""))
    tasks = read_tasks(args.file[0])[:args.hellaswag_tasks]
    model = load_model(args, n_ctx=args.ctx or 512)
    bar, progress = running_bar(len(tasks), "hellaswag", "task", args.json, "acc", ".2%")
    res = hellaswag(model, tasks, progress)
    bar.close()
    if args.json:
        emit_json(res)
    else:
        ci = f" ± {res['ci95']:.2%}" if res["ci95"] is not None else ""
        sparsity = f", FFN sparsity {res['sparsity']:.1%}" if "sparsity" in res else ""
        print(f"hellaswag: {res['accuracy']:.2%}{ci} over {res['tasks']} tasks{sparsity}")


def cmd_perplexity(args) -> None:
    from tools import kld
    from tools.profile import read_corpus
    if args.hellaswag:
        return hellaswag_cmd(args)
    base = args.kl_divergence_base
    if args.kl_divergence:  # the text, ctx and chunks are the base's
        if base is None:
            raise HotcoldError("--kl-divergence compares with --kl-divergence-base FILE, which a run with -f wrote")
        given = [f for f, v in (("-f", args.file), ("--ctx", args.ctx), ("--first-chunk", args.first_chunk))
                 if v is not None]
        if given:
            raise HotcoldError(f"{given[0]}: --kl-divergence takes the text, --ctx and chunks of {base} (--chunks N: "
                               "its first N)")
        tokens, ctx, scored = kld.base_chunks(base, args.chunks)  # a bad file is named before the model loads
        try:
            model = load_model(args, n_ctx=ctx)
        except HotcoldError as e:
            raise HotcoldError(f"{base} was written with --ctx {ctx}: {e}") from None
    else:
        if args.file is None:
            raise HotcoldError("-f FILE: the text to score (or --kl-divergence with --kl-divergence-base FILE)")
        if base is not None:
            kld.refuse_other_file(base)
        text = "\n\n".join(read_corpus(args.file))  # a bad file is named before the model loads
        ctx = args.ctx or 512
        model = load_model(args, n_ctx=ctx)
        tokens = model.tokenize(text, special=False)  # BOS first where the model adds one, as llama.cpp
        scored = model.chunk_range(len(tokens), ctx, args.chunks, args.first_chunk or 0, ", ".join(args.file))
    bar, progress = running_bar(len(scored), "perplexity", "chunk", args.json, "ppl", ".4f")

    def run(each=None):
        return model.perplexity(tokens, ctx, len(scored), scored.start, progress, each)

    res = (kld.compare(base, model, run) if args.kl_divergence else
           kld.write_base(base, model, tokens, ctx, scored, run) if base is not None else run())
    bar.close()
    if args.json:
        emit_json(res)
    else:
        sparsity = f", FFN sparsity {res['sparsity']:.1%}" if "sparsity" in res else ""
        print(f"perplexity: {res['ppl']:.4f} over chunks {res['chunks'][0]}-{res['chunks'][-1]} "
              f"({res['scored_tokens']} scored tokens, ctx {ctx}{sparsity})")
        if "kld" in res:
            d = res["kld"]  # a standard error needs two tokens
            err, top_err = [("" if v is None else f" ± {v:{f}}") for v, f in ((d["stderr"], ".5f"),
                                                                                (d["same_top_stderr"], ".2%"))]
            ratio = "" if d["ln_ppl_ratio_stderr"] is None else f" ± {d['ln_ppl_ratio_stderr']:.5f}"
            print(f"KL divergence from {base} ({os.path.basename(d['base_model'])}, perplexity {d['ppl_base']:.4f}): "
                  f"mean {d['mean']:.5f}{err}, median {d['median']:.5f}, 99% {d['p99']:.5f}, 99.9% {d['p999']:.5f}, "
                  f"max {d['max']:.5f}; same likeliest token {d['same_top']:.2%}{top_err}; ln(PPL/PPL base) "
                  f"{d['ln_ppl_ratio']:.5f}{ratio}; RMS Δp {d['rms_dp']:.4f}")
        if "stats" in res:
            print(format_runtime_stats(res["stats"]))


# --- parser ---------------------------------------------------------------------------------------------
class Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked (importlib.metadata takes 20-40 ms,
    which every command's start would pay)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print hotcold's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(f"hotcold {version('hotcold')}")
        except PackageNotFoundError:  # a checkout run without installing
            parser.error("--version: hotcold is not installed (pip install -e .)")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All commands; given the command that will run, only the module that defines it is imported."""
    ap = Parser(prog="hotcold", description="sparse hot/cold LLM inference")
    ap.add_argument("--version", action=Version)
    sub = ap.commands = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the prompt text (with --chat: the user's message)")
    prompt.add_argument("-f", "--file", metavar="FILE", help="the prompt read from a UTF-8 file, as it is but for one "
                        "final newline, as llama.cpp's -f reads it")
    p.add_argument("-n", "--n-predict", dest="n", type=at_least(-1), default=128,
                   help="tokens to generate (default 128; -1: until a stop token or the end of the context, "
                   "with --context-shift until a stop token)")
    p.add_argument("--ignore-eos", action="store_true", help="never sample the model's end-of-text and end-of-turn "
                   "tokens (llama.cpp's): on to -n tokens or the end of the context")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the text before this string "
                   "(repeatable; the one that starts first; not shown; an empty one is none)")
    p.add_argument("--context-shift", action="store_true", help="at the end of the context, forget half of what "
                   "follows the kept prompt tokens and go on (llama.cpp's; -n -1: until a stop token)")
    p.add_argument("--keep", type=at_least(-1), default=0, metavar="N", help="with --context-shift: the prompt's "
                   "first N tokens are never forgotten (default 0, -1: the whole prompt; a BOS always is)")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before the prompt (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--prompt-cache", metavar="FILE", default=None, help="take the prompt's first tokens' keys and "
                   "values from FILE where they are there, and write the prompt's to it (llama.cpp's)")
    p.add_argument("--prompt-cache-ro", action="store_true", help="read --prompt-cache, do not write it")
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="print the token ids of a text")
    add_model_args(p, ctx=False, backend=False)
    p.add_argument("text")
    p.add_argument("--no-special", action="store_true", help="treat <|...|> control tokens as plain text")
    p.add_argument("--bos", action="store_true", default=None, help="prepend BOS (default: the model's rule)")
    p.add_argument("--json", action="store_true", help='print {"token_ids", "pieces"}: each token as the vocabulary '
                   "spells it (byte-level: Ġ is a space, Ċ a newline)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("perplexity", help="perplexity of a text file, llama.cpp's chunk scheme")
    add_model_args(p, ctx=False)
    p.add_argument("-f", "--file", nargs="+", metavar="FILE",
                   help="text files, or .jsonl with a text field per line, joined by blank lines")
    p.add_argument("-c", "--ctx", type=at_least(4), default=None, help="chunk size in tokens (default 512)")
    p.add_argument("--chunks", type=at_least(1), default=None, help="number of chunks (default: all)")
    p.add_argument("--first-chunk", type=at_least(0), default=None, help="first chunk scored (default 0)")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None, help="with -f: write the tokens and every "
                   "scored position's log-probabilities to FILE; with --kl-divergence: compare with them")
    p.add_argument("--kl-divergence", action="store_true", help="the KL divergence of this model's next-token "
                   "distributions from --kl-divergence-base's, over its text and chunks (as llama.cpp's)")
    p.add_argument("--hellaswag", action="store_true", help="-f FILE holds HellaSwag tasks (llama.cpp's format: "
                   "6 lines each): print the multiple-choice accuracy, as llama.cpp's --hellaswag")
    p.add_argument("--hellaswag-tasks", type=at_least(1), default=400, metavar="N",
                   help="the first N tasks of the file (default 400, as llama.cpp's)")
    p.add_argument("--json", action="store_true", help='print {"ppl", "chunks", "scored_tokens"}, and "sparsity" '
                   'with --sparsity, "stats" with --predictors, "kld" with --kl-divergence; with --hellaswag '
                   '{"tasks", "accuracy", "ci95", "choices"} and the same "sparsity" and "stats"')
    add_runtime_args(p)
    p.set_defaults(func=cmd_perplexity)

    if command in sub.choices:
        return ap
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else dict.fromkeys(COMMAND_MODULES.values())
    for name in wanted:
        importlib.import_module(name).add_command(sub)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a job scheduler): a command stops as on Ctrl-C, its temporary files removed."""


PATH_ARGS = ("model", "out", "file", "files", "profile", "bundle", "predictors", "sparsity", "split", "report",
             "kl_divergence_base", "prompt_cache")


def expand_paths(args) -> None:
    """~ in path options: a shell leaves --out=~/x as it is."""
    for name in PATH_ARGS:
        v = getattr(args, name, None)
        if isinstance(v, str):
            setattr(args, name, os.path.expanduser(v))
        elif isinstance(v, list):
            setattr(args, name, [os.path.expanduser(p) if isinstance(p, str) else p for p in v])


def drop_stdout() -> None:
    """What stdout still buffers goes nowhere: the flush at exit would fail again, outside main."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM during whose handling e was raised, if any."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__context__
    return e


def stopped(e: KeyboardInterrupt, process: bool) -> int:
    """main's end on Ctrl-C (130) or SIGTERM (143, `Terminated`)."""
    if process:  # a second Ctrl-C ends the process at once, as a second SIGTERM does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if isinstance(e, Terminated):
        print("hotcold: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("hotcold: interrupted", file=sys.stderr)
    return 130


def terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM, during the cleanup, ends the process
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # `hotcold` itself (not a program calling main, nor a parent that has SIGINT ignored): hands SIGINT back at the end
    process = (argv is None and threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    argv = sys.argv[1:] if argv is None else argv
    # SIGTERM becomes Terminated unless the program calling main (or a parent ignoring it) has its own way with it
    mine = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if mine:
        signal.signal(signal.SIGTERM, terminate)
    try:  # from the start: a command's module imports torch, which takes seconds
        ap = build_parser(argv[0] if argv else None)
        args, extra = ap.parse_known_args(argv)
        if extra:  # named by the command's parser, whose -h tells the options
            ap.commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "threads", None) is None and hasattr(args, "threads"):
            args.threads = os.cpu_count()
        expand_paths(args)
        if sys.stdout is None:
            raise HotcoldError("stdout is closed")
        if hasattr(sys.stdout, "reconfigure"):  # a locale that cannot show a character gets "?", not a traceback
            sys.stdout.reconfigure(errors="replace")
        if getattr(args, "out", None):  # profile, calibrate, train-predictors, relufy, ...
            from engine.files import output_lock
            with output_lock(args.out):
                args.func(args)
        else:
            args.func(args)
        sys.stdout.flush()  # here, where a closed pipe or a full disk is caught, not at exit
    except HotcoldError as e:
        if interruption(e) is not None:  # a write that Ctrl-C cut short: "cannot write (...)"
            return stopped(interruption(e), process)
        print(f"hotcold: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return stopped(e, process)
    except MemoryError:
        print("hotcold: error: out of memory", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): quietly
        drop_stdout()
        return 0
    except OSError as e:  # an output path that cannot be written: a directory, under a file, no permission, disk full
        if interruption(e) is not None:
            return stopped(interruption(e), process)
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO):  # stdout's file (> file)
            drop_stdout()
            e.filename = "stdout"
        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e)
        if isinstance(e, FileExistsError) and not os.path.isdir(e.filename):  # os.makedirs under a file
            what = "exists and is not a directory"
        print(f"hotcold: error: {where}{what}", file=sys.stderr)
        return 2
    except Exception as e:  # raised by cleanup that the interruption cut short (torch.save's zip writer: ValueError)
        if interruption(e) is None:
            raise
        return stopped(interruption(e), process)
    finally:
        if mine:  # main() called in a program (the tests) leaves its SIGTERM as it was
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if process:  # Ctrl-C while the interpreter exits (atexit, tqdm's monitor): the process ends, no traceback
            signal.signal(signal.SIGINT, signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
