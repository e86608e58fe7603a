"""Tokenizers built with the `tokenizers` library from GGUF metadata or an HF `tokenizer.json`.

GGUF vocabularies: `gpt2` (byte-level BPE, with the pre-tokenizer named by `tokenizer.ggml.pre`) and `llama`
(SentencePiece-style BPE with scores and byte fallback). Control tokens are parsed in text only when asked.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import HotcoldError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's splits for `default` (and a GGUF without tokenizer.ggml.pre), each applied to the pieces of the last
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                  r"\p{N}+", r"[0-9][0-9][0-9]")


def split_then_bytes(*patterns: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> pre-tokenizer of a byte-level BPE vocabulary, in the order export tries them
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS = {
    "gpt2": lambda: BYTE_LEVEL,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), BYTE_LEVEL]),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT),
    "default": lambda: split_then_bytes(*DEFAULT_SPLITS),
}
# names of end-of-turn tokens that stop generation besides EOS
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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
                 chat_template: str | None, special_ids: set[int], space_prefix: bool = False, add_eos: bool = False):
        """space_prefix: encoding puts a space before the text (SentencePiece), which `decode` removes again;
        add_eos: EOS after the text wherever BOS is added before it (llama.cpp's add_special)."""
        self.tk = tk
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.space_prefix = space_prefix
        self.chat_template = chat_template
        vocab = tk.get_vocab()
        self.stop_ids = {i for i in [eos_id] if i is not None} | {vocab[t] for t in END_OF_TURN if t in vocab}
        self.special_ids = special_ids

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
        for key, v in (("bos", bos), ("eos", eos)):
            if v is not None and not 0 <= v < len(tokens):
                raise HotcoldError(f"{path}: tokenizer.ggml.{key}_token_id {v} is outside the vocabulary of "
                                   f"{len(tokens)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        if model == "gpt2":
            merges = meta.get("tokenizer.ggml.merges") or []
            bad = next((m for m in merges if not isinstance(m, str) or " " not in m), None)
            if bad is not None:
                raise HotcoldError(f"{path}: tokenizer.ggml.merges holds {bad!r}, not two tokens and a space")
            merges = [tuple(m.split(" ", 1)) for m in merges]
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                import sys
                print(f"hotcold: note: pre-tokenizer {pre!r} unknown, using llama.cpp's default", file=sys.stderr)
                pre = "default"
            tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=(pre == "llama-bpe")))
            tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
            tk.decoder = decoders.ByteLevel()
            # A BOS equal to EOS (SmolLM2: both <|im_start|>) is no real BOS; llama.cpp's outputs carry none.
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos != eos
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
        control = [i for i, t in enumerate(types) if t == TOKEN_CONTROL]
        user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        if model == "gpt2":
            tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
            space_prefix = False
        return cls(tk, bos, eos, add_bos, meta.get("tokenizer.chat_template"), set(control), space_prefix,
                   bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None)

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
        # no add_bos_token: BOS is what the post-processor puts first (Llama 3's TemplateProcessing)
        add_bos = (bool(tc["add_bos_token"]) if "add_bos_token" in tc
                   else tk.encode("", add_special_tokens=True).ids[:1] == [bos]) and bos is not None and bos != eos
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        # a SentencePiece decoder ends stripping the space before the text: decode's job. Its spec alone is read (as
        # pickling does), not the whole tokenizer's, written out and parsed again
        spec = json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else {}
        steps = spec.get("decoders") or []
        space_prefix = bool(steps) and steps[-1] == {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        if space_prefix:
            trimmed = decoders.Sequence([])
            trimmed.__setstate__(json.dumps({**spec, "decoders": steps[:-1]}).encode())
            tk.decoder = trimmed
        return cls(tk, bos, eos, add_bos, hf_chat_template(path, tc), special, space_prefix,
                   bool(tc.get("add_eos_token", False)) and eos is not None)

    # --- use ----------------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

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

    def decode(self, ids: list[int], continuation: bool = False) -> str:
        """The text of ids: of a whole text (the space `encode` put before it removed), or a continuation's (its
        leading space kept, as llama.cpp prints pieces)."""
        text = self.tk.decode(list(ids), skip_special_tokens=True)
        return text[1:] if self.space_prefix and not continuation and text.startswith(" ") else text

    def stream(self):
        """An incremental decoder of a continuation: `step(id) -> str | None` that never splits a UTF-8 character."""
        return decoders.DecodeStream(skip_special_tokens=True)

    def apply_chat_template(self, prompt: str, system: str | None = None) -> str:
        if not self.chat_template:
            raise HotcoldError("this model has no chat template (tokenizer.chat_template)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise HotcoldError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tok = self.tk.id_to_token
        bos = tok(self.bos_id) if self.bos_id is not None else ""
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token=bos,
                eos_token=tok(self.eos_id) if self.eos_id is not None else "")
        except jinja2.TemplateError as e:
            raise HotcoldError(f"chat template: {type(e).__name__}: {e}") from None
        # encode adds BOS itself: a template's own (Llama 3, Gemma) would make two, so it goes, as in llama.cpp
        return text[len(bos):] if self.add_bos and bos and text.startswith(bos) else text


def read_json_if(path: str, what: str) -> dict | None:
    """The JSON object in path, None when there is no such file."""
    from .sparsity import read_json
    return read_json(path, what) if os.path.exists(path) else None

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
