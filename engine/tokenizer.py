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
# tokenizer.ggml.pre -> pre-tokenizer of a byte-level BPE vocabulary
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS = {
    "default": lambda: BYTE_LEVEL,
    "gpt2": lambda: BYTE_LEVEL,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), BYTE_LEVEL]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
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
                 chat_template: str | None, special_ids: set[int]):
        self.tk = tk
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
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
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = {t: i for i, t in enumerate(tokens)}
        if model == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                import sys
                print(f"hotcold: note: pre-tokenizer {pre!r} unknown, using gpt2's", file=sys.stderr)
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
            tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                            decoders.Strip(" ", 1, 0)])
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        else:
            raise HotcoldError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")
        control = [i for i, t in enumerate(types) if t == TOKEN_CONTROL]
        user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        if model == "gpt2":
            tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        return cls(tk, bos, eos, add_bos, meta.get("tokenizer.chat_template"), set(control))

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise HotcoldError(f"{path}: no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(tj)
        except Exception as e:
            raise HotcoldError(f"{tj}: unreadable tokenizer ({e})") from None
        tc = {}
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json")) as fh:
                tc = json.load(fh)

        def token_id(key):
            v = tc.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return tk.token_to_id(v) if v else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        add_bos = bool(tc.get("add_bos_token", False)) and bos is not None and bos != eos
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        return cls(tk, bos, eos, add_bos, tc.get("chat_template"), special)

    # --- use ----------------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids; `special` parses control tokens such as <|im_start|> (else they are plain text)."""
        self.tk.encode_special_tokens = not special
        ids = self.tk.encode(valid_text(text), add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def stream(self):
        """An incremental decoder: `step(id) -> str | None` that never splits a UTF-8 character."""
        return decoders.DecodeStream(skip_special_tokens=True)

    def apply_chat_template(self, prompt: str, system: str | None = None) -> str:
        if not self.chat_template:
            raise HotcoldError("this model has no chat template (tokenizer.chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise HotcoldError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tok = self.tk.id_to_token
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=tok(self.bos_id) if self.bos_id is not None else "",
            eos_token=tok(self.eos_id) if self.eos_id is not None else "")
