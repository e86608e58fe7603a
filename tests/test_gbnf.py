"""GBNF grammars and JSON schemas: the recognizer against Python's re and json modules, the schema's grammar against
named and random instances, and sampling under them on SmolLM2."""
import itertools
import json
import math
import random
import re
import threading
import urllib.request

import numpy as np
import pytest

from engine.api import Sampler
from engine.config import HotcoldError
from engine.gbnf import Gbnf
from engine.grammar import constrained_pick, worth_trying
from engine.schema import grammar_for, schema_grammar
from test_grammar import random_value
from tools.cli import build_parser, main
from tools.server import BadRequest, Server, request_grammar


def whole(g, text: str | bytes) -> bool:
    state = g.advance(g.start, text.encode() if isinstance(text, str) else text)
    return state is not None and g.complete(state)


# (GBNF, the same language as a Python regular expression)
PAIRS = [
    ('root ::= "a"{2,4} "b"? [^x-z]', r"a{2,4}b?[^x-z]"),
    ('root ::= ("ab" | "é" | [0-9]+)* "!"', r"(ab|é|[0-9]+)*!"),
    ('root ::= x{3}\nx ::= [a-c] | "日"', r"([a-c]|日){3}"),
    ('root ::= ("x" | ) (y "," )+ # comment\ny ::= [^,\\n]{1,2}', r"x?([^,\n]{1,2},)+"),
    ('root ::= . "z"{0,} "!"?', r".z*!?"),
    ('root ::= "(" root ")" | [a-z]', None),  # nested parentheses: no regular expression
    ('root ::= [\\x41-\\u0043] "\\t" [\\]\\[]', r"[A-C]\t[\]\[]"),
]
ALPHABET = ["a", "b", "c", "x", "z", "é", "日", "😀", "0", "7", ",", "!", "\n", "(", ")", "A", "\t", "[", "]"]


@pytest.mark.parametrize("gbnf,regex", PAIRS)
def test_gbnf_agrees_with_regular_expressions(gbnf, regex):
    """On 4000 strings, random ones (multi-byte characters among them) and random walks through the recognizer's
    states: whole exactly when the regular expression matches, and every prefix of a whole one goes on; a walk never
    reaches a state from which no character goes on and the text is not whole."""
    g, rng = Gbnf(gbnf + "\n"), random.Random(1)
    rx = re.compile(regex, re.S) if regex else None
    seen = 0
    for i in range(4000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(9)))
        if i % 2:
            text, state = "", g.start
            while True:
                nxt = [c for c in ALPHABET if g.advance(state, c.encode()) is not None]
                assert nxt or g.complete(state), (gbnf, text)
                if not nxt or g.complete(state) and rng.random() < 0.3 or len(text) > 40:
                    break
                assert {b for b in range(256) if g.step(state, b) is not None} <= set(g.nexts(state))
                text += rng.choice(nxt)
                state = g.advance(state, text[-1].encode())
        if rx is None:  # a letter in balanced parentheses
            m = re.fullmatch(r"(\(*)[a-z](\)*)", text)
            want = bool(m) and len(m[1]) == len(m[2])
        else:
            want = bool(rx.fullmatch(text))
        assert whole(g, text) == want, (gbnf, text)
        if want:
            seen += 1
            data = text.encode()
            assert all(g.advance(g.start, data[:k]) is not None for k in range(len(data))), text
    assert seen > 1000, gbnf  # the test saw the language, not only its complement


def test_gbnf_json_value_grammar_agrees_with_the_json_module():
    """The schema module's JSON value grammar (schema `true`) on json.dumps texts and one-byte mutations of them:
    whole exactly when json.loads reads them."""
    g, rng = Gbnf(schema_grammar(True)), random.Random(2)
    for _ in range(300):
        doc = random_value(rng)
        for kw in ({}, {"indent": 2}, {"ensure_ascii": False}):
            assert whole(g, json.dumps(doc, **kw)), doc
        text = bytearray(json.dumps(doc, ensure_ascii=False).encode())
        for _ in range(3):
            text[rng.randrange(len(text))] = rng.choice(b'{}[]",:0123456789.eE+-tfnul\\x')
            try:
                json.loads(bytes(text).decode())
                ok = True
            except ValueError:
                ok = False
            assert whole(g, bytes(text)) == ok, bytes(text)


def test_partial_characters_go_on_only_toward_a_character_the_grammar_takes():
    g = Gbnf('root ::= "é" | [a-c] | [^\\u0000-\\u3000]\n')
    assert g.advance(g.start, b"\xc3") is not None  # é may follow
    assert g.advance(g.start, b"\xc3\xa8") is None  # è: not in the grammar
    assert g.advance(g.start, b"\xc4") is None  # U+0100..U+013F: none taken
    assert g.advance(g.start, b"\xe6\x97") is not None and whole(g, "日")  # past U+3000
    assert not g.complete(g.advance(g.start, b"\xe6\x97"))  # half a character is not a whole text
    letters = Gbnf("root ::= [a-z]+\n")
    assert all(letters.advance(letters.start, bytes([b])) is None for b in range(0x80, 0x100))
    few = Gbnf('root ::= [\\u0800-\\u0801] | "\\uD7FF" | "\\U00010000" | "\\U0010FFFF"\n')  # edges of each length
    for lead in range(0xC0, 0x100):  # half characters go on exactly when some whole one they begin is taken
        for tail in [b""] + [bytes([c]) for c in range(0x80, 0xC0)]:
            half = bytes([lead]) + tail
            edges = (0x80, 0x81, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)
            ends = [half + bytes(more) for k in range(4) for more in itertools.product(edges, repeat=k)]
            can = any(whole(few, e) for e in ends)
            state = few.advance(few.start, half)
            assert (state is not None) == can, half
            if state is not None:  # nexts: every byte that goes on (worth_trying tries no other)
                assert {b for b in range(256) if few.step(state, b) is not None} <= set(few.nexts(state)), half
    for bad in (b"\xff", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"):
        assert g.advance(Gbnf("root ::= .*\n").start, bad) is None, bad  # not UTF-8 (RFC 3629)


@pytest.mark.parametrize("text,why", [
    ('root ::= "a"\nroot ::= "b"\n', "rule 'root' is defined twice at line 2"),
    ('root ::= x\n', "rule 'x' is used but not defined"),
    ('x ::= "a"\n', "no rule 'root'"),
    ('root ::= root "a"\n', "rule 'root' is left-recursive"),
    ('root ::= ("a"?)*\n', "rule 'root' is left-recursive"),
    ('root ::= "a\n', "unexpected end of the grammar"),
    ('root ::= "\\q"\n', "unknown escape \\q at line 1, column 11"),
    ('root ::= "a"{3,2}\n', "the largest count is below the smallest"),
    ('root ::= "a"{2001}\n', "a count above 2000"),
    ('root ::= "a"{2000}{2000}\n', "a count that writes more than 100000 items"),  # 4 million, not allocated
    ("root ::= " + '"a"{0,2000} ' * 201 + "\n", "the counts write more than 400000 items in all"),
    ('root ::= * "a"\n', "nothing before '*' to repeat"),
    ('root := "a"\n', "'::=' expected at line 1, column 6"),
    ('root ::= ("a"\n', "')' expected"),
    ('root ::= <[42]>\n', "token references (<...>) are not supported"),
    ('root ::= []\n', "an empty set of characters"),
    ('root ::= "\\uD800"\n', "\\uD800 is not a character"),
    ("root ::= " + "(" * 2000 + '"a"' + ")" * 2000 + "\n", "nested too deeply"),
    ('root ::= "a" ) "b"\n', "unexpected ')'"),
])
def test_bad_grammars_are_one_line(text, why):
    with pytest.raises(HotcoldError, match=re.escape(why)):
        Gbnf(text)


def test_counts_of_parts_that_can_match_nothing():
    """("ab"?){300}: each "ab" read leaves up to 300 ways to go on, and each of them reaches the same ones again;
    reading them once per character (not once per way) makes 600 bytes a moment's work, where it took 5 s (and
    ("a"?){2000} 2.5 s a byte)."""
    g = Gbnf('root ::= ("ab"?){300} "c"\n')
    state = g.start
    for k in range(301):
        assert g.complete(g.advance(state, b"c")) and g.advance(state, b"b") is None
        state = g.advance(state, b"ab")
        assert (state is None) == (k == 300)
    big = Gbnf('root ::= ("ab"{2000}){2000}\n')  # a count of a group reads the group's one rule: 6002 items
    assert len(big.elements) == 6002 and not whole(big, "ab" * 2000 * 3)
    many = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 2000} for i in range(50)}}
    assert grammar_for(many).start is not None  # 100000 items over 50 counts: each count's own copies are few


CAT = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8}, "age": {"type": "integer"},
    "color": {"enum": ["black", "white", None]}, "toys": {"type": "array", "items": {"$ref": "#/$defs/toy"},
                                                          "maxItems": 2},
    "weight": {"type": ["number", "null"]}, "kind": {"const": "cat"}},
    "required": ["name", "age"],
    "$defs": {"toy": {"anyOf": [{"type": "string", "maxLength": 12}, {"$ref": "#/$defs/box"}]},
              "box": {"type": "object", "properties": {"in": {"$ref": "#/$defs/toy"}}, "required": ["in"]}}}


def random_cat(rng: random.Random) -> dict:
    def toy(depth=0):
        if depth > 2 or rng.random() < 0.5:
            return "".join(rng.choice("ab é") for _ in range(3))
        return {"in": toy(depth + 1)}
    cat = {"name": "".join(rng.choice("Tom é") for _ in range(rng.randint(1, 8))), "age": rng.randint(-99, 99)}
    for key, value in (("color", rng.choice(["black", "white", None])),
                       ("toys", [toy() for _ in range(rng.randrange(3))]),
                       ("weight", rng.choice([None, 4.5, -1e-3, 12])), ("kind", "cat")):
        if rng.random() < 0.5:
            cat[key] = value
    return cat


def test_schema_grammar_takes_its_instances_and_refuses_others():
    g, rng = grammar_for(CAT), random.Random(3)
    for _ in range(200):  # properties in the schema's order, each optional one there or not
        cat = random_cat(rng)
        assert whole(g, json.dumps(cat)) and whole(g, json.dumps(cat, indent=2, ensure_ascii=False)), cat
    for cat in ({"name": "Tom"}, {"age": 3, "name": "Tom"}, {"name": "", "age": 1}, {"name": "123456789", "age": 1},
                {"name": "T", "age": 1.5}, {"name": "T", "age": 1, "color": "red"}, {"name": "T", "age": 1, "x": 0},
                {"name": "T", "age": 1, "toys": ["a", "b", "c"]}, {"name": "T", "age": 1, "toys": [{"on": "a"}]},
                {"name": "T", "age": 1, "weight": "4"}, {"name": "T", "age": 1, "kind": "dog"}, [], "Tom"):
        assert not whole(g, json.dumps(cat)), cat
    extra = grammar_for({"properties": {"a": {"type": "null"}, "ab": {}}, "additionalProperties": {"type": "integer"}})
    assert whole(extra, '{"a": null, "b": 1, "c": 2}') and whole(extra, '{"b": 1}') and whole(extra, '{"abc": 1}')
    assert not whole(extra, '{"b": "x"}') and not whole(extra, '{"b": 1, "a": null}')
    for listed in ('{"a": 1}', '{"a": null, "a": 2}', '{"ab": 1, "ab": 2}'):  # the listed names are theirs alone
        assert not whole(extra, listed), listed
    assert whole(grammar_for({"type": "array", "minItems": 2}), "[1, {}]")
    assert not whole(grammar_for({"type": "array", "minItems": 2}), "[1]")


@pytest.mark.parametrize("schema,why", [
    ({"type": "string", "pattern": "(?=a)b"}, 'at #: pattern "(?=a)b" at 1: lookarounds and inline flags'),
    ({"properties": {"p": {"pattern": "a^b"}}}, "at #/properties/p: pattern \"a^b\" at 1: an anchor (^ or $) inside"),
    ({"pattern": r"(a)\1"}, "\\1 (backreferences, word boundaries and other escapes) is not supported"),
    ({"pattern": "[]"}, "a set that matches no character"), ({"pattern": "a**"}, "a quantifier after a quantifier"),
    ({"pattern": "(a"}, "unbalanced parenthesis"), ({"pattern": "a)"}, "unbalanced parenthesis"),
    ({"pattern": "[z-a]"}, "a range out of order"), ({"pattern": "*a"}, "nothing for * to repeat"),
    ({"pattern": "^(a?b?)*$"}, 'pattern "^(a?b?)*$" at 7: a repetition of a part that can match nothing'),
    ({"pattern": "^a", "maxLength": 3}, "pattern: hotcold takes it without format, minLength or maxLength"),
    ({"pattern": "\\ud800"}, "lone surrogate"), ({"pattern": 5}, "pattern: a regular expression, got 5"),
    ({"properties": {"d": {"type": "string", "format": "email"}}}, 'at #/properties/d: format "email": hotcold takes'),
    ({"properties": {"d": {"type": "number", "minimum": 0}}}, "at #/properties/d: the keyword 'minimum'"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer lies between the minimum 5 and the maximum 4"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf: hotcold takes one schema there"),
    ({"type": "strng"}, "type: one of object, array, string"),
    ({"$ref": "#/$defs/none"}, "$ref: #/$defs/none is not in the schema"),
    ({"$ref": "https://example.com/s.json"}, "$ref: a reference inside the schema"),
    ({"$ref": "#"}, "left-recursive"),
    ({"properties": {"a": {}}, "required": ["b"]}, "required: 'b' is not among the properties"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "the keyword 'maxLength' does not go with enum there"),
    ({"type": "number", "minimum": 1}, 'the keyword \'minimum\' does not go with type "number" there (hotcold takes'),
    ({"const": float("nan")}, "nan is not a number JSON holds"),
    ({"enum": ["\ud800"]}, "holds a lone surrogate"),
    ({"type": "string", "minLength": 3000}, "at #: minLength 3000: at most 2000"),
    ({"anyOf": [{"$ref": "#/$defs/x"}], "$defs": {"x": {"$ref": "#/$defs/x"}}}, "rule 'ref-defs-x"),
    ({"properties": {'"q"': {}}, "additionalProperties": True}, "beside a property whose name JSON escapes"),
    ({"type": "array", "items": {"type": "array", "items": {}}, "minItems": 1} | {"items": json.loads(
        '{"items":' * 900 + "{}" + "}" * 900)}, "JSON schema: nested too deeply"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "at most 2 of something asked for at least 3"),
    ({"enum": []}, "enum: a list of values"),
    (False, "a schema is an object"),
])
def test_unsupported_schemas_are_named(schema, why):
    with pytest.raises(HotcoldError, match=re.escape(why)):
        grammar_for(schema)


def test_sampling_under_a_schema_keeps_every_allowed_token(smollm):
    """In states of the schema's grammar, on SmolLM2's logits: the first-bytes filter loses no token a brute force
    over the vocabulary allows, and the tokens said to be surely allowed are (inside a string without a length
    bound, most of the vocabulary); greedy is the likeliest allowed."""
    story = grammar_for({"properties": {"story": {"type": "string"}, "cat": CAT}, "$defs": CAT["$defs"]})
    for g, text in [(grammar_for(CAT), t) for t in ("", '{"name": "T', '{"name": "Tom", "age": 1',
                                                    '{"name": "Tom", "age": 12, ', '{\n  "name": "é')] + [
            (story, '{"story": "Once'), (story, '{"story": "x", "cat": {"name": "a')]:
        state = g.advance(g.start, text.encode())
        logits = smollm.logits(smollm.tokenize("A cat: " + text), all_logits=False).numpy().copy()
        allowed = np.array([smollm.allows(g, state, t) for t in range(logits.size)])
        maybe = worth_trying(g, state, smollm.token_tables.first)
        assert allowed.any() and not (allowed & ~maybe).any(), text
        sure = g.sure(state, smollm.token_tables)
        assert sure is None or not (sure & ~allowed).any(), text
        assert (sure is not None and sure.sum() > 30000) == (text == '{"story": "Once'), text
        ranked = [t for t in np.argsort(-logits, kind="stable").tolist() if allowed[t]]
        check = lambda t: bool(allowed[t])  # noqa: E731
        assert constrained_pick(Sampler(0), logits, [], maybe, check) == ranked[0]


def test_generate_under_a_schema_and_a_grammar(smollm):
    """Greedy and sampled replies keep to the schema, the properties in its order, and end with the end token; a
    GBNF grammar's reply is one of its sentences."""
    ids = smollm.tokenize(smollm.tokenizer.apply_chat_template("Describe a cat as JSON."))
    g = grammar_for(CAT)
    for sampler in (Sampler(0), Sampler(0.8, seed=1), Sampler(0.9, top_k=0, seed=2)):
        out = smollm.generate(ids, 200, sampler, grammar=g)
        print(out.text)
        cat = json.loads(out.text)
        assert out.stats["stop"] == "stop_token" and whole(g, out.text), out.text
        assert list(cat)[:2] == ["name", "age"] and 1 <= len(cat["name"]) <= 8 and isinstance(cat["age"], int)
    yes_no = Gbnf('root ::= ("yes" | "no") "."\n')
    ask = smollm.tokenize(smollm.tokenizer.apply_chat_template("Is the sky blue? Answer yes or no."))
    for sampler in (Sampler(0), Sampler(1.0, seed=4)):
        out = smollm.generate(ask, 16, sampler, grammar=yes_no)
        assert out.text in ("yes.", "no.") and out.stats["stop"] == "stop_token", out.text


def test_cli_and_server_take_grammars_and_schemas(smollm, tmp_path, capsys):
    """--grammar-file and -jf give Model.generate's reply under the grammar; bad ones are one line (exit 2); the
    server's grammar field and response_format json_schema keep to theirs, and refuse bad ones with a 400."""
    ask = "Is the sky blue? Answer yes or no."
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= ("yes" | "no") "."\n')
    schema = tmp_path / "cat.json"
    schema.write_text(json.dumps(CAT))
    ids = smollm.tokenize(smollm.tokenizer.apply_chat_template(ask))
    for flags, grammar in ((["--grammar-file", str(gbnf)], Gbnf(gbnf.read_text())),
                           (["-jf", str(schema)], grammar_for(CAT))):
        want = smollm.generate(ids, 64, Sampler(0), grammar=grammar).text
        assert main(["generate", "-p", ask, "--chat", "--temperature", "0", "-n", "64", "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == want
    for flags, why in ((["--grammar", "root ::= x"], "argument --grammar: grammar: rule 'x' is used but not defined"),
                       (["--grammar-file", str(tmp_path / "no.gbnf")], f"{tmp_path / 'no.gbnf'}: no such file"),
                       (["-jf", str(gbnf)], "argument -jf/--json-schema-file: not JSON"),
                       (["-j", "{}", "--grammar", 'root ::= "a"'], "not allowed with argument")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "-p", ask, *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and err.count("\n") <= 2, err  # argparse's usage line, then it
    args = build_parser("server").parse_args(["server"])
    for body, why in (({"grammar": "root ::= ("}, "grammar: ')' expected"), ({"grammar": 3}, "grammar: GBNF text"),
                      ({"grammar": 'root ::= "a"', "json_schema": {}}, "grammar and a JSON schema"),
                      ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}},
                       "the keyword 'not' is not supported")):
        with pytest.raises(BadRequest, match=re.escape(why)):
            request_grammar(body, args)
    srv = Server(smollm, args, "127.0.0.1", 0)
    try:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        for body, check in (({"grammar": gbnf.read_text()}, lambda t: t in ("yes.", "no.")),
                            ({"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "cat", "schema": CAT}}},
                             lambda t: whole(grammar_for(CAT), t))):
            req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps({
                "messages": [{"role": "user", "content": ask}], "temperature": 0.7, "seed": 5, "max_tokens": 160,
                **body}).encode())
            with urllib.request.urlopen(req, timeout=600) as r:
                got = json.loads(r.read())["choices"][0]
            assert check(got["message"]["content"]) and got["finish_reason"] == "stop", got
    finally:
        srv.shutdown()
        srv.server_close()


def test_deep_ambiguous_and_repeated_grammars():
    """Nesting 3000 deep reads (stacks share their tails); an ambiguous grammar that doubles its ways of reading each
    character stops in one line; a repetition repeats what comes before it, repetitions included (llama.cpp's)."""
    g = Gbnf(schema_grammar(True))
    assert whole(g, "[" * 3000 + "]" * 3000) and not whole(g, "[" * 3000 + "]" * 2999)
    twice = Gbnf('root ::= "a" root "b" | "a" root "c" | "x"\n')
    assert whole(twice, "aaxbc")
    with pytest.raises(HotcoldError, match="more than 10000 ways to read the text at once"):
        twice.advance(twice.start, b"a" * 14)
    four = Gbnf('root ::= "a"{2}{2} "b"*?\n')
    assert [whole(four, "a" * k) for k in range(6)] == [False] * 4 + [True, False] and whole(four, "aaaabbb")


# (pattern, the same for Python's re on these strings: `$` there also matches before a final newline, named groups)
PATTERNS = [r"^[a-z]+$", r"\d{2,3}-\d", r"^(ab|c)*é?$", r'^"[^"\\]*"$', r"^a.b|\t$", r"^(?:x|y){2,3}?\W$",
            r"^\s*\S+$", r"😀|[^\n\d]{3}", r"^(?<w>\w{1,3})$", r"^$", r"^[\]a-c-]+\\?$", r"^a{2,}|b{1}$",
            r"^(\x01{2}|a)+\x01?$"]
CHARS = ["a", "b", "c", "x", "y", "é", "😀", "0", "7", "-", '"', "\\", "\n", "\t", " ", "A", "_", "\x01", "]"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_schema_patterns_agree_with_regular_expressions(pattern):
    """A string schema's pattern (unanchored without ^ and $, as JSON schema says) against Python's re.search on
    4000 strings, random ones and random walks through the grammar's states, written as json.dumps writes them
    (escapes for quotes, backslashes and control characters), other characters as they are (not \\u escapes)."""
    g, rng = grammar_for({"type": "string", "pattern": pattern}), random.Random(5)
    rx = re.compile(re.sub(r"\$$", r"\\Z", pattern.replace("(?<", "(?P<")), re.ASCII)
    seen = 0
    for i in range(4000):
        text = "".join(rng.choice(CHARS + ["12-3", "ab", "xy", "aa"]) for _ in range(rng.randrange(7)))
        if i % 2:
            text, state = "", g.advance(g.start, b'"')
            while len(text) < 12 and rng.random() < 0.85:
                nxt = [c for c in CHARS if g.advance(state, json.dumps(c)[1:-1].encode()) is not None]
                if not nxt:
                    break
                text += rng.choice(nxt)
                state = g.advance(state, json.dumps(text[-1])[1:-1].encode())
        want = bool(rx.search(text))
        assert whole(g, json.dumps(text, ensure_ascii=False)) == want, (pattern, text)
        seen += want
    assert 100 < seen < 3900, (pattern, seen)  # the test saw the language and its complement
    assert whole(grammar_for({"pattern": r"^\ud83d\ude00\x7f$"}), '"😀\\u007f"')  # a surrogate pair: one character
    assert whole(grammar_for({"pattern": ""}), '"any \\n"') and not whole(grammar_for({"pattern": "^a"}), '"\\u0061"')


def test_schema_formats_tuples_nullable_and_allof():
    """What Pydantic and OpenAPI write: RFC 3339 dates and times, UUIDs, tuples (prefixItems), nullable, allOf of one
    $ref."""
    g = grammar_for({"properties": {"when": {"type": "string", "format": "date-time"}, "id": {"format": "uuid"},
                                    "n": {"type": "integer", "nullable": True},
                                    "p": {"allOf": [{"$ref": "#/$defs/P"}]},
                                    "t": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}},
                     "$defs": {"P": {"enum": ["x", "y"]}}})
    for text, ok in (('{"when": "2024-02-29T13:05:09Z"}', True), ('{"when": "2024-13-01T00:00:00Z"}', False),
                     ('{"when": "2024-01-01T23:59:60Z"}', False), ('{"when": "2024-01-01T00:00:00.5+05:30"}', True),
                     ('{"id": "123e4567-e89b-12d3-a456-426614174000"}', True), ('{"id": "123e4567"}', False),
                     ('{"n": null}', True), ('{"n": 5}', True), ('{"n": "5"}', False), ('{"p": "y"}', True),
                     ('{"p": "z"}', False), ('{"t": [1, "a"]}', True), ('{"t": [1]}', False),
                     ('{"t": [1, "a", 2]}', False)):
        assert whole(g, text) == ok, text


@pytest.mark.parametrize("bounds", [{"minimum": 0}, {"minimum": 1, "maximum": 10}, {"maximum": -5},
                                    {"minimum": -123, "maximum": 4567}, {"minimum": 2.5, "maximum": 7.5},
                                    {"exclusiveMinimum": 0, "exclusiveMaximum": 100}, {"minimum": 100, "maximum": 100}])
def test_integer_bounds_take_exactly_the_integers_between(bounds):
    """minimum/maximum (exclusive ones too, fractional ones rounded inward) on integers, against Python on 700
    integers near and far from the bounds; no leading zeros, no -0."""
    g, rng = grammar_for({"type": "integer", **bounds}), random.Random(4)
    top = 10 ** 16 - 1  # an unbounded side: 16 digits, as a number's parts
    lo = max([math.ceil(v) + (k == "exclusiveMinimum") for k, v in bounds.items() if "inimum" in k], default=-top)
    hi = min([math.floor(v) - (k == "exclusiveMaximum") for k, v in bounds.items() if "aximum" in k], default=top)
    for x in [rng.randint(-10 ** 6, 10 ** 6) for _ in range(350)] + [rng.randint(-200, 200) for _ in range(350)] + [
            lo, hi, lo - 1, hi + 1, 0, -1, 1]:
        assert whole(g, str(x)) == (lo <= x <= hi), x
    assert not any(whole(g, t) for t in ("01", "-0", "+1", "1.0", "-", ""))
