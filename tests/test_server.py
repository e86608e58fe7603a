"""hotcold server: OpenAI's endpoints over HTTP, answered as generate answers, the cache kept between requests."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch

from engine.api import Sampler
from engine.config import HotcoldError
from tools.cli import build_parser, main
from tools.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(smollm):
    srv = Server(smollm, build_parser("server").parse_args(["server"]), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(srv, path: str, body=None, raw: bytes | None = None, key: str | None = None):
    """(HTTP status, the JSON answer, or a stream's events as a list of JSON objects and "[DONE]")."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + path, data=data, headers={"Content-Type": "application/json", **(
        {"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status, text, kind = r.status, r.read().decode(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers["Content-Type"]
    if kind != "text/event-stream":
        return status, json.loads(text)
    assert text.endswith("\n\n")
    events = [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]
    return status, [e if e == "[DONE]" else json.loads(e) for e in events]


def greedy(model, prompt: str, n: int):
    return model.generate(model.tokenize(prompt), n, Sampler(temperature=0))


def test_server_completions_are_generates(smollm, server):
    """/v1/completions: generate's text and counts, for a prompt as text or as its token ids; streamed, the pieces
    make the same text; a stop string ends it."""
    want = greedy(smollm, "The capital of France is", 12)
    status, got = call(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12,
                                                   "temperature": 0, "model": "any"})
    assert status == 200 and got["object"] == "text_completion" and got["model"].endswith(".gguf")
    assert got["choices"] == [{"index": 0, "text": want.text, "logprobs": None, "finish_reason": "length"}]
    assert got["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "completion_tokens": 12,
                            "total_tokens": len(want.prompt_token_ids) + 12}
    status, again = call(server, "/v1/completions", {"prompt": want.prompt_token_ids, "max_tokens": 12,
                                                     "temperature": 0})
    assert again["choices"][0]["text"] == want.text  # from token ids; the cache held all but the last
    assert again["timings"]["cache_n"] == len(want.prompt_token_ids) - 1 and again["timings"]["predicted_n"] == 12
    status, events = call(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12,
                                                      "temperature": 0, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]" and len(events) > 3
    *pieces, end, usage, _ = events
    assert "".join(e["choices"][0]["text"] for e in pieces) == want.text
    assert all(e["choices"][0]["finish_reason"] is None for e in pieces)
    assert end["choices"][0]["finish_reason"] == "length" and "usage" not in end
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12  # OpenAI's last chunk
    cut = want.text.index("Paris") + 2
    status, got = call(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12,
                                                   "temperature": 0, "stop": want.text[cut:cut + 3]})
    assert got["choices"][0]["text"] == want.text[:cut] and got["choices"][0]["finish_reason"] == "stop"


def test_server_chat_keeps_the_conversation_in_the_cache(smollm, server):
    """/v1/chat/completions: the first reply is generate's over the chat template; the next turn, sent whole with
    the first reply, computes only what follows the cached tokens; streamed, the deltas make the same reply."""
    convo = [{"role": "user", "content": "What is 2+2?"}]
    want = greedy(smollm, smollm.tokenizer.apply_chat_template(convo), 16)
    status, one = call(server, "/v1/chat/completions", {"messages": convo, "temperature": 0, "max_tokens": 16,
                                                        "logprobs": False, "n": 1, "tools": []})  # as not asked
    assert status == 200 and one["object"] == "chat.completion"
    assert one["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert one["choices"][0]["finish_reason"] == ("stop" if want.stats["stop"] == "stop_token" else "length")
    convo += [{"role": "assistant", "content": want.text},
              {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "3+3?"}]}]
    status, events = call(server, "/v1/chat/completions", {"messages": convo, "temperature": 0, "max_tokens": 16,
                                                           "stream": True, "stream_options": {"include_usage": True}})
    flat = convo[:2] + [{"role": "user", "content": "And\n3+3?"}]  # text parts joined by newlines
    two = greedy(smollm, smollm.tokenizer.apply_chat_template(flat), 16)
    first, *pieces, end, usage, done = events
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                        "content": ""}
    assert "".join(e["choices"][0]["delta"]["content"] for e in pieces) == two.text and done == "[DONE]"
    assert end["choices"][0]["delta"] == {} and usage["usage"]["prompt_tokens"] == len(two.prompt_token_ids)
    assert usage["timings"]["cache_n"] == len(want.prompt_token_ids) + len(want.token_ids) - 1 \
        and want.stats["stop"] == "stop_token"  # all but the first reply's end token, which the template writes


def test_server_native_completion_as_llama_server(smollm, server):
    """llama-server's own /completion (and /completions): generate's text, llama-server's stop types and counts;
    streamed, the pieces then the result; several prompts, a list; a mix of text and token ids; n_probs."""
    want = greedy(smollm, "The capital of France is", 12)
    ask = {"prompt": "The capital of France is", "n_predict": 12, "temperature": 0}
    status, got = call(server, "/completion", {**ask, "return_tokens": True, "max_tokens": 3})  # n_predict first
    assert status == 200 and got["content"] == want.text and got["tokens"] == want.token_ids
    assert got["timings"]["predicted_per_token_ms"] == pytest.approx(got["timings"]["predicted_ms"] / 11)
    assert (got["stop"], got["stop_type"], got["stopping_word"], got["truncated"]) == (True, "limit", "", False)
    assert got["tokens_predicted"] == 12 and got["tokens_evaluated"] == len(want.prompt_token_ids)
    assert got["prompt"] == ask["prompt"] and got["generation_settings"]["n_predict"] == 12
    assert got["generation_settings"]["temperature"] == 0 and got["timings"]["predicted_n"] == 12
    word = want.text[len(want.text) // 2:][:3]
    status, got = call(server, "/completions", {**ask, "stop": ["zzz", word]})
    assert got["content"] == want.text[:want.text.index(word)] and got["tokens"] == []
    assert (got["stop_type"], got["stopping_word"]) == ("word", word)
    status, events = call(server, "/completion", {**ask, "stream": True, "return_tokens": True})
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True and "[DONE]" not in events
    assert events[-1]["tokens"] == want.token_ids
    assert "".join(e["content"] for e in events) == want.text and events[-1]["tokens_predicted"] == 12
    chat = smollm.tokenizer.apply_chat_template("What is 2+2?")
    status, got = call(server, "/completion", {"prompt": chat, "n_predict": 64, "temperature": 0})
    assert got["stop_type"] == "eos" and got["content"] == greedy(smollm, chat, 64).text
    head = smollm.tokenize("The capital of")
    mixed = smollm.tokenize(" France is", add_bos=False)  # after ids, a text without the model's BOS
    status, got = call(server, "/completion", {**ask, "prompt": [[*head, " France is"], "Hello"], "n_probs": 2})
    first = smollm.generate(head + mixed, 12, Sampler(temperature=0), logprobs=2)
    assert [r["index"] for r in got] == [0, 1] and got[0]["content"] == first.text
    assert got[1]["content"] == greedy(smollm, "Hello", 12).text
    probs = got[0]["completion_probabilities"]
    assert [p["id"] for p in probs] == first.token_ids and [p["logprob"] for p in probs] == pytest.approx(
        [lp["logprob"] for lp in first.logprobs])
    assert [t["id"] for t in probs[0]["top_logprobs"]] == [i for i, _ in first.logprobs[0]["top"]]
    assert probs[0]["token"] == smollm.detokenize(first.token_ids[:1]) and "bytes" in probs[0]
    status, got = call(server, "/apply-template", {"messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert status == 200 and got == {"prompt": chat}
    status, props = call(server, "/props")
    params = props["default_generation_settings"]["params"]
    assert status == 200 and (params["temperature"], params["top_k"], params["n_predict"]) == (0.8, 40, -1)
    assert props["default_generation_settings"]["n_ctx"] == smollm.n_ctx and props["chat_template"]


def test_server_logit_bias_as_openai_and_llama_server(smollm, server):
    """logit_bias: OpenAI's {"token id": bias} (-100 bans) and llama-server's [[token id or text, bias or false]]
    (every token of a text), as generate with the Sampler's logit_bias."""
    free = greedy(smollm, "The capital of France is", 4)
    ask = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    want = smollm.generate(free.prompt_token_ids, 4, Sampler(0, logit_bias={free.token_ids[0]: -100})).text
    status, got = call(server, "/v1/completions", {**ask, "logit_bias": {str(free.token_ids[0]): -100}})
    assert status == 200 and got["choices"][0]["text"] == want != free.text
    never = {i: -np.inf for i in smollm.tokenize(free.text, add_bos=False)}
    want = smollm.generate(free.prompt_token_ids, 4, Sampler(0, logit_bias=never))
    status, got = call(server, "/v1/completions", {**ask, "logit_bias": [[free.text, False]]})
    assert status == 200 and got["choices"][0]["text"] == want.text and not set(never) & set(want.token_ids)
    status, got = call(server, "/v1/completions", {**ask, "logit_bias": {free.text: False}})  # llama-server's too
    assert status == 200 and got["choices"][0]["text"] == want.text
    first = str(free.token_ids[0])  # the same token twice: both added; an id with a sign or spaces is an id
    for bias in ([[int(first), -100], [int(first), 100]], {f" +{first} ": 0}):
        status, got = call(server, "/v1/completions", {**ask, "logit_bias": bias})
        assert status == 200 and got["choices"][0]["text"] == free.text, bias
    end = smollm.tokenizer.stop_ids  # a text is text: "<|im_end|>" is not the control token
    status, got = call(server, "/completion", {**ask, "logit_bias": [["<|im_end|>", 1]]})
    assert not set(end) & {i for i, _ in got["generation_settings"]["logit_bias"]}


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{not json", 400, "the body is not JSON"),
    ("/v1/completions", [1, 2], 400, "the body: a JSON object"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature: must be a number >= 0, got -1"),
    ("/v1/completions", {"prompt": "Hi", "top_k": 1.5}, 400, "top_k: an integer, got 1.5"),
    ("/v1/completions", {"prompt": "Hi", "top_p": "high"}, 400, 'top_p: a number, got "high"'),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -2}, 400, "max_tokens: must be at least -1, got -2"),
    ("/v1/completions", {"prompt": "Hi", "stop": 5}, 400, "stop: a string or a list of strings, got 5"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, 'stream: true or false, got "yes"'),
    ("/v1/completions", {"prompt": "Hi", "n": 2}, 400, "n: not supported by hotcold server"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["a"]}}}}, 400,
     "JSON schema at #: required: 'a' is not among the properties"),
    ("/v1/completions", {"prompt": "Hi", "grammar": "root ::= [a-z"}, 400, "grammar: unexpected end of the grammar"),
    ("/v1/completions", {"prompt": "Hi", "tfs_z": 0.5}, 400, "tfs_z: not supported by hotcold server"),
    ("/v1/completions", {"prompt": "Hi", "mirostat": 3}, 400, "mirostat: must be from 0 to 2, got 3"),
    ("/v1/completions", {"prompt": "Hi", "samplers": ["top_k", "temperature"]}, 400,
     "samplers: hotcold runs llama.cpp's default order only"),
    ("/v1/completions", {"prompt": "Hi", "min_keep": 2}, 400, "min_keep: not supported by hotcold server"),
    ("/completion", {"prompt": "Hi", "dry_sequence_breakers": "\n"}, 400, "dry_sequence_breakers: a list of strings"),
    ("/completion", {"prompt": "Hi", "stream": True, "dry_multiplier": 1, "dry_sequence_breakers": ["User:"]}, 400,
     "DRY sequence breaker 'User:': no token of the vocabulary holds it whole"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "the body is not JSON of UTF-8 text"),
    ("/v1/completions", {"prompt": "Hi", "cache_prompt": 1}, 400, "cache_prompt: true or false, got 1"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, "the body is JSON nested too deep"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of: not supported by hotcold server"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs: at most 20, got 21"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 2, "stream": True}, 400, "logprobs: not with stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": 2}, 400,
     "logprobs: true or false (top_logprobs: how many), got 2"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400,
     'top_logprobs: goes with "logprobs": true'),
    ("/v1/completions", {"prompt": [[1.5]]}, 400, "prompt: a string, token ids or a mix of both, or a list of those"),
    ("/v1/completions", {"prompt": []}, 400, "prompt: a string, token ids or a mix of both, or a list of those"),
    ("/completion", {"prompt": [[]]}, 400, "prompt: a string, token ids or a mix of both, or a list of those"),
    ("/completion", {"prompt": "Hi", "n_probs": 21}, 400, "n_probs: at most 20, got 21"),
    ("/completion", {"prompt": "Hi", "n_probs": 2, "stream": True}, 400, "n_probs: not with stream"),
    ("/completion", {"prompt": "Hi", "return_tokens": 1}, 400, "return_tokens: true or false, got 1"),
    ("/v1/completions", {"prompt": "Hi", "n_probs": 2}, 400, "n_probs: not supported by hotcold server"),
    ("/apply-template", {"messages": []}, 400, "messages: a list of"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "prompt: 2 prompts; a stream takes one"),
    ("/v1/completions", {"prompt": [5, 10 ** 6]}, 400, "1000000"),
    ("/v1/completions", {"prompt": "word " * 1100}, 400, "does not fit the context of 1024"),
    ("/v1/chat/completions", {"prompt": "Hi"}, 400, "messages: a list of"),
    ("/v1/chat/completions", {"messages": [{"role": "narrator", "content": "x"}]}, 400, "messages[0]: an object with"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content: hotcold server takes text only"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"x": "1"}}, 400,
     'logit_bias: "x": a bias that is a number, or false (never), got "1"'),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": [[1, "1"]]}, 400, 'logit_bias: 1: a bias that is a number'),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": [[None, False]]}, 400, "got false"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": [[1, 10 ** 400]]}, 400, "logit_bias: 1: a bias that is a"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"-1": -100}}, 400, "token id -1 is outside the vocabulary"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": [1, 2]}, 400, 'logit_bias: {"token id": bias, ...} or'),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"49152": 1}}, 400,
     "logit_bias: token id 49152 is outside the vocabulary of 49152"),
    ("/v1/completions", b'{"prompt": "Hi", "logit_bias": {"3": NaN}}', 400, "logit_bias: 3: a bias that is a number"),
    ("/v1/rerank", {"query": "Hi"}, 404, "no endpoint POST /v1/rerank"),
    ("/tokenize", {"text": "Hi"}, 400, "tokenize: {"),
    ("/detokenize", {"tokens": [-1]}, 400, "-1"),
])
def test_server_refuses_a_bad_request_in_one_line(server, path, body, status, message):
    """Each bad request: its status and one line that names the field, in llama-server's error object."""
    got_status, got = call(server, path, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got_status == status and message in got["error"]["message"] and "\n" not in got["error"]["message"]
    assert got["error"]["code"] == status


def test_server_goes_on_after_a_client_leaves_a_stream(smollm, server, capsys):
    """A client that closes its connection mid-stream stops the generation (logged); the next request is answered as
    on a fresh model, the cache's record cut where the generation stopped."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(server.server_address[:2], timeout=600) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += s.recv(4096)
    want = greedy(smollm, "Once upon a time", 8)
    status, got = call(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert status == 200 and got["choices"][0]["text"] == want.text
    assert "POST /v1/completions 499 | the client went away; its request stopped" in capsys.readouterr().err
    status, health = call(server, "/health")
    assert status == 200 and health == {"status": "ok"}
    status, models = call(server, "/v1/models")
    assert models["data"][0]["id"] == server.name and models["data"][0]["n_ctx"] == smollm.n_ctx


def test_generate_logprobs_are_the_models_before_sampling(smollm):
    """generate(logprobs=k): each token's log-softmax of the logits it was sampled from, and the k likeliest; the
    teacher-forced prompt_logprobs of a greedy continuation agree with its decode steps' (a batched forward against
    decode steps with an f16 cache: 0.04 nats apart on average, 0.2 at most, measured)."""
    seen = []

    def pick(logits):  # the second likeliest: the logprobs are not the sampler's
        seen.append(logits.copy())
        return int(np.argsort(logits)[-2])

    ids = smollm.tokenize("The capital of France is")
    out = smollm.generate(ids, 5, pick, logprobs=3)
    assert len(out.logprobs) == 5 and out.to_dict()["logprobs"] == out.logprobs
    for lp, z, tok in zip(out.logprobs, seen, out.token_ids):
        ref = torch.log_softmax(torch.tensor(z, dtype=torch.float64), -1)
        assert lp["id"] == tok and lp["logprob"] == pytest.approx(float(ref[tok]), abs=1e-9)
        assert [i for i, _ in lp["top"]] == ref.topk(3).indices.tolist() and lp["top"][1][0] == tok
        assert [v for _, v in lp["top"]] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-9)
    out = smollm.generate(ids, 16, logprobs=0)
    forced = smollm.prompt_logprobs(ids + out.token_ids, 1)[len(ids) - 1:]
    assert [lp["id"] for lp in forced] == out.token_ids and all(lp["top"] == [] for lp in out.logprobs)
    apart = [abs(a["logprob"] - b["logprob"]) for a, b in zip(forced, out.logprobs)]
    assert np.mean(apart) < 0.1 and max(apart) < 0.5
    assert all(lp["top"][0][0] == t for lp, t in zip(forced, out.token_ids))  # greedy: the likeliest
    assert "logprobs" not in smollm.generate(ids, 1).to_dict()


def test_server_logprobs_and_echo(smollm, server):
    """/v1/completions logprobs with echo (lm-evaluation-harness's loglikelihood request: the prompt's tokens scored,
    the first null); chat's logprobs with top_logprobs: the tokens make the reply."""
    ids = smollm.tokenize("The capital of France is Paris")
    status, got = call(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    c = got["choices"][0]
    assert status == 200 and c["text"] == "The capital of France is Paris" and c["finish_reason"] == "length"
    want = smollm.prompt_logprobs(ids, 1)
    assert c["logprobs"]["token_logprobs"] == [None] + [lp["logprob"] for lp in want]
    assert c["logprobs"]["tokens"] == ["The", " capital", " of", " France", " is", " Paris"]
    assert c["logprobs"]["text_offset"] == [0, 3, 11, 14, 21, 24]
    assert list(c["logprobs"]["top_logprobs"][-1]) == [" Paris"]  # the greedy choice there
    batch = [ids[:3], ids]  # lm-evaluation-harness's local-completions: its batch, each with a token more
    status, got = call(server, "/v1/completions", {"prompt": batch, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                   "temperature": 0, "seed": 1234})
    assert status == 200 and [c["index"] for c in got["choices"]] == [0, 1]
    for c, p in zip(got["choices"], batch):
        got_lps = c["logprobs"]["token_logprobs"][:len(p)]  # another length: the matmuls round otherwise, and an
        # activation near a step of its 8-bit rounding takes the other step (0.04 apart, measured)
        assert got_lps[0] is None and got_lps[1:] == pytest.approx([lp["logprob"] for lp in want[:len(p) - 1]],
                                                                   abs=0.1)
        assert len(c["logprobs"]["tokens"]) == len(p) + 1 and c["text"].startswith(smollm.detokenize(p))
    assert got["usage"]["prompt_tokens"] == 3 + len(ids) and got["usage"]["completion_tokens"] == 2
    status, got = call(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2,
                                                   "temperature": 0, "logprobs": 2})
    lps = got["choices"][0]["logprobs"]
    assert lps["tokens"][0] == " Paris" and lps["text_offset"][0] == len("The capital of France is")
    for stop, text, tokens in ((".", " Paris", [" Paris"]), ("ris", " Pa", [])):  # the tokens that make the text
        got = call(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "stop": stop,
                                               "temperature": 0, "logprobs": 1})[1]["choices"][0]
        assert got["text"] == text and got["logprobs"]["tokens"] == tokens
    got = call(server, "/v1/completions", {"prompt": "Café 日本", "max_tokens": 0, "echo": True, "logprobs": 0})[1]
    split = got["choices"][0]["logprobs"]  # 日's bytes in three tokens: each at 日
    assert split["tokens"][-4:] == [" \ufffd", "\ufffd", "\ufffd", "本"] and split["text_offset"][-4:] == [4, 5, 5, 6]
    assert lps["token_logprobs"][0] == pytest.approx(want[-1]["logprob"], abs=0.2)  # decode step, batched
    status, got = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "temperature": 0, "max_tokens": 30, "logprobs": True,
                                                        "top_logprobs": 2})
    c = got["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == got["usage"]["completion_tokens"] - (c["finish_reason"] == "stop")  # the end token: not
    assert len(content[0]["top_logprobs"]) == 2
    assert "".join(e["token"] for e in content) == c["message"]["content"]
    assert bytes(sum((e["bytes"] for e in content), [])).decode() == c["message"]["content"]
    assert all(e["top_logprobs"][0]["logprob"] == e["logprob"] for e in content)  # greedy


def test_server_takes_llama_cpps_other_samplers(smollm, server):
    """DRY, XTC, typical, top-n-sigma, dynamic temperature and mirostat by llama-server's field names: a greedy reply
    under DRY is generate's, and generation_settings says what the request asked for."""
    ask = {"prompt": "one, two, three, one, two, three, one, two, three,", "n_predict": 24, "temperature": 0,
           "dry_multiplier": 0.8, "dry_sequence_breakers": ["\n"]}
    dry = Sampler(temperature=0, dry_multiplier=0.8, dry_sequence_breakers=("\n",))
    smollm.check_sampler(dry)
    status, got = call(server, "/completion", ask)
    assert status == 200 and got["content"] == smollm.generate(smollm.tokenize(ask["prompt"]), 24, dry).text
    ask = {**ask, "typical_p": 0.9, "xtc_probability": 0.5, "top_n_sigma": 2, "dynatemp_range": 0.2, "mirostat_tau": 4}
    status, got = call(server, "/completion", ask)
    assert {k: got["generation_settings"][k] for k in ask if k not in ("prompt", "n_predict")} == {
        **{k: v for k, v in ask.items() if k not in ("prompt", "n_predict")}}
    status, got = call(server, "/completion", {**ask, "temperature": 0.8, "mirostat": 2, "seed": 3,
                                               "samplers": "edskypmxt", "min_keep": 0})
    assert status == 200 and got["tokens_predicted"] == 24


def test_server_context_shift(smollm):
    """With --context-shift, a reply goes on past the context's end (llama-server's `truncated` then true), its first
    tokens those of a reply that the context's end stops; n_keep is checked as a count."""
    srv = Server(smollm, build_parser("server").parse_args(["server", "--context-shift"]), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ids = smollm.tokenize("The history of the Roman Empire is long. " * 130)[:smollm.n_ctx - 8]
        ask = {"prompt": ids, "n_predict": 20, "temperature": 0, "ignore_eos": True, "n_keep": 4}
        short = smollm.generate(ids, 20, Sampler(temperature=0), ignore_stop=True)
        status, got = call(srv, "/completion", ask)
        assert status == 200 and got["tokens_predicted"] == 20 and got["truncated"] is True
        assert short.stats["stop"] == "context" and got["content"].startswith(short.text) and len(short.token_ids) < 20
        status, got = call(srv, "/completion", {**ask, "n_keep": -2})
        assert status == 400 and "n_keep: must be at least -1" in got["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()


def scrape(srv) -> dict[str, float]:
    """GET /metrics as {name: value}; each metric with its HELP and TYPE lines, in Prometheus' text format."""
    with urllib.request.urlopen(srv.url + "/metrics", timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        lines = r.read().decode().splitlines()
    out = {}
    for help_, type_, line in zip(lines[::3], lines[1::3], lines[2::3]):
        name, value = line.split(" ")
        assert help_.startswith(f"# HELP {name} ") and type_ in (f"# TYPE {name} counter", f"# TYPE {name} gauge")
        out[name] = float(value)
    return out


def test_server_metrics(smollm, server):
    """--metrics: llama-server's Prometheus metrics, the totals of the replies' tokens and times (as their timings),
    throughput since the last scrape, the KV cache, and requests waiting for the model; without it a 501."""
    from tools.metrics import METRICS, Metrics
    status, got = call(server, "/metrics")
    assert status == 501 and "Start it with `--metrics`" in got["error"]["message"]
    srv = Server(smollm, build_parser("server").parse_args(["server", "--metrics"]), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        first = scrape(srv)
        assert list(first) == list(METRICS) and first["llamacpp:tokens_predicted_total"] == 0
        ask = {"prompt": "The history of the Roman Empire is long.", "n_predict": 8, "temperature": 0,
               "ignore_eos": True}
        replies = [call(srv, "/completion", ask)[1] for _ in range(2)]  # the second from the cache but its last token
        deadline = time.monotonic() + 60  # the answer is sent before the handler lets go of the model
        while srv.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        m = scrape(srv)  # (a scrape starts a new bucket of throughput: one here)
        t = [r["timings"] for r in replies]
        assert m["llamacpp:prompt_tokens_total"] == sum(r["tokens_evaluated"] - r["tokens_cached"] for r in replies)
        assert replies[1]["tokens_evaluated"] - replies[1]["tokens_cached"] == 1
        assert m["llamacpp:tokens_predicted_total"] == 16 and m["llamacpp:n_decode_total"] == 2 * (1 + 7)
        assert m["llamacpp:prompt_seconds_total"] == pytest.approx(sum(x["prompt_ms"] for x in t) / 1e3)
        assert m["llamacpp:tokens_predicted_seconds_total"] == pytest.approx(sum(x["predicted_ms"] for x in t) / 1e3)
        assert m["llamacpp:predicted_tokens_seconds"] == pytest.approx(16 / sum(x["predicted_ms"] / 1e3 for x in t))
        assert m["llamacpp:kv_cache_tokens"] == len(smollm.kv_ids) > 0
        assert m["llamacpp:kv_cache_usage_ratio"] == pytest.approx(len(smollm.kv_ids) / smollm.n_ctx)
        assert m["llamacpp:requests_processing"] == m["llamacpp:requests_deferred"] == m["hotcold:ffn_sparsity"] == 0
        again = scrape(srv)  # a new bucket: no reply since the last scrape
        assert again["llamacpp:predicted_tokens_seconds"] == again["llamacpp:prompt_tokens_seconds"] == 0
        assert again["llamacpp:tokens_predicted_total"] == 16
        with srv.lock:  # the model busy: a request waits for it
            waiting = threading.Thread(target=call, args=(srv, "/completion", ask))
            waiting.start()
            deadline = time.monotonic() + 60
            while scrape(srv)["llamacpp:requests_deferred"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = scrape(srv)
            assert busy["llamacpp:requests_deferred"] == 1 and busy["llamacpp:requests_processing"] == 1
        waiting.join(60)
        assert scrape(srv)["llamacpp:tokens_predicted_total"] == 24
    finally:
        srv.shutdown()
        srv.server_close()
    stats = {"prompt_tokens": 5, "cached_tokens": 5, "generated_tokens": 1, "prefill_s": 0.1, "decode_s": 0.0,
             "predicted_sparsity": 0.625}
    m = Metrics()
    m.record(stats)  # one token from the prefill, no pass after it: throughput 0, not a division by zero
    assert "hotcold:ffn_sparsity 0.625\n" in (text := m.scrape(3, 8, False)) and "llamacpp:n_decode_total 0\n" in text
    assert "llamacpp:predicted_tokens_seconds 0\n" in text and "llamacpp:kv_cache_usage_ratio 0.375\n" in text
    m.record({**stats, "predicted_sparsity": None})  # no decode step measured it: the last value stays
    assert "hotcold:ffn_sparsity 0.625\n" in m.scrape(3, 8, False)
    m.record({k: v for k, v in stats.items() if k != "predicted_sparsity"})  # a dense reply
    assert "hotcold:ffn_sparsity 0\n" in m.scrape(3, 8, False)


def test_server_lists_its_lora_adapters(smollm, server):
    """GET /lora-adapters lists the adapters merged at load (llama-server's fields); POST, which sets their scales
    there, is a 501: merged adapters are changed by a restart."""
    assert call(server, "/lora-adapters") == (200, [])
    args = build_parser("server").parse_args(["server", "--lora", "a.gguf", "--lora-scaled", "peft", "0.5"])
    srv = Server(smollm, args, "127.0.0.1", 0)  # (the adapters are merged by load_model, which this test skips)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert call(srv, "/lora-adapters") == (200, [{"id": 0, "path": "a.gguf", "scale": 1.0},
                                                     {"id": 1, "path": "peft", "scale": 0.5}])
        status, got = call(srv, "/lora-adapters", [{"id": 0, "scale": 0.2}])
        assert status == 501 and "restart the server with other --lora-scaled scales" in got["error"]["message"]
        status, got = call(srv, "/completion", {"prompt": "Hi", "n_predict": 1, "lora": [{"id": 0, "scale": 0.2}]})
        assert status == 400 and "lora: not supported by hotcold server" in got["error"]["message"]  # not ignored
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_slots_save_restore_and_erase(smollm, server, tmp_path):
    """llama-server's /slots actions: the KV cache's tokens saved to a file in --slot-save-path, erased, restored, and
    a request then takes its prompt from the cache; bad names, slots and actions are a 400, no directory a 501."""
    status, got = call(server, "/slots/0?action=save", {"filename": "a.bin"})
    assert status == 501 and "Start it with `--slot-save-path`" in got["error"]["message"]
    srv = Server(smollm, build_parser("server").parse_args(["server", "--slot-save-path", str(tmp_path)]),
                 "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ask = {"prompt": "The history of the Roman Empire is long. " * 8, "n_predict": 8, "temperature": 0}
        call(srv, "/completion", ask)
        status, first = call(srv, "/completion", ask)  # the prompt from the cache but its last token, as below
        held = len(smollm.kv_ids)
        status, got = call(srv, "/slots/0?action=save", {"filename": "a.bin"})
        assert status == 200 and got["n_saved"] == held and got["n_written"] == os.path.getsize(tmp_path / "a.bin")
        req = urllib.request.Request(srv.url + "/slots/0?action=erase", method="POST")  # no body, as curl -X POST
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read()) == {"id_slot": 0, "n_erased": held} and smollm.kv_ids == []
        status, got = call(srv, "/slots")
        assert status == 200 and got[0]["n_cached"] == 0 and got[0]["n_ctx"] == smollm.n_ctx
        status, got = call(srv, "/slots/0?action=restore", {"filename": "a.bin"})
        assert status == 200 and got["n_restored"] == held and len(smollm.kv_ids) == held
        status, again = call(srv, "/completion", ask)
        assert again["content"] == first["content"] and again["tokens_cached"] == first["tokens_evaluated"] - 1
        status, got = call(srv, "/slots/0?action=restore", {"filename": "a.bin"})
        assert status == 200 and got["n_restored"] == held  # a second time: the same
        (tmp_path / "t.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:100])
        for path, body, why in (("/slots/0?action=save", {"filename": "../x"}, "Invalid filename"),
                                ("/slots/0?action=save", {"filename": "a\nb"}, "Invalid filename"),
                                ("/slots/0?action=restore", {"filename": "t.bin"}, "t.bin: not a hotcold prompt"),
                                ("/slots/0?action=save", {}, "Invalid filename"),
                                ("/slots/1?action=save", {"filename": "b"}, "has one slot, 0"),
                                ("/slots/0?action=load", {"filename": "a.bin"}, "Invalid action"),
                                ("/slots/0?action=restore", {"filename": "none.bin"}, "no such file")):
            status, got = call(srv, path, body)
            assert status == 400 and why in got["error"]["message"], (path, got)
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_tokenize_and_detokenize(smollm, server):
    status, got = call(server, "/tokenize", {"content": "Hello world"})
    assert status == 200 and got["tokens"] == smollm.tokenize("Hello world")
    assert call(server, "/detokenize", {"tokens": got["tokens"]})[1] == {"content": "Hello world"}
    pieces = call(server, "/tokenize", {"content": "Hello world", "with_pieces": True})[1]["tokens"]
    assert pieces == [{"id": got["tokens"][0], "piece": "Hello"}, {"id": got["tokens"][1], "piece": " world"}]
    pieces = call(server, "/tokenize", {"content": "\u0f00", "with_pieces": True})[1]["tokens"]
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces) \
        == "\u0f00".encode() and any(isinstance(p["piece"], list) for p in pieces)  # bytes of part of a character


def test_server_chat_roles_continuation_and_cache_prompt(smollm, server):
    """A last assistant message is the reply's beginning, which it goes on from (llama-server's); developer is
    OpenAI's new name for system; "cache_prompt": false computes the whole prompt (the same tokens through the same
    arithmetic: the cached and the computed parts of a prompt may take other paths, batched or by decode steps)."""
    convo = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "The colour is"}]
    text = smollm.tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."}, convo[1]])
    assert text.endswith("<|im_start|>assistant\n")
    text = text + "The colour is"  # the template's own text of that start, without its end of turn
    assert smollm.tokenizer.apply_chat_template([{**convo[0], "role": "system"}] + convo[1:],
                                                continue_reply=True) == text
    want = greedy(smollm, text, 6)
    for _ in range(2):
        status, got = call(server, "/v1/chat/completions", {"messages": convo, "temperature": 0, "max_tokens": 6,
                                                            "cache_prompt": False})
        assert status == 200 and got["choices"][0]["message"]["content"] == want.text
        assert got["usage"]["prompt_tokens"] == len(want.prompt_token_ids) and got["timings"]["cache_n"] == 0
    end = smollm.tokenizer.apply_chat_template([convo[1], {"role": "assistant", "content": "end"}],
                                               continue_reply=True)
    assert end.endswith("<|im_end|>\n<|im_start|>assistant\nend")  # not cut inside the template's own <|im_end|>


def test_server_http_edges(smollm, server):
    """Connections: an unknown endpoint's unread body closes the connection (not read as the next request); CORS
    preflight; other methods get JSON errors; /v1/models/ID; completions' logprobs false is none."""
    def raw(data: bytes) -> bytes:
        with socket.create_connection(server.server_address[:2], timeout=60) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got

    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    got = raw(b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) + post)
    assert got.startswith(b"HTTP/1.1 404") and b"Connection: close" in got and got.count(b"HTTP/1.1") == 1
    got = raw(post.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    assert got.startswith(b"HTTP/1.1 200") and b"Access-Control-Allow-Origin: *" in got
    got = raw(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 204") and b"Access-Control-Allow-Headers: Authorization, Content-Type" in got
    got = raw(b"PUT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 501") and b'"type": "not_supported_error"' in got
    got = raw(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n"
              b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in got  # its body is not a second request
    got = raw(post.replace(b"Host: x", b"Host: x\r\nTransfer-Encoding: chunked"))
    assert got.startswith(b"HTTP/1.1 411") and b"not chunked" in got
    got = raw(b"OPTIONS / HTTP/1.1\r\nHost: x\r\nAccess-Control-Request-Headers: x-stainless-os\r\n"
              b"Connection: close\r\n\r\n")
    assert b"Access-Control-Allow-Headers: x-stainless-os" in got  # the OpenAI client's own headers too
    got = raw(b"GARBAGE\r\n\r\n")  # no HTTP version: http.server answers as HTTP/0.9, the body alone
    assert got.startswith(b'{"error": {"code": 400, "message": "Bad request syntax')
    assert call(server, f"/v1/models/{server.name}") == (200, server.card)
    assert call(server, "/v1/models/" + urllib.parse.quote(server.name, safe=""))[0] == 200
    assert call(server, "/v1/models/gpt-4")[0] == 404
    status, got = call(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "logprobs": False,
                                                   "tool_choice": "none", "suffix": "", "grammar": ""})
    assert status == 200 and got["choices"][0]["logprobs"] is None  # each field as not asked for


def test_gone_on_a_socket_with_a_timeout_and_a_descriptor_past_1023():
    """The check for a client that left: false while it is there (also with data pending), true once it closed; on a
    socket with a timeout, as the handler's, and a descriptor select() would refuse."""
    import resource
    import types

    from tools.server import Handler
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 2000:
        pytest.skip("fewer than 2001 descriptors allowed here")
    a, b = socket.socketpair()
    conn = socket.socket(fileno=os.dup2(a.fileno(), 2000))
    a.close()
    conn.settimeout(600)
    h = types.SimpleNamespace(connection=conn)
    try:
        assert not Handler.gone(h)
        b.sendall(b"x")  # a pipelined request: not gone
        assert not Handler.gone(h) and conn.recv(1) == b"x"
        b.close()
        assert Handler.gone(h)
    finally:
        conn.close()


def test_server_a_client_that_leaves_mid_body_gets_nothing_and_no_traceback(server, capfd):
    with socket.create_connection(server.server_address[:2], timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    assert call(server, "/health")[0] == 200
    line, err, deadline = "POST /v1/completions 499 | the client went away; its request stopped", "", time.time() + 60
    while line not in err and time.time() < deadline:  # its thread logs it when it finds the socket closed: the
        err += capfd.readouterr().err  # health check, on a thread of its own, can answer first on a busy machine
        time.sleep(0.05)
    assert line in err and "Traceback" not in err


def test_server_timeout_cap_and_a_client_that_leaves_before_its_answer(smollm, server, capsys):
    """--timeout drops a client whose body does not come (408), --n-predict caps every request, and a client that
    closes its connection before its (not streamed) answer stops the generation."""
    args = build_parser("server").parse_args(["server", "--timeout", "1", "-n", "3"])
    srv = Server(smollm, args, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(srv.server_address[:2], timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
        for n in (10, -1):
            status, got = call(srv, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": n,
                                                        "ignore_eos": True})
            assert status == 200 and got["usage"]["completion_tokens"] == 3
    finally:
        srv.shutdown()
        srv.server_close()
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}).encode()
    capsys.readouterr()
    with socket.create_connection(server.server_address[:2], timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert call(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200  # before or after it
    err, deadline = "", time.monotonic() + 120  # (which request takes the lock first is the threads' race)
    while "499" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    assert "hotcold server: POST /v1/completions 499 | the client went away; its request stopped\n" in err


def test_server_with_an_api_key_answers_only_requests_that_carry_it(smollm):
    srv = Server(smollm, build_parser("server").parse_args(["server", "--api-key", "sesame"]), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, got = call(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        assert status == 401 and got["error"]["type"] == "authentication_error"
        assert call(srv, "/v1/models", key="open")[0] == 401
        assert call(srv, "/health") == (200, {"status": "ok"})  # as llama-server's: for load balancers
        assert call(srv, "/v1/models", key="sesame")[0] == 200
        status, got = call(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, key="sesame")
        assert status == 200 and got["usage"]["completion_tokens"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_refuses_a_port_in_use(smollm, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(HotcoldError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            Server(smollm, build_parser("server").parse_args(["server"]), "127.0.0.1", port)
    assert main(["server", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "hotcold: error: --port 70000: at most 65535\n"
    for flag, why in (("49152+1", "logit bias: token id 49152 is outside the vocabulary of 49152"),
                      ("99999999999999999999999+1", "Sampler logit_bias: token id 99999999999999999999999, an")):
        assert main(["server", "--port", "0", "-c", "64", "-l", flag]) == 2  # before it listens, not each request
        assert capsys.readouterr().err.startswith(f"hotcold: error: {why}")
    assert main(["server", "--port", "0", "-c", "64", "-j", "{}", "-l", "0-inf", "-l", "2-inf", "-l", "4-inf"]) == 2
    assert "ends with an end token once its text is whole" in capsys.readouterr().err  # no end token


def test_cli_server_listens_and_stops_on_ctrl_c():
    """hotcold server --port 0: says where it listens, answers, and Ctrl-C stops it with exit code 0."""
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", "server", "--port", "0", "-t", "1", "-c", "128"],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        url = re.match(r"hotcold server: listening on (http://127\.0\.0\.1:\d+) \(SmolLM2-135M-Instruct\.Q4_1\.gguf, "
                       r"context 128 tokens; Ctrl-C stops it\)$", line)
        assert url, line
        with urllib.request.urlopen(url[1] + "/health", timeout=60) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0 and p.stderr.read() == "hotcold server: stopped\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
