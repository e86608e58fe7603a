"""Constrained generation: a byte-level pushdown recognizer of JSON text, and the sampling step that keeps to it or to
a GBNF grammar (engine.gbnf), both ByteGrammars.

The recognizer's state is a small tuple, so a token is tried by running its bytes from the state (nothing to undo).
Sampling under it is llama.cpp's grammar sampling: the tokens the grammar refuses are out before the sampler's chain
(top-k, top-p, min-p, temperature): greedy and top-k try tokens in the order of their logits until they have what they
keep, and otherwise every allowed token is found (inside a string most are known at once).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .config import HotcoldError

WS_RUN = 20  # whitespace before and between JSON's tokens: at most one newline, and at most this many spaces or tabs
# with one (one without), as llama.cpp's JSON grammar: a small model would pad with blank lines to the context's end
DIGITS_MAX = 16  # digits of a number's integral part, fraction and exponent, as llama.cpp's -j '{}' (not pi until -n
# runs out)
ESCAPES = frozenset(b'"\\/bfnrt')
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# UTF-8 as RFC 3629 has it: the byte after these lead bytes is in a narrower range (no overlong forms, no
# surrogates, nothing past U+10FFFF); RANGES[code] = (lowest, highest) continuation byte
FIRST_RANGE = {0xE0: 1, 0xED: 2, 0xF0: 3, 0xF4: 4}
RANGES = ((0x80, 0xBF), (0xA0, 0xBF), (0x80, 0x9F), (0x90, 0xBF), (0x80, 0x8F))

# modes of the state (stack, mode, aux, ws): stack holds the open containers ("{" or "["), innermost last
TOP, VALUE, ARRAY0, OBJECT0, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, LITERAL, NUMBER, DONE = range(13)
# NUMBER's aux: the part of the number read so far, plus 8 x the digits of that part
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_INT = range(8)
NUMBER_ENDS = (ZERO, INT, FRAC, EXP_INT)  # a number may end after these


class ByteGrammar:
    """What sampling under a grammar asks of it: start (a state), step(state, byte) -> the next state or None (the
    byte is refused), complete(state); and for the search of candidates nexts(state) (the bytes worth trying after
    it), wide(state) (nearly every byte goes on) and sure(state, TokenTables) (tokens allowed without trying them:
    an (n_vocab,) bool mask, or None), whose defaults here know nothing."""

    def advance(self, state, data: bytes):
        """The state after the bytes `data`, or None if the grammar's text does not go on so."""
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    @staticmethod
    def nexts(state) -> range:
        return range(256)

    @staticmethod
    def wide(state) -> bool:
        return False

    def sure(self, state, tables: TokenTables) -> np.ndarray | None:
        return None


class JsonGrammar(ByteGrammar):
    """JSON text (RFC 8259) as a byte-level recognizer. top_object: the text is one object, as OpenAI's
    response_format json_object asks; else any JSON value."""

    def __init__(self, top_object: bool = True):
        self.top_object = top_object
        self.start = ("", TOP if top_object else VALUE, 0, 0)

    @staticmethod
    def wide(state) -> bool:
        """Whether nearly every byte goes on from here (`worth_trying`): inside a string."""
        return state[1] == STRING

    @staticmethod
    def sure(state, tables: TokenTables) -> np.ndarray | None:
        """The tokens known to be allowed in `state` (`constrained_pick`'s sure): the plain tokens inside a string
        with no character half done; None elsewhere."""
        return tables.plain if state[1] == STRING and not state[2] & 3 else None

    def complete(self, state) -> bool:
        """Whether the text so far is whole JSON (a number at the top: whole, though more digits could come)."""
        stack, mode, aux, _ = state
        return mode == DONE or mode == NUMBER and not stack and aux & 7 in NUMBER_ENDS

    def step(self, state, b: int):
        stack, mode, aux, ws = state
        if mode == STRING:  # aux: 4 in a key, plus the UTF-8 continuation bytes due, plus 16 x their RANGES code
            if aux & 3:
                lo, hi = RANGES[aux >> 4]
                return (stack, STRING, (aux & 7) - 1, 0) if lo <= b <= hi else None
            if b == 0x22:  # the closing quote
                return (stack, COLON, 0, 0) if aux & 4 else self.value_done(stack)
            if b == 0x5C:
                return (stack, ESCAPE, aux, 0)
            if b < 0x20 or 0x80 <= b < 0xC2 or b > 0xF4:  # control characters; not a UTF-8 lead byte
                return None
            due = 0 if b < 0x80 else 1 if b < 0xE0 else 2 if b < 0xF0 else 3
            return (stack, STRING, aux | due | FIRST_RANGE.get(b, 0) << 4, 0)
        if mode == ESCAPE:
            if b == ord("u"):
                return (stack, UNICODE, aux | 4 << 4, 0)  # aux: 4 in a key, plus 16 x the hex digits still due
            return (stack, STRING, aux, 0) if b in ESCAPES else None
        if mode == UNICODE:
            if b not in HEX:
                return None
            left = (aux >> 4) - 1
            return (stack, UNICODE, (aux & 4) | left << 4, 0) if left else (stack, STRING, aux & 4, 0)
        if mode == LITERAL:  # aux: the literal's first byte x 256 plus how many of the rest have come
            rest, i = LITERALS[aux >> 8], aux & 0xFF
            if b != rest[i]:
                return None
            return (stack, LITERAL, aux + 1, 0) if i + 1 < len(rest) else self.value_done(stack)
        if mode == NUMBER:
            nxt = self.number(aux, b)
            if nxt is not None:
                return (stack, NUMBER, nxt, 0)
            if aux & 7 not in NUMBER_ENDS or not stack:  # a number at the top is the whole text
                return None
            return self.step(self.value_done(stack), b)  # the byte after the number, read after it
        if b in (0x20, 0x09, 0x0A) and mode != DONE:  # whitespace between tokens, bounded
            newline, run = ws >> 8, ws & 0xFF
            if b == 0x0A:
                return None if newline else (stack, mode, aux, 1 << 8 | run)
            if run >= (WS_RUN if newline else 1):
                return None
            return (stack, mode, aux, ws + 1)
        if mode == COLON:
            return (stack, VALUE, 0, 0) if b == 0x3A else None
        if mode == AFTER:  # after a value inside a container
            if b == 0x2C:  # a comma: the next key or value
                return (stack, KEY if stack[-1] == "{" else VALUE, 0, 0)
            return self.value_done(stack[:-1]) if b == (0x7D if stack[-1] == "{" else 0x5D) else None
        if mode in (OBJECT0, KEY):
            if b == 0x22:
                return (stack, STRING, 4, 0)  # a key
            return self.value_done(stack[:-1]) if b == 0x7D and mode == OBJECT0 else None
        if mode == ARRAY0 and b == 0x5D:
            return self.value_done(stack[:-1])
        if mode == TOP:
            return (stack + "{", OBJECT0, 0, 0) if b == 0x7B else None
        if mode in (VALUE, ARRAY0):
            return self.value(stack, b)
        return None  # DONE: nothing after the text

    @staticmethod
    def value(stack: str, b: int):
        """The state after the first byte of a value."""
        if b == 0x7B:
            return (stack + "{", OBJECT0, 0, 0)
        if b == 0x5B:
            return (stack + "[", ARRAY0, 0, 0)
        if b == 0x22:
            return (stack, STRING, 0, 0)
        if b in LITERALS:
            return (stack, LITERAL, b << 8, 0)
        if b == 0x2D:
            return (stack, NUMBER, MINUS, 0)
        if b in DIGITS:
            return (stack, NUMBER, (ZERO if b == 0x30 else INT) | 1 << 3, 0)
        return None

    @staticmethod
    def value_done(stack: str):
        return (stack, AFTER, 0, 0) if stack else ("", DONE, 0, 0)

    @staticmethod
    def number(aux: int, b: int):
        """A number's aux (part | 8 x its digits) after byte b, or None if b does not go on with it."""
        part, digits = aux & 7, aux >> 3
        if b in DIGITS:
            if part == MINUS:
                return (ZERO if b == 0x30 else INT) | 1 << 3
            if part in (INT, FRAC, EXP_INT):
                return aux + 8 if digits < DIGITS_MAX else None
            return None if part == ZERO else (FRAC if part == DOT else EXP_INT) | 1 << 3
        if b == 0x2E:
            return DOT if part in (ZERO, INT) else None
        if b in (0x65, 0x45):
            return EXP if part in (ZERO, INT, FRAC) else None
        return EXP_SIGN if b in (0x2B, 0x2D) and part == EXP else None


def best_first(z: np.ndarray, ids: np.ndarray, head: int = 256):
    """ids (ascending) in the order of z, best first, ties by id (as argmax): the best `head` sorted first, the rest
    only when they are asked for."""
    parts = [ids]
    if len(ids) > head:
        cut = np.partition(z[ids], len(ids) - head)[len(ids) - head]
        parts = [ids[z[ids] >= cut], ids[z[ids] < cut]]
    for part in parts:
        yield from part[np.argsort(-z[part], kind="stable")].tolist()


def constrained_pick(sampler, logits: np.ndarray, recent, maybe: np.ndarray, allowed,
                     sure: Callable[[], np.ndarray | None] | None = None) -> int:
    """A token the grammar allows, sampled as llama.cpp samples under a grammar: the logit biases and penalties, then
    the refused tokens out, then the rest of the chain. maybe (n_vocab,) bool: the tokens worth trying
    (`worth_trying`); sure() (n_vocab,) bool or None: tokens known to be allowed (the grammar's `sure`, asked for
    only with top-k off, where it spares trying most of the vocabulary inside a string); allowed(id):
    whether the grammar takes that token. Greedy and top-k try the tokens best first until they have the likeliest
    k (Sampler.reach); else the chain uses every allowed token (top-p's sum is over them all), and all are found."""
    z = sampler.penalized(sampler.biased(logits), recent)  # (n_vocab,)
    greedy = sampler.greedy
    need = sampler.reach if sampler.reach is None or sampler.reach < z.size else None
    ids = np.flatnonzero(maybe & (z > -np.inf))
    if need is None:
        known = sure() if sure is not None else None
        ok = known[ids] if known is not None else np.zeros(len(ids), bool)
        ok[~ok] = [allowed(t) for t in ids[~ok].tolist()]
        kept = ids[ok]
    else:
        kept = []
        for t in best_first(z, ids):
            if allowed(t):
                kept.append(t)
                if len(kept) == need:
                    break
        kept = np.array(kept, np.int64)
    if not len(kept):
        raise HotcoldError("grammar: no token of the vocabulary goes on with the text here")
    if greedy:
        return int(kept[0])
    masked = np.full_like(z, -np.inf)
    masked[kept] = z[kept]
    return sampler.choose(masked)


class TokenTables(NamedTuple):
    """What the search under a grammar reads of the vocabulary, from one pass over its tokens (control tokens count
    as having no bytes). first (2, n_vocab) int16: each token's first two bytes, 256 where it has none (control
    tokens, one-byte tokens), for `worth_trying`; and for grammars' `sure`: plain (n_vocab,) bool, tokens a JSON
    string takes whole wherever it has no character half done (strict UTF-8 without a quote, a backslash or a control
    character); ascii (n_vocab, 2) uint64, a bit for each ASCII byte a token holds, all bits set for a token with
    another byte or none."""
    first: np.ndarray
    plain: np.ndarray
    ascii: np.ndarray


def token_tables(tokenizer, n_vocab: int) -> TokenTables:
    def plain(p: bytes) -> bool:
        try:
            p.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return bool(p) and not any(b < 0x20 or b in (0x22, 0x5C) for b in p)

    def bits(p: bytes) -> tuple[int, int]:
        if not p or max(p) > 0x7F:
            return (2**64 - 1, 2**64 - 1)
        m = sum(1 << b for b in set(p))
        return (m & 2**64 - 1, m >> 64)
    pieces = [b"" if i in tokenizer.special_ids else tokenizer.piece(i) for i in range(n_vocab)]
    return TokenTables(np.array([[p[k] if len(p) > k else 256 for p in pieces] for k in (0, 1)], np.int16),
                       np.array([plain(p) for p in pieces]), np.array([bits(p) for p in pieces], np.uint64))


def worth_trying(grammar, state, first: np.ndarray) -> np.ndarray:
    """(n_vocab,) bool: the tokens whose first two bytes (TokenTables.first) go on with the text in `state` (of a
    JsonGrammar or an engine.gbnf.Gbnf); by the first byte alone where many bytes can come next, by both where few
    can, and after whitespace outside a string (most of a BPE vocabulary starts with a space, and fails on the next
    byte there)."""
    ok = np.zeros((257, 257), bool)  # [first byte, second byte]; 256: none
    after = [(b, grammar.step(state, b)) for b in grammar.nexts(state)]
    after = [(b, s) for b, s in after if s is not None]
    for b, s in after:
        if len(after) <= 16 or b in b" \t\n" and not grammar.wide(s):
            ok[b, 256] = True
            for c in grammar.nexts(s):
                ok[b, c] = grammar.step(s, c) is not None
        else:
            ok[b] = True
    return ok[first[0], first[1]]
