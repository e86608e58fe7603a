"""hotcold server: OpenAI's completion and chat endpoints over HTTP, as llama-server serves them.

One model; requests are served one at a time, in turn (a GET of /health or /v1/models answers at once). The KV cache
is kept between requests (`Model.generate(reuse_cache=True)`, llama-server's cache_prompt): a client sends a
conversation whole each turn, and only the tokens after those the cache holds are computed.
"""
from __future__ import annotations

import argparse
import base64
import codecs
import functools
import hmac
import http.server
import json
import math
import os
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid

from engine.config import POOLINGS, HotcoldError
from engine.gbnf import Gbnf
from engine.sampling import finite
from engine.schema import grammar_for
from tools import tool_calls
from tools.cli import SAMPLING, adapters, at_least, between, sampler_of, strict
from tools.metrics import Metrics

MAX_BODY = 16 * 2**20  # bytes of a request's JSON
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context": "length"}  # OpenAI's names
# request fields hotcold does not do, refused rather than ignored: each with the value that means "not asked for"
# (OpenAI's, then llama-server's samplers)
# (null, false, "", [] and {} mean it too)
UNSUPPORTED = {"n": 1, "best_of": 1, "suffix": None, "functions": None, "function_call": "none", "n_probs": 0,
               "tfs_z": 1, "n_indent": 0, "min_keep": 0, "lora": None}
CHAIN = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]  # llama.cpp's
# default --samplers, the order hotcold's Sampler runs (a request's "samplers": that list, its letters, or refused)
TOP_LOGPROBS = 20  # the most likeliest tokens a request may ask for each token's (OpenAI's limit)


class BadRequest(Exception):
    """The client's mistake: an HTTP status and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def field(body: dict, name: str, kind, default):
    """The request's `name`, checked by `kind` (an argparse type of the command line's flags) as its flag would be;
    default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    want = "a number" if kind.__name__ == "float" else "an integer"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (want == "an integer" and isinstance(v, float)):
        raise BadRequest(f"{name}: {want}, got {json.dumps(v)}")
    try:
        return kind(repr(v))
    except argparse.ArgumentTypeError as e:  # out of range: the flag's words
        raise BadRequest(f"{name}: {e}") from None
    except ValueError:
        raise BadRequest(f"{name}: {want}, got {json.dumps(v)}") from None


def generate_options(body: dict, args, model, chat: bool, native: bool = False) -> dict:
    """Model.generate's keyword arguments from a request: the server's flags where it is silent. native: llama-server's
    /completion, which takes n_probs for OpenAI's logprobs."""
    for name, off in UNSUPPORTED.items():
        v = body.get(name)
        if not (v is None or v is False or v == off or v in ("", [], {}) or native and name == "n_probs"):
            raise BadRequest(f"{name}: not supported by hotcold server (leave it out)")
    n = args.n
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):  # llama-server's first, as it reads them
        if body.get(name) is not None:
            n = field(body, name, at_least(-1), None)
            break
    if args.n != -1 and not 0 <= n <= args.n:  # the server's -n caps every request, as llama-server's
        n = args.n
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop: a string or a list of strings, got {json.dumps(body.get('stop'))}")
    for name in ("ignore_eos", "stream", "echo", "cache_prompt", "return_tokens"):
        if not isinstance(body.get(name, False), bool):
            raise BadRequest(f"{name}: true or false, got {json.dumps(body[name])}")
    given = {name: field(body, name, kind, None) for name, (kind, _, _) in SAMPLING.items()}
    given["logit_bias"] = logit_bias(model, body.get("logit_bias"))
    order = body.get("samplers")
    if order not in (None, CHAIN, ";".join(CHAIN), "edskypmxt"):
        raise BadRequest(f"samplers: hotcold runs llama.cpp's default order only, {json.dumps(CHAIN)}, got "
                         f"{json.dumps(order)}")
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None and (not isinstance(breakers, list) or not all(isinstance(b, str) and b for b in breakers)):
        raise BadRequest(f"dry_sequence_breakers: a list of strings that are not empty, got {json.dumps(breakers)}")
    given["dry_sequence_breakers"] = None if breakers is None else tuple(breakers)
    grammar = request_grammar(body, args)
    sampler = sampler_of(args, **{k: v for k, v in given.items() if v is not None})
    model.check_sampler(sampler)  # a 400 before a stream starts: its biases, DRY's breakers
    if grammar is not None:
        model.check_grammar(sampler, body.get("ignore_eos", False))  # a 400 before a stream starts
    return {"n": n, "stop": stop, "logprobs": logprobs(body, chat, native),
            "ignore_stop": body.get("ignore_eos", False), "reuse_cache": body.get("cache_prompt", True),
            "sampler": sampler, "grammar": grammar, "context_shift": args.context_shift,
            "keep": field(body, "n_keep", at_least(-1), 0)}


def request_grammar(body: dict, args):
    """The grammar a request asks for: llama-server's grammar (GBNF) or json_schema, OpenAI's response_format
    (json_object: any JSON object, or the schema llama-server reads there; json_schema: its schema); else the
    server's -j or --grammar; None for free text."""
    fmt, schema, gbnf = body.get("response_format"), body.get("json_schema"), body.get("grammar") or None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        inner = fmt.get("json_schema") if kind == "json_schema" else None
        if kind == "json_object":
            schema = fmt.get("schema") or {}  # llama-server reads a schema here too
        elif kind == "json_schema":
            schema = (inner.get("schema") or {}) if isinstance(inner, dict) else inner or {}
        elif kind != "text":
            raise BadRequest(f"response_format: {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                             f"{{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": ...}}}}, got "
                             f"{json.dumps(fmt)}")
    if gbnf is not None and schema is not None:
        raise BadRequest("grammar and a JSON schema: give one of them")
    if gbnf is not None and not isinstance(gbnf, str):
        raise BadRequest(f"grammar: GBNF text, got {json.dumps(gbnf)}")
    if gbnf is None and schema is None:
        return args.grammar
    try:
        return cached_grammar("gbnf", gbnf) if gbnf is not None else cached_grammar("schema", json.dumps(schema))
    except HotcoldError as e:
        raise BadRequest(str(e)) from None


@functools.lru_cache(maxsize=8)
def cached_grammar(kind: str, text: str):
    """A request's grammar, kept for the next requests that give the same (with what it has learnt of its states)."""
    return Gbnf(text) if kind == "gbnf" else grammar_for(json.loads(text))


def logit_bias(model, v) -> dict[int, float] | None:
    """A request's logit_bias as Sampler's: OpenAI's {"token id": bias} or llama-server's [[token id or text, bias or
    false (never)], ...] (also {"text": bias}), a text's every token biased; None when absent."""
    if v is None:
        return None
    pairs = list(v.items()) if isinstance(v, dict) else v if isinstance(v, list) else None
    if pairs is None or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise BadRequest(f"logit_bias: {{\"token id\": bias, ...}} or [[token id or text, bias or false], ...], got "
                         f"{json.dumps(v)}")
    bias: dict[int, float] = {}
    for key, b in pairs:
        if isinstance(v, dict) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", key):
            key = int(key)  # OpenAI's ids, as strings
        ids = [key] if is_id(key) else model.tokenize(key, special=False, add_bos=False) if isinstance(key, str) \
            else None  # a text as text, as llama-server: "<|im_end|>" is not the control token
        value = -math.inf if b is False else finite(b) if isinstance(b, (int, float)) and b is not True else math.nan
        if ids is None or not (math.isfinite(value) or value == -math.inf):
            raise BadRequest(f"logit_bias: {json.dumps(key)}: a bias that is a number, or false (never), got "
                             f"{json.dumps(b)}")
        bad = [i for i in ids if not 0 <= i < model.config.n_vocab]
        if bad:
            raise BadRequest(f"logit_bias: token id {bad[0]} is outside the vocabulary of {model.config.n_vocab}")
        for i in ids:  # the same token twice: both added, as llama-server's
            bias[i] = bias.get(i, 0.0) + value
    return bias


def logprobs(body: dict, chat: bool, native: bool = False) -> int | None:
    """How many likeliest tokens to give with each token's log-probability, None for none: OpenAI's completions take
    `logprobs` (a count), its chat `logprobs` (true or false) and `top_logprobs` (a count), llama-server's
    /completion `n_probs` (a count, 0: none)."""
    if not chat and body.get("logprobs") is False or native and not body.get("n_probs"):
        return None
    if chat and not isinstance(body.get("logprobs", False), bool):
        raise BadRequest(f"logprobs: true or false (top_logprobs: how many), got {json.dumps(body['logprobs'])}")
    name = "top_logprobs" if chat else "n_probs" if native else "logprobs"
    top = field(body, name, at_least(0), 0 if chat and body.get("logprobs") else None)
    if chat and top is not None and not body.get("logprobs"):
        raise BadRequest("top_logprobs: goes with \"logprobs\": true")
    if top is not None and top > TOP_LOGPROBS:
        raise BadRequest(f"{name}: at most {TOP_LOGPROBS}, got {top}")
    if top is not None and body.get("stream"):
        raise BadRequest(f"{'logprobs' if chat else name}: not with stream in hotcold server")
    return top


def token_text(model, i: int) -> str:
    """A token as logprobs name it: its text (U+FFFD for a part of a character), or a control token's name."""
    piece = model.tokenizer.piece(i)
    return piece.decode("utf-8", "replace") if piece else model.tokenizer.tk.id_to_token(i) or ""


def piece_of(model, i: int) -> str | list[int]:
    """/tokenize's piece, as llama-server gives it: the token's text, or its bytes when they are not whole UTF-8."""
    try:
        return model.tokenizer.piece(i).decode() or token_text(model, i)
    except UnicodeDecodeError:
        return list(model.tokenizer.piece(i))


def text_logprobs(model, out) -> list[dict]:
    """out.logprobs of the tokens that make out.text, as OpenAI and llama-server give them: not the end token that
    stopped it, nor one holding (a part of) a stop string."""
    lps, stop = out.logprobs, out.stats["stop"]
    if stop == "stop_token":
        return lps[:-1]
    if stop != "stop_string":
        return lps
    room, kept = len(out.text.encode()), []
    for lp in lps:
        room -= len(model.tokenizer.piece(lp["id"]))
        if room < 0:
            break
        kept.append(lp)
    return kept


def completion_logprobs(model, lps: list[dict | None], start: int) -> dict:
    """OpenAI's completions logprobs: each token's text, log-probability (null for an echoed prompt's first),
    likeliest tokens and offset in the text, from `start` (in characters: a token inside a character is at it)."""
    tokens, offsets, chars = [token_text(model, lp["id"]) for lp in lps], [], start
    text = codecs.getincrementaldecoder("utf-8")("ignore")  # the characters so far, a split one once whole
    for lp in lps:
        offsets.append(chars)
        chars += len(text.decode(model.tokenizer.piece(lp["id"])))
    return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{token_text(model, i): v for i, v in lp["top"]} for lp in lps],
            "text_offset": offsets}


def token_entry(model, i: int, logprob: float, with_id: bool = False) -> dict:
    """A token in OpenAI's chat logprobs: {"token", "logprob", "bytes"}; with_id: llama-server's, "id" first."""
    entry = {"token": token_text(model, i), "logprob": logprob, "bytes": list(model.tokenizer.piece(i))}
    return {"id": i, **entry} if with_id else entry


def chat_logprobs(model, lps: list[dict]) -> dict:
    """OpenAI's chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    return {"content": [{**token_entry(model, lp["id"], lp["logprob"]), "top_logprobs": [
        token_entry(model, i, v) for i, v in lp["top"]]} for lp in lps]}


def message_text(i: int, m) -> dict:
    """messages[i] as the chat template takes it: a role and a text (OpenAI's content parts of type text joined)."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
        raise BadRequest(f"messages[{i}]: an object with a role of system (or developer), user or assistant and a "
                         "content")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise BadRequest(f"messages[{i}].content: hotcold server takes text only ({{\"type\": \"text\", "
                             "\"text\": ...}} parts)")
        content = "\n".join(p["text"] for p in content)
    elif content is None and m["role"] == "assistant":  # an assistant's turn of tool calls alone
        content = ""
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content: a string, got {json.dumps(content)}")
    return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}  # OpenAI's new name


def is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)  # JSON's true and false are not token ids


def prompt_tokens(model, p) -> list[int] | None:
    """One prompt's tokens: a text, token ids, or llama-server's mix of both ([12, "text", 56]: a text first is
    tokenized as a whole prompt is, with the model's BOS); None when p is none of these."""
    if isinstance(p, str):
        return model.tokenize(p)
    if not isinstance(p, list) or not p or not all(isinstance(t, str) or is_id(t) for t in p):
        return None
    ids: list[int] = []
    for j, t in enumerate(p):
        ids += [t] if is_id(t) else model.tokenize(t, add_bos=None if j == 0 else False)
    return model.check_ids(ids)


def chat_prompt(model, messages) -> str:
    """The chat template over OpenAI's `messages`; a last message of the assistant's is continued."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a list of {\"role\", \"content\"} objects, at least one")
    messages = [message_text(i, m) for i, m in enumerate(messages)]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()  # an empty start of the reply: a new reply
    if not messages:
        raise BadRequest("messages: one empty assistant message, nothing to answer")
    return model.tokenizer.apply_chat_template(messages, continue_reply=messages[-1]["role"] == "assistant")


def prompts_of(model, body: dict, chat: bool) -> list[tuple[list[int], str]]:
    """[(the tokens to continue, their text)]: the chat template over `messages`; or each of `prompt`'s prompts (a
    text, token ids or a mix, or a list of them: lm-evaluation-harness sends its batches so; a list with a token id
    in it is one prompt)."""
    if chat:
        text = chat_prompt(model, body.get("messages"))
        return [(model.tokenize(text), text)]  # a last message of the assistant's: the reply goes on from it

    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt, list) and any(map(is_id, prompt)) else prompt
    ids = [prompt_tokens(model, p) for p in prompts] if isinstance(prompts, list) and prompts else [None]
    if None in ids:
        raise BadRequest("prompt: a string, token ids or a mix of both, or a list of those")
    return [(i, p if isinstance(p, str) else model.detokenize(i)) for i, p in zip(ids, prompts)]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; a stream ends with the connection
    server: Server

    def setup(self) -> None:
        self.timeout = self.server.args.timeout  # a client that sends or reads nothing for so long is dropped
        super().setup()

    def log_message(self, format, *args):  # http.server's own lines: left to `log`
        pass

    def send_response_only(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response_only(code, message)

    def end_headers(self) -> None:
        if self.status != 100:  # not on curl's interim "100 Continue"
            self.send_header("Access-Control-Allow-Origin", "*")  # browser front-ends, as llama-server allows them
            if self.close_connection:
                self.send_header("Connection", "close")
            elif self.request_version == "HTTP/1.0":  # one that asked to keep it, told so
                self.send_header("Connection", "keep-alive")
        super().end_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, a method without a handler) as JSON, not HTML."""
        self.close_connection = True
        self.fail(code, message or self.responses.get(code, ("error",))[0], False)

    def path_only(self) -> str:
        """The request's path, %-escapes decoded; a GET or OPTIONS with a body closes the connection after its
        answer (the body is not read, so it must not be taken for the next request)."""
        if self.command != "POST" and (self.headers.get("Content-Length", "0") != "0"
                                       or self.headers.get("Transfer-Encoding")):
            self.close_connection = True
        return urllib.parse.unquote(self.path.split("?")[0])

    def do_OPTIONS(self) -> None:
        """A browser's CORS preflight: any method of these, any header it asks for."""
        self.path_only()
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers")
                         or "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log(self, status: int, what: str = "") -> None:
        request = f"{self.command} {self.path}" if self.command else "(a malformed request)"
        print(f"hotcold server: {request} {status}" + (f" | {what}" if what else ""),
              file=sys.stderr, flush=True)

    def send_json(self, status: int, obj) -> None:
        data = json.dumps(strict(obj), ensure_ascii=False, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_event(self, obj) -> None:
        """One server-sent event of a stream."""
        self.wfile.write(b"data: " + json.dumps(strict(obj), ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def fail(self, status: int, message: str, streaming: bool) -> None:
        """The error as llama-server words it: {"error": {"code", "message", "type"}}; inside a stream, an event."""
        kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error",
                501: "not_supported_error"}.get(status, "invalid_request_error")
        error = {"error": {"code": status, "message": message, "type": kind}}
        self.log(status, message)
        try:
            if streaming:
                self.send_event(error)
            else:
                self.send_json(status, error)
        except OSError:  # the client has gone: no one to tell
            self.close_connection = True

    def authorized(self) -> bool:
        """With --api-key: the request's `Authorization: Bearer KEY` is it (else a 401 is sent)."""
        key = self.server.args.api_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key is None or hmac.compare_digest(given.encode(), key.encode()):
            return True
        self.close_connection = True  # a body may be left unread
        self.fail(401, "a missing or wrong API key (Authorization: Bearer KEY)", False)
        return False

    def do_GET(self) -> None:
        path = self.path_only()
        if path not in ("/health", "/v1/health") and not self.authorized():  # /health answers all, as llama-server's
            return
        if path in ("/health", "/v1/health"):
            self.send_json(200, {"status": "ok"})
        elif path == "/props":
            model, args = self.server.model, self.server.args
            self.send_json(200, {"default_generation_settings": {"n_ctx": model.n_ctx, "params": settings(
                model, generate_options({}, args, model, chat=False))},  # a request that gives nothing
                "total_slots": 1, "model_path": str(model.ckpt.path), "chat_template": model.tokenizer.chat_template})
        elif path == "/metrics":
            if not self.server.args.metrics:
                self.fail(501, "This server does not support metrics endpoint. Start it with `--metrics`", False)
                return
            model = self.server.model
            data = self.server.metrics.scrape(len(model.kv_ids), model.n_ctx, self.server.lock.locked()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")  # Prometheus' text format
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/slots":  # llama-server's one slot, as it lists its slots
            model, args = self.server.model, self.server.args
            self.send_json(200, [{"id": 0, "n_ctx": model.n_ctx, "is_processing": self.server.lock.locked(),
                                  "params": settings(model, generate_options({}, args, model, chat=False)),
                                  "n_cached": len(model.kv_ids)}])
        elif path == "/lora-adapters":  # llama-server's list: what was merged at load
            self.send_json(200, [{"id": i, "path": f, "scale": scale} for i, (f, scale) in
                                 enumerate(adapters(self.server.args))])
        elif path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [self.server.card]})
        elif path in (f"/v1/models/{self.server.name}", f"/models/{self.server.name}"):
            self.send_json(200, self.server.card)
        else:
            self.fail(404, f"no endpoint GET {path}", False)

    def read_body(self, empty_ok: bool = False) -> dict:
        """The request's JSON object; empty_ok: {} for no body (of no bytes, or none: curl -X POST)."""
        length = self.headers.get("Content-Length")
        if empty_ok and length in (None, "0") and not self.headers.get("Transfer-Encoding"):
            return {}
        if length is None or not (length.isascii() and length.isdigit()) or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a chunked body is not read: not to be taken for the next request
            raise BadRequest("a request needs a JSON body with its Content-Length (not chunked)", 411)
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is left unread
            raise BadRequest(f"the body of {int(length)} bytes is over the {MAX_BODY} hotcold server takes", 413)
        try:
            data = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the body did not come within {self.timeout:g} s (--timeout)", 408) from None
        if len(data) < int(length):  # the client closed its connection before the whole body
            raise ConnectionResetError
        try:
            body = json.loads(data)
            json.dumps(body, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") is not text
        except ValueError as e:  # UnicodeDecodeError and UnicodeEncodeError too
            raise BadRequest(f"the body is not JSON of UTF-8 text ({e})") from None
        except RecursionError:
            raise BadRequest("the body is JSON nested too deep") from None
        if not isinstance(body, dict):
            raise BadRequest("the body: a JSON object")
        return body

    def gone(self) -> bool:
        """Has the client closed its connection (while its answer is being generated)? Asked of poll(), which takes
        any descriptor (select() refuses those past 1023), and the socket's own timeout is not waited on."""
        ready = select.poll()
        ready.register(self.connection, select.POLLIN)
        if not ready.poll(0):
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""  # readable: at once, data or the end
        except OSError:
            return True

    def do_POST(self) -> None:
        path = self.path_only()
        routes = {"/v1/completions": self.complete, "/completion": self.native, "/completions": self.native,
                  "/v1/chat/completions": self.chat, "/chat/completions": self.chat, "/tokenize": self.tokenize,
                  "/detokenize": self.detokenize, "/apply-template": self.apply_template,
                  "/v1/embeddings": self.embeddings, "/embeddings": self.embeddings}
        slot = re.fullmatch(r"/slots/([^/]*)", path)
        if slot:
            routes[path] = functools.partial(self.slot_action, slot[1])
        self.streaming = False
        if not self.authorized():
            return
        try:
            if path == "/lora-adapters":
                self.close_connection = True
                raise BadRequest("hotcold merges LoRA adapters into the weights at load: restart the server with "
                                 "other --lora-scaled scales", 501)
            if path not in routes:
                self.close_connection = True  # its body is left unread
                raise BadRequest(f"no endpoint POST {path}", 404)
            body = self.read_body(empty_ok=bool(slot))
            with self.server.metrics.turn(self.server.lock):  # one request at a time: the model and its cache
                routes[path](body)  # are one
        except BadRequest as e:
            self.fail(e.status, str(e), self.streaming)
        except HotcoldError as e:  # the model's refusal: a prompt longer than the context, a token id, a template
            self.fail(500 if self.streaming else 400, str(e), self.streaming)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            self.close_connection = True
            self.log(499, "the client " + ("read nothing for --timeout" if isinstance(e, TimeoutError) else
                                           "went away") + "; its request stopped")
        except Exception as e:
            self.close_connection = True
            self.fail(500, f"{type(e).__name__}: {e}", self.streaming)

    def tokenize(self, body: dict) -> None:
        """llama-server's /tokenize: {"content", "add_special" (BOS where the model adds one; default false),
        "with_pieces" (each token as {"id", "piece"})}."""
        text, bos, pieces = body.get("content"), body.get("add_special", False), body.get("with_pieces", False)
        if not isinstance(text, str) or not isinstance(bos, bool) or not isinstance(pieces, bool):
            raise BadRequest("tokenize: {\"content\": a string, \"add_special\", \"with_pieces\": true or false}")
        model = self.server.model
        ids = model.tokenize(text, add_bos=bos and None)
        self.send_json(200, {"tokens": [{"id": i, "piece": piece_of(model, i)} for i in ids] if pieces else ids})

    def detokenize(self, body: dict) -> None:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(map(is_id, ids)):
            raise BadRequest("detokenize: {\"tokens\": a list of token ids}")
        self.send_json(200, {"content": self.server.model.detokenize(ids)})

    def embeddings(self, body: dict) -> None:
        """OpenAI's /v1/embeddings: {"input": a text, token ids, or a list of those, "encoding_format": "float" or
        "base64" (little-endian float32, as OpenAI's client asks by default), "dimensions": the model's if given} ->
        {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}: each vector
        pooled by the server's --pooling, of unit length (Model.embed)."""
        model, given = self.server.model, body.get("input")
        items = [given] if isinstance(given, str) or isinstance(given, list) and any(map(is_id, given)) else given
        ids = [prompt_tokens(model, p) for p in items] if isinstance(items, list) and items else [None]
        if None in ids or [] in ids:
            raise BadRequest("input: a text that is not empty, token ids, or a list of those")
        fmt, dims = body.get("encoding_format") or "float", body.get("dimensions")
        if fmt not in ("float", "base64"):
            raise BadRequest(f"encoding_format: \"float\" or \"base64\", got {json.dumps(fmt)}")
        if dims is not None and dims != model.config.n_embd:
            raise BadRequest(f"dimensions: this model's embeddings have {model.config.n_embd}, not {json.dumps(dims)}")
        data = []
        for k, i in enumerate(ids):
            v = model.embed(i, self.server.args.pooling)
            data.append({"object": "embedding", "index": k, "embedding": v.tolist() if fmt == "float" else
                         base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")})
        n = sum(map(len, ids))
        self.log(200, f"embeddings of {len(ids)} inputs, {n} tokens")
        self.send_json(200, {"object": "list", "data": data, "model": self.server.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def slot_action(self, slot: str, body: dict) -> None:
        """llama-server's POST /slots/0?action=save|restore|erase: the KV cache's tokens to or from {"filename"} in
        the --slot-save-path directory (a prompt cache file, engine.state), or forgotten."""
        folder, model = self.server.args.slot_save_path, self.server.model
        if folder is None:
            raise BadRequest("This server does not support slots action. Start it with `--slot-save-path`", 501)
        if slot != "0":
            raise BadRequest(f"Invalid slot ID {json.dumps(slot)}: hotcold server has one slot, 0")
        action = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("action", [""])[-1]
        if action == "erase":
            n, model.kv_ids = len(model.kv_ids), []
            self.send_json(200, {"id_slot": 0, "n_erased": n})
            return
        if action not in ("save", "restore"):
            raise BadRequest(f"Invalid action {json.dumps(action)}: save, restore or erase")
        name = body.get("filename")
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in "/\\" or not c.isprintable() for c in name):
            raise BadRequest(f"Invalid filename {json.dumps(name)}: a file name in --slot-save-path, not a path")
        path, t0 = os.path.join(folder, name), time.perf_counter()
        try:
            n = model.save_state(path) if action == "save" else model.load_state(path)
        except HotcoldError as e:  # named as the client named it, not by the server's directory
            raise BadRequest(str(e).replace(path, name)) from None
        ms = (time.perf_counter() - t0) * 1000
        self.log(200, f"slot {action}d: {n} tokens, {name}")
        self.send_json(200, {"id_slot": 0, "filename": name, **({"n_saved": n, "n_written": os.path.getsize(path),
                             "timings": {"save_ms": ms}} if action == "save" else {
                             "n_restored": n, "n_read": os.path.getsize(path), "timings": {"restore_ms": ms}})})

    def apply_template(self, body: dict) -> None:
        """llama-server's /apply-template: {"messages"} -> {"prompt": the chat template's text}."""
        self.send_json(200, {"prompt": chat_prompt(self.server.model, body.get("messages"))})

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.streaming = self.close_connection = True  # the stream ends with the connection
        self.end_headers()

    def watch(self, piece: str) -> None:
        """generate's on_text for an answer that is not streamed: a client that left stops its generation, as one
        that leaves a stream."""
        if self.gone():
            raise ConnectionResetError

    def native(self, body: dict) -> None:
        """llama-server's own /completion (also /completions): {"content", "stop_type", "timings", ...}, a list of
        them for several prompts; streamed, events {"content", "stop": false} and the result last (no [DONE])."""
        model = self.server.model
        options = generate_options(body, self.server.args, model, chat=False, native=True)
        prompts = [(model.check_prompt(ids), text) for ids, text in prompts_of(model, body, chat=False)]
        if body.get("stream") and len(prompts) > 1:
            raise BadRequest(f"prompt: {len(prompts)} prompts; a stream takes one")
        results = []
        for k, (ids, prompt) in enumerate(prompts):
            if body.get("stream"):
                self.start_stream()
            out = model.generate(ids, on_text=self.watch if not self.streaming else lambda piece: self.send_event(
                {"index": 0, "content": piece, "stop": False}), **options)
            self.log_reply(ids, out)
            results.append({"index": k, **result(model, self.server.name, out, prompt, options,
                                                   body.get("return_tokens", False), self.streaming)})
        if self.streaming:
            self.send_event(results[0])
        else:
            self.send_json(200, results if len(results) > 1 else results[0])

    def complete(self, body: dict) -> None:
        self.generate(body, chat=False)

    def chat(self, body: dict) -> None:
        self.generate(body, chat=True)

    def generate(self, body: dict, chat: bool) -> None:
        model = self.server.model
        options = generate_options(body, self.server.args, model, chat)
        tools = self.tools(body, options) if chat else None
        if chat:
            body = {**body, "messages": tool_calls.conversation(body.get("messages"), tools)}
        elif body.get("tools"):
            raise BadRequest("tools: with /v1/chat/completions")
        prompts = [(model.check_prompt(ids), text) for ids, text in prompts_of(model, body, chat)]
        echo = not chat and body.get("echo", False)  # the prompt before the completion, as OpenAI's echo
        if body.get("stream") and len(prompts) > 1:
            raise BadRequest(f"prompt: {len(prompts)} prompts; a stream takes one")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.name, "object": "chat.completion" if chat else "text_completion"}

        def choice(k: int, text: str | None, finish: str | None, lps=None, calls=None) -> dict:
            """text None: a chat stream's first chunk; calls: the tool_calls of a reply under tools."""
            if not chat:
                return {"index": k, "text": text or "", "logprobs": lps, "finish_reason": finish}
            if not self.streaming:
                return {"index": k, "message": {"role": "assistant", "content": text,
                                                **({"tool_calls": calls} if calls else {})},
                        "logprobs": lps, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            if calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
            return {"index": k, "delta": delta, "finish_reason": finish}

        def answer(out) -> tuple[str | None, list | None, str]:
            """The reply's content, tool calls and finish_reason."""
            content, calls = tool_calls.reply(out.text) if tools else (out.text, None)
            return content, calls, "tool_calls" if calls else FINISH[out.stats["stop"]]

        if body.get("stream"):
            (ids, prompt), = prompts
            self.start_stream()
            head["object"] = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text: str | None, finish: str | None = None) -> dict:
                return {**head, "choices": [choice(0, text, finish)]}

            if chat or echo:
                self.send_event(chunk(None if chat else prompt))
            out = model.generate(ids, on_text=self.watch if tools else lambda piece: self.send_event(chunk(piece)),
                                 **options)  # under tools: the reply is read whole, then sent
            self.log_reply(ids, out)
            content, calls, finish = answer(out)
            if tools:
                self.send_event({**head, "choices": [choice(0, content, None, calls=calls)]})
            self.send_event(chunk("", finish))
            if isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
                self.send_event({**head, "choices": [], **accounts([out])})  # OpenAI's last chunk
            self.wfile.write(b"data: [DONE]\n\n")
            return

        choices, outs = [], []
        for k, (ids, prompt) in enumerate(prompts):
            scored = [] if not echo or options["logprobs"] is None else \
                [{"id": ids[0], "logprob": None, "top": []}] + model.prompt_logprobs(ids, options["logprobs"])
            out = model.generate(ids, on_text=self.watch, **options)
            self.log_reply(ids, out)
            lps = None if out.logprobs is None else text_logprobs(model, out)
            if lps is not None:
                lps = chat_logprobs(model, lps) if chat else completion_logprobs(
                    model, scored + lps, 0 if echo else len(prompt))
            content, calls, finish = answer(out)
            choices.append(choice(k, (prompt if echo else "") + content if content is not None else None, finish,
                                  lps, calls))
            outs.append(out)
        self.send_json(200, {**head, "choices": choices, **accounts(outs)})

    def tools(self, body: dict, options: dict):
        """The request's tools (tool_calls.plan), their grammar in options; a response_format, json_schema or grammar
        beside them is refused."""
        tools = tool_calls.plan(body)
        if tools is None:
            return None
        if any(body.get(k) not in (None, "", {"type": "text"}) for k in ("response_format", "json_schema", "grammar")):
            raise BadRequest("tools and a response_format, json_schema or grammar: give one")
        options["grammar"] = cached_grammar("schema", json.dumps(tools.schema))
        self.server.model.check_grammar(options["sampler"], options["ignore_stop"])
        return tools

    def log_reply(self, ids: list[int], out) -> None:
        """Before the answer is sent: the client's next request may come at once. Counted in /metrics."""
        s = out.stats
        self.server.metrics.record(s)
        rate = "n/a" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.1f} tok/s"
        self.log(200, f"prompt {len(ids)} tokens, {s['cached_tokens']} from the cache | reply "
                 f"{len(out.token_ids)} tokens, {rate}, {s['stop']}")


STOP_TYPE = {"stop_token": "eos", "stop_string": "word", "length": "limit", "context": "limit"}  # llama-server's


def settings(model, options: dict) -> dict:
    """llama-server's generation_settings of generate's options."""
    s = options["sampler"]
    bias = [[int(i), float(b)] for i, b in zip(s.bias_ids, s.bias)]
    return {"n_predict": options["n"], **{name: getattr(s, name) for name in SAMPLING},
            "dry_sequence_breakers": list(s.dry_sequence_breakers), "seed": -1 if s.seed is None
            else s.seed, "stop": options["stop"], "ignore_eos": options["ignore_stop"], "logit_bias": bias,
            "n_probs": options["logprobs"] or 0, "n_ctx": model.n_ctx}


def result(model, name: str, out, prompt: str, options: dict, tokens: bool, streamed: bool) -> dict:
    """llama-server's /completion answer for `out`, the completion of `prompt` (streamed: the text has gone in the
    events before it; the token ids come here, with return_tokens)."""
    s, word = out.stats, ""
    if s["stop"] == "stop_string":  # which stop string: the one the rest of the decoded tokens starts with
        rest = model.detokenize(out.token_ids)[len(out.text):]
        word = next((w for w in options["stop"] if w and rest.startswith(w)), "")
    answer = {"content": "" if streamed else out.text, "tokens": out.token_ids if tokens else [],
              "id_slot": 0, "stop": True, "model": name, "tokens_predicted": len(out.token_ids),
              "tokens_evaluated": len(out.prompt_token_ids), "generation_settings": settings(model, options),
              "prompt": prompt, "has_new_line": "\n" in out.text,
              "truncated": s["stop"] == "context" or bool(s.get("context_shifts")),
              "stop_type": STOP_TYPE[s["stop"]], "stopping_word": word, "tokens_cached": s["cached_tokens"],
              "timings": accounts([out])["timings"]}
    if out.logprobs is not None:  # n_probs
        answer["completion_probabilities"] = [
            {**token_entry(model, lp["id"], lp["logprob"], True), "top_logprobs": [
                token_entry(model, i, v, True) for i, v in lp["top"]]} for lp in text_logprobs(model, out)]
    return answer


def accounts(outs: list) -> dict:
    """OpenAI's usage and llama-server's timings of the completions `outs` together."""
    def total(key) -> float:
        return sum(o.stats[key] for o in outs)
    prompt, cached, made = total("prompt_tokens"), total("cached_tokens"), total("generated_tokens")
    steps, prefill_s, decode_s = sum(max(len(o.token_ids) - 1, 0) for o in outs), total("prefill_s"), total("decode_s")
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made},
            "timings": {"cache_n": cached, "prompt_n": prompt - cached, "prompt_ms": 1e3 * prefill_s,
                        "prompt_per_second": (prompt - cached) / prefill_s if prefill_s else None,
                        "prompt_per_token_ms": 1e3 * prefill_s / (prompt - cached) if prompt > cached else None,
                        "predicted_n": made, "predicted_ms": 1e3 * decode_s,
                        "predicted_per_token_ms": 1e3 * decode_s / steps if steps else None,
                        "predicted_per_second": steps / decode_s if steps else None}}  # as generate's decode_tok_s


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a generation in progress does not hold the process at Ctrl-C

    def __init__(self, model, args, host: str = "127.0.0.1", port: int = 8080):
        """model: a loaded Model; args: the server's flags (`-n` and the sampling options: a request's defaults)."""
        self.model, self.args, self.lock, self.metrics = model, args, threading.Lock(), Metrics()
        self.name = os.path.basename(str(model.ckpt.path))
        self.card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "hotcold",
                     "n_ctx": model.n_ctx}  # /v1/models' entry
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise HotcoldError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away mid-answer: no traceback
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def cmd_server(args) -> None:
    from tools.cli import checked_sampler, load_model
    if args.port > 65535:
        raise HotcoldError(f"--port {args.port}: at most 65535")
    if args.slot_save_path is not None and not os.path.isdir(args.slot_save_path):
        raise HotcoldError(f"--slot-save-path {args.slot_save_path}: not a directory")
    model = load_model(args)
    checked_sampler(model, args)  # the server's own -l and -j, before a request is answered
    server = Server(model, args, args.host, args.port)
    print(f"hotcold server: listening on {server.url} ({server.name}, context {model.n_ctx} tokens; "
          "Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the way a server is stopped, not a failure
        print("hotcold server: stopped", file=sys.stderr)
    finally:
        server.server_close()


def add_command(sub) -> None:
    from tools.cli import add_model_args, add_runtime_args, add_sampling_args
    p = sub.add_parser("server", help="serve OpenAI's /v1/completions and /v1/chat/completions over HTTP, as "
                       "llama-server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(0), default=8080, help="port (default 8080; 0: a free one, printed)")
    p.add_argument("--timeout", type=between(0.001, 1e6), default=600.0, help="seconds a client may send or read "
                   "nothing before its connection is dropped (default 600, as llama-server's)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="answer only requests with the header "
                   "'Authorization: Bearer KEY' (/health: all)")
    p.add_argument("-n", "--n-predict", dest="n", type=at_least(-1), default=-1,
                   help="most tokens a reply may have, and the default when its request gives no max_tokens "
                   "(default -1: no cap; to a stop token or the end of the context)")
    add_sampling_args(p)  # a request's defaults, as llama-server's flags
    p.add_argument("--slot-save-path", metavar="DIR", default=None, help="the directory where POST "
                   "/slots/0?action=save and restore keep the KV cache's tokens (llama-server's; off by default)")
    p.add_argument("--context-shift", action="store_true", help="at the end of the context, forget half of what "
                   "follows a request's first n_keep prompt tokens (default 0, -1: all) and go on (llama-server's; "
                   "off by default, as there: it can cut a chat template's structure)")
    p.add_argument("--metrics", action="store_true", help="GET /metrics: llama-server's Prometheus metrics (tokens, "
                   "times, throughput, KV cache, requests) and hotcold's FFN sparsity (off by default, as there)")
    p.add_argument("--pooling", choices=POOLINGS[:3], default="mean", help="the embeddings' (/v1/embeddings): the "
                   "mean of the tokens' hidden states (default), the last token's, or the first's (cls)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_server)

