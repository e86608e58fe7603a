"""hotcold server: OpenAI's completion and chat endpoints over HTTP, as llama-server serves them.

One model; requests are served one at a time, in turn (a GET of /health or /v1/models answers at once). The KV cache
is kept between requests (`Model.generate(reuse_cache=True)`, llama-server's cache_prompt): a client sends a
conversation whole each turn, and only the tokens after those the cache holds are computed.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading
import time
import uuid

from engine.config import HotcoldError
from engine.tokenizer import valid_text
from tools.cli import SAMPLING, at_least, strict

MAX_BODY = 16 * 2**20  # bytes of a request's JSON
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context": "length"}  # OpenAI's names
# request fields hotcold does not do, refused rather than ignored: each with the value that means "not asked for"
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "tools": None, "tool_choice": None, "functions": None, "logit_bias": None, "grammar": None}


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


def generate_options(body: dict, args, model) -> dict:
    """Model.generate's keyword arguments from a request: the server's flags where it is silent."""
    for name, off in UNSUPPORTED.items():
        v = body.get(name)
        if not (v is None or v is False or v == off or v == [] or v == {}):
            raise BadRequest(f"{name}: not supported by hotcold server (leave it out)")
    n = args.n
    for name in ("max_completion_tokens", "max_tokens", "n_predict"):  # OpenAI's new and old names, llama-server's
        if body.get(name) is not None:
            n = field(body, name, at_least(-1), None)
            break
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop: a string or a list of strings, got {json.dumps(body.get('stop'))}")
    for name in ("ignore_eos", "stream"):
        if not isinstance(body.get(name, False), bool):
            raise BadRequest(f"{name}: true or false, got {json.dumps(body[name])}")
    from tools.cli import sampler_of
    given = {name: field(body, name, kind, None) for name, (kind, _, _) in SAMPLING.items()}
    return {"n": model.n_ctx if n == -1 else n, "stop": [valid_text(s) for s in stop],
            "ignore_stop": body.get("ignore_eos", False),
            "sampler": sampler_of(args, **{k: v for k, v in given.items() if v is not None})}


def message_text(i: int, m) -> dict:
    """messages[i] as the chat template takes it: a role and a text (OpenAI's content parts of type text joined)."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(f"messages[{i}]: an object with a role of system, user or assistant and a content")
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
    return {"role": m["role"], "content": valid_text(content)}


def prompt_ids(model, body: dict, chat: bool) -> list[int]:
    """The tokens to continue: the chat template over `messages`, or `prompt` (a text, one text in a list, or token
    ids)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a list of {\"role\", \"content\"} objects, at least one")
        return model.tokenize(model.tokenizer.apply_chat_template([message_text(i, m)
                                                                   for i, m in enumerate(messages)]))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return model.tokenize(valid_text(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return model.check_ids(prompt)
    raise BadRequest("prompt: a string or a list of token ids (one prompt: several in one request are not "
                     "supported)")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; a stream ends with the connection
    server: Server

    def log_message(self, format, *args):  # http.server's own lines: left to `log`
        pass

    def log(self, status: int, what: str = "") -> None:
        print(f"hotcold server: {self.command} {self.path} {status}" + (f" | {what}" if what else ""),
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
        kind = {404: "not_found_error", 500: "server_error"}.get(status, "invalid_request_error")
        error = {"error": {"code": status, "message": message, "type": kind}}
        self.log(status, message)
        if streaming:
            self.send_event(error)
        else:
            self.send_json(status, error)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/health":
            self.send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                                             "created": self.server.started, "owned_by": "hotcold",
                                                             "n_ctx": self.server.model.n_ctx}]})
        else:
            self.fail(404, f"no endpoint GET {path}", False)

    def read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise BadRequest("a request needs a JSON body with its Content-Length", 411)
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is left unread
            raise BadRequest(f"the body of {int(length)} bytes is over the {MAX_BODY} hotcold server takes", 413)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as e:  # UnicodeDecodeError too
            raise BadRequest(f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body: a JSON object")
        return body

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        routes = {"/v1/completions": self.complete, "/completions": self.complete, "/v1/chat/completions": self.chat,
                  "/chat/completions": self.chat, "/tokenize": self.tokenize, "/detokenize": self.detokenize}
        self.streaming = False
        try:
            if path not in routes:
                raise BadRequest(f"no endpoint POST {path}", 404)
            body = self.read_body()
            with self.server.lock:  # one request at a time: the model and its cache are one
                routes[path](body)
        except BadRequest as e:
            self.fail(e.status, str(e), self.streaming)
        except HotcoldError as e:  # the model's refusal: a prompt longer than the context, a token id, a template
            self.fail(500 if self.streaming else 400, str(e), self.streaming)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.log(499, "the client went away; its generation stopped")
        except Exception as e:
            self.close_connection = True
            self.fail(500, f"{type(e).__name__}: {e}", self.streaming)

    def tokenize(self, body: dict) -> None:
        """llama-server's /tokenize: {"content", "add_special" (BOS where the model adds one; default false)}."""
        text, bos = body.get("content"), body.get("add_special", False)
        if not isinstance(text, str) or not isinstance(bos, bool):
            raise BadRequest("tokenize: {\"content\": a string, \"add_special\": true or false}")
        self.send_json(200, {"tokens": self.server.model.tokenize(valid_text(text), add_bos=bos and None)})

    def detokenize(self, body: dict) -> None:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadRequest("detokenize: {\"tokens\": a list of token ids}")
        self.send_json(200, {"content": self.server.model.detokenize(ids)})

    def complete(self, body: dict) -> None:
        self.generate(body, chat=False)

    def chat(self, body: dict) -> None:
        self.generate(body, chat=True)

    def generate(self, body: dict, chat: bool) -> None:
        model = self.server.model
        options = generate_options(body, self.server.args, model)
        ids = model.check_prompt(prompt_ids(model, body, chat))
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.name}
        usage_too = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        def choice(text: str | None, finish: str | None) -> dict:  # text None: a stream's first chunk (chat)
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if not self.streaming:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            return {"index": 0, "delta": delta, "finish_reason": finish}

        def chunk(text: str | None, finish: str | None = None) -> dict:
            return {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [choice(text, finish)]}

        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.streaming = self.close_connection = True
            if chat:
                self.send_event(chunk(None))
            out = model.generate(ids, on_text=lambda piece: self.send_event(chunk(piece)), reuse_cache=True,
                                 **options)
        else:
            out = model.generate(ids, reuse_cache=True, **options)
        s = out.stats
        tail = {"usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": len(ids) + len(out.token_ids)},
                "timings": {"cache_n": s["cached_tokens"], "prompt_n": len(ids) - s["cached_tokens"],
                            "prompt_ms": 1e3 * s["prefill_s"], "prompt_per_second": s["prefill_tok_s"],
                            "predicted_n": len(out.token_ids), "predicted_ms": 1e3 * s["decode_s"],
                            "predicted_per_second": s["decode_tok_s"]}}
        finish = FINISH[s["stop"]]
        if self.streaming:
            self.send_event({**chunk("", finish), **(tail if usage_too else {})})
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice(out.text, finish)], **tail})
        rate = "n/a" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.1f} tok/s"
        self.log(200, f"prompt {len(ids)} tokens, {s['cached_tokens']} from the cache | reply "
                 f"{len(out.token_ids)} tokens, {rate}, {s['stop']}")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a generation in progress does not hold the process at Ctrl-C

    def __init__(self, model, args, host: str = "127.0.0.1", port: int = 8080):
        """model: a loaded Model; args: the server's flags (`-n` and the sampling options: a request's defaults)."""
        self.model, self.args, self.lock = model, args, threading.Lock()
        self.name, self.started = os.path.basename(str(model.ckpt.path)), int(time.time())
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise HotcoldError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def cmd_server(args) -> None:
    from tools.cli import load_model
    if args.port > 65535:
        raise HotcoldError(f"--port {args.port}: at most 65535")
    model = load_model(args)
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
    p.add_argument("-n", "--n-predict", dest="n", type=at_least(-1), default=-1,
                   help="tokens a reply may have when its request gives no max_tokens (default -1: to a stop token "
                   "or the end of the context)")
    add_sampling_args(p)  # a request's defaults, as llama-server's flags
    add_runtime_args(p)
    p.set_defaults(func=cmd_server)

