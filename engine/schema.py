"""JSON schemas as GBNF grammars (llama.cpp's --json-schema): types, properties, items and tuples, lengths and counts,
the RFC 3339 date and time formats and UUIDs, patterns (engine.pattern), integers' bounds, enum, const, anyOf/oneOf,
allOf of one schema, nullable and $ref. Other keywords (other formats, bounds on other numbers, ...) are refused by
name rather than ignored: the text would not keep to them.

Objects hold their properties in the schema's order, the required ones always, the others when the model gives them,
and no other properties unless additionalProperties allows them (as llama.cpp's converter). Whitespace between
JSON's tokens is bounded as in engine.grammar (at most one newline and 20 spaces or tabs), and numbers' parts to 16
digits.
"""
from __future__ import annotations

import json
import math
import re

from .config import HotcoldError
from .gbnf import MAX_REPEAT, literal, set_char
from .pattern import pattern_expr

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "readOnly", "writeOnly",
               "deprecated", "$defs", "definitions"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
BASE = r'''ws ::= [ \t]? ("\n" [ \t]{0,20})?
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws (string ws ":" ws value ws ("," ws string ws ":" ws value ws)*)? "}"
array ::= "[" ws (value ws ("," ws value ws)*)? "]"
string ::= "\"" char* "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
integer ::= "-"? ("0" | [1-9] [0-9]{0,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,16})?
boolean ::= "true" | "false"
null ::= "null"
'''
KEYS = {"object": {"properties", "required", "additionalProperties"},
        "array": {"items", "minItems", "maxItems", "prefixItems"},
        "string": {"minLength", "maxLength", "format", "pattern"},
        "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}}
STRUCTURE = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "nullable"}  # keywords of any type
TAKEN = ("hotcold takes type, properties, required, additionalProperties, items, prefixItems, minItems, maxItems, "
         "minLength, maxLength, format, pattern, an integer's minimum and maximum, enum, const, anyOf, oneOf, allOf of "
         "one, nullable and $ref")
INT_DIGITS = 16  # digits of an integer, as the number rule's parts (engine.grammar's DIGITS_MAX)
HOUR = r'([01] [0-9] | "2" [0-3])'
TIME = HOUR + r' ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,9})? ("Z" | [+-] ' + HOUR + r' ":" [0-5] [0-9])'
DATE = r'[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
FORMATS = {"date": DATE, "time": TIME, "date-time": f'{DATE} "T" {TIME}',  # RFC 3339's, as llama.cpp's converter
           "uuid": r'[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}'}


def json_text(v) -> str:
    """A value as compact JSON (an enum's or const's text); HotcoldError for what no JSON text holds."""
    try:
        text = json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise HotcoldError(f"JSON schema: {v!r} is not a number JSON holds (NaN, infinity)") from None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise HotcoldError(f"JSON schema: {text!r} holds a lone surrogate, which no UTF-8 text holds")
    return text


def schema_grammar(schema) -> str:
    """GBNF text for the JSON texts a schema describes (no whitespace before or after the value); HotcoldError for
    a schema or keyword hotcold does not do."""
    try:
        return Converter(schema).text
    except RecursionError:
        raise HotcoldError("JSON schema: nested too deeply") from None


class Converter:
    def __init__(self, schema):
        self.root, self.rules, self.refs = schema, {}, {}
        self.text = "root ::= " + self.rule(schema, "#") + "\n" + BASE + "".join(
            f"{name} ::= {body}\n" for name, body in self.rules.items())

    def fail(self, where: str, what: str) -> HotcoldError:
        return HotcoldError(f"JSON schema at {where}: {what}")

    def new(self, body: str, name: str = "s") -> str:
        name = f"{name}{len(self.rules)}"
        self.rules[name] = body
        return name

    def rule(self, schema, where: str) -> str:
        """A GBNF expression (a rule name or a group) for a value of the schema."""
        if schema is True or schema == {}:
            return "value"
        if not isinstance(schema, dict):
            raise self.fail(where, f"a schema is an object, got {json.dumps(schema)}")
        if "nullable" in schema:  # OpenAPI's: the schema, or null
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return f"({self.rule(rest, where)} | null)" if schema["nullable"] is True else self.rule(rest, where)
        if "allOf" in schema:  # one schema (Pydantic v1 wraps a $ref so): that schema; several are not merged
            if not isinstance(schema["allOf"], list) or len(schema["allOf"]) != 1:
                raise self.fail(where, "allOf: hotcold takes one schema there (it does not merge several)")
            self.check(schema, where, {"allOf"})
            return self.rule(schema["allOf"][0], f"{where}/allOf/0")
        if "$ref" in schema:
            return self.ref(schema, where)
        if "const" in schema or "enum" in schema:
            self.check(schema, where, {"const", "enum", "type"})  # (a type beside them: what they hold)
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(where, "enum: a list of values")
            return "(" + " | ".join(literal(json_text(v)) for v in values) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise self.fail(where, f"{key}: a list of schemas")
                self.check(schema, where, {key})
                return "(" + " | ".join(self.rule(s, f"{where}/{key}/{i}") for i, s in enumerate(subs)) + ")"
        implied = next((k for k, keys in KEYS.items() if keys & schema.keys()), None)  # as llama.cpp's converter
        kind = schema["type"] if "type" in schema else implied
        if kind is None:
            self.check(schema, where, set())
            return "value"
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in TYPES for k in kinds):
            raise self.fail(where, f"type: one of {', '.join(TYPES)} (or a list of them), got {json.dumps(kind)}")
        self.check(schema, where, {"type"}.union(*(KEYS.get(k, set()) for k in kinds)))
        alts = [self.typed(schema, k, where) for k in kinds]
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def check(self, schema: dict, where: str, known: set) -> None:
        for key in schema:
            if key in known or key in ANNOTATIONS:
                continue
            if key in STRUCTURE.union(*KEYS.values()):
                others = ", ".join(f"type {json.dumps(schema[k])}" if k == "type" else k for k in schema if k in known)
                raise self.fail(where, f"the keyword {key!r} does not go with {others or 'the rest'} there ({TAKEN})")
            raise self.fail(where, f"the keyword {key!r} is not supported ({TAKEN})")

    def ref(self, schema: dict, where: str) -> str:
        target = schema["$ref"]
        self.check(schema, where, {"$ref"})
        if target not in self.refs:
            if not isinstance(target, str) or not target.startswith("#"):
                raise self.fail(where, f"$ref: a reference inside the schema (#/$defs/NAME), got {json.dumps(target)}")
            node = self.root
            for part in filter(None, target[1:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(node, dict) or part not in node:
                    raise self.fail(where, f"$ref: {target} is not in the schema")
                node = node[part]
            name = self.refs[target] = self.new("", "ref-" + re.sub(r"[^a-zA-Z0-9]+", "-", target[1:]).strip("-"))
            self.rules[name] = self.rule(node, target)
        return self.refs[target]

    def count(self, schema: dict, key: str, where: str, default: int | None) -> int | None:
        v = schema.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise self.fail(where, f"{key}: a count, got {json.dumps(v)}")
        if v is not None and v > MAX_REPEAT:
            raise self.fail(where, f"{key} {v}: at most {MAX_REPEAT} (llama.cpp's grammars' largest count)")
        return v

    def repeat(self, item: str, lo: int, hi: int | None, sep: str) -> str:
        """lo to hi (None: any number of) items, with sep between them."""
        if hi is not None and hi < lo:
            raise HotcoldError(f"JSON schema: at most {hi} of something asked for at least {lo}")
        if hi == 0:
            return '""'
        more = f"({sep} {item})" if sep else item
        first = f"{item} {more}{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        return first if lo else f"({first})?"

    def typed(self, schema: dict, kind: str, where: str) -> str:
        if kind == "string":
            lo = self.count(schema, "minLength", where, 0)
            hi = self.count(schema, "maxLength", where, None)
            if "pattern" in schema:
                if {"format", "minLength", "maxLength"} & schema.keys():
                    raise self.fail(where, "pattern: hotcold takes it without format, minLength or maxLength")
                try:
                    return self.new('"\\"" ' + pattern_expr(schema["pattern"]) + ' "\\""')
                except HotcoldError as e:
                    raise self.fail(where, str(e)) from None
            if "format" in schema:
                if schema["format"] not in FORMATS or (lo, hi) != (0, None):
                    raise self.fail(where, f"format {json.dumps(schema['format'])}: hotcold takes "
                                    f"{', '.join(FORMATS)}, without minLength or maxLength")
                return self.new('"\\"" ' + FORMATS[schema["format"]] + ' "\\""')
            return "string" if (lo, hi) == (0, None) else self.new('"\\"" ' + self.repeat("char", lo, hi, "") +
                                                                   ' "\\""')
        if kind == "array" and "prefixItems" in schema:  # a tuple: each of these, then items' (none by default)
            firsts, items = schema["prefixItems"], schema.get("items", False)
            if not isinstance(firsts, list) or not firsts or {"minItems", "maxItems"} & schema.keys():
                raise self.fail(where, "prefixItems: a list of schemas (without minItems or maxItems)")
            parts = [self.rule(s, f"{where}/prefixItems/{i}") + " ws" for i, s in enumerate(firsts)]
            more = "" if items is False else f' ("," ws {self.rule(items, where + "/items")} ws)*'
            return self.new('"[" ws ' + ' "," ws '.join(parts) + more + ' "]"')
        if kind == "array":
            items = schema.get("items", True)
            lo = self.count(schema, "minItems", where, 0)
            hi = self.count(schema, "maxItems", where, None)
            item = self.rule(items, f"{where}/items") + " ws"
            return self.new('"[" ws ' + self.repeat(item, lo, hi, '"," ws') + ' "]"')
        if kind == "object":
            return self.object(schema, where)
        if kind == "integer" and KEYS["integer"] & schema.keys():
            return self.new(self.integer_range(schema, where))
        return kind

    def integer_range(self, schema: dict, where: str) -> str:
        """A GBNF expression for the integers within the schema's minimum/maximum (exclusive ones moved by one), as
        llama.cpp's converter: digit by digit, without leading zeros."""
        bound = {}
        for key in KEYS["integer"]:
            v = schema.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or
                                  abs(v) >= 10 ** INT_DIGITS):
                raise self.fail(where, f"{key}: a number of at most {INT_DIGITS} digits, got {json.dumps(v)}")
            bound[key] = v
        lo = max([math.ceil(v) + (k == "exclusiveMinimum" and v == math.ceil(v))  # an integer bound excluded
                  for k, v in bound.items() if k.endswith("inimum") and v is not None], default=None)
        hi = min([math.floor(v) - (k == "exclusiveMaximum" and v == math.floor(v))
                  for k, v in bound.items() if k.endswith("aximum") and v is not None], default=None)
        top = 10 ** INT_DIGITS - 1
        lo, hi = -top if lo is None else lo, top if hi is None else hi
        if lo > hi:
            raise self.fail(where, f"no integer lies between the minimum {lo} and the maximum {hi}")
        alts = []
        if lo < 0:  # the negatives: "-" then a magnitude in [max(1, -hi), -lo]
            alts.append(f'"-" ({digits_between(max(1, -hi), -lo)})')
        if hi >= 0:
            alts.append(digits_between(max(0, lo), hi))
        return " | ".join(f"({a})" for a in alts)

    def object(self, schema: dict, where: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", "properties" not in schema)
        if not isinstance(props, dict) or not isinstance(required, list) or \
                not all(isinstance(r, str) for r in required):
            raise self.fail(where, "properties: an object of schemas; required: a list of names")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.fail(where, f"required: {missing[0]!r} is not among the properties (hotcold writes the required "
                            "properties from their schemas)")
        if extra is False and not props:
            return '("{" ws "}")'
        pairs = [(literal(json.dumps(k, ensure_ascii=False)) + ' ws ":" ws ' +
                  self.rule(v, f"{where}/properties/{k}") + " ws", k in required) for k, v in props.items()]
        other = None
        if extra is not False:
            value = "value" if extra is True else self.rule(extra, f"{where}/additionalProperties")
            if any(not c.isprintable() or c in '"\\' for k in props for c in k):
                raise self.fail(where, "additionalProperties beside a property whose name JSON escapes")
            key = '"\\"" (' + not_strings(list(props)) + ') "\\""'  # not one of the listed names, as llama.cpp
            other = self.new(f'{key} ws ":" ws {value} ws')
        # some[i]: the properties from i on after one has been written; none[i]: before any has
        some, none = ['("," ws ' + other + ")*" if other else '""'], [
            f"({other} (\",\" ws {other})*)?" if other else '""']
        for pair, needed in reversed(pairs):
            after = self.new(some[-1])
            some.append(f'"," ws {pair} {after}' if needed else f'("," ws {pair})? {after}')
            none.append(f"{pair} {after}" if needed else f"{pair} {after} | {self.new(none[-1])}")
        return self.new('"{" ws (' + none[-1] + ') "}"')


def digits_between(lo: int, hi: int) -> str:
    """A GBNF expression for the decimal numbers lo..hi (0 <= lo <= hi), without leading zeros."""
    alts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):  # each length: a fixed-width range
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10 ** n - 1)
        if a <= b:
            alts.append(same_length(str(a), str(b)))
    return " | ".join(alts)


def same_length(a: str, b: str) -> str:
    """A GBNF sequence for the numbers a..b written with the same count of digits."""
    if not a:
        return '""'
    if a[0] == b[0]:
        return f'"{a[0]}" ' + same_length(a[1:], b[1:]) if len(a) > 1 else f'"{a[0]}"'
    rest = len(a) - 1
    tail = f" [0-9]{{{rest}}}" if rest else ""
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"[{a[0]}-{b[0]}]" + tail
    alts = [f'"{a[0]}" ({same_length(a[1:], "9" * rest)})']
    if int(a[0]) + 1 <= int(b[0]) - 1:
        alts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + tail)
    alts.append(f'"{b[0]}" ({same_length("0" * rest, b[1:])})')
    return "(" + " | ".join(alts) + ")"


def not_strings(names: list[str]) -> str:
    """A GBNF expression for the contents of a JSON string that is none of `names` (a name's characters, then a
    different one or more; or a string that stops short of every name), as llama.cpp's converter keys its additional
    properties."""
    trie: dict = {}
    for name in names:
        node = trie
        for c in name:
            node = node.setdefault(c, {})
        node[""] = {}  # the end of a name

    def visit(node: dict) -> str:
        kids = [c for c in node if c]
        alts = [r'[^"\\\x7F\x00-\x1F' + "".join(set_char(ord(c)) for c in kids) + "] char*",
                r'"\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) char*']  # something else from here on
        alts += [f"{literal(c)} ({visit(node[c])})" for c in kids]
        return " | ".join(alts + ([] if "" in node else ['""']))
    return visit(trie)


def grammar_for(schema):
    """The grammar of a JSON schema: any JSON object for `{}` and `{"type": "object"}`, annotations aside
    (engine.grammar's JsonGrammar, as llama.cpp's -j '{}'), else the schema's GBNF (engine.gbnf.Gbnf)."""
    from .gbnf import Gbnf
    from .grammar import JsonGrammar
    bare = {k: v for k, v in schema.items() if k not in ANNOTATIONS} if isinstance(schema, dict) else schema
    return JsonGrammar() if bare in ({}, {"type": "object"}) else Gbnf(schema_grammar(schema))
