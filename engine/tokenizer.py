"""Tokenizers built with the `tokenizers` library from GGUF metadata or an HF `tokenizer.json`.

GGUF vocabularies: `gpt2` (byte-level BPE, with the pre-tokenizer named by `tokenizer.ggml.pre`) and `llama`
(SentencePiece-style BPE with scores and byte fallback). Control tokens are parsed in text only when asked.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from datetime import datetime

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import HotcoldError
from .files import read_json_if

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2's: digits one by one
# llama.cpp's splits for `default` (and a GGUF without tokenizer.ggml.pre), each applied to the pieces of the last
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                  r"\p{N}+", r"[0-9][0-9][0-9]")


def split_then_bytes(*patterns: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> pre-tokenizer of a byte-level BPE vocabulary, in the order export tries them
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS = {
    "gpt-2": lambda: BYTE_LEVEL,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), BYTE_LEVEL]),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: split_then_bytes(QWEN2_SPLIT),
    "default": lambda: split_then_bytes(*DEFAULT_SPLITS),
}
# other names llama.cpp gives these pre-tokenizers (ones it splits text alike with; gpt2: what hotcold's exports
# wrote before, which llama.cpp does not know); the llama-bpe family adds BOS where the file does not say
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "falcon-h1": "llama-bpe",
               "pixtral": "llama-bpe", "midm-2.0": "llama-bpe", "lfm2": "llama-bpe", "gpt2": "gpt-2",
               "phi-2": "gpt-2", "gigachat": "gpt-2", "a.x-4.0": "gpt-2", "mellum": "gpt-2", "exaone4": "gpt-2",
               "deepseek-r1-qwen": "qwen2"}
# names of tokens that end generation besides EOS, as llama.cpp finds them (and its eot/eom keys)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|return|>",
               "<|call|>")
END_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# fill-in-the-middle tokens as llama.cpp finds them by name, each kind where the GGUF has no key for it: control
# tokens; the pad, repository and file-separator kinds (by name or key) end generation too
FIM_KINDS = {"tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
             "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
             "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
             "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>",
                                                 "<PRE>", "▁<PRE>", "<|code_prefix|>"),
             "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>",
                                                 "<SUF>", "▁<SUF>", "<|code_suffix|>"),
             "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>",
                                                 "<MID>", "▁<MID>", "<|code_middle|>")}
FIM_END_KEYS = tuple(FIM_KINDS)[:3]


def named_tokens(keys: dict) -> tuple[frozenset, frozenset]:
    """(names of tokens that end generation, names of control tokens) for a GGUF's metadata (every kind where it has
    no key: an HF directory's {}). Every token of these names counts (llama.cpp: the first of each FIM kind)."""
    fim = {k: names for k, names in FIM_KINDS.items() if keys.get(k) is None}
    ends = frozenset(END_OF_TURN).union(*(fim[k] for k in FIM_END_KEYS if k in fim))
    return ends, ends.union(*fim.values())


END_NAMES, CONTROL_NAMES = named_tokens({})
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a pair merges when their concatenation is a token,
    earlier for a higher score of the merged token."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for t, i in ids.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def valid_text(text: str) -> str:
    """text with each lone surrogate replaced by U+FFFD: Python holds argv bytes that are not UTF-8 as surrogates,
    which neither the tokenizer nor a UTF-8 stdout accepts."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the argv bytes back
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace")


class Tokenizer:
    def __init__(self, tk: HFTokenizer, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 chat_template: str | None, special_ids: set[int], space_prefix: bool = False, add_eos: bool = False,
                 end_ids: set[int] = frozenset(), end_names: frozenset = END_NAMES):
        """space_prefix: encoding puts a space before the text (SentencePiece), which `decode` removes again;
        add_eos: EOS after the text wherever BOS is added before it (llama.cpp's add_special); end_ids: more tokens
        that end generation (the model's eot/eom); end_names: the names of tokens that end it (`named_tokens`)."""
        self.tk = tk
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.space_prefix = space_prefix
        self.chat_template = chat_template
        vocab = tk.get_vocab()
        self.stop_ids = ({i for i in [eos_id] if i is not None} | {vocab[t] for t in end_names if t in vocab}
                         | set(end_ids))
        self.special_ids = special_ids
        self.pieces: dict[int, bytes] = {}  # id -> its bytes, filled as ids are decoded
        self.piece_rule = piece_rule(decoder_steps(tk))
        self.raw_ids = {i for i, t in tk.get_added_tokens_decoder().items() if not t.special}

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict, path: str) -> Tokenizer:
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise HotcoldError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
        tokens = list(tokens)
        if not all(isinstance(t, str) for t in tokens):
            raise HotcoldError(f"{path}: tokenizer.ggml.tokens holds other values than strings")
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        ends = {key: meta.get(key) for key in END_KEYS + FIM_END_KEYS}
        for key, v in [("tokenizer.ggml.bos_token_id", bos), ("tokenizer.ggml.eos_token_id", eos), *ends.items()]:
            if v is not None and not 0 <= v < len(tokens):
                raise HotcoldError(f"{path}: {key} {v} is outside the vocabulary of {len(tokens)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        if model == "gpt2":
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:  # as llama.cpp refuses it (an empty list it takes: no merges)
                raise HotcoldError(f"{path}: tokenizer.ggml.merges is missing (a gpt2 tokenizer needs the key)")
            bad = next((m for m in merges if not isinstance(m, str) or " " not in m), None)
            if bad is not None:
                raise HotcoldError(f"{path}: tokenizer.ggml.merges holds {bad!r}, not two tokens and a space")
            merges = [tuple(m.split(" ", 1)) for m in merges]
            pre = meta.get("tokenizer.ggml.pre") or "default"
            pre = PRE_ALIASES.get(pre, pre)
            if pre not in PRE_TOKENIZERS:
                import sys
                print(f"hotcold: note: pre-tokenizer {pre!r} unknown, using llama.cpp's default", file=sys.stderr)
                pre = "default"
            tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=(pre == "llama-bpe")))
            tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
            tk.decoder = decoders.ByteLevel()
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe"))
        elif model == "llama":
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
            tk = HFTokenizer(models.BPE(vocab, spm_merges(tokens, scores, types), unk_token=tokens[unk],
                                        byte_fallback=True, fuse_unk=True))
            norm = [normalizers.Replace(" ", "▁")]
            if meta.get("tokenizer.ggml.add_space_prefix", True):
                norm.insert(0, normalizers.Prepend("▁"))
            tk.normalizer = normalizers.Sequence(norm)
            tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
            space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        else:
            raise HotcoldError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")
        # the end-of-turn and FIM tokens found by name are control tokens whatever their type, as llama.cpp makes
        # them: not printed, and parsed in a text only with special tokens on (those of the keys keep their type)
        end_names, control_names = named_tokens(meta)
        named = {i for i, t in enumerate(tokens) if t in control_names}
        control = [i for i, t in enumerate(types) if t == TOKEN_CONTROL or i in named]
        user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and i not in named]
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        # user-defined tokens are matched whole in any text, as llama.cpp matches them (with SentencePiece, the text
        # after one gets its space prefix, as after a control token)
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        if model == "gpt2":
            space_prefix = False
        return cls(tk, bos, eos, add_bos, meta.get("tokenizer.chat_template"), set(control), space_prefix,
                   bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None,
                   {v for v in ends.values() if v is not None}, end_names)

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise HotcoldError(f"{path}: no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(tj)
        except Exception as e:
            raise HotcoldError(f"{tj}: unreadable tokenizer ({e})") from None
        tc = read_json_if(os.path.join(path, "tokenizer_config.json"), "tokenizer config") or {}

        def token_id(key):
            v = tc.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return tk.token_to_id(v) if v else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        # without add_bos_token/add_eos_token: what the post-processor puts around a text (Llama 3's
        # TemplateProcessing), as llama.cpp's converter reads it
        probes = ((t, tk.encode(t, add_special_tokens=False).ids) for t in ("a", "0", ".", " "))  # the first that
        probe, plain = next(((t, ids) for t, ids in probes if ids), ("a", []))  # encodes to something, else none
        framed = tk.encode(probe, add_special_tokens=True).ids
        at = next((k for k in range(len(framed) - len(plain) + 1) if framed[k:k + len(plain)] == plain), None)
        before, after = (framed[:at], framed[at + len(plain):]) if plain and at is not None else ([], [])
        said = {k: tc[k] for k in ("add_bos_token", "add_eos_token") if isinstance(tc.get(k), bool)}
        add_bos = said.get("add_bos_token", before == [bos]) and bos is not None
        add_eos = said.get("add_eos_token", after == [eos]) and eos is not None
        # the end-of-turn and FIM tokens are control tokens even where added as plain ones, as llama.cpp makes them
        tk.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                          normalized=t.normalized, special=True)
                               for t in tk.get_added_tokens_decoder().values()
                               if t.content in CONTROL_NAMES and not t.special])
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        # a SentencePiece decoder strips the space before the text (Strip, or Metaspace's prepend): decode's job
        space_prefix = any(s == {"type": "Strip", "content": " ", "start": 1, "stop": 0} or s.get("type") == "Metaspace"
                           and s.get("prepend_scheme", "always" if s.get("add_prefix_space") else "never") != "never"
                           for s in decoder_steps(tk))
        # generation_config.json's eos_token_id (an id or a list: Llama 3.1's <|eot_id|>, <|eom_id|>) ends generation
        ends = (read_json_if(os.path.join(path, "generation_config.json"), "generation config") or {}).get(
            "eos_token_id")
        ends = {i for i in (ends if isinstance(ends, list) else [ends])
                if isinstance(i, int) and 0 <= i < tk.get_vocab_size(with_added_tokens=True)}
        return cls(tk, bos, eos, add_bos, hf_chat_template(path, tc), special, space_prefix, add_eos, ends)

    # --- use ----------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids; `special` parses control tokens such as <|im_start|> (else they are plain text); add_bos None:
        BOS (and EOS) as the model's tokenizer adds them, False: neither, True: BOS."""
        self.tk.encode_special_tokens = not special
        ids = self.tk.encode(valid_text(text), add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.add_eos and add_bos is not False:  # add_bos=False: no special tokens at all
            ids = ids + [self.eos_id]
        return ids

    def piece(self, i: int) -> bytes:
        """Token i's bytes, as llama.cpp prints a token: none for a special token, an added token's own text, a
        byte-fallback token's byte, else the token with its decoder's stand-ins (Ġ, ▁) undone."""
        b = self.pieces.get(i)
        if b is None:
            b = self.pieces[i] = token_bytes(self, int(i))
        return b

    def decode(self, ids: list[int], continuation: bool = False) -> str:
        """The text of ids: of a whole text (the space `encode` put before it removed), or a continuation's (its
        leading space kept, as llama.cpp prints pieces). Bytes that are not UTF-8 show as U+FFFD, each run alone."""
        text = b"".join(map(self.piece, ids)).decode("utf-8", "replace")
        return text[1:] if self.space_prefix and not continuation and text.startswith(" ") else text

    def stream(self) -> Stream:
        return Stream(self.piece)

    def apply_chat_template(self, prompt: str | list[dict], system: str | None = None,
                            continue_reply: bool = False) -> str:
        """The text of the model's chat template over a user's message (prompt), or over a conversation's messages
        ({"role", "content"}, the user's last), after a system message if given, ready for the assistant's reply.
        continue_reply: the last message is the assistant's own beginning, which the reply goes on from (the
        template over the messages before it, then that text as it is, as llama-server continues one)."""
        if not self.chat_template:
            raise HotcoldError("this model has no chat template (tokenizer.chat_template)")
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):  # transformers' {% generation %} marks a reply for training: as is
            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(msg):
            raise HotcoldError(f"chat template: {msg}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers': no HTML
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", Generation])  # {% break %}
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = tojson
        messages = ([{"role": "system", "content": system}] if system else []) + (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        start = messages.pop()["content"] if continue_reply else ""
        tok = self.tk.id_to_token
        bos = tok(self.bos_id) if self.bos_id is not None else ""
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token=bos,
                eos_token=tok(self.eos_id) if self.eos_id is not None else "")
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # tojson of an undefined value: a TypeError
            raise HotcoldError(f"chat template: {type(e).__name__}: {e}") from None
        text += start
        # encode adds BOS itself: a template's own (Llama 3, Gemma) would make two, so it goes, as in llama.cpp
        return text[len(bos):] if self.add_bos and bos and text.startswith(bos) else text


class Stream:
    """An incremental decoder of a continuation: `step(id)` gives the text that is whole so far, never half a UTF-8
    character; `end()` what is left (U+FFFD for a character cut off). Together they are decode(ids, True)."""

    def __init__(self, piece):
        self.piece, self.utf8 = piece, codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, i: int) -> str:
        return self.utf8.decode(self.piece(i))

    def end(self) -> str:
        return self.utf8.decode(b"", final=True)


BYTE_OF_CHAR = byte_level_chars()


def decoder_steps(tk: HFTokenizer) -> list[dict]:
    """The JSON specs of a tokenizer's decoder steps (a Sequence's, or the one decoder; none without a decoder),
    read from the decoder alone, not from the whole tokenizer written out."""
    spec = json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else {}
    return (spec.get("decoders") or []) if spec.get("type") == "Sequence" else [spec] if spec else []


def piece_rule(steps: list[dict]) -> tuple[str, list[tuple[str, str]], bool]:
    """How a decoder (its steps' specs) turns a token into bytes: ("bytes", ...) byte-level BPE; ("text",
    replacements, byte_fallback) SentencePiece styles; ("hf", ...) anything else, each token decoded alone."""
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" in kinds:
        return "bytes", [], False
    replaces = [(s["pattern"]["String"], s["content"]) for s in steps
                if s.get("type") == "Replace" and "String" in (s.get("pattern") or {})]
    replaces += [(s.get("replacement", "▁"), " ") for s in steps if s.get("type") == "Metaspace"]
    known = len(replaces) == kinds.count("Replace") + kinds.count("Metaspace") and set(kinds) <= {
        "Replace", "Metaspace", "ByteFallback", "Fuse", "Strip"}
    return ("text" if known else "hf"), replaces, "ByteFallback" in kinds


def token_bytes(tok: Tokenizer, i: int) -> bytes:
    """Tokenizer.piece's bytes, computed."""
    t = tok.tk.id_to_token(i)
    if i in tok.special_ids or t is None:
        return b""
    if i in tok.raw_ids:
        return t.encode()
    kind, replaces, byte_fallback = tok.piece_rule
    if kind == "bytes":
        return b"".join(bytes([BYTE_OF_CHAR[c]]) if c in BYTE_OF_CHAR else c.encode() for c in t)
    if kind == "text":
        m = BYTE_PIECE.fullmatch(t) if byte_fallback else None
        if m:
            return bytes([int(m[1], 16)])
        for a, b in replaces:
            t = t.replace(a, b)
        return t.encode()
    return tok.tk.decode([i], skip_special_tokens=True).encode()


def hf_chat_template(path: str, tc: dict) -> str | None:
    """An HF directory's chat template: tokenizer_config.json's (a list of named ones: the one named "default"),
    else chat_template.jinja's or chat_template.json's, as newer transformers save it."""
    t = tc.get("chat_template")
    if t is None:
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja):
            try:
                with open(jinja, encoding="utf-8") as fh:
                    return fh.read()
            except (OSError, UnicodeDecodeError) as e:
                raise HotcoldError(f"{jinja}: unreadable ({e})") from None
        t = (read_json_if(os.path.join(path, "chat_template.json"), "chat template") or {}).get("chat_template")
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) else None
