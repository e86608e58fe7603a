"""hotcold chat: a conversation with the model in the terminal, as llama-cli's conversation mode.

Each turn renders the whole conversation through the model's chat template and generates with the KV cache reused
(`Model.generate(reuse_cache=True)`): only what follows the tokens the cache holds, the last reply's end and the
new message, is computed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator

ROOM = 4  # the oldest exchanges are dropped when a reply would have less than 1/ROOM of the context (or -n tokens)


def input_lines(tty: bool) -> Iterator[str]:
    """The input's lines without their newline; at a terminal read with a "> " prompt and line editing (the prompt
    on stderr when stdout goes elsewhere: a file of replies or JSON holds only them)."""
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become surrogates, then U+FFFD (valid_text)
        sys.stdin.reconfigure(errors="surrogateescape")
    if not tty:
        for line in sys.stdin:
            yield line.removesuffix("\n")
        return
    with contextlib.suppress(ImportError):  # loaded, it gives input() line editing and a history
        importlib.import_module("readline")
    while True:
        if not sys.stdout.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            yield input("> " if sys.stdout.isatty() else "")
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            return


def messages(lines: Iterator[str]) -> Iterator[str]:
    """The user's messages: a line each, a line that ends in a backslash continued by the next (as in llama-cli)."""
    parts: list[str] = []
    for line in lines:
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        yield "\n".join(parts + [line])
        parts = []
    if parts:
        yield "\n".join(parts)


def conversation_ids(model, history: list[dict], user: dict, system: str | None, room: int) -> tuple[list[int], int]:
    """(the tokens of the conversation so far and the user's new message, ready for the reply; how many of the
    oldest exchanges they leave out): exchanges go while the reply would have fewer than `room` positions of the
    context. A message too long for the context alone: HotcoldError."""
    for dropped in range(0, len(history) + 1, 2):
        ids = model.tokenize(model.tokenizer.apply_chat_template(history[dropped:] + [user], system))
        if len(ids) + room <= model.n_ctx:
            break
    return model.check_prompt(ids), dropped // 2


def cmd_chat(args) -> None:
    from engine.config import HotcoldError
    from engine.tokenizer import valid_text
    from tools.cli import Terminated, checked_sampler, emit_json, load_model, prompt_cache
    model = load_model(args)
    system = None if args.system is None else valid_text(args.system)
    bare = model.tokenize(model.tokenizer.apply_chat_template("", system))  # no chat template: refused here
    if len(bare) >= model.n_ctx:
        raise HotcoldError(f"the chat template{' and --system' if system else ''} alone take {len(bare)} tokens, "
                           f"the whole context of {model.n_ctx} (raise --ctx)")
    if args.prompt_cache is not None or args.prompt_cache_ro:  # what every conversation begins with: the template's
        a, b = (model.tokenize(model.tokenizer.apply_chat_template(t, system)) for t in ("a", "b"))  # tokens before
        head = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # the first message
        if not head:
            raise HotcoldError(f"--prompt-cache: the chat template{' and --system' if system else ''} write "
                               "nothing before the first message, nothing to keep")
        prompt_cache(model, args, a[:head])
    tty = sys.stdin.isatty()
    if tty:
        print(f"hotcold chat ({model.ckpt.path}, context {model.n_ctx} tokens): a line that ends in \\ continues on "
              "the next; Ctrl-C stops a reply, Ctrl-D ends the chat", file=sys.stderr)
    n = model.n_ctx if args.n == -1 else args.n
    sampler, room = checked_sampler(model, args), min(n, model.n_ctx // ROOM)
    history: list[dict] = []
    total = {"replies": 0, "prompt": 0, "cached": 0, "tokens": 0, "decode_s": 0.0}
    try:
        for text in messages(input_lines(tty)):
            if not text.strip():
                continue
            user = {"role": "user", "content": valid_text(text)}
            try:
                ids, dropped = conversation_ids(model, history, user, system, room)
            except HotcoldError as e:  # the conversation stays as it was
                if not tty:
                    raise
                print(f"hotcold: error: {e}", file=sys.stderr)  # at a terminal the chat goes on
                continue
            if dropped:
                del history[:2 * dropped]
                print(f"hotcold: note: the oldest {'exchange' if dropped == 1 else f'{dropped} exchanges'} left the "
                      f"conversation, to fit the context of {model.n_ctx} tokens (raise --ctx to keep more)",
                      file=sys.stderr)
            total["replies"] += 1
            total["prompt"] += len(ids)
            total["cached"] += model.cached_prefix(ids)  # what generate(reuse_cache=True) takes from the cache
            shown: list[str] = []

            def on_text(piece: str) -> None:
                shown.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()

            try:
                out = model.generate(ids, n, sampler, on_text=None if args.json else on_text,
                                     reuse_cache=True, grammar=args.grammar)
            except KeyboardInterrupt as e:  # Ctrl-C at a terminal stops the reply; what it said so far stays said
                if isinstance(e, Terminated) or not tty:
                    raise
                print("\nhotcold: reply stopped" + ("" if shown else "; the message is left out, as unanswered"),
                      file=sys.stderr)
                if shown:
                    history += [user, {"role": "assistant", "content": "".join(shown)}]
                continue
            history += [user, {"role": "assistant", "content": out.text}]
            s = out.stats
            total["tokens"] += max(s["generated_tokens"] - 1, 0)
            total["decode_s"] += s["decode_s"]
            if args.json:
                emit_json(out.to_dict())
            else:
                sys.stdout.write("\n")
            sys.stdout.flush()
            if s["stop"] == "context":
                print(f"hotcold: note: the reply stopped at the end of the context of {model.n_ctx} tokens (raise "
                      "--ctx)", file=sys.stderr)
    finally:  # Ctrl-D, the input's end, Ctrl-C at the prompt (then `hotcold: interrupted`)
        n = total["replies"]
        if n:
            rate = f"{total['tokens'] / total['decode_s']:.1f} tok/s" if total["decode_s"] > 0 else "n/a"
            print(f"chat: {n} {'reply' if n == 1 else 'replies'} | prompt: {total['prompt']} tokens, "
                  f"{total['cached']} of them from the cache | decode: {rate}", file=sys.stderr)


def reply_tokens(text: str) -> int:
    """An argparse type: -n of chat, -1 or at least 1."""
    v = int(text)
    if v != -1 and v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or -1: no limit), got {v}")
    return v


reply_tokens.__name__ = "int"  # argparse names it in "invalid int value"


def add_command(sub) -> None:
    from tools.cli import add_model_args, add_runtime_args, add_sampling_args
    p = sub.add_parser("chat", help="a conversation in the terminal (the model's chat template, the KV cache kept "
                       "between turns)")
    add_model_args(p)
    p.add_argument("-n", "--n-predict", dest="n", type=reply_tokens, default=-1,
                   help="most tokens a reply, at least 1 (default -1: until the model ends its turn or the context is "
                   "full)")
    add_sampling_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before the conversation")
    p.add_argument("--json", action="store_true", help="print each reply as one line of JSON (generate --json's "
                   "object) instead of streaming")
    p.add_argument("--prompt-cache", metavar="FILE", default=None, help="keep the keys and values of what the chat "
                   "template and --system write before the first message in FILE, and take them from it the next "
                   "time (llama.cpp's): a long system prompt computed once")
    p.add_argument("--prompt-cache-ro", action="store_true", help="read --prompt-cache, do not write it")
    add_runtime_args(p)
    p.set_defaults(func=cmd_chat)
