"""JSON output: the byte-level recognizer against Python's json module, and sampling under it against a brute force
over the whole vocabulary."""
import json
import random
import threading
import urllib.request

import numpy as np
import pytest

from engine.api import Sampler
from engine.config import HotcoldError
from engine.grammar import JsonGrammar, constrained_pick, worth_trying
from tools.cli import build_parser, main
from tools.server import BadRequest, Server, generate_options, request_grammar


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([rng.randint(-10 ** 6, 10 ** 6), 0.5, -1e-7, 3.25e10, 0.0, 12.0])
    if kind in (2, 3):
        return "".join(rng.choice('ab"\\\n\té€😀/\x01 ') for _ in range(rng.randrange(6)))
    if kind == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {"".join(rng.choice('kq"é ') for _ in range(rng.randrange(4))): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_json_recognizer_agrees_with_the_json_module():
    """Every text json.dumps writes (compact, indented, ASCII or not) is whole, and each of its prefixes goes on; a
    text with a byte changed is whole exactly when json.loads reads an object from it. Whitespace between tokens:
    one space, or one newline and at most 20 spaces or tabs, as llama.cpp's JSON grammar."""
    g, rng = JsonGrammar(), random.Random(0)
    for _ in range(400):
        doc = {"".join(rng.choice("kq é") for _ in range(3)): random_value(rng) for _ in range(rng.randrange(4))}
        for kw in ({}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}):
            text = json.dumps(doc, **kw).encode()
            assert g.complete(g.advance(g.start, text)), text
            assert all(g.advance(g.start, text[:k]) is not None for k in range(len(text))), text
        text = bytearray(json.dumps(doc, ensure_ascii=False).encode())
        for _ in range(4):
            text[rng.randrange(len(text))] = rng.choice(b'{}[]",:0123456789.eE+-tfnul\\x')  # no whitespace
            try:
                whole = isinstance(json.loads(bytes(text).decode()), dict)
            except ValueError:
                whole = False
            state = g.advance(g.start, bytes(text))
            assert whole == (state is not None and g.complete(state)), bytes(text)
    for text in (b'{"a":01}', b'{"a":1.}', b'{"a":-}', b'{"a":"\\u12G4"}', b'{"a":tru}', b'{"a":[1,]}', b'[1]',
                 b'{"a":1} ', b'{"a":"\xff"}', b'{"a":"\xc3"}', b'{\n\n}', b'{' + b" " * 2 + b"}",
                 b"{\n" + b" " * 21 + b"}", b'{"a":' + b"1" * 17 + b"}", b'{"a":0.' + b"1" * 17 + b"}",
                 b'{"a":"\xe0\x80\x80"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}'):  # overlong,
        state = g.advance(g.start, text)  # a surrogate, past U+10FFFF: not UTF-8 (RFC 3629)
        assert state is None or not g.complete(state), text
    for text in (b'{"a":1e+5}', b'{"a":"\\uD83D"}', b'{"\xc3\xa9":-0.0E-1}', b"{\n" + b" " * 20 + b"}", b'{ }',
                 b'{"a":' + b"1" * 16 + b"}", b'{"a":"\xe0\xa0\x80\xed\x9f\xbf\xf4\x8f\xbf\xbf"}'):
        assert g.complete(g.advance(g.start, text)), text
    value = JsonGrammar(top_object=False)  # any value at the top
    for text, whole in ((b"[1, true]", True), (b"-0.5e3", True), (b'"x"', True), (b'"x"]', False), (b'"x",', False),
                        (b"1 ", False)):
        state = value.advance(value.start, text)
        assert (state is not None and value.complete(state)) == whole, text


class Keeps(Sampler):
    """A Sampler that answers the candidates the chain was given (their ids) in place of a draw."""

    def choose(self, logits):
        return sorted(np.flatnonzero(np.isfinite(logits)).tolist())


@pytest.mark.parametrize("text", ['', '{', '{"na', '{"name": ', '{"a":', '{"a": [1, ', '{\n  "b": "x"', '{"a": 1,\n  ',
                                  '{"a": tru', '{"a": "\xe9'])
def test_sampling_under_json_is_the_chain_over_the_tokens_it_allows(smollm, text):
    """On SmolLM2's logits, in a state of each kind: every token the grammar allows passes the first-bytes filter,
    and every token said to be surely allowed is; greedy picks the likeliest allowed token; top-k gets exactly the k
    likeliest allowed; with top-k off, the chain gets every allowed token. A brute force over all 49152 tokens says
    which."""
    g = JsonGrammar()
    state = g.advance(g.start, text.encode())
    logits = smollm.logits(smollm.tokenize("Here is a JSON object: " + text), all_logits=False).numpy().copy()
    n = logits.size
    allowed = np.array([smollm.allows(g, state, t) for t in range(n)])
    maybe = worth_trying(g, state, smollm.token_tables.first)
    assert allowed.any() and not (allowed & ~maybe).any()  # the filter loses nothing
    sure = g.sure(state, smollm.token_tables)
    assert sure is None or not (sure & ~allowed).any()
    assert (sure is not None) == (text.count('"') % 2 == 1)  # inside a string: most of the vocabulary, known at once
    check = lambda t: bool(allowed[t])  # noqa: E731
    order = np.argsort(-logits, kind="stable")
    ranked = order[allowed[order]]  # the allowed tokens, best first
    for known in (None, lambda: sure):
        assert constrained_pick(Sampler(0), logits, [], maybe, check, known) == ranked[0]
        assert constrained_pick(Keeps(1.0, top_k=40), logits, [], maybe, check, known) == sorted(ranked[:40].tolist())
        assert constrained_pick(Keeps(1.0, top_k=0), logits, [], maybe, check, known) == sorted(ranked.tolist())
    biased = Sampler(0, logit_bias={int(ranked[0]): -np.inf})  # the biases come first, as unconstrained
    if len(ranked) > 1:
        assert constrained_pick(biased, logits, [], maybe, check) == ranked[1]
    else:  # "tru" goes on with one token alone
        with pytest.raises(HotcoldError, match="no token of the vocabulary goes on with the text here"):
            constrained_pick(biased, logits, [], maybe, check)


def test_generate_json_from_smollm(smollm):
    """Greedy and sampled, the reply is one JSON object and ends with the end token when it closes (the free reply
    opens with a ```json fence)."""
    ids = smollm.tokenize(smollm.tokenizer.apply_chat_template("Give me a JSON object describing a cat with name "
                                                                "and age."))
    for sampler in (Sampler(0), Sampler(0.8, seed=3), Sampler(0.7, top_k=0, seed=6)):  # 67, 74 and 66 tokens
        out = smollm.generate(ids, 128, sampler, grammar=JsonGrammar())
        assert isinstance(json.loads(out.text), dict) and out.stats["stop"] == "stop_token", out.text
        assert out.token_ids[-1] in smollm.tokenizer.stop_ids
    free = smollm.generate(ids, 8, Sampler(0)).text
    assert free.startswith("```json") and out.text.startswith("{")
    with pytest.raises(HotcoldError, match="not with ignore_eos"):
        smollm.generate(ids, 4, Sampler(0), grammar=JsonGrammar(), ignore_stop=True)
    never = Sampler(0, logit_bias={t: -np.inf for t in smollm.tokenizer.stop_ids})  # as ignore_eos: refused first
    with pytest.raises(HotcoldError, match="nor with every end token's logit biased to -inf"):
        smollm.generate(ids, 4, never, grammar=JsonGrammar())
    with pytest.raises(HotcoldError, match="a grammar \\(JSON output\\): with a Sampler"):
        smollm.generate(ids, 4, lambda z: 0, grammar=JsonGrammar())


def test_json_output_says_when_the_logits_are_not_finite(smollm, monkeypatch):
    """NaN logits (an overflow): the error that names them, not "no token goes on"."""
    monkeypatch.setattr(smollm.net, "next_logits", lambda ids, pos: np.full(smollm.config.n_vocab, np.nan, np.float32))
    with pytest.raises(HotcoldError, match="token 1: the logits are not finite"):
        smollm.generate(smollm.tokenize("Hi"), 4, Sampler(0), grammar=JsonGrammar())


def test_cli_and_server_json_output(smollm, capsys):
    """generate -j '{}' and chat -j; the server's response_format json_object and json_schema, llama-server's
    json_schema: the reply generate gives under the grammar; schemas that ask for more are refused in one line."""
    ask = "Give me a JSON object describing a cat with name and age."
    want = smollm.generate(smollm.tokenize(smollm.tokenizer.apply_chat_template(ask)), 128, Sampler(0),
                           grammar=JsonGrammar()).text
    assert main(["generate", "-p", ask, "--chat", "-j", "{}", "--temperature", "0", "--json", "-n", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == want
    for bad, why in (('{"type": "strin"}', "type: one of object, array"), ("{", "not JSON"),
                     ('{"minProperties": 1}', "keyword 'minProperties'"), ("[]", "a schema is an object")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "-p", ask, f"--json-schema={bad}"])
        assert e.value.code == 2 and why in capsys.readouterr().err
    for flags in (["--ignore-eos"], ["-l", "2-inf", "-l", "0-inf", "-l", "4-inf"]):  # no end token: refused at once
        assert main(["generate", "-p", ask, "-j", "{}", *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "ends with an end token once its text is whole" in err
    args = build_parser("server").parse_args(["server"])
    for body in ({"response_format": {"type": "json_object"}}, {"json_schema": {"type": "object"}},
                 {"json_schema": {"description": "any object", "title": "x"}},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}):
        assert isinstance(request_grammar(body, args), JsonGrammar), body
    for body in ({"response_format": {"type": "json_object", "schema": None}}, {"response_format": {
            "type": "json_schema"}}):  # no schema: any object
        assert isinstance(request_grammar(body, args), JsonGrammar), body
    assert request_grammar({"response_format": {"type": "text"}}, args) is None
    assert isinstance(request_grammar({}, build_parser("server").parse_args(["server", "-j", "{}"])), JsonGrammar)
    for body, why in (({"response_format": {"type": "xml"}}, 'response_format: {"type": "text"}'),
                      ({"json_schema": {"pattern": "(?!a)"}}, "lookarounds and inline flags"),
                      ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "not with ignore_eos")):
        with pytest.raises((BadRequest, HotcoldError), match=why):
            generate_options(body, args, smollm, chat=True)
    srv = Server(smollm, args, "127.0.0.1", 0)
    try:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps({
            "messages": [{"role": "user", "content": ask}], "temperature": 0, "max_tokens": 128,
            "response_format": {"type": "json_object"}}).encode())
        with urllib.request.urlopen(req, timeout=600) as r:
            got = json.loads(r.read())
        assert got["choices"][0]["message"]["content"] == want and got["choices"][0]["finish_reason"] == "stop"
    finally:
        srv.shutdown()
        srv.server_close()
