"""KL divergence from a base model, as llama.cpp's `perplexity --kl-divergence-base FILE [--kl-divergence]`.

A base run writes the text's tokens and its log-probabilities at every scored position to FILE; a later run of another
model (a sparsity config, predictors, another quantization) over the same chunks measures how far its next-token
distributions are from the base's: the quality cost that perplexity's mean hides.

FILE: MAGIC, an 8-byte little-endian header length, the header (JSON: n_vocab, vocab, ctx, first_chunk, chunks,
n_tokens, model), the tokens (int32), then each chunk's log-probabilities, (scored positions, n_vocab) float16.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from engine.config import HotcoldError

MAGIC = b"hotcold kld\n"


def vocab_digest(tokenizer) -> str:
    """What two models must share to compare their distributions: the vocabulary, token by token."""
    vocab = sorted(tokenizer.tk.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(t for t, _ in vocab).encode()).hexdigest()[:16]


def scored(ctx: int) -> int:
    """Scored positions of a chunk of ctx tokens (Model.chunk_logprobs)."""
    return ctx - 1 - ctx // 2


def write_base(path: str, model, tokens: list[int], ctx: int, chunks: range, run) -> dict:
    """run(each) (Model.perplexity with `each`), the log-probabilities it gives written to `path` (atomically: the
    file appears whole once the run is done); run's result."""
    import torch

    from engine.files import write_atomic
    result = {}

    def write(tmp: str) -> None:
        head = json.dumps({"n_vocab": model.config.n_vocab, "vocab": vocab_digest(model.tokenizer), "ctx": ctx,
                           "first_chunk": chunks.start, "chunks": len(chunks), "n_tokens": len(tokens),
                           "model": str(model.ckpt.path)}).encode()
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(head)) + head)
            fh.write(np.asarray(tokens, np.int32).tobytes())
            result.update(run(lambda k, logp: fh.write(logp.to(torch.float16).numpy().tobytes())))

    write_atomic(path, write)
    return result


def read_base(path: str, n_vocab: int | None = None, vocab: str | None = None):
    """(header, tokens, log-probabilities (chunks, scored positions, n_vocab) float16, mapped) of a base file;
    HotcoldError for a file that is not one, a truncated one, or one of another vocabulary than `vocab`."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(MAGIC))
            size = fh.read(8)
            if magic != MAGIC or len(size) < 8:
                raise HotcoldError(f"{path}: not a KL divergence base (hotcold perplexity --kl-divergence-base "
                                   "FILE -f TEXT writes one)")
            head = json.loads(fh.read(min(struct.unpack("<Q", size)[0], 1 << 20)))
            start = fh.tell()
        shape = (int(head["chunks"]), scored(int(head["ctx"])), int(head["n_vocab"]))
        int(head["first_chunk"]), int(head["n_tokens"]), str(head["vocab"]), str(head["model"])
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file (a base is written by hotcold perplexity --kl-divergence-base "
                           "FILE -f TEXT)") from None
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError too
        raise HotcoldError(f"{path}: a KL divergence base with a corrupt header") from None
    want = start + 4 * head["n_tokens"] + 2 * int(np.prod(shape))
    if os.path.getsize(path) != want:
        raise HotcoldError(f"{path}: {os.path.getsize(path)} bytes where its header makes {want} (truncated?)")
    if (n_vocab, vocab) != (None, None) and (head["n_vocab"], head["vocab"]) != (n_vocab, vocab):
        raise HotcoldError(f"{path}: written by a model of another vocabulary ({head['model']}); KL divergence "
                           "compares models that share their tokens")
    tokens = np.fromfile(path, np.int32, head["n_tokens"], offset=start).tolist()
    logp = np.memmap(path, np.float16, "r", start + 4 * head["n_tokens"], shape)
    return head, tokens, logp


def compare(path: str, model, run) -> dict:
    """run(each) (Model.perplexity over the base's chunks, with `each`) against the base at `path`: run's result with
    "kld": the base's perplexity, the KL divergence from the base per scored token (mean and its standard error,
    median, 99th percentile, max) and how often both give the same likeliest token."""
    import torch
    head, tokens, base = read_base(path, model.config.n_vocab, vocab_digest(model.tokenizer))
    kl, same, nll = [], [], 0.0

    def each(k: int, logp) -> None:
        nonlocal nll
        b = torch.from_numpy(np.asarray(base[k - head["first_chunk"]], np.float32)).double()  # (S, n_vocab)
        b = b - torch.logsumexp(b, -1, keepdim=True)  # normalized again after float16's rounding
        kl.append((b.exp() * (b - logp)).sum(-1))
        same.append(b.argmax(-1) == logp.argmax(-1))
        nxt = model.chunk(tokens, k, head["ctx"])[head["ctx"] // 2 + 1:]  # the scored tokens
        nll -= float(b.gather(1, torch.as_tensor(nxt)[:, None]).sum())

    res = run(each)
    kl, same = torch.cat(kl).numpy(), torch.cat(same).numpy().astype(np.float64)
    n = len(kl)
    from engine.api import perplexity_of
    res["kld"] = {"base": path, "base_model": head["model"], "ppl_base": perplexity_of(nll, n),
                  "mean": float(kl.mean()), "stderr": float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
                  "median": float(np.median(kl)), "p99": float(np.percentile(kl, 99)), "max": float(kl.max()),
                  "same_top": float(same.mean()),
                  "same_top_stderr": float(same.std(ddof=1) / np.sqrt(n)) if n > 1 else None}
    return res


def refuse_other_file(path: str) -> None:
    """A base is written over an older base only: another file at `path` (a model, the text) is refused, not
    replaced (before the model loads)."""
    from engine.files import refuse_directories
    refuse_directories([path])
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise HotcoldError(f"{path}: exists and is not a KL divergence base, so it is not replaced")


def base_chunks(path: str) -> tuple[list[int], int, range]:
    """The tokens, ctx and chunks a base file was written over (for the compared run)."""
    head, tokens, _ = read_base(path)
    return tokens, head["ctx"], range(head["first_chunk"], head["first_chunk"] + head["chunks"])
