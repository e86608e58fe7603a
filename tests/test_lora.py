"""LoRA adapters (--lora, --lora-scaled): llama.cpp's GGUF adapters and PEFT directories, merged at load, give the
model whose weights are W + scale * alpha / rank * B @ A, Q/K rows turned as the model's are."""
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from safetensors.torch import save_file

from engine.api import load
from engine.config import HotcoldError
from tiny_model import gguf_to_hf_name, halves, tiny_config, tiny_weights, write_gguf, write_hf
from tools.cli import main

IDS = list(range(2, 30))
RANK, ALPHA = 4, 8.0
TARGETS = ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight", "blk.1.attn_v.weight")


def lora_mats(w: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: ((0.3 * rng.standard_normal((RANK, w[n].shape[1]))).astype(np.float32),
                (0.3 * rng.standard_normal((w[n].shape[0], RANK))).astype(np.float32)) for n in TARGETS}


def write_gguf_adapter(path: str, arch: str, mats: dict, c, alpha: float = ALPHA, general_type: str = "adapter"):
    """As llama.cpp's convert_lora_to_gguf.py writes one: B's Q/K rows in the model file's layout (Qwen2: halves)."""
    wr = GGUFWriter(path, arch)
    wr.add_string("general.type", general_type)
    wr.add_string("adapter.type", "lora")
    wr.add_float32("adapter.lora.alpha", alpha)
    for n, (a, b) in mats.items():
        wr.add_tensor(n + ".lora_a", a)
        wr.add_tensor(n + ".lora_b", np.ascontiguousarray(halves(n, b, c) if arch == "qwen2" else b))
    wr.write_header_to_file(), wr.write_kv_data_to_file(), wr.write_tensors_to_file(), wr.close()
    return path


def write_peft(path: str, mats: dict, c, **cfg) -> str:
    """As PEFT saves one: HF names under base_model.model., B's Q/K rows rotating halves."""
    os.makedirs(path, exist_ok=True)
    st = {}
    for n, (a, b) in mats.items():
        hf = gguf_to_hf_name(n).removesuffix(".weight")
        st[f"base_model.model.{hf}.lora_A.weight"] = torch.from_numpy(a)
        st[f"base_model.model.{hf}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(halves(n, b, c)))
    st["base_model.model.lm_head.base_layer.weight"] = torch.zeros(3, 3)  # as PEFT saves a targeted lm_head: skipped
    save_file(st, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, **cfg}, fh)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapters_merge_into_the_model_they_describe(tmp_path, arch, capsys):
    c = tiny_config(arch=arch, attn_bias=arch == "qwen2")
    w = tiny_weights(c, 2)
    mats = lora_mats(w)
    base = write_gguf(str(tmp_path / "base.gguf"), c, w, arch=arch)
    merged = {**w, **{n: w[n] + 0.5 * ALPHA / RANK * b @ a for n, (a, b) in mats.items()}}
    want = load(write_gguf(str(tmp_path / "merged.gguf"), c, merged, arch=arch), n_ctx=64, backend="torch")
    gg = write_gguf_adapter(str(tmp_path / "lora.gguf"), arch, mats, c)
    peft = write_peft(str(tmp_path / "peft"), mats, c)
    ref = want.logits(IDS).numpy()
    assert np.abs(load(base, n_ctx=64, backend="torch").logits(IDS).numpy() - ref).max() > 1  # the delta matters
    for adapter in (gg, peft):
        got = load(base, n_ctx=64, backend="torch", lora=[(adapter, 0.5)])
        assert np.abs(got.logits(IDS).numpy() - ref).max() < 1e-4
    hf = write_hf(str(tmp_path / "hf"), c, w)  # the HF model with the PEFT adapter it was trained as
    assert np.abs(load(hf, n_ctx=64, backend="torch", lora=[(peft, 0.5)]).logits(IDS).numpy() - ref).max() < 1e-4
    # the CLI: --lora-scaled, and two adapters summed
    assert main(["generate", "-m", base, "--lora-scaled", gg, "0.5", "-p", "the cat", "-n", "8", "--temperature", "0",
                 "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "-m", base, "--lora-scaled", gg, "0.25", "--lora-scaled", peft, "0.25", "-p", "the cat",
                 "-n", "8", "--temperature", "0", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["token_ids"]
    assert a == b == want.generate(want.tokenize("the cat"), 8).token_ids
    # export --lora writes the merged model, as llama.cpp's llama-export-lora
    assert main(["export", "-m", base, "--lora-scaled", gg, "0.5", "--format", "gguf", "--outtype", "f16", "-o",
                 str(tmp_path / "out")]) == 0
    out = load(str(tmp_path / "out.gguf"), n_ctx=64, backend="torch")
    assert np.abs(out.logits(IDS).numpy() - ref).max() < 1e-2  # stored as F16


def test_a_quantized_model_keeps_its_other_matrices(tmp_path):
    """Merged block-quantized matrices are stored as Q8_0, the others as they were."""
    c = tiny_config()
    w = tiny_weights(c, 2)
    mats = lora_mats(w)
    base = write_gguf(str(tmp_path / "q.gguf"), c, w, QT.Q4_1)
    m = load(base, n_ctx=64, lora=[(write_gguf_adapter(str(tmp_path / "a.gguf"), "llama", mats, c), 1.0)])
    t = m.ckpt.tensors
    assert {n for n in t if t[n].qtype == QT.Q8_0} == set(TARGETS) and t["blk.0.attn_k.weight"].qtype == QT.Q4_1
    from engine.qtensor import QTensor
    wq = {n: QTensor.from_float(a, QT.Q4_1).dequantize() if a.ndim == 2 else a for n, a in w.items()}  # as stored
    merged = {**wq, **{n: wq[n] + ALPHA / RANK * b @ a for n, (a, b) in mats.items()}}
    ref = load(write_gguf(str(tmp_path / "m.gguf"), c, merged), n_ctx=64).logits(IDS)
    assert float((m.logits(IDS) - ref).norm() / ref.norm()) < 0.05  # activations in 8 bits, merged rows in Q8_0


def test_export_keeps_carried_predictors_only_where_the_adapter_leaves_the_ffn(tmp_path, capsys):
    """A file that carries predictors: export --lora writes them on with an attention adapter, and refuses them with
    one that changes the FFN they were trained on."""
    from predictors.bundle import Bundle, model_fingerprint
    from predictors.model import Predictor
    c = tiny_config("relu")
    w = tiny_weights(c, 2)
    m = load(write_gguf(str(tmp_path / "relu.gguf"), c, w), n_ctx=64)
    preds = [Predictor.from_weights(torch.zeros(4, c.n_embd), torch.ones(c.n_ff, 4)) for _ in range(c.n_layer)]
    Bundle(preds, [0.0] * c.n_layer, model_fingerprint(m.ckpt)).save(str(tmp_path / "b"))
    assert main(["export", "-m", m.ckpt.path, "--predictors", str(tmp_path / "b"), "--format", "gguf", "-o",
                 str(tmp_path / "carry")]) == 0
    carry = str(tmp_path / "carry.gguf")
    attn = {n: ab for n, ab in lora_mats(w).items() if ".attn_" in n}
    for mats, code in ((attn, 0), (lora_mats(w), 2)):
        adapter = write_gguf_adapter(str(tmp_path / f"a{code}.gguf"), "llama", mats, c)
        capsys.readouterr()
        assert main(["export", "-m", carry, "--lora", adapter, "--format", "gguf", "--force", "-o",
                     str(tmp_path / "out")]) == code
    assert "the predictors it carries were trained without the LoRA adapter" in capsys.readouterr().err
    assert main(["generate", "-m", carry, "--lora", adapter, "-p", "hi", "-n", "1"]) == 2  # nor run with it
    assert "the predictors it carries were trained without the LoRA adapter" in capsys.readouterr().err
    with pytest.raises(HotcoldError, match="trained without the LoRA adapter"):
        load(carry, n_ctx=64, lora=[(adapter, 1.0)])
    assert load(str(tmp_path / "out.gguf"), n_ctx=64).ckpt.predictors is not None  # the attention adapter's export
    # a PowerInfer file holds down transposed (ffn_down_t): an adapter of ffn_down goes there, transposed
    assert main(["export", "-m", m.ckpt.path, "--predictors", str(tmp_path / "b"), "-o", str(tmp_path / "pi")]) == 0
    rng = np.random.default_rng(3)
    down = {"blk.0.ffn_down.weight": ((0.3 * rng.standard_normal((RANK, c.n_ff))).astype(np.float32),
                                      (0.3 * rng.standard_normal((c.n_embd, RANK))).astype(np.float32))}
    adapter = [(write_gguf_adapter(str(tmp_path / "down.gguf"), "llama", down, c), 1.0)]
    pi = load(str(tmp_path / "pi.powerinfer.gguf"), n_ctx=64, backend="torch", predictors=False, lora=adapter)
    ref = load(m.ckpt.path, n_ctx=64, backend="torch", lora=adapter).logits(IDS)
    assert "blk.0.ffn_down_t.weight" in pi.ckpt.tensors and float((pi.logits(IDS) - ref).abs().max()) < 1e-2


def test_predictors_for_an_adapted_model(tmp_path, capsys):
    """profile --lora, then train-predictors: with the same --lora it trains them for the merged model; without it the
    profile, made on other weights past layer 0 (which the fingerprint reads), is refused."""
    from tiny_model import CAT_TEXT
    c = tiny_config("relu")
    w = tiny_weights(c, 2)
    base = write_gguf(str(tmp_path / "relu.gguf"), c, w)
    rng = np.random.default_rng(1)  # layer 1's FFN: past what the fingerprint reads, within what the bundle's does
    up = ((0.3 * rng.standard_normal((RANK, c.n_embd))).astype(np.float32),
          (0.3 * rng.standard_normal((c.n_ff, RANK))).astype(np.float32))
    adapter = write_gguf_adapter(str(tmp_path / "a.gguf"), "llama", {"blk.1.ffn_up.weight": up}, c)
    (tmp_path / "corpus.txt").write_text(CAT_TEXT * 4)
    assert main(["profile", "-m", base, "--lora", adapter, "-f", str(tmp_path / "corpus.txt"), "--ctx", "64",
                 "-o", str(tmp_path / "prof")]) == 0
    capsys.readouterr()
    assert main(["train-predictors", "--profile", str(tmp_path / "prof"), "-o", str(tmp_path / "b")]) == 2
    assert "profiled on other weights than" in capsys.readouterr().err
    assert main(["train-predictors", "--profile", str(tmp_path / "prof"), "--lora", adapter, "-o",
                 str(tmp_path / "b"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "-m", base, "--lora", adapter, "--predictors", str(tmp_path / "b"), "-p", "the cat",
                 "-n", "4"]) == 0  # the bundle is the merged model's
    assert main(["generate", "-m", base, "--predictors", str(tmp_path / "b"), "-p", "the cat", "-n", "4"]) == 2
    assert "of another model" in capsys.readouterr().err


def test_bad_adapters_are_one_line(tmp_path, capsys):
    c = tiny_config()
    w = tiny_weights(c, 2)
    mats = lora_mats(w)
    base = write_gguf(str(tmp_path / "base.gguf"), c, w)
    other = tiny_config(n_embd=32)
    cases = [
        (str(tmp_path / "none.gguf"), "none.gguf: no such file or directory"),
        (base, "not a LoRA adapter (general.type"),
        (write_gguf_adapter(str(tmp_path / "q.gguf"), "qwen2", mats, c),
         "an adapter of a qwen2 model; this model is llama"),
        (write_gguf_adapter(str(tmp_path / "o.gguf"), "llama", lora_mats(tiny_weights(other, 2)), other),
         "blk.0.attn_q.weight's B @ A is (32, 32), the model's blk.0.attn_q.weight (64, 64): an adapter of another"),
        (write_peft(str(tmp_path / "dora"), mats, c, use_dora=True), "use_dora is set"),
        (write_peft(str(tmp_path / "alora"), mats, c, alora_invocation_tokens=[5]), "alora_invocation_tokens is set"),
        (write_peft(str(tmp_path / "r8"), mats, c, r=8), "'s rank is 4, its config's r 8"),
        (write_gguf_adapter(str(tmp_path / "e.gguf"), "llama", {"token_embd.weight": (
            np.ones((RANK, c.n_embd), np.float32), np.ones((c.n_vocab, RANK), np.float32))}, c),
         "adapts token_embd.weight; hotcold merges no adapter into the token embeddings"),
    ]
    half = {n + ".lora_a": a for n, (a, _) in mats.items()}
    wr = GGUFWriter(str(tmp_path / "half.gguf"), "llama")
    wr.add_string("general.type", "adapter"), wr.add_string("adapter.type", "lora")
    for n, a in half.items():
        wr.add_tensor(n, a)
    wr.write_header_to_file(), wr.write_kv_data_to_file(), wr.write_tensors_to_file(), wr.close()
    cases.append((str(tmp_path / "half.gguf"), "blk.0.attn_q.weight has lora_a without its lora_b"))
    for adapter, why in cases:
        assert main(["generate", "-m", base, "--lora", adapter, "-p", "hi", "-n", "1"]) == 2
        err = capsys.readouterr().err
        assert why in err and "\n" not in err.strip() and "Traceback" not in err, err
    assert main(["generate", "-m", base, "--lora-scaled", str(tmp_path / "a"), "x", "-p", "hi", "-n", "1"]) == 2
    assert "the scale is not a number" in capsys.readouterr().err
    with pytest.raises(HotcoldError, match="the model's blk.0.attn_q.weight"):  # the API says it too
        load(base, n_ctx=64, lora=[(cases[3][0], 1.0)])
    for lora in ("a.gguf", [("a.gguf", float("nan"))], [(None, 1.0)], [("a.gguf", "1")]):
        with pytest.raises(HotcoldError, match="pairs|a path and a finite number"):
            load(base, n_ctx=64, lora=lora)
