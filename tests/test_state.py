"""The KV cache as state. Prompt caches (generate --prompt-cache, Model.save_state/load_state): a later run continues
from the file's keys and values as the run that wrote them would have, and a file of another model or kind is
refused. Context shifts (generate --context-shift): the keys moved back are those of their new positions."""
import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine.api import Sampler, load
from engine.config import HotcoldError
from engine.state import arrays, shift_context
from tiny_model import tiny_config, tiny_weights, write_gguf
from tools.cli import main

TEXT = "The history of the Roman Empire is long. " * 12


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_a_loaded_prompt_cache_continues_as_the_model_that_wrote_it(tmp_path, backend):
    """On a tiny model: a second model that loads the file continues the prompt with the same logits, bit for bit,
    as the first, which computed it; only the prompt's tokens are kept; the cache holds no more than it says."""
    c = tiny_config("silu")
    path = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c, seed=3), QT.Q8_0)
    a, b = (load(path, n_ctx=128, threads=1, backend=backend) for _ in range(2))
    prompt, more = [3, 5, 7, 9, 11, 2, 4, 6], [8, 10, 12]
    a.generate(prompt, 5, ignore_stop=True)  # the cache: the prompt, then 4 generated tokens
    assert a.save_state(str(tmp_path / "p.cache"), len(prompt)) == len(prompt)
    assert b.load_state(str(tmp_path / "p.cache")) == len(prompt) and b.kv_ids == prompt
    want = a.generate(prompt + more, 6, ignore_stop=True, reuse_cache=True, logprobs=0)
    got = b.generate(prompt + more, 6, ignore_stop=True, reuse_cache=True, logprobs=0)
    assert got.stats["cached_tokens"] == want.stats["cached_tokens"] == len(prompt)
    assert got.token_ids == want.token_ids and [x["logprob"] for x in got.logprobs] == [
        x["logprob"] for x in want.logprobs]
    other = load(path, n_ctx=6, threads=1, backend=backend)  # the file's 8 tokens do not fit
    with pytest.raises(HotcoldError, match="holds 8 tokens, which leave no room in the context of 6"):
        other.load_state(str(tmp_path / "p.cache"))


@pytest.mark.parametrize("backend,cache_type", [("kernels", "f16"), ("kernels", "f32"), ("torch", "f32")])
def test_a_context_shift_moves_keys_as_computed_at_their_new_positions(tmp_path, backend, cache_type):
    """Layer 0's keys depend on a token and its position alone: after a shift (4 positions kept, 8 forgotten) they
    are those a fresh model computes for the remaining tokens at their new positions; the values are the ones before,
    moved back; kv_ids says which tokens are there, and a generate reusing them computes only what follows; after a
    generate that shifted, only the kept positions are offered to the next."""
    c = tiny_config("silu")
    path = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c, seed=3), QT.Q8_0)
    a, b = (load(path, n_ctx=32, threads=1, backend=backend, cache_type=cache_type) for _ in range(2))
    ids = list(range(3, 23))
    a.logits(ids)
    k0, v0 = (x.copy() for x in arrays(a.net))
    shift_context(a, 4, 8)
    kept = ids[:4] + ids[12:]
    b.logits(kept)
    (ka, va), (kb, vb) = arrays(a.net), arrays(b.net)
    assert a.kv_ids == kept and np.array_equal(va[..., 4:12], v0[..., 12:20]) and np.array_equal(ka[:, :, :4],
                                                                                                 k0[:, :, :4])
    real = (lambda x: x.view(np.float16).astype(np.float32)) if cache_type == "f16" else (lambda x: x)
    tol = 2e-3 if cache_type == "f16" else 1e-5
    np.testing.assert_allclose(real(ka[0, :, :12]), real(kb[0, :, :12]), rtol=tol, atol=tol)
    np.testing.assert_allclose(real(va[0, ..., :12]), real(vb[0, ..., :12]), rtol=tol, atol=tol)
    assert a.generate(kept + [30], 1, reuse_cache=True).stats["cached_tokens"] == 12
    out = a.generate(ids, 30, ignore_stop=True, context_shift=True, keep=4)  # 20 + 30 tokens in a context of 32
    assert out.stats["context_shifts"] == 2 and len(out.token_ids) == 30
    assert a.kv_ids == ids[:4]  # what follows was computed beside forgotten tokens: no other prompt reuses it


def test_prompt_caches_of_another_model_or_kind_are_refused(tmp_path, smollm, smollm_torch):
    c = tiny_config("silu")
    tiny = load(write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c, seed=3), QT.Q8_0), n_ctx=64, threads=1)
    tiny.generate([3, 5, 7], 1)
    good = str(tmp_path / "tiny.cache")
    tiny.save_state(good)
    data = open(good, "rb").read()
    trunc, text = tmp_path / "trunc.cache", tmp_path / "text.cache"
    trunc.write_bytes(data[:len(data) // 2])
    text.write_text("hello")
    for path, model, why in ((good, smollm, "a prompt cache of another model"),
                             (str(trunc), tiny, "not a hotcold prompt cache, or a truncated one"),
                             (str(text), tiny, "not a hotcold prompt cache"),
                             (str(tmp_path / "none.cache"), tiny, "no such file")):
        with pytest.raises(HotcoldError, match=why):
            model.load_state(path)
    smollm.generate(smollm.tokenize("Hi"), 1)
    smollm.save_state(str(tmp_path / "f16.cache"))
    with pytest.raises(HotcoldError, match="a prompt cache of a f16 KV cache; this one is f32"):
        smollm_torch.load_state(str(tmp_path / "f16.cache"))
    tiny.sparsity = "a config"  # the keys and values of a sparse FFN: not what a dense run reads
    for act in (lambda: tiny.save_state(good), lambda: tiny.load_state(good)):
        with pytest.raises(HotcoldError, match="not with --sparsity or predictors"):
            act()


def test_cli_prompt_cache(smollm, tmp_path, capsys):
    """The first run writes the prompt's keys and values before it generates; the second takes all but the prompt's
    last token from the file and says what the first said, and what a model that computed the prompt itself says; a
    prompt the file holds whole (itself, or a shorter one it begins with) does not rewrite it, a longer one does;
    -ro reads and does not write; a file that is not a prompt cache, or a directory, is refused and left as it was."""
    cache = str(tmp_path / "roman.cache")
    run = ["generate", "-p", TEXT, "-n", "12", "--temperature", "0", "--json", "-c", "1024", "--prompt-cache", cache]
    assert main(run) == 0
    first = json.loads(capsys.readouterr().out)
    ids = smollm.tokenize(TEXT)
    assert first["stats"]["cached_tokens"] == len(ids) - 1 and os.path.exists(cache)
    smollm.generate(ids, 1)  # the prompt computed in one batch, as the first run computed it
    want = smollm.generate(ids, 12, Sampler(0), reuse_cache=True)
    stamp = os.stat(cache).st_mtime_ns
    for flags in (["--prompt-cache-ro"], []):
        assert main(run + flags) == 0
        out, err = capsys.readouterr()
        second = json.loads(out)
        assert second["stats"]["cached_tokens"] == len(ids) - 1
        assert second["token_ids"] == want.token_ids == first["token_ids"]
        assert f"prompt cache: {cache} holds {len(ids)} tokens, of which the prompt begins with {len(ids)}" in err
    short = ["generate", "-p", TEXT[:40], "-n", "2", "-c", "1024", "--prompt-cache", cache]
    assert main(short) == 0 and os.stat(cache).st_mtime_ns == stamp  # held whole: the file keeps the longer prompt
    assert main(run[:2] + [TEXT + " And"] + run[3:]) == 0
    capsys.readouterr()
    assert smollm.load_state(cache) == len(smollm.tokenize(TEXT + " And"))
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    for flags, why in ((["--prompt-cache", str(other)], "not a hotcold prompt cache"),
                       (["--prompt-cache", str(tmp_path)], "a directory, not a prompt cache"),
                       (["--prompt-cache-ro"], "--prompt-cache-ro: with --prompt-cache FILE"),
                       (["--prompt-cache", str(tmp_path / "new.cache"), "--prompt-cache-ro"], "no such file")):
        assert main(["generate", "-p", "Hi", "-n", "2", *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and why in err and err.count("\n") == 1, err
    assert other.read_text() == "keep me" and not os.path.exists(tmp_path / "new.cache")


def test_a_model_changed_in_a_middle_layer_is_another_model(tmp_path):
    """Two tiny models that differ in one middle layer's attention alone: the prompt cache of one is refused by the
    other (its keys and values would be another model's)."""
    c = tiny_config("silu", n_layer=4)
    w = tiny_weights(c, seed=3)
    a = load(write_gguf(str(tmp_path / "a.gguf"), c, w, QT.Q8_0), n_ctx=32, threads=1)
    w["blk.1.attn_v.weight"] = w["blk.1.attn_v.weight"] * 1.5
    b = load(write_gguf(str(tmp_path / "b.gguf"), c, w, QT.Q8_0), n_ctx=32, threads=1)
    a.generate([3, 5, 7], 1)
    a.save_state(str(tmp_path / "a.cache"))
    assert a.load_state(str(tmp_path / "a.cache")) == 3
    with pytest.raises(HotcoldError, match="a prompt cache of another model"):
        b.load_state(str(tmp_path / "a.cache"))
