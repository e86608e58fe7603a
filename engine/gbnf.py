"""GBNF grammars (llama.cpp's --grammar format) as byte-level recognizers for constrained sampling.

A grammar is parsed into rules whose alternatives are sequences of character sets and rule references, each ended by
END in one flat list of elements, the repetitions (`*`, `+`, `?`, `{m,n}`) and groups rewritten into rules of their
own as llama.cpp rewrites them. The recognizer's state is llama.cpp's: the set of stacks of positions in that list
(each top a character set; None, the empty stack: the text may end here), plus the bytes of a character not yet
whole. A stack is a linked list (top, rest), so stacks share their tails and a state costs the same at any depth.
Characters are Unicode code points read from strict UTF-8. States are interned and their transitions memoized, so a
token is tried by a few dictionary lookups once the grammar's common states have been seen.
"""
from __future__ import annotations

import numpy as np

from .config import HotcoldError
from .grammar import FIRST_RANGE, RANGES, ByteGrammar

END, REF, CHARS = range(3)  # element kinds: (END,), (REF, rule id), (CHARS, ((lo, hi), ...), negated)
MAX_REPEAT = 2000  # the largest count in {m,n}, as llama.cpp's
MAX_COPIES = 100_000  # items one count may write: "a"{2000}{2000} would be 4 million (a group is one item)
MAX_COPIES_ALL = 400_000  # items all counts may write together (4 elements each: 1.6 million, some 400 MB and 4 s)
MAX_UNICODE = 0x10FFFF
ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]"}
MEMO_MAX = 1 << 20  # transitions kept before the memo and the interned states start over
MAX_STACKS = 10000  # ways of reading the text at once (an ambiguous grammar can double them each character)
SECOND = {lead: RANGES[code] for lead, code in FIRST_RANGE.items()}  # lead byte -> the narrower range of the byte
# after it (engine.grammar's strict UTF-8)


def literal(text: str) -> str:
    """A GBNF literal matching text exactly."""
    return '"' + "".join("\\" + c if c in '"\\' else c if c.isprintable() else f"\\U{ord(c):08X}"
                         for c in text) + '"'


def set_char(c: int) -> str:
    """A code point inside a GBNF set."""
    return chr(c) if chr(c).isascii() and chr(c).isalnum() else f"\\u{c:04X}" if c <= 0xFFFF else f"\\U{c:08X}"


def utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with `lead`; 0 for a byte no character starts with."""
    return 1 if lead < 0x80 else 0 if lead < 0xC2 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else \
        4 if lead <= 0xF4 else 0


class Parser:
    """GBNF text -> rules: rules[id] = alternatives, each a list of items (REF, id) or (CHARS, ranges, negated)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.rules: dict[int, list[list[tuple]]] = {}
        self.copies = 0  # items written by counts (MAX_COPIES_ALL at most)
        self.space(True)
        while self.pos < len(text):
            self.rule()
        missing = [n for i, n in enumerate(self.names) if i not in self.rules]
        if missing:
            raise self.error(f"rule '{missing[0]}' is used but not defined", at=False)

    def error(self, what: str, at: bool = True) -> HotcoldError:
        if not at:
            return HotcoldError(f"grammar: {what}")
        line = self.text.count("\n", 0, self.pos) + 1
        col = self.pos - self.text.rfind("\n", 0, self.pos)
        return HotcoldError(f"grammar: {what} at line {line}, column {col}")

    def peek(self, k: int = 0) -> str:
        return self.text[self.pos + k] if self.pos + k < len(self.text) else ""

    def space(self, newlines: bool) -> None:
        """Skip spaces, tabs and comments (and newlines where they do not end a rule)."""
        while self.peek() and (self.peek() in " \t#" or newlines and self.peek() in "\r\n"):
            if self.peek() == "#":
                while self.peek() and self.peek() not in "\r\n":
                    self.pos += 1
            else:
                self.pos += 1

    def name(self) -> str:
        start = self.pos
        while self.peek() and (self.peek().isascii() and self.peek().isalnum() or self.peek() == "-"):
            self.pos += 1
        if self.pos == start:
            raise self.error("a rule name expected")
        return self.text[start:self.pos]

    def rule_id(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]

    def new_rule(self, base: str) -> int:
        return self.rule_id(f"{base}_{len(self.names)}")

    def rule(self) -> None:
        name = self.name()
        self.space(False)
        if self.text.startswith("::=", self.pos):
            self.pos += 3
        else:
            raise self.error("'::=' expected")
        rid = self.rule_id(name)
        if rid in self.rules:
            raise self.error(f"rule '{name}' is defined twice")
        self.space(True)
        self.rules[rid] = self.alternates(name, False)
        if self.peek() not in ("", "\r", "\n"):
            raise self.error(f"unexpected {self.peek()!r}")
        self.space(True)

    def alternates(self, name: str, nested: bool) -> list[list[tuple]]:
        alts = [self.sequence(name, nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            alts.append(self.sequence(name, nested))
        return alts

    def char(self) -> int:
        """One character of a literal or a set, with llama.cpp's escapes."""
        c = self.peek()
        if not c:
            raise self.error("unexpected end of the grammar")
        if c != "\\":
            self.pos += 1
            return ord(c)
        kind = self.peek(1)
        digits = {"x": 2, "u": 4, "U": 8}.get(kind)
        if digits:
            hexa = self.text[self.pos + 2:self.pos + 2 + digits]
            if len(hexa) != digits or any(h not in "0123456789abcdefABCDEF" for h in hexa):
                raise self.error(f"{digits} hex digits expected after \\{kind}")
            self.pos += 2 + digits
            v = int(hexa, 16)
            if v > MAX_UNICODE or 0xD800 <= v <= 0xDFFF:
                raise self.error(f"\\{kind}{hexa} is not a character (past U+10FFFF, or a surrogate no UTF-8 holds)")
            return v
        if kind not in ESCAPES:
            raise self.error(f"unknown escape \\{kind}")
        self.pos += 2
        return ord(ESCAPES[kind])

    def sequence(self, name: str, nested: bool) -> list[tuple]:
        seq: list[tuple] = []
        last = None  # where the item a repetition applies to starts in seq
        while self.peek():
            c = self.peek()
            if c == '"':
                self.pos += 1
                last = len(seq)
                while self.peek() != '"':
                    v = self.char()
                    seq.append((CHARS, ((v, v),), False))
                self.pos += 1
            elif c == "[":
                self.pos += 1
                negated = self.peek() == "^"
                self.pos += negated
                ranges = []
                while self.peek() != "]":
                    lo = hi = self.char()
                    if self.peek() == "-" and self.peek(1) not in ("]", ""):
                        self.pos += 1
                        hi = self.char()
                    ranges.append((lo, hi))
                self.pos += 1
                if not ranges:
                    raise self.error("an empty set of characters")
                last = len(seq)
                seq.append((CHARS, tuple(ranges), negated))
            elif c == ".":
                self.pos += 1
                last = len(seq)
                seq.append((CHARS, ((0, MAX_UNICODE),), False))
            elif c == "(":
                self.pos += 1
                self.space(True)
                sub = self.new_rule(name)
                self.rules[sub] = self.alternates(name, True)
                if self.peek() != ")":
                    raise self.error("')' expected")
                self.pos += 1
                last = len(seq)
                seq.append((REF, sub))
            elif c.isascii() and (c.isalnum() or c == "-"):
                last = len(seq)
                seq.append((REF, self.rule_id(self.name())))
            elif c in "*+?{":
                if last is None:
                    raise self.error(f"nothing before {c!r} to repeat")
                self.pos += 1
                lo, hi = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}.get(c) or self.counts()
                self.repeat(seq, last, lo, hi, name)  # a repetition after it repeats this (llama.cpp's "a"{2}{2})
            elif c == "<":
                raise self.error("token references (<...>) are not supported")
            else:
                break
            self.space(nested)
        return seq

    def counts(self) -> tuple[int, int]:
        """The m and n of {m}, {m,} (n: -1) or {m,n}, after the brace."""
        def number() -> int:
            self.space(False)
            start = self.pos
            while self.peek().isdigit() and self.peek().isascii():
                self.pos += 1
            if start == self.pos:
                raise self.error("a count expected")
            v = int(self.text[start:self.pos])
            if v > MAX_REPEAT:
                raise self.error(f"a count above {MAX_REPEAT}")
            self.space(False)
            return v
        lo = hi = number()
        if self.peek() == ",":
            self.pos += 1
            self.space(False)
            hi = -1 if self.peek() == "}" else number()
        if self.peek() != "}":
            raise self.error("'}' expected")
        self.pos += 1
        if hi != -1 and hi < lo:
            raise self.error(f"{{{lo},{hi}}}: the largest count is below the smallest")
        return lo, hi

    def repeat(self, seq: list[tuple], last: int, lo: int, hi: int, name: str) -> None:
        """seq[last:] repeated lo to hi times (-1: no limit), as llama.cpp rewrites it: lo copies, then a chain of
        optional rules (S' ::= S S' | for no limit)."""
        item = seq[last:]
        del seq[last:]
        optional = 1 if hi < 0 else hi - lo
        copies = len(item) * (lo + optional)
        self.copies += copies
        if copies > MAX_COPIES:
            raise self.error(f"a count that writes more than {MAX_COPIES} items (a count of a count copies the "
                             "first's items: (\"a\"{2000}){2000} reads them from one rule)")
        if self.copies > MAX_COPIES_ALL:
            raise self.error(f"the counts write more than {MAX_COPIES_ALL} items in all (a schema's maxLength and "
                             "maxItems are counts too)")
        seq += item * lo
        tail = None
        for _ in range(optional):
            rid = self.new_rule(name)
            more = [(REF, rid)] if hi < 0 else [(REF, tail)] if tail is not None else []
            self.rules[rid] = [item + more, []]
            tail = rid
        if tail is not None:
            seq.append((REF, tail))


class Gbnf(ByteGrammar):
    """A GBNF grammar (llama.cpp's format) over the text, from rule `root`."""

    def __init__(self, text: str, root: str = "root"):
        try:
            p = Parser(text)
            if root not in p.ids:
                raise HotcoldError(f"grammar: no rule '{root}'")
            check_left_recursion(p.rules, p.names)
        except RecursionError:
            raise HotcoldError("grammar: nested too deeply (parentheses or rules inside one another)") from None
        self.names = p.names
        self.elements: list[tuple] = []
        self.starts: dict[int, list[int]] = {}  # rule id -> where each of its alternatives starts in elements
        for rid, alts in p.rules.items():
            self.starts[rid] = []
            for alt in alts:
                self.starts[rid].append(len(self.elements))
                self.elements += alt + [(END,)]
        self.memo: dict = {}
        self.interned: dict = {}
        masks: dict = {}  # the same set (a literal's letters) computed once
        self.firsts = {pos: masks.get(e) or masks.setdefault(e, lead_mask(e[1], e[2]))
                       for pos, e in enumerate(self.elements) if e[0] == CHARS}
        stacks: set = set()
        seen: set = set()
        for s in self.starts[p.ids[root]]:
            self.push(None, s, stacks, seen)
        self.start = self.intern(frozenset(stacks), b"")

    def intern(self, stacks: frozenset, partial: bytes):
        """The state (stacks, partial, first): first, a 256-bit mask of the bytes that may come next where no
        character is half read (the union of the top sets' `lead_mask`)."""
        first = 0
        for top in {s[0] for s in stacks if s is not None} if not partial else ():
            first |= self.firsts[top]
        state = (stacks, partial, first)
        return self.interned.setdefault(state, state)

    def push(self, rest, pos: int, out: set, seen: set) -> None:
        """Into out: the stacks that read the sequence from element pos on, then what the stack `rest` reads, each
        down to a character set on top (or None: the end). seen: the (rest, pos) pairs pushed into out before,
        skipped (the stacks they give are there): with it, reading past k nullable items (`("a"?){2000}`) from each
        of k stacks costs k steps, not k * k."""
        work = [(rest, pos)]
        while work:
            item = work.pop()
            if item in seen:
                continue
            seen.add(item)
            rest, pos = item
            e = self.elements[pos]
            if e[0] == CHARS:
                out.add((pos, rest))
            elif e[0] == END:
                if rest is None:
                    out.add(None)
                else:
                    work.append((rest[1], rest[0]))
            else:
                after = rest if self.elements[pos + 1][0] == END else (pos + 1, rest)
                work.extend((after, s) for s in self.starts[e[1]])

    def matches(self, pos: int, lo: int, hi: int) -> bool:
        """Whether the character set at pos takes some code point in [lo, hi]."""
        _, ranges, negated = self.elements[pos]
        if not negated:
            return any(a <= hi and lo <= b for a, b in ranges)
        for a, b in sorted(ranges):  # negated: some point of [lo, hi] outside every range
            if a > lo:
                return True
            lo = max(lo, b + 1)
            if lo > hi:
                return False
        return True

    def complete(self, state) -> bool:
        """Whether the text so far is a whole sentence of the grammar."""
        return not state[1] and None in state[0]

    @staticmethod
    def nexts(state) -> list[int]:
        """The bytes that may come next (the others surely do not): a character's first bytes, or the continuation
        bytes of one half read."""
        stacks, partial, first = state
        if partial:
            return list(range(*SECOND[partial[0]])) + [SECOND[partial[0]][1]] if len(partial) == 1 and \
                partial[0] in SECOND else list(range(0x80, 0xC0))
        out = []
        while first:
            low = first & -first
            out.append(low.bit_length() - 1)
            first ^= low
        return out

    def sure(self, state, tables):
        """The tokens known to be allowed in `state` without trying them (engine.grammar's constrained_pick): those
        made of ASCII bytes that each lead back to this same state (inside a string, `char*`); None when there are
        none such."""
        if state[1]:
            return None
        loop = sum(1 << b for b in range(128) if self.step(state, b) is state)
        if not loop:
            return None
        lo, hi = np.uint64(loop & 2**64 - 1), np.uint64(loop >> 64)
        return ((tables.ascii[:, 0] & ~lo) == 0) & ((tables.ascii[:, 1] & ~hi) == 0)

    def step(self, state, b: int):
        key = (state, b)
        try:
            return self.memo[key]
        except KeyError:
            pass
        if len(self.memo) >= MEMO_MAX:  # (states in use stay whole: each holds its stacks)
            self.memo.clear()
            self.interned.clear()
        nxt = self.memo[key] = self.read(state, b)
        return nxt

    def read(self, state, b: int):
        stacks, partial, first = state
        if not partial and not first >> b & 1:
            return None
        data = partial + bytes([b])
        need = utf8_length(data[0])
        if len(data) > 1 and not (0x80 <= b <= 0xBF):
            return None
        if len(data) == 2 and data[0] in SECOND and not SECOND[data[0]][0] <= b <= SECOND[data[0]][1]:
            return None
        if len(data) < need:  # a character begun: kept if some set could take a code point it may become
            if len(data) > 1 and not any(s is not None and self.matches(s[0], *span(data)) for s in stacks):
                return None  # (one byte: `first` said so)
            return self.intern(stacks, data)
        c = ord(data.decode("utf-8"))
        out: set = set()
        seen: set = set()
        for s in stacks:
            if s is not None and self.matches(s[0], c, c):
                self.push(s[1], s[0] + 1, out, seen)
        if len(out) > MAX_STACKS:
            raise HotcoldError(f"grammar: more than {MAX_STACKS} ways to read the text at once (an ambiguous "
                               "grammar, such as two alternatives that go on alike)")
        return self.intern(frozenset(out), b"") if out else None


def lead_mask(ranges: tuple, negated: bool) -> int:
    """The bytes that begin the UTF-8 of a code point a set takes, as a 256-bit mask (from its ranges: a UTF-8 lead
    byte grows with the code point)."""
    taken, lo = [], 0
    if negated:  # the complement's ranges
        for a, b in sorted(ranges):
            if a > lo:
                taken.append((lo, a - 1))
            lo = max(lo, b + 1)
        taken.append((lo, MAX_UNICODE))
    mask = 0
    for lo, hi in ranges if not negated else taken:
        hi = min(hi, MAX_UNICODE)
        if lo <= min(hi, 0x7F):
            mask |= ((1 << (min(hi, 0x7F) - lo + 1)) - 1) << lo
        lo = max(lo, 0x80)
        for lead in range(lead_byte(lo), lead_byte(hi) + 1) if lo <= hi else ():
            a, b = span(bytes([lead]))
            if utf8_length(lead) and a <= hi and lo <= b:
                mask |= 1 << lead
    return mask


def lead_byte(c: int) -> int:
    """The first byte of the UTF-8 of code point c (at least U+0080)."""
    return 0xC0 | c >> 6 if c < 0x800 else 0xE0 | c >> 12 if c < 0x10000 else 0xF0 | c >> 18


def span(data: bytes) -> tuple[int, int]:
    """The lowest and highest code points of the UTF-8 characters that begin with these bytes (a valid beginning)."""
    pad = utf8_length(data[0]) - len(data)
    if not pad:
        return (code_point(data),) * 2
    second = SECOND.get(data[0], (0x80, 0xBF)) if len(data) == 1 else (0x80, 0xBF)
    return code_point(data + bytes([second[0]]) + b"\x80" * (pad - 1)), \
        code_point(data + bytes([second[1]]) + b"\xbf" * (pad - 1))


def code_point(data: bytes) -> int:
    """The code point of a UTF-8 character's bytes, not checked (for the bounds of one half read)."""
    v = data[0] & (0xFF >> len(data) + 1 if len(data) > 1 else 0x7F)
    for c in data[1:]:
        v = v << 6 | c & 0x3F
    return v


def check_left_recursion(rules: dict[int, list[list[tuple]]], names: list[str]) -> None:
    """Refuse a rule that can reach itself before reading a character (the recognizer would not end)."""
    nullable: set[int] = set()
    grew = True
    while grew:
        grew = False
        for rid, alts in rules.items():
            if rid not in nullable and any(all(i[0] == REF and i[1] in nullable for i in alt) for alt in alts):
                nullable.add(rid)
                grew = True
    first: dict[int, set[int]] = {}  # rule -> the rules it may start with
    for rid, alts in rules.items():
        first[rid] = set()
        for alt in alts:
            for item in alt:
                if item[0] != REF:
                    break
                first[rid].add(item[1])
                if item[1] not in nullable:
                    break
    done: set[int] = set()

    def visit(rid: int, path: list[int]) -> None:
        if rid in path:
            raise HotcoldError(f"grammar: rule '{base_name(names[rid], names)}' is left-recursive (it can reach "
                               "itself before reading a character)")
        if rid in done:
            return
        for nxt in first[rid]:
            visit(nxt, path + [rid])
        done.add(rid)
    for rid in rules:
        visit(rid, [])


def base_name(name: str, names: list[str]) -> str:
    """The user's rule a generated one (`name_N`) was made for."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() and head in names else name
