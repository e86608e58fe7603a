"""KL divergence from a base model, as llama.cpp's `perplexity --kl-divergence-base FILE [--kl-divergence]`.

A base run writes the text's tokens and its log-probabilities at every scored position to FILE; a later run of another
model (a sparsity config, predictors, another quantization) over the same chunks measures how far its next-token
distributions are from the base's: the quality cost that perplexity's mean hides.

FILE: MAGIC, an 8-byte little-endian header length, the header (JSON: n_vocab, vocab, ctx, first_chunk, chunks,
n_tokens, model), the tokens (int32), then each chunk's log-probabilities, (scored positions, n_vocab) float16, then
each scored token's negative log-likelihood, (chunks, scored positions) float64.
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
    file appears whole once the run is done), then each scored token's negative log-likelihood in float64 (the
    base's exact perplexity and the per-token differences); run's result."""
    import torch

    from engine.files import write_atomic
    result, nll = {}, []

    def write(tmp: str) -> None:
        head = json.dumps({"n_vocab": model.config.n_vocab, "vocab": vocab_digest(model.tokenizer), "ctx": ctx,
                           "first_chunk": chunks.start, "chunks": len(chunks), "n_tokens": len(tokens),
                           "model": str(model.ckpt.path)}).encode()
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(head)) + head)
            fh.write(np.asarray(tokens, np.int32).tobytes())

            def each(k: int, logp) -> None:
                fh.write(logp.to(torch.float16).numpy().tobytes())
                nll.append(-logp.gather(1, next_tokens(model, tokens, k, ctx)).numpy()[:, 0])

            result.update(run(each))
            fh.write(np.concatenate(nll).astype(np.float64).tobytes())

    write_atomic(path, write)
    return result


def next_tokens(model, tokens: list[int], k: int, ctx: int):
    """The tokens chunk k's scored positions predict, (S, 1) for gather."""
    import torch
    return torch.as_tensor(model.chunk(tokens, k, ctx)[ctx // 2 + 1:])[:, None]


INTS = ("n_vocab", "ctx", "first_chunk", "chunks", "n_tokens")


def read_base(path: str, n_vocab: int | None = None, vocab: str | None = None):
    """(header, tokens, log-probabilities (chunks, scored positions, n_vocab) float16, the scored tokens' negative
    log-likelihoods (chunks, scored positions) float64; both mapped) of a base file; HotcoldError for a file that is
    not one, a truncated one, or one of another vocabulary than `vocab`."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(MAGIC))
            size = fh.read(8)
            if magic != MAGIC or len(size) < 8:
                raise HotcoldError(f"{path}: not a KL divergence base (hotcold perplexity --kl-divergence-base "
                                   "FILE -f TEXT writes one; llama.cpp's are another format)")
            head = json.loads(fh.read(min(struct.unpack("<Q", size)[0], 1 << 20)))
            start = fh.tell()
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file (a base is written by hotcold perplexity --kl-divergence-base "
                           "FILE -f TEXT)") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError too
        head = None
    if not (isinstance(head, dict) and all(type(head.get(k)) is int and head[k] >= 0 for k in INTS)
            and head["ctx"] >= 4 and all(isinstance(head.get(k), str) for k in ("vocab", "model"))):
        raise HotcoldError(f"{path}: a KL divergence base with a corrupt header")
    shape = (head["chunks"], scored(head["ctx"]), head["n_vocab"])
    at = start + 4 * head["n_tokens"]
    want = at + 2 * int(np.prod(shape)) + 8 * shape[0] * shape[1]
    if os.path.getsize(path) != want:
        raise HotcoldError(f"{path}: {os.path.getsize(path)} bytes where its header makes {want} (truncated?)")
    if (n_vocab, vocab) != (None, None) and (head["n_vocab"], head["vocab"]) != (n_vocab, vocab):
        raise HotcoldError(f"{path}: written by a model of another vocabulary ({head['model']}); KL divergence "
                           "compares models that share their tokens")
    tokens = np.fromfile(path, np.int32, head["n_tokens"], offset=start).tolist()
    logp = np.memmap(path, np.float16, "r", at, shape)
    nll = np.memmap(path, np.float64, "r", at + 2 * int(np.prod(shape)), shape[:2])
    return head, tokens, logp, nll


ROWS = 32  # scored positions compared at a time: float64 copies of (ROWS, n_vocab), not of the whole chunk


def compare(path: str, model, run) -> dict:
    """run(each) (Model.perplexity over the base's chunks, with `each`) against the base at `path`: run's result with
    "kld": the base's perplexity, the KL divergence from the base per scored token (mean and its standard error,
    median, 99th and 99.9th percentiles, max), how often both give the same likeliest token, the mean of
    ln(PPL / PPL base) over tokens with its standard error (the paired difference: far tighter than two perplexities'),
    and the RMS of the change in the probability of the text's next token, as llama.cpp's statistics."""
    import torch
    head, tokens, base, base_nll = read_base(path, model.config.n_vocab, vocab_digest(model.tokenizer))
    kl, same, dnll, dp = [], [], [], []

    def each(k: int, logp) -> None:
        j = k - head["first_chunk"]
        nxt = next_tokens(model, tokens, k, head["ctx"])
        for r in range(0, len(logp), ROWS):
            b = torch.from_numpy(np.asarray(base[j, r:r + ROWS], np.float32)).double()  # (rows, n_vocab)
            b -= torch.logsumexp(b, -1, keepdim=True)  # normalized again after float16's rounding
            q = logp[r:r + ROWS]
            kl.append((b.exp() * (b - q)).sum(-1))
            same.append(b.argmax(-1) == q.argmax(-1))
            lq, lb = q.gather(1, nxt[r:r + ROWS])[:, 0], -torch.from_numpy(np.array(base_nll[j, r:r + ROWS]))
            dnll.append(lb - lq)
            dp.append(lq.exp() - lb.exp())

    res = run(each)
    kl, same, dnll, dp = (torch.cat(v).numpy().astype(np.float64) for v in (kl, same, dnll, dp))
    n = len(kl)

    def err(v):  # the standard error of v's mean; None for one token
        return float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else None

    from engine.api import perplexity_of
    res["kld"] = {"base": path, "base_model": head["model"],
                  "ppl_base": perplexity_of(float(np.asarray(base_nll[:len(res["chunks"])]).sum()), n),
                  "mean": float(kl.mean()), "stderr": err(kl), "median": float(np.median(kl)),
                  "p99": float(np.percentile(kl, 99)), "p999": float(np.percentile(kl, 99.9)), "max": float(kl.max()),
                  "same_top": float(same.mean()), "same_top_stderr": err(same),
                  "ln_ppl_ratio": float(dnll.mean()), "ln_ppl_ratio_stderr": err(dnll),
                  "rms_dp": float(np.sqrt((dp ** 2).mean()))}
    return res


def refuse_other_file(path: str) -> None:
    """A base is written over an older base or an empty file only: another file at `path` (a model, the text) is
    refused, not replaced; a folder that cannot be written is named (both before the model loads)."""
    from engine.files import check_replaceable, check_writable, refuse_directories

    def is_base(p: str) -> bool:
        with open(p, "rb") as fh:
            return os.path.getsize(p) == 0 or fh.read(len(MAGIC)) == MAGIC

    refuse_directories([path])
    check_replaceable(path, "a KL divergence base", is_base, "--kl-divergence-base")
    check_writable(path)


def base_chunks(path: str, chunks: int | None = None) -> tuple[list[int], int, range]:
    """The tokens, ctx and chunks (its first `chunks` of them) a base file was written over, for the compared run."""
    head, tokens, _, _ = read_base(path)
    n = head["chunks"] if chunks is None else min(chunks, head["chunks"])
    return tokens, head["ctx"], range(head["first_chunk"], head["first_chunk"] + n)
