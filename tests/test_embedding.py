"""Embeddings (hotcold embedding, /v1/embeddings): the hidden states the output matrix reads, pooled and normalized as
llama.cpp's llama-embedding."""
import base64
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from engine.api import Sampler, normalized
from engine.config import HotcoldError
from engine.model import quantize_rows_q8
from tools.cli import build_parser, main
from tools.server import Server

TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock prices fell sharply today."]


def test_embeddings_are_the_hidden_states_the_output_matrix_reads(smollm, smollm_torch):
    """Each token's vector (pooling none), rounded to 8 bits a block as ggml rounds what a quantized matrix reads,
    times the output matrix (dequantized from the file) gives the model's logits at that position; mean, last and
    cls pool those rows; the two backends agree; a text about a kitten is nearer one about a cat than one about
    stock prices."""
    out = smollm.ckpt.tensors.get("output.weight") or smollm.ckpt.tensors["token_embd.weight"]
    W = out.dequantize().astype(np.float64)  # (n_vocab, n_embd)
    long = smollm.tokenize(" ".join(TEXTS * 4))  # past STEP_PREFILL: the batched forward, as a long prompt's
    rows = smollm.embed(long, "none", -1)  # (T, n_embd)
    x8 = quantize_rows_q8(torch.from_numpy(rows)).double().numpy()
    np.testing.assert_allclose(x8 @ W.T, smollm.logits(long).double().numpy(), rtol=1e-4, atol=1e-3)
    ids = smollm.tokenize(TEXTS[0])  # short: decode steps, which read no output matrix; their logits, here
    rows = smollm.embed(ids, "none", -1)
    steps = np.stack([smollm.net.step(t, j).copy() for j, t in enumerate(ids)])
    x8 = quantize_rows_q8(torch.from_numpy(rows)).double().numpy()
    np.testing.assert_allclose(x8 @ W.T, steps, rtol=0, atol=0.1)  # (the kernel rounds x to 8 bits its own way)
    assert ((x8 @ W.T).argmax(1) == steps.argmax(1)).all()
    assert rows.shape == (len(ids), smollm.config.n_embd) and len(long) > 48
    for pooling, want in (("mean", rows.mean(0)), ("last", rows[-1]), ("cls", rows[0])):
        v = smollm.embed(ids, pooling)
        np.testing.assert_allclose(v, want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
        assert v.dtype == np.float32 and abs(np.linalg.norm(v) - 1) < 1e-5
    other = smollm_torch.embed(ids)
    assert float(other @ smollm.embed(ids)) > 0.999
    cat, kitten, stocks = (smollm.embed(smollm.tokenize(t)) for t in TEXTS)
    assert kitten @ cat > stocks @ cat + 0.1 and kitten @ cat > stocks @ kitten + 0.1


def test_normalizations_are_llamacpp_s():
    v = np.array([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(normalized(v, 2)[0], [0.6, -0.8, 0])
    np.testing.assert_allclose(normalized(v, 1)[0], [3 / 7, -4 / 7, 0])
    np.testing.assert_allclose(normalized(v, 0)[0], [24570, -32760, 0])
    np.testing.assert_allclose(normalized(v, 3)[0], v[0] / (27 + 64) ** (1 / 3), rtol=1e-6)
    assert (normalized(v, -1) == v).all() and (normalized(v, 2)[1] == 0).all()  # a zero vector stays zero


def test_embedding_leaves_the_cache_as_generate_expects(smollm):
    """After embed(ids) generate with reuse_cache takes nothing from the cache, so it says what a fresh generate
    says (a prompt split elsewhere can differ in the last bits); bad input is one line."""
    ids = smollm.tokenize("Once upon a time")
    fresh = smollm.generate(ids, 8, Sampler(0)).token_ids
    smollm.embed(ids[:3])
    again = smollm.generate(ids, 8, Sampler(0), reuse_cache=True)
    assert again.token_ids == fresh and again.stats["cached_tokens"] == 0
    for args, why in ((([],), "no tokens to embed"), ((ids, "max"), "pooling 'max': one of mean, last, cls, none"),
                      (([1] * (smollm.n_ctx + 1),), f"does not fit the context of {smollm.n_ctx}"),
                      (([-1],), "token id -1 is outside the vocabulary")):
        with pytest.raises(HotcoldError, match=why):
            smollm.embed(*args)


def test_cli_embedding(smollm, tmp_path, capsys):
    """One text a line: the vectors Model.embed gives, and their cosine similarities; --pooling none gives a vector
    a token; an empty text, a missing file and a text past the context are one line."""
    assert main(["embedding", "-p", "\n".join(TEXTS) + "\n", "--json", "-c", "1024"]) == 0
    got = json.loads(capsys.readouterr().out)
    vecs = np.array([d["embedding"] for d in got["data"]])
    want = np.stack([smollm.embed(smollm.tokenize(t)) for t in TEXTS])
    np.testing.assert_allclose(vecs, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["cosine_similarity"], want @ want.T, atol=1e-4)
    assert got["usage"]["prompt_tokens"] == sum(len(smollm.tokenize(t)) for t in TEXTS)
    assert main(["embedding", "-p", TEXTS[0], "--pooling", "none", "--embd-normalize", "-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(smollm.tokenize(TEXTS[0])) and lines[0].startswith("embedding 0 token 0: ")
    assert len(lines[0].split(": ")[1].split()) == smollm.config.n_embd
    f = tmp_path / "texts.txt"
    f.write_text("one|two", encoding="utf-8")
    assert main(["embedding", "-f", str(f), "--embd-separator", "|"]) == 0
    out = capsys.readouterr().out
    assert out.count("embedding ") == 2 and "cosine similarity matrix" in out
    for flags, why in ((["-p", "a\n\nb"], "text 2 of 3 is empty"), (["-f", str(tmp_path / "no.txt")], "no such file"),
                       (["-p", "word " * 80, "-c", "64"], "tokens: more than the context of 64")):
        assert main(["embedding", *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and why in err and err.count("\n") == 1, err


def call(srv, path: str, body: dict):
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_embeddings(smollm):
    """/v1/embeddings: OpenAI's object for a text, a list of texts or token ids, float or base64 (little-endian
    float32), the vectors Model.embed gives; bad input is a 400 naming the field."""
    srv = Server(smollm, build_parser("server").parse_args(["server"]), "127.0.0.1", 0)
    try:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        want = np.stack([smollm.embed(smollm.tokenize(t)) for t in TEXTS])
        status, got = call(srv, "/v1/embeddings", {"input": TEXTS, "model": "x"})
        assert status == 200 and got["object"] == "list" and [d["index"] for d in got["data"]] == [0, 1, 2]
        np.testing.assert_allclose([d["embedding"] for d in got["data"]], want, rtol=1e-4, atol=1e-5)
        n = sum(len(smollm.tokenize(t)) for t in TEXTS)
        assert got["usage"] == {"prompt_tokens": n, "total_tokens": n}
        status, got = call(srv, "/embeddings", {"input": smollm.tokenize(TEXTS[1]), "encoding_format": "base64"})
        v = np.frombuffer(base64.b64decode(got["data"][0]["embedding"]), "<f4")
        assert status == 200 and len(got["data"]) == 1
        np.testing.assert_allclose(v, want[1], rtol=1e-4, atol=1e-5)
        for body, why in (({"input": ""}, "input: a text that is not empty"), ({"input": []}, "input:"),
                          ({"input": [TEXTS[0], 3.5]}, "input:"), ({"input": "a", "encoding_format": "int8"},
                                                                   "encoding_format"),
                          ({"input": "a", "dimensions": 64}, "dimensions: this model's embeddings have 576"),
                          ({"input": [99999]}, "token id 99999 is outside the vocabulary")):
            status, got = call(srv, "/v1/embeddings", body)
            assert status == 400 and why in got["error"]["message"], (body, got)
    finally:
        srv.shutdown()
        srv.server_close()
