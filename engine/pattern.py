"""JSON schema's `pattern` (an ECMA-262 regular expression) as a GBNF expression for the contents of a JSON string
whose value it matches: literals and escapes, `.`, sets and the classes \\d \\w \\s (and their negations), groups,
alternatives and the quantifiers * + ? {m} {m,} {m,n} (lazy ones too: the same strings). Unanchored as JSON schema
says: without `^` (`$`) a branch may have any text before (after) it. Anchors elsewhere, backreferences, lookarounds,
word boundaries and inline flags are refused by name.

Characters are written as JSON writes them: `"`, `\\` and the control characters (U+007F too, as llama.cpp's JSON
grammar) by their escapes, the others as they are.
"""
from __future__ import annotations

import json
import re

from .config import HotcoldError
from .gbnf import MAX_REPEAT, literal, set_char

TOP = 0x10FFFF
Ranges = list[tuple[int, int]]  # sorted, disjoint, no surrogates
CLASSES: dict[str, Ranges] = {
    "d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]}  # ECMA-262's white space
LINE_ENDS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what `.` does not match
ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
RAW: Ranges = [(0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, TOP)]  # what a JSON string holds unescaped
SYNTAX = set("^$\\.*+?()[]{}|/")
QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def normal(ranges) -> Ranges:
    """Sorted, merged ranges without the surrogates (no UTF-8 text holds one)."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def complement(ranges: Ranges) -> Ranges:
    out, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    return normal(out + ([(at, TOP)] if at <= TOP else []))


def intersect(a: Ranges, b: Ranges) -> Ranges:
    return normal((max(x, u), min(y, v)) for x, y in a for u, v in b if max(x, u) <= min(y, v))


def class_expr(ranges: Ranges) -> str:
    """A GBNF expression for one character of the ranges, as JSON text: the others as they are, `"` `\\` and the
    control characters by JSON's short escapes or \\u00hh (grouped by their first h)."""
    raw = intersect(ranges, RAW)
    members = "".join(set_char(lo) + (f"-{set_char(hi)}" if hi > lo else "") for lo, hi in raw)
    single = len(raw) == 1 and raw[0][0] == raw[0][1] and chr(raw[0][0]).isalnum()
    alts = [literal(chr(raw[0][0])) if single else f"[{members}]"] if raw else []
    by_digit: dict[str, str] = {}
    for lo, hi in intersect(ranges, complement(RAW)):
        for c in range(lo, hi + 1):
            text = json.dumps(chr(c))[1:-1] if c != 0x7F else "\\u007f"
            if text.startswith("\\u"):
                by_digit[text[4]] = by_digit.get(text[4], "") + text[5]
            else:
                alts.append(literal(text))
    if by_digit:  # (a sequence: grouped, so that a quantifier after it repeats it whole)
        alts.append("(" + literal("\\u00") + " (" + " | ".join(f'"{d}" [{hs}]' for d, hs in by_digit.items()) + "))")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def pattern_expr(pattern: str) -> str:
    """The GBNF expression for a JSON string's contents (between its quotes) whose value the pattern matches
    somewhere; HotcoldError naming what hotcold does not take."""
    if not isinstance(pattern, str):
        raise HotcoldError(f"pattern: a regular expression, got {json.dumps(pattern)}")
    return Pattern(pattern).top()


class Pattern:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> HotcoldError:
        return HotcoldError(f"pattern {json.dumps(self.text)} at {self.pos}: {what}")

    def peek(self, ahead: int = 0) -> str:
        return self.text[self.pos + ahead:self.pos + ahead + 1]

    def top(self) -> str:
        branches = []
        while True:
            start = self.peek() == "^"
            self.pos += start
            seq = self.sequence(top=True)
            end = self.peek() == "$"  # (sequence stops at one only before | or the end)
            self.pos += end
            parts = [expr for expr, _ in seq]
            branches.append(" ".join(([] if start else ["char*"]) + parts + ([] if end else ["char*"])) or '""')
            if not self.peek():
                return "(" + " | ".join(branches) + ")"
            self.pos += 1

    def alternatives(self) -> tuple[str, bool]:
        """(a GBNF group, whether it matches the empty string) for alternatives up to ) or the end."""
        alts = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            alts.append(self.sequence())
        return ("(" + " | ".join(" ".join(e for e, _ in seq) or '""' for seq in alts) + ")",
                any(all(empty for _, empty in seq) for seq in alts))

    def sequence(self, top: bool = False) -> list[tuple[str, bool]]:
        seq = []
        while self.peek() and self.peek() not in "|)" and not (top and self.at_branch_end()):
            if self.peek() in "^$":
                raise self.fail("an anchor (^ or $) inside the expression; hotcold takes them at its ends")
            seq.append(self.quantified(self.atom()))
        if top and self.peek() == ")":
            raise self.fail("unbalanced parenthesis")
        return seq

    def at_branch_end(self) -> bool:
        return self.peek() == "$" and self.peek(1) in ("|", "")

    def quantified(self, atom: tuple[str, bool]) -> tuple[str, bool]:
        """The atom (expression, whether it matches the empty string) with the quantifier at pos, if any."""
        (expr, empty), c = atom, self.peek()
        m = QUANTIFIER.match(self.text, self.pos)
        if c and c in "*+?":
            lo, hi, out, end = int(c == "+"), 1 if c == "?" else None, f"{expr}{c}", self.pos + 1
        elif m:
            lo, hi = int(m[1]), (int(m[3]) if m[3] else None) if m[2] else int(m[1])
            if max(lo, hi or 0) > MAX_REPEAT or hi is not None and hi < lo:
                raise self.fail(f"{m[0]}: counts up to {MAX_REPEAT}, the smaller first")
            out, end = f"{expr}{{{lo},{'' if hi is None else hi}}}" if m[2] else f"{expr}{{{lo}}}", m.end()
        else:
            return atom
        if empty and (hi is None or hi > 1):  # GBNF's rewrite would be left-recursive, or ambiguous past counting
            raise self.fail("a repetition of a part that can match nothing; write the part so that it matches at "
                            "least one character")
        self.pos = end
        self.pos += self.peek() == "?"  # lazy: the same strings
        if self.peek() in ("*", "+", "?") or QUANTIFIER.match(self.text, self.pos):
            raise self.fail("a quantifier after a quantifier")
        return out, empty or lo == 0

    def atom(self) -> tuple[str, bool]:
        c = self.peek()
        if c == "(":
            self.pos += 1
            if self.peek() == "?":
                if self.peek(1) == ":":
                    self.pos += 2
                elif self.peek(1) == "<" and self.peek(2) not in "=!":  # a named group: a group
                    end = self.text.find(">", self.pos)
                    if end < 0:
                        raise self.fail("a group's name without >")
                    self.pos = end + 1
                else:
                    raise self.fail("lookarounds and inline flags (?...) are not supported")
            inner = self.alternatives()
            if self.peek() != ")":
                raise self.fail("unbalanced parenthesis")
            self.pos += 1
            return inner
        if c in "*+?" or QUANTIFIER.match(self.text, self.pos):
            raise self.fail(f"nothing for {c} to repeat")
        if c == "[":
            return class_expr(self.set()), False
        if c == ".":
            self.pos += 1
            return class_expr(complement(LINE_ENDS)), False
        if c == "\\":
            return class_expr(self.escape(in_set=False)), False
        self.pos += 1
        return class_expr(normal([(ord(c), ord(c))])), False

    def escape(self, in_set: bool) -> Ranges:
        """The characters of the escape at pos (a class, or one character)."""
        kind = self.peek(1)
        if not kind:
            raise self.fail("a \\ at the end")
        self.pos += 2
        if kind.lower() in CLASSES:
            ranges = normal(CLASSES[kind.lower()])
            return complement(ranges) if kind.isupper() else ranges
        if kind in ESCAPES and not (kind == "0" and self.peek().isdigit()):
            return [(ESCAPES[kind], ESCAPES[kind])]
        if kind == "b" and in_set:
            return [(0x08, 0x08)]
        if kind in "xu":
            digits = 2 if kind == "x" else 4
            hexa = self.text[self.pos:self.pos + digits]
            if len(hexa) != digits or any(h not in "0123456789abcdefABCDEF" for h in hexa):
                raise self.fail(f"{digits} hex digits expected after \\{kind}")
            self.pos += digits
            v = int(hexa, 16)
            low = re.match(r"\\u(d[c-f][0-9a-f]{2})", self.text[self.pos:self.pos + 6], re.I)
            if 0xD800 <= v <= 0xDBFF and low:  # a surrogate pair: one character
                self.pos += 6
                v = 0x10000 + (v - 0xD800) * 0x400 + int(low[1], 16) - 0xDC00
            if 0xD800 <= v <= 0xDFFF:
                raise self.fail(f"\\u{hexa} is a lone surrogate, which no UTF-8 text holds")
            return [(v, v)]
        if kind in SYNTAX or kind == "-" or not (kind.isascii() and kind.isalnum()):
            return normal([(ord(kind), ord(kind))])
        self.pos -= 2
        raise self.fail(f"\\{kind} (backreferences, word boundaries and other escapes) is not supported")

    def set(self) -> Ranges:
        """The characters of the set [...] or [^...] at pos."""
        self.pos += 1
        negated = self.peek() == "^"
        self.pos += negated
        ranges: Ranges = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("a set without ]")
            lo = self.member()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                hi = self.member()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.fail("a range between classes")
                if hi[0][0] < lo[0][0]:
                    raise self.fail("a range out of order")
                lo = [(lo[0][0], hi[0][0])]
            ranges += lo
        self.pos += 1
        ranges = normal(ranges)
        out = complement(ranges) if negated else ranges
        if not out:
            raise self.fail("a set that matches no character")
        return out

    def member(self) -> Ranges:
        if self.peek() == "\\":
            return self.escape(in_set=True)
        c = self.peek()
        self.pos += 1
        return [(ord(c), ord(c))]
