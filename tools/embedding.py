"""hotcold embedding: text embeddings from the model's hidden states, as llama.cpp's llama-embedding."""
from __future__ import annotations

import os
import sys

import numpy as np

from engine.config import POOLINGS, HotcoldError


def texts_of(text: str, separator: str) -> list[str]:
    """The texts to embed: the prompt split at the separator (a final one ends the last text); an empty text in
    between is refused."""
    parts = text.split(separator) if separator else [text]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    for k, part in enumerate(parts):
        if not part:
            raise HotcoldError(f"text {k + 1} of {len(parts)} is empty (texts are separated by {separator!r}: "
                               "--embd-separator)")
    return parts


def cosine(e: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of e."""
    u = e.astype(np.float64) / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    return u @ u.T


def cmd_embedding(args) -> None:
    from engine.files import read_text
    from engine.tokenizer import valid_text
    from tools.cli import emit_json, load_model
    text = args.prompt if args.file is None else read_text(args.file, "text file")
    texts = texts_of(valid_text(text), args.embd_separator)
    model = load_model(args)
    ids = [model.tokenize(t) for t in texts]
    for k, i in enumerate(ids):
        if len(i) > model.n_ctx:
            raise HotcoldError(f"text {k + 1} has {len(i)} tokens: more than the context of {model.n_ctx} (raise "
                               "--ctx)")
    vectors = [model.embed(i, args.pooling, args.embd_normalize) for i in ids]
    if args.json:
        out = {"object": "list", "model": os.path.basename(str(model.ckpt.path)), "pooling": args.pooling,
               "data": [{"object": "embedding", "index": k, "embedding": v.tolist()} for k, v in enumerate(vectors)],
               "usage": {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}}
        if len(vectors) > 1 and args.pooling != "none":
            out["cosine_similarity"] = cosine(np.stack(vectors)).round(6).tolist()
        emit_json(out)
        return
    for k, v in enumerate(vectors):
        rows = v if v.ndim == 2 else v[None]
        for j, row in enumerate(rows):
            label = f"embedding {k}" + (f" token {j}" if v.ndim == 2 else "")
            print(f"{label}: " + " ".join(f"{x:.6f}" for x in row.tolist()))
    if len(vectors) > 1 and args.pooling != "none":
        sim = cosine(np.stack(vectors))
        print("\ncosine similarity matrix:\n")
        for k, row in enumerate(sim):
            print(" ".join(f"{x:6.2f}" for x in row) + f"  {texts[k][:40]!r}")
    sys.stdout.flush()


def add_command(sub) -> None:
    from tools.cli import add_model_args, at_least
    p = sub.add_parser("embedding", help="embeddings of texts from the model's hidden states (llama-embedding)")
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the texts, separated by --embd-separator (default: one a line)")
    prompt.add_argument("-f", "--file", metavar="FILE", help="the texts read from a UTF-8 file")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="mean of the tokens' hidden states "
                   "(default), the last token's, the first's (cls), or none: one vector a token")
    p.add_argument("--embd-normalize", type=at_least(-1), default=2, metavar="P", help="2: unit Euclidean length "
                   "(default); 1: taxicab; p > 2: p-norm; 0: largest magnitude 32760; -1: none")
    p.add_argument("--embd-separator", default="\n", metavar="TEXT", help="what separates the texts (default a "
                   "newline)")
    p.add_argument("--json", action="store_true", help='print {"data": [{"index", "embedding"}], "usage", '
                   '"cosine_similarity"} (OpenAI\'s embeddings object)')
    p.set_defaults(func=cmd_embedding)
