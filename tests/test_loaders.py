"""GGUF and HF loaders agree on a tiny random LLaMA; bad input gets one clear line and exit code 2."""
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from engine.api import load
from engine.config import HotcoldError
from tiny_model import DIGIT_LIMIT, rewrite_gguf, tiny_config, tiny_weights, write_gguf, write_hf
from tools.cli import main

TEXT = "hello there, the cat in a hat sat on the mat"


@pytest.mark.parametrize("act,threshold", [("silu", 0.0), ("relu", 0.0), ("fatrelu", 0.05), ("drelu", 0.0)])
def test_hf_and_gguf_give_same_logits(tmp_path, act, threshold):
    c = tiny_config(act, threshold)
    w = tiny_weights(c, seed=1)
    hf = load(write_hf(str(tmp_path / "hf"), c, w), n_ctx=64)
    gg = load(write_gguf(str(tmp_path / "m.gguf"), c, w), n_ctx=64)
    assert (hf.config.act, hf.config.act_threshold) == (act, pytest.approx(threshold))
    assert (gg.config.act, gg.config.act_threshold) == (act, pytest.approx(threshold))
    ids = gg.tokenize(TEXT)
    assert ids == hf.tokenize(TEXT) and ids[0] == 0  # BOS from both tokenizers
    la, lb = hf.logits(ids), gg.logits(ids)
    assert float((la - lb).abs().max()) < 1e-4
    # incremental decode through the KV cache equals the batched prefill
    gg.logits(ids[:5])
    step = gg.net.forward(ids[5:6], 5)
    assert float((step - lb[5]).abs().max()) < 1e-4


def test_rotary_rows_written_out():
    """HF pairs dim j with j + hd/2, GGUF 2j with 2j + 1: with 2 heads of 8 rows, GGUF's order of HF's rows."""
    from engine.loader import rotary_halves_to_pairs
    from tiny_model import hf_rotary_rows
    pairs = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert rotary_halves_to_pairs(np.arange(16), 2).tolist() == pairs
    assert np.arange(16)[hf_rotary_rows(16, 2)][pairs].tolist() == list(range(16))


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1])
def test_quantized_gguf_close_to_f32(tmp_path, qtype):
    c = tiny_config("relu")
    w = tiny_weights(c, seed=2)
    ref = load(write_gguf(str(tmp_path / "f32.gguf"), c, w), n_ctx=64)
    q = load(write_gguf(str(tmp_path / "q.gguf"), c, w, qtype), n_ctx=64)
    assert q.ckpt.tensors["blk.0.ffn_up.weight"].qtype == qtype  # kept in its stored form
    ids = ref.tokenize(TEXT)
    la, lb = ref.logits(ids), q.logits(ids)
    tol = {QT.F16: 0.01, QT.Q8_0: 0.08, QT.Q4_0: 0.4, QT.Q4_1: 0.4, QT.Q5_0: 0.2, QT.Q5_1: 0.2}[qtype]
    assert float((la - lb).norm() / la.norm()) < tol


def run_cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    assert code == 0 or cap.out == "", cap.out  # a refused command prints nothing on stdout
    return code, cap.err.strip()


def assert_one_line(code, err, *words):
    assert code == 2
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_generate_reads_its_prompt_from_a_file_as_llamacpp_does(tmp_path, capsys):
    """generate -f: the file's text with "\r\n" kept and one final newline dropped (llama.cpp's -f), the prompt -p
    would give (a file of one newline: the empty prompt, BOS alone)."""
    c = tiny_config()
    good = write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))

    def prompt_ids(*argv):
        assert main(["generate", "-m", good, "-n", "1", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)["prompt_token_ids"]

    (tmp_path / "p.txt").write_bytes(b"the cat\r\nsat on\n\n")
    got = prompt_ids("-f", str(tmp_path / "p.txt"))
    assert got == prompt_ids("-p", "the cat\r\nsat on\n") != prompt_ids("-p", "the cat\nsat on\n")
    (tmp_path / "nl.txt").write_bytes(b"\n")
    assert prompt_ids("-f", str(tmp_path / "nl.txt")) == prompt_ids("-p", "") == [0]  # BOS


def test_bad_inputs_give_one_line(tmp_path, capsys):
    c = tiny_config()
    w = tiny_weights(c)
    good = write_gguf(str(tmp_path / "good.gguf"), c, w)

    assert_one_line(*run_cli(capsys, "tokenize", "-m", str(tmp_path / "nope.gguf"), "x"), "nope.gguf", "no such")

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model")
    assert_one_line(*run_cli(capsys, "tokenize", "-m", str(text), "x"), "notes.txt", "not a GGUF")

    data = open(good, "rb").read()
    for cut in (len(data) // 2, 200):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        assert_one_line(*run_cli(capsys, "generate", "-m", str(trunc), "-p", "hi"), trunc.name, "truncated")

    wrong = str(tmp_path / "gpt2.gguf")
    wr = GGUFWriter(wrong, "gpt2")
    wr.add_block_count(1)
    wr.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    wr.write_header_to_file(), wr.write_kv_data_to_file(), wr.write_tensors_to_file(), wr.close()
    assert_one_line(*run_cli(capsys, "generate", "-m", wrong, "-p", "hi"), "gpt2.gguf", "architecture")

    for name in ("blk.1.ffn_up.weight", "blk.1.ffn_down.weight"):  # named as the file would hold it
        missing = write_gguf(str(tmp_path / "missing.gguf"), c, w, drop=name)
        assert_one_line(*run_cli(capsys, "generate", "-m", missing, "-p", "hi"), f"missing tensor {name}")

    shaped = write_gguf(str(tmp_path / "shape.gguf"), c, w, reshape="blk.0.attn_k.weight")
    assert_one_line(*run_cli(capsys, "generate", "-m", shaped, "-p", "hi"), "blk.0.attn_k.weight", "shape")

    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-c", "16", "-p", "a long prompt " * 10),
                    "context")
    assert_one_line(*run_cli(capsys, "perplexity", "-m", good, "-f", str(tmp_path / "none.txt")), "none.txt")
    # past the context the model was trained on (the tiny model's 256): refused before anything is allocated
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("the cat sat on the mat. " * 200)
    assert_one_line(*run_cli(capsys, "perplexity", "-m", good, "-f", str(wiki), "--ctx", "300"), "good.gguf", "256")
    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-c", "257", "-p", "hi"), "good.gguf", "trained on")
    assert run_cli(capsys, "generate", "-m", good, "-c", "256", "-p", "hi", "-n", "2")[0] == 0
    assert load(good).n_ctx == 256  # the default context, 2048, shortened to the model's
    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-p", "hi", "--audit-recall"), "--audit-recall",
                    "--predictors")  # not silently ignored
    assert_one_line(*run_cli(capsys, "perplexity", "-m", good, "-f", str(wiki), "--ctx", "128", "--predictor-type",
                             "Q8_0"), "--predictor-type", "--predictors")
    # logits far out of range: a perplexity past a float is inf in text and null in --json (strict JSON), not a crash
    loud = write_gguf(str(tmp_path / "loud.gguf"), c, {**w, "output_norm.weight": w["output_norm.weight"] * 1e6})
    assert main(["perplexity", "-m", loud, "-f", str(wiki), "--ctx", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))["ppl"] is None
    assert main(["perplexity", "-m", loud, "-f", str(wiki), "--ctx", "128"]) == 0 and "inf" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    assert_one_line(*run_cli(capsys, "perplexity", "-m", good, "-f", str(short), "--ctx", "128"), "short.txt",
                    "0 chunks of --ctx 128")
    # argv bytes that are not UTF-8 reach Python as lone surrogates: tokenized as U+FFFD, not a crash
    assert run_cli(capsys, "tokenize", "-m", good, "ab\udcff\udcfecd")[0] == 0
    assert run_cli(capsys, "generate", "-m", good, "-p", "hi \udcff", "-n", "2", "--seed", "-1")[0] == 0
    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-f", str(tmp_path / "none.txt")), "none.txt", "no such")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-f", str(tmp_path / "latin1.txt")), "latin1.txt",
                    "unreadable prompt file")
    assert_one_line(*run_cli(capsys, "generate", "-m", good, "-f", str(tmp_path)), tmp_path.name, "unreadable")

    hfdir = tmp_path / "hf"
    write_hf(str(hfdir), c, w)
    (hfdir / "config.json").write_text('{"architectures": ["GPTNeoXForCausalLM"]}')
    assert_one_line(*run_cli(capsys, "generate", "-m", str(hfdir), "-p", "hi"), "GPTNeoXForCausalLM")
    assert_one_line(*run_cli(capsys, "tokenize", "-m", "", "x"), "-m: an empty path")


def test_model_path_with_a_tilde_no_shell_expanded(tmp_path, capsys, monkeypatch):
    c = tiny_config()
    write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_cli(capsys, "tokenize", "--model=~/good.gguf", "hi")[0] == 0


def test_bad_tokenizer_and_embedded_predictors_are_one_line(tmp_path, capsys):
    """The tokenizers library raised bare Exceptions (a merge of unknown tokens) and base64 a binascii.Error: now one
    line naming the file and key; a bundle check failing inside the embedded predictors names the file, not the
    temporary directory they were checked in."""
    from gguf import GGUFValueType as VT
    from engine.loader import KEY_BUNDLE_MANIFEST, KEY_BUNDLE_TENSORS
    c = tiny_config()
    good = write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))
    cases = [("tokenizer.ggml.merges", (["nospace"], VT.ARRAY), "tokenizer.ggml.merges holds 'nospace'"),
             ("tokenizer.ggml.merges", None, "tokenizer.ggml.merges is missing"),
             ("tokenizer.ggml.merges", (["Ġ zz"], VT.ARRAY), "invalid tokenizer metadata", "zz"),
             ("tokenizer.ggml.bos_token_id", (10**6, VT.UINT32), "bos_token_id 1000000 is outside the vocabulary"),
             (KEY_BUNDLE_TENSORS, ("@@ not base64", VT.STRING), f"{KEY_BUNDLE_TENSORS} or", "is not base64"),
             (KEY_BUNDLE_TENSORS, ("AAAA", VT.STRING), f"{KEY_BUNDLE_MANIFEST}: not a predictor bundle manifest")]
    for i, (key, value, *words) in enumerate(cases):
        extra = {KEY_BUNDLE_MANIFEST: ("{}", VT.STRING)} if key == KEY_BUNDLE_TENSORS else {}
        bad = rewrite_gguf(good, str(tmp_path / f"bad{i}.gguf"), {key: value, **extra})
        code, err = run_cli(capsys, "tokenize", "-m", bad, "hi")
        assert_one_line(code, err, f"bad{i}.gguf", *words)
        assert "/tmp" not in err.replace(str(tmp_path), ""), err


def test_block_count_must_match_the_layers(tmp_path, capsys):
    """llama.block_count below the layers the tensors hold would run silently on fewer layers: refused, naming the
    first tensor past it; above them, the first missing tensor; a huge count fails fast, not after listing 9e9
    tensor names."""
    from gguf import GGUFValueType
    c = tiny_config()
    fewer = write_gguf(str(tmp_path / "fewer.gguf"), tiny_config(n_layer=1), tiny_weights(c))  # 2 layers' tensors
    assert_one_line(*run_cli(capsys, "tokenize", "-m", fewer, "hi"), "fewer.gguf", "blk.1.attn_norm.weight", "past")
    good = write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))
    for n, word in ((3, "blk.2.attn_norm.weight"), (10**9, "blk.999999999.attn_norm.weight")):
        bad = rewrite_gguf(good, str(tmp_path / f"blocks{n}.gguf"), {"llama.block_count": (n, GGUFValueType.UINT32)})
        assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"), f"blocks{n}.gguf", "missing tensor", word)


def test_bad_metadata_values_are_refused(tmp_path, capsys):
    """Config values of the wrong type or out of range: one line naming the file and the key, before anything
    divides by them (head_count 0 was a ZeroDivisionError, context_length 0 a complaint about the prompt)."""
    from gguf import GGUFValueType as VT
    c = tiny_config()
    good = write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))
    cases = [("block_count", "thirty", VT.STRING, "expected an integer"), ("block_count", True, VT.BOOL, "integer"),
             ("feed_forward_length", 128.0, VT.FLOAT32, "expected an integer"),
             ("attention.head_count", 0, VT.UINT32, "at least 1"), ("context_length", 0, VT.UINT32, "at least 1"),
             ("attention.head_count_kv", 3, VT.UINT32, "does not divide llama.attention.head_count 4"),
             ("attention.head_count", 6, VT.UINT32, "not a multiple of llama.attention.head_count 6"),
             ("attention.head_count", 64, VT.UINT32, "heads of 1 dimensions, expected an even number"),
             ("attention.layer_norm_rms_epsilon", -1.0, VT.FLOAT32, "above 0"),
             ("attention.layer_norm_rms_epsilon", float("nan"), VT.FLOAT32, "finite"),
             ("rope.freq_base", "big", VT.STRING, "finite number")]
    for i, (key, value, vtype, words) in enumerate(cases):
        bad = rewrite_gguf(good, str(tmp_path / f"bad{i}.gguf"), {f"llama.{key}": (value, vtype)})
        assert_one_line(*run_cli(capsys, "generate", "-m", bad, "-p", "hi", "-n", "1"), f"bad{i}.gguf", f"llama.{key} ",
                        words)
    for key in ("context_length", "attention.layer_norm_rms_epsilon"):  # llama.cpp requires them; no guessing
        bad = rewrite_gguf(good, str(tmp_path / "nokey.gguf"), {f"llama.{key}": None})
        assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"), f"missing metadata key llama.{key}")
    bad = rewrite_gguf(good, str(tmp_path / "thr.gguf"), {"hotcold.ffn_act_threshold": (float("inf"), VT.FLOAT32)})
    assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"), "thr.gguf", "hotcold.ffn_act_threshold", "finite")


def test_misaligned_tensor_offset_is_refused(tmp_path, capsys):
    """GGUF aligns each tensor's data to general.alignment (32 here): an offset off the grid, though inside the
    file, is refused naming the tensor (it was a ZeroDivisionError in the kernels, or perplexity nan)."""
    import struct
    from gguf import GGUFReader
    c = tiny_config()
    good = write_gguf(str(tmp_path / "good.gguf"), c, tiny_weights(c))
    t = GGUFReader(good).tensors[0]  # its data at offset 0; +4 keeps it inside the file
    pos = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:5])  # name length, name, n_dims, dims, type
    data = bytearray(open(good, "rb").read())
    assert struct.unpack_from("<Q", data, pos) == (0,)
    struct.pack_into("<Q", data, pos, 4)
    (tmp_path / "misaligned.gguf").write_bytes(data)
    assert_one_line(*run_cli(capsys, "tokenize", "-m", str(tmp_path / "misaligned.gguf"), "hi"), "misaligned.gguf",
                    f"tensor {t.name} ", "offset 4", "alignment 32")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's quantize on NaN and infinity
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1])
def test_non_finite_weights_are_found(qtype):
    """QTensor.finite: a NaN or infinity anywhere (for block types it makes the block's scale one) is found, also
    when the chunks read at a time split the tensor."""
    from engine.qtensor import QTensor
    rng = np.random.default_rng(0)
    assert QTensor.from_float(rng.standard_normal((6, 64)), qtype).finite(chunk=5)
    for pos in ((0, 0), (2, 63), (5, 40)):
        for bad in (np.nan, np.inf, -np.inf):
            a = rng.standard_normal((6, 64)).astype(np.float32)
            a[pos] = bad
            t = QTensor.from_float(a, qtype)
            assert not t.finite() and not t.finite(chunk=7) and not t.finite(chunk=1), (pos, bad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_weights_are_refused(tmp_path, capsys):
    """A weight of NaN or infinity (perplexity was nan, exit code 0): one line naming the file and the tensor."""
    c = tiny_config()
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    for qtype, name, bad in ((QT.F32, "blk.1.ffn_up.weight", np.nan), (QT.F16, "blk.0.attn_k.weight", np.inf),
                             (QT.Q8_0, "blk.1.ffn_down.weight", np.nan), (QT.Q4_1, "output.weight", -np.inf),
                             (QT.F32, "output_norm.weight", np.nan)):
        w = tiny_weights(c)
        w[name].reshape(-1)[7] = bad
        path = write_gguf(str(tmp_path / f"bad-{qtype.name}.gguf"), c, w, qtype)
        words = "block scales" if qtype.name.startswith("Q") and w[name].ndim == 2 else "values"
        assert_one_line(*run_cli(capsys, "perplexity", "-m", path, "-f", str(text)), f"bad-{qtype.name}.gguf",
                        f"tensor {name} has NaN or infinite {words}")
    assert run_cli(capsys, "tokenize", "-m", path, "hi")[0] == 0  # the tokenizer alone: no scan of the weights


def test_bad_hf_config_is_refused(tmp_path, capsys):
    """config.json of the wrong shape or with values of the wrong type: one line naming config.json and the key."""
    import json
    c = tiny_config()
    hfdir = tmp_path / "hf"
    write_hf(str(hfdir), c, tiny_weights(c))
    good = json.loads((hfdir / "config.json").read_text())
    cases = [(["LlamaForCausalLM"], "a JSON object expected"), (b"\xff\xfe{}", "invalid JSON: UnicodeDecodeError"),
             *[('{"hidden_size": ' + "1" * 5000 + "}", "invalid JSON: ValueError: Exceeds the limit")] * DIGIT_LIMIT,
             ("[" * 100000, "invalid JSON: RecursionError"), ({**good, "hidden_size": "big"}, "hidden_size is 'big'"),
             ({**good, "architectures": "LlamaForCausalLM"}, "architectures is 'LlamaForCausalLM', expected a list"),
             ({**good, "num_attention_heads": 0}, "num_attention_heads is 0"),
             ({**good, "num_key_value_heads": 3}, "num_key_value_heads is 3"),
             ({**good, "rms_norm_eps": None}, "rms_norm_eps has no value"),
             ({**good, "tie_word_embeddings": "false"}, "tie_word_embeddings is 'false'"),
             ({**good, "hidden_act": ["silu"]}, "hidden_act ['silu']"),
             ({**good, "rope_theta": 10**400}, "rope_theta is 1000"),  # too large for a float
             ({**good, "act_threshold": "abc"}, "act_threshold is 'abc'"),  # hidden_act_param's older name
             ({**good, "hidden_act_param": "abc"}, "hidden_act_param is 'abc'")]
    for cfg, words in cases:
        (hfdir / "config.json").write_bytes(cfg if isinstance(cfg, bytes) else
                                            (cfg if isinstance(cfg, str) else json.dumps(cfg)).encode())
        assert_one_line(*run_cli(capsys, "tokenize", "-m", str(hfdir), "hi"), "hf/config.json: ", words)
    (hfdir / "config.json").write_text(json.dumps(good))
    assert run_cli(capsys, "tokenize", "-m", str(hfdir), "hi")[0] == 0


def test_counts_below_their_minimum_are_refused(capsys):
    """Thread, token and chunk counts are checked by the argument parser: exit code 2, the argument named."""
    for argv, name in ((["generate", "-p", "hi", "-n", "-2"], "-n/--n-predict"),
                       (["chat", "-n", "0"], "-n/--n-predict"),
                       (["bench", "-t", "0"], "-t/--threads"),
                       (["perplexity", "-f", "x.txt", "--chunks", "0"], "--chunks"),
                       (["profile", "-f", "x.txt", "-o", "out", "--ctx", "1"], "--ctx"),
                       (["calibrate", "-f", "x.txt", "-o", "o.json", "--target-sparsity", "0.5", "--ctx", "3"],
                        "--ctx"),  # scores the second half of each chunk: a ctx of 2 scored nothing, perplexity 1
                       (["split", "--profile", "p", "-o", "s", "--group", "0", "--hot-fraction", "0.5"], "--group")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {name}: must be at least" in err and "Traceback" not in err, err


def test_argument_errors_are_one_line(capsys):
    """The argument parser's refusals: one line naming the argument and where the usage is, exit code 2."""
    for argv, words in ((["tokenize", "hi", "--bogus"], "unrecognized arguments: --bogus (hotcold tokenize -h"),
                        (["generate", "-p", "hi", "--top-p", "2"], "argument --top-p: must be in (0, 1]"),
                        (["bench", "--sparsity-levels", "nan"], "argument --sparsity-levels"),
                        (["split", "--profile", "p", "-o", "s", "--hot-fraction", "1.5"],
                         "argument --hot-fraction: must be in [0, 1]"),
                        (["calibrate", "-f", "x", "-o", "s", "--target-sparsity", "0.99"],
                         "argument --target-sparsity: must be in [0, 0.95]"),
                        (["calibrate", "-f", "x", "-o", "s", "--ppl-increase", "nan"],
                         "argument --ppl-increase: must be a number > 0"),
                        (["nosuch"], "invalid choice: 'nosuch'"),
                        (["bench", "-n", "abc"], "argument -n: invalid int value: 'abc'"),  # not "parse value"
                        (["generate", "-p", "hi", "--top-p", "x"], "argument --top-p: invalid float value: 'x'"),
                        (["generate", "-p", "hi", "-f", "p.txt"], "argument -f/--file: not allowed with argument -p"),
                        (["generate", "-n", "4"], "one of the arguments -p/--prompt -f/--file is required"),
                        (["bench", "-n", "1"], "argument -n: must be at least 2")):  # -n 1: no decode step to time
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("hotcold: error: ") and words in err, err
        assert err.rstrip().endswith("-h for usage)")
    for argv, words in ((["bench", "--compare", "--backend", "torch"], "--backend torch: bench --compare times the"),
                        (["bench", "--hybrid", "--backend", "torch"], "--backend torch: bench --hybrid times the")):
        assert main(argv) == 2 and words in capsys.readouterr().err  # the rows would time other engines


def test_perplexity_reads_as_llama_cpp(tmp_path, capsys):
    """Several files joined by blank lines; "\r\n" kept (llama.cpp reads bytes); .JSONL in any case; BOS at the start
    of each chunk where the model adds one (the tiny model does)."""
    import torch
    from tools.profile import read_corpus
    c = tiny_config()
    m = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c))
    (tmp_path / "a.txt").write_bytes(b"the cat sat on the mat.\r\n" * 30)
    (tmp_path / "b.JSONL").write_text('{"text": "the dog ate in the hat."}\n' * 20)
    assert read_corpus([str(tmp_path / "a.txt")])[0].count("\r\n") == 30
    assert read_corpus([str(tmp_path / "b.JSONL")])[0] == "the dog ate in the hat."
    (tmp_path / "ab.txt").write_text("\n\n".join(read_corpus([str(tmp_path / n) for n in ("a.txt", "b.JSONL")])),
                                     newline="")
    ppl = {}
    for name, files in (("two", ["a.txt", "b.JSONL"]), ("one", ["ab.txt"])):
        assert main(["perplexity", "-m", m, "-f", *[str(tmp_path / f) for f in files], "--ctx", "32", "--json"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl["two"] == ppl["one"]
    model = load(m, n_ctx=64)
    tokens = model.tokenize(open(tmp_path / "ab.txt", newline="").read(), special=False)
    assert model.tokenizer.add_bos and tokens[0] == model.tokenizer.bos_id
    nll = 0.0
    for k in range(len(tokens) // 32):  # the scheme by hand: chunk k's first token is BOS, its second half scored
        chunk = [model.tokenizer.bos_id] + tokens[k * 32 + 1:(k + 1) * 32]
        logp = torch.log_softmax(model.logits(chunk, 0)[16:-1].double(), -1)
        nll -= float(logp.gather(1, torch.tensor(chunk[17:])[:, None]).sum())
    assert ppl["one"] == pytest.approx(math.exp(nll / (len(tokens) // 32 * 15)), rel=1e-6)


def test_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hotcold {version('hotcold')}"


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """kill (SIGTERM) in the middle of a command: one line, exit code 143, the temporaries of the write under way
    removed; SIGTERM's default is back afterwards."""
    import signal

    import engine.files
    import engine.sparsity

    def killed_while_writing(tmp):
        open(tmp, "w").write("half")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine.sparsity, "write_json", lambda path, obj: engine.files.write_all(
        [(path, killed_while_writing)]))
    c = tiny_config()
    path = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c))
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a new process (main leaves others' handlers be)
    try:
        assert main(["calibrate", "-m", path, "-f", os.path.join(os.path.dirname(__file__), "data",
                     "tinyshakespeare.txt"), "--tokens", "128", "--heldout-tokens", "128", "--ctx", "64",
                     "--target-sparsity", "0.3", "-o", str(tmp_path / "s.json"), "-t", "1"]) == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "hotcold: terminated"
    left = sorted(os.listdir(tmp_path))  # no s.json, no temporary (s.json.progress.json: the resume point, if saved)
    assert left in (["m.gguf"], ["m.gguf", "s.json.progress.json"])


def test_signals_held_also_when_another_thread_takes_the_signal():
    """write_all's renames run with Ctrl-C held. A signal mask held it for the main thread only: the kernel handed the
    signal to another thread (torch's, numba's, tqdm's), and Python raised KeyboardInterrupt inside the block."""
    import signal
    import threading
    import time

    from engine.files import signals_held
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # where an unheld signal's handler runs
                done.append("block")
            done.append("after")  # not reached: the held signal is raised as the block ends
    finally:
        stop.set()
        other.join()
    assert done == ["block"]


def test_after_ctrl_c_the_process_leaves_sigint_to_the_system(monkeypatch, capsys):
    """`hotcold` (main reading sys.argv) hands SIGINT back to the system after the first Ctrl-C and when it ends: a
    second one during the cleanup or the interpreter's exit ends the process, not in a traceback. main called by a
    program, with its argv, leaves SIGINT as it was."""
    import signal

    import tools.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tools.cli, "cmd_tokenize", interrupted)
    monkeypatch.setattr(sys, "argv", ["hotcold", "tokenize", "hi"])
    before = signal.getsignal(signal.SIGINT)
    try:
        assert main(["tokenize", "hi"]) == 130 and signal.getsignal(signal.SIGINT) is before
        assert main() == 130 and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a parent's ignored SIGINT (cmd & in a script) stays ignored
        assert main() == 130 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.splitlines() == ["hotcold: interrupted"] * 3
    for error in (ValueError("Can't close the ZIP file"), HotcoldError("x.pt: cannot write")):  # cleanup cut short

        def cut_short(args, error=error):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise error from None

        monkeypatch.setattr(tools.cli, "cmd_tokenize", cut_short)
        assert main(["tokenize", "hi"]) == 130 and capsys.readouterr().err == "hotcold: interrupted\n"


def test_installed_command_exit_code(tmp_path):
    """The real console script: exit code 2, one line on stderr, no traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "hotcold")
    r = subprocess.run([exe, "generate", "-m", str(tmp_path / "missing.gguf"), "-p", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.gguf" in r.stderr


def test_stdout_closed_early_or_unable_to_encode(tmp_path):
    """A reader that goes away (| head) ends the command quietly; a locale that cannot encode the text gets "?" and a
    --json document in \\u escapes (exact), not a traceback; a closed stdout is one line."""
    cli, root = [sys.executable, "-m", "tools.cli"], os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = tiny_config("relu")
    model = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([*cli, "tokenize", "-m", model, "the cat " * 50], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=root)
    p.stdout.close()  # before the command writes
    assert p.stderr.read() == b"" and p.wait() == 0
    enc = dict(env, PYTHONIOENCODING="latin-1")
    r = subprocess.run([*cli, "tokenize", "-m", model, "日本", "--json"], capture_output=True, env=enc, cwd=root)
    assert r.returncode == 0 and r.stderr == b"" and json.loads(r.stdout)["token_ids"][0] == 0
    r = subprocess.run([*cli, "generate", "-m", model, "-p", "日本", "-n", "2", "-t", "1"], capture_output=True,
                       env=enc, cwd=root)
    assert r.returncode == 0 and r.stdout.startswith(b"??") and b"Traceback" not in r.stderr
    r = subprocess.run(f"'{sys.executable}' -m tools.cli tokenize -m '{model}' hi >&-", shell=True,
                       capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 2 and r.stderr == "hotcold: error: stdout is closed\n"
    r = subprocess.run([*cli, "generate", "-m", model, "-p", "hi", "-n", "1", "-t", "1"], capture_output=True,
                       text=True, env=dict(env, NUMBA_NUM_THREADS="0"), cwd=root)
    assert r.returncode == 2 and r.stderr.startswith("hotcold: error: numba: ") and r.stderr.count("\n") == 1


def test_hf_generate_and_chat_template(tmp_path):
    c = tiny_config("relu")
    m = load(write_hf(str(tmp_path / "hf"), c, tiny_weights(c)), n_ctx=64)
    prompt = m.tokenizer.apply_chat_template("hi")
    assert prompt == "user: hi\n<s>assistant: "  # the template's first <s> left to the BOS encode adds
    ids = m.tokenize(prompt)
    assert ids.count(m.tokenizer.bos_id) == 2 and ids[0] == m.tokenizer.bos_id
    out = m.generate(ids, 5)
    assert 1 <= len(out.token_ids) <= 5 and isinstance(out.text, str)


def test_cli_chat_renders_the_conversation_and_needs_a_template(tmp_path, monkeypatch, capsys):
    """hotcold chat on a tiny HF model: the second turn's prompt is the template over both exchanges (the roles and
    the first reply's text as the model wrote it); a model without a chat template is refused before any input."""
    c = tiny_config("relu")
    w = tiny_weights(c)
    m = load(write_hf(str(tmp_path / "hf"), c, w), n_ctx=64)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you\n"))
    assert main(["chat", "-m", str(tmp_path / "hf"), "-n", "3", "--json", "-t", "1", "-c", "128"]) == 0  # room: a
    # sampled reply of bytes that are not UTF-8 comes back as U+FFFD, 3 tokens each (64 made the chat drop it)
    one, two = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": one["text"]},
             {"role": "user", "content": "how are you"}]
    assert two["prompt_token_ids"] == m.tokenize(m.tokenizer.apply_chat_template(convo))
    assert m.tokenizer.apply_chat_template(convo).startswith("user: hi\n<s>assistant: " + one["text"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "-m", write_gguf(str(tmp_path / "m.gguf"), c, w), "-t", "1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "hotcold: error: this model has no chat template (tokenizer.chat_template)\n"


def test_hf_chat_templates_as_transformers_saves_them(tmp_path, capsys):
    """A list of named templates (the one named default), chat_template.jinja beside tokenizer_config.json, and BOS
    from the post-processor when tokenizer_config.json does not say; transformers' additions (tojson, strftime_now,
    loop controls, {% generation %}); a broken template is one line."""
    from tokenizers import processors
    from tiny_model import hf_tokenizer
    c = tiny_config("relu")
    path = write_hf(str(tmp_path / "hf"), c, tiny_weights(c))
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}!"}]
    with open(cfg_path, "w") as fh:
        json.dump({**cfg, "chat_template": named}, fh)
    assert load(path, n_ctx=64).tokenizer.apply_chat_template("hi") == "hi!"
    del cfg["chat_template"], cfg["add_bos_token"]
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(path, "chat_template.jinja"), "w") as fh:
        fh.write("[{{ messages[0].content }}]")
    m = load(path, n_ctx=64)
    assert m.tokenizer.apply_chat_template("hi") == "[hi]"
    with open(os.path.join(path, "chat_template.jinja"), "w") as fh:  # what Llama 3.x and tool templates use
        fh.write("{% for m in messages %}{{ m | tojson }}{% break %}{% endfor %}|{{ strftime_now('%Y') }}"
                 "{% generation %}{{ '!' }}{% endgeneration %}")
    got = load(path, n_ctx=64).tokenizer.apply_chat_template("hé <b>")
    assert got == '{"role": "user", "content": "hé <b>"}|' + time.strftime("%Y") + "!"  # as transformers renders it
    with open(os.path.join(path, "chat_template.jinja"), "w") as fh:
        fh.write("{{ nothing | tojson }}")
    with pytest.raises(HotcoldError, match="chat template: TypeError: Object of type Undefined"):
        load(path, n_ctx=64).tokenizer.apply_chat_template("hi")
    assert m.tokenize("hi")[0] != m.tokenizer.bos_id  # neither add_bos_token nor a post-processor adding it
    tk = hf_tokenizer()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tk.save(os.path.join(path, "tokenizer.json"))
    assert load(path, n_ctx=64).tokenize("hi")[0] == tk.token_to_id("<s>")  # as Llama 3 adds BOS
    with open(os.path.join(path, "chat_template.jinja"), "w") as fh:
        fh.write("{{ messages[0].content }")
    assert main(["generate", "-m", path, "-p", "hi", "--chat", "-n", "1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().splitlines() == [
        "hotcold: error: chat template: TemplateSyntaxError: unexpected '}'"]


def test_gpt2_vocabulary_names_and_end_tokens_as_llama_cpp():
    """llama.cpp's other names of a pre-tokenizer split alike (llama3 is llama-bpe, which adds BOS where the file does
    not say); an end-of-turn token typed user-defined is made a control token, as llama.cpp makes it: not printed, and
    parsed only with special tokens on."""
    from engine.tokenizer import TOKEN_USER_DEFINED, Tokenizer
    from tiny_model import tiny_vocab
    vocab, merges = tiny_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["<|im_end|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 3) + [TOKEN_USER_DEFINED],
            "tokenizer.ggml.merges": [" ".join(m) for m in merges], "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1}
    end = len(tokens) - 1
    for name, twin in (("llama3", "llama-bpe"), ("falcon3", "llama-bpe"), ("gpt2", "gpt-2"), ("phi-2", "gpt-2")):
        a, b = (Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": p}, "x") for p in (name, twin))
        text = "it's 12345 the  cat!!"
        assert a.encode(text) == b.encode(text) and a.add_bos == (twin == "llama-bpe")
        assert a.tk.pre_tokenizer.__getstate__() == b.tk.pre_tokenizer.__getstate__()
    tok = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "gpt2"}, "x")
    assert tok.encode("the<|im_end|>", add_bos=False)[-1] == end and end in tok.stop_ids
    assert end not in tok.encode("the<|im_end|>", special=False, add_bos=False)
    assert tok.decode(tok.encode("the<|im_end|>", add_bos=False)) == "the"


def test_other_vocabularies_tokenize_and_decode_as_llama_cpp(tmp_path):
    """A SentencePiece vocabulary keeps the space before a continuation's first word (only a whole text loses the
    space encoding put before it), and `default` (or no tokenizer.ggml.pre) splits as llama.cpp's default rules."""
    from engine.tokenizer import Tokenizer
    words = ["▁", "t", "h", "e", "o", "f", "T", "▁t", "he", "▁o", "▁T", "▁the", "▁of", "▁The"]
    pieces = ["<unk>", "<s>", "</s>"] + words + [f"<0x{b:02X}>" for b in range(256)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * len(words) + [6] * 256,
            "tokenizer.ggml.scores": [0.0] * 3 + [-float(i) for i in range(len(words))] + [0.0] * 256,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    spm = Tokenizer.from_gguf(meta, "spm")
    the, of, The = (pieces.index(w) for w in ("▁the", "▁of", "▁The"))
    assert spm.encode("The of") == [1, The, of]
    assert spm.decode([1, The, of]) == "The of"
    assert spm.decode([the, of], continuation=True) == " the of"
    eos = Tokenizer.from_gguf({**meta, "tokenizer.ggml.add_eos_token": True}, "spm")  # llama.cpp's add_special
    assert eos.encode("The of") == [1, The, of, 2] and eos.encode("The of", add_bos=False) == [The, of]
    stream = spm.stream()
    assert "".join(stream.step(i) for i in [the, of]) + stream.end() == " the of"
    user = Tokenizer.from_gguf({**meta, "tokenizer.ggml.tokens": pieces + ["<|user|>"],
                                "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"] + [4],
                                "tokenizer.ggml.scores": meta["tokenizer.ggml.scores"] + [0.0]}, "spm")
    u = len(pieces)  # a user-defined token: whole, even without special tokens, and a space before what follows
    assert user.encode("<|user|>the of", special=False) == [1, u, the, of] == user.encode("<|user|>the of")
    assert user.decode([1, u, the, of]) == "<|user|> the of"
    from tokenizers import decoders  # the same vocabulary as an HF directory saves it: its decoder strips the space
    spm.tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    spm.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    hf = Tokenizer.from_hf_dir(str(tmp_path))
    assert hf.decode([the, of], continuation=True) == " the of" and hf.decode([1, The, of]) == "The of"
    split = Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                                 "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "default"},
                                "x").tk.pre_tokenizer.pre_tokenize_str
    # llama.cpp: punctuation runs first, then GPT-2's words, then digits in runs of three
    assert [p for p, _ in split("f(x) = (a + b)")] == ["f", "(", "x", ")", "Ġ", "=", "Ġ", "(", "a", "Ġ", "+", "Ġb", ")"]
    assert [p for p, _ in split("a==b || c 12345")] == ["a", "==", "b", "Ġ", "||", "Ġc", "Ġ", "123", "45"]


def test_byte_fallback_decodes_bytes_as_llama_cpp_and_streams_the_same(tmp_path):
    """Byte tokens give their bytes (valid UTF-8 runs survive beside invalid ones, as llama.cpp prints them); the
    stream never raises and its steps join to the decoded text; eot/eom ids and end-of-generation names stop, FIM
    ones too (pad, repository, file separator: by name, or by key, which replaces the names of its kind), and all
    named ones are control tokens."""
    import random

    from engine.tokenizer import Tokenizer
    words = ["▁", "a", "b", "▁a", "<|fim_pad|>", "<|fim_prefix|>", "<|eom_id|>", "<|end_of_text|>", "<|eot_id|>"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 6 + [3] * 3,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = Tokenizer.from_gguf(meta, "spm")
    byte = {b: 3 + b for b in range(256)}
    a = pieces.index("▁a")
    ri = [byte[b] for b in "日".encode()]
    assert tok.decode([byte[0x45], byte[0x4D], byte[0xD1]]) == "EM\ufffd"
    assert tok.decode(ri + ri[:1] + [a], continuation=True) == "日\ufffd a"
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(len(pieces)), *ri, rng.randrange(3 + 0xC0, 3 + 0xF5)]) for _ in range(8)]
        stream = tok.stream()
        assert "".join(map(stream.step, ids)) + stream.end() == tok.decode(ids, continuation=True)
    eom, eot, end, pad, pre = (pieces.index(t) for t in ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>", "<|fim_pad|>",
                                                          "<|fim_prefix|>"))
    assert tok.stop_ids == {2, eom, eot, end, pad} and {pad, pre} < tok.special_ids
    assert tok.decode([a, pad, pre]) == "a" and tok.encode("<|fim_prefix|>a", special=False)[1] != pre
    keyed = Tokenizer.from_gguf({**meta, "tokenizer.ggml.eot_token_id": byte[0], "tokenizer.ggml.eom_token_id": a,
                                 "tokenizer.ggml.fim_sep_token_id": byte[1], "tokenizer.ggml.fim_pad_token_id": byte[2],
                                 "tokenizer.ggml.fim_pre_token_id": byte[3]}, "spm")
    # a FIM kind's key replaces its names, as in llama.cpp: <|fim_pad|> and <|fim_prefix|> are plain tokens then
    assert {byte[0], a, byte[1], byte[2]} < keyed.stop_ids and pad not in keyed.stop_ids
    assert not {pad, pre} & keyed.special_ids and keyed.decode([a, pad, pre]) == "a<|fim_pad|><|fim_prefix|>"
    with pytest.raises(HotcoldError, match="spm: tokenizer.ggml.eom_token_id 999 is outside the vocabulary"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.eom_token_id": 999}, "spm")
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, byte[7]]}))
    hf = Tokenizer.from_hf_dir(str(tmp_path))
    assert byte[7] in hf.stop_ids and hf.decode(ri[:2] + ri + [a]) == "\ufffd日 a"


def test_hf_directory_frames_and_ends_as_llama_cpp_reads_it(tmp_path):
    """An HF directory without add_bos_token/add_eos_token adds what its post-processor puts around a text (a BOS
    equal to EOS too, and an EOS after the text is not taken for a BOS); the keys win over the post-processor; an
    end-of-turn (or FIM) token added as a plain one is a control token, as llama.cpp makes it: not printed, parsed
    only with special tokens."""
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers, processors
    from engine.tokenizer import Tokenizer
    from tiny_model import tiny_vocab
    vocab, merges = tiny_vocab()  # <s> 0, </s> 1
    a = vocab["a"]

    def load(template, bos, eos, **keys):
        tk = HF(models.BPE(vocab, merges))
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<|im_end|>", "<|file_sep|>")])
        if template:
            tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
        tk.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos, **keys}))
        return Tokenizer.from_hf_dir(str(tmp_path))

    assert load("<s> $A </s>", "<s>", "</s>").encode("a") == [0, a, 1]
    assert load("<s> $A", "<s>", "<s>").encode("a") == [0, a]  # BOS equal to EOS: still added
    assert load("$A </s>", "</s>", "</s>").encode("a") == [a, 1]  # not a BOS
    assert load(None, "<s>", "</s>").encode("a") == [a]
    assert load("<s> $A </s>", "<s>", "</s>", add_bos_token=False, add_eos_token=False).encode("a") == [a]
    assert load("<s> $A", "<s>", "</s>", add_bos_token=None).encode("a") == [0, a]  # null: not said, as gguf-py reads
    tok = load(None, "<s>", "<s>", add_bos_token=True)
    end, sep = len(vocab), len(vocab) + 1  # <|im_end|>, <|file_sep|>
    assert tok.encode("a") == [0, a] and {end, sep} <= tok.special_ids & tok.stop_ids
    assert tok.encode("a<|im_end|>") == [0, a, end] and end not in tok.encode("a<|im_end|>", special=False)
    assert tok.decode([a, end]) == "a"


def _fields(reader):
    """Every header field as gguf-py describes it: offset, name, types, data indices, parts' bytes, contents."""
    return [(f.offset, f.name, f.types, f.data, [(p.dtype, p.shape, p.tobytes()) for p in f.parts], f.contents())
            for f in reader.fields.values()]


def test_header_fast_path_matches_gguf_py(tmp_path):
    """The loader's reader splits arrays of strings and scalars in one loop: the same fields as gguf-py's own
    reader, part by part, on the default model's header (vocabulary, merges, token types) and on a file with every
    kind of array, nested and empty ones included."""
    from gguf import GGUFReader, GGUFValueType
    from engine.loader import open_gguf, resolve
    path = str(tmp_path / "arrays.gguf")
    wr = GGUFWriter(path, "llama")
    wr.add_array("t.strings", ["", "a", "\u00e9t\u00e9", "x" * 300])
    wr.add_array("t.empty", [])
    wr.add_array("t.ints", [3, -1, 7])
    wr.add_array("t.floats", [0.5, -2.0])
    wr.add_array("t.bools", [True, False])
    wr.add_array("t.nested", [[1, 2], ["u", "v"]])
    wr.add_key_value("t.u8", 7, GGUFValueType.UINT8)
    wr.add_string("t.s", "s")
    wr.add_tensor("w", np.ones((2, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    for p in (path, resolve(None)):
        fast, ref = open_gguf(p), GGUFReader(p)
        assert _fields(fast) == _fields(ref)
        assert [(t.name, t.data_offset) for t in fast.tensors] == [(t.name, t.data_offset) for t in ref.tensors]
    head = open(resolve(None), "rb").read(1 << 21)  # the vocabulary and merges lie in the first 2 MB
    for cut, why in ((100_000, "truncated or corrupt GGUF: its header"), (1_000_000, "truncated or corrupt GGUF: its "
                     "header"), (1 << 21, "truncated GGUF: the data of tensor token_embd.weight runs past the end")):
        (tmp_path / "cut.gguf").write_bytes(head[:cut])
        with pytest.raises(HotcoldError, match=f"cut.gguf: {why} .*{cut} bytes"):
            open_gguf(str(tmp_path / "cut.gguf"))
    whole = open(path, "rb").read()  # cut in the tensor data: the tensor named, not numpy's IndexError
    (tmp_path / "cut.gguf").write_bytes(whole[:-40])
    with pytest.raises(HotcoldError, match=f"cut.gguf: truncated GGUF: the data of tensor w runs past the end of the "
                       rf"file \({len(whole) - 40} bytes\)$"):
        open_gguf(str(tmp_path / "cut.gguf"))


# --- rope scaling and the tensors llama.cpp's llama graph has no place for -----------------------------------
def test_rope_tables_scale_positions_and_divide_frequencies():
    """llama.cpp's angle for pair i at position p: p / factor * base^(-2i/d) / rope_freqs[i]."""
    from dataclasses import replace
    c = tiny_config()  # head_dim 16: 8 pairs
    freqs = tuple(float(f) for f in np.linspace(1.0, 8.0, c.head_dim // 2))
    p, i = np.arange(64)[:, None], np.arange(c.head_dim // 2)[None, :]
    for cfg, scale, f in ((c, 1.0, 1.0), (replace(c, rope_scale=4.0), 4.0, 1.0),
                          (replace(c, rope_freqs=freqs), 1.0, np.array(freqs))):
        ang = p / scale * c.rope_base ** (-2.0 * i / c.head_dim) / f
        cos, sin = cfg.rope_tables(64)
        assert np.allclose(cos, np.cos(ang), atol=1e-6) and np.allclose(sin, np.sin(ang), atol=1e-6)


def test_rope_scaling_is_read_from_gguf_and_hf_and_exported(tmp_path, capsys):
    from gguf import GGUFValueType as VT

    from engine.loader import load_checkpoint
    c = tiny_config()
    w = tiny_weights(c, seed=4)
    plain = write_gguf(str(tmp_path / "plain.gguf"), c, w)
    freqs = np.linspace(1.0, 8.0, c.head_dim // 2).astype(np.float32)
    llama31 = write_gguf(str(tmp_path / "llama31.gguf"), c, {**w, "rope_freqs.weight": freqs})
    linear = rewrite_gguf(plain, str(tmp_path / "linear.gguf"), {"llama.rope.scaling.type": ("linear", VT.STRING),
                                                               "llama.rope.scaling.factor": (4.0, VT.FLOAT32)})
    unscaled = rewrite_gguf(linear, str(tmp_path / "none.gguf"), {"llama.rope.scaling.type": ("none", VT.STRING)})
    assert load_checkpoint(llama31).config.rope_freqs == tuple(freqs.tolist())
    assert load_checkpoint(linear).config.rope_scale == 4.0 and load_checkpoint(unscaled).config.rope_scale == 1.0
    ids = list(range(2, 40))
    base = load(plain, n_ctx=64, backend="torch").logits(ids)
    for path in (llama31, linear):
        torch_logits = load(path, n_ctx=64, backend="torch").logits(ids)
        assert float((torch_logits - base).abs().max()) > 0.01  # the scaling reaches the logits
        kernels = load(path, n_ctx=64)  # the kernels' decode steps read the same tables
        kernels.logits(ids[:-1])
        step = kernels.net.forward(ids[-1:], len(ids) - 1)
        assert float((step - torch_logits[-1]).norm() / torch_logits[-1].norm()) < 0.03
    # an HF directory's llama3 rope_scaling gives Llama 3's factors; export writes them as rope_freqs
    hf = write_hf(str(tmp_path / "hf"), c, w)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    got = load_checkpoint(hf).config.rope_freqs
    wavelen = 2 * math.pi * c.rope_base ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    assert got[0] == 1.0 and got[-1] == 8.0  # short waves kept, long ones (beyond 64 positions) stretched 8x
    mid = [k for k, wl in enumerate(wavelen) if 16 < wl < 64]  # between 64 / high_freq_factor and 64 / low
    assert mid and all(1.0 < got[k] < 8.0 for k in mid) and list(got) == sorted(got)
    assert main(["export", "-m", hf, "-o", str(tmp_path / "hf_out"), "--format", "gguf"]) == 0
    back = load_checkpoint(str(tmp_path / "hf_out.gguf")).config
    assert np.allclose(back.rope_freqs, got) and back.rope_scale == 1.0
    capsys.readouterr()


def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path, capsys):
    """Biases, experts, partial rotary, other head sizes, yarn and a vocabulary the token list does not cover loaded
    and computed another model without a word; llama.cpp refuses each (or computes it: hotcold does not)."""
    from gguf import GGUFValueType as VT
    from safetensors.numpy import save_file
    c = tiny_config()
    w = tiny_weights(c, seed=4)
    good = write_gguf(str(tmp_path / "good.gguf"), c, w)
    bias = write_gguf(str(tmp_path / "bias.gguf"), c, {**w, "blk.0.attn_output.bias": np.ones(c.n_embd, np.float32)})
    assert_one_line(*run_cli(capsys, "tokenize", "-m", bias, "hi"), "tensor blk.0.attn_output.bias has no place")
    q_only = write_gguf(str(tmp_path / "q.gguf"), c, {**w, "blk.0.attn_q.bias": np.ones(c.n_embd, np.float32)})
    assert_one_line(*run_cli(capsys, "tokenize", "-m", q_only, "hi"), "missing tensor blk.0.attn_k.bias")  # q, k, v
    assert main(["inspect", bias]) == 0  # what hotcold refuses to run, inspect still shows, saying why
    assert "hotcold does not run it: " in capsys.readouterr().out
    for key, value, words in (("expert_count", 4, "no mixture of experts"),
                              ("rope.dimension_count", 8, "heads of 16 dimensions"),
                              ("attention.key_length", 32, "heads of 16 dimensions")):
        bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {f"llama.{key}": (value, VT.UINT32)})
        assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"), f"llama.{key} is {value}", words)
    bad = rewrite_gguf(good, str(tmp_path / "yarn.gguf"), {"llama.rope.scaling.type": ("yarn", VT.STRING)})
    assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"), "llama.rope.scaling.type is 'yarn'")
    from engine.loader import open_gguf
    tokens = list(open_gguf(good).fields["tokenizer.ggml.tokens"].contents())
    bad = rewrite_gguf(good, str(tmp_path / "short.gguf"), {"tokenizer.ggml.tokens": (tokens[:-3], VT.ARRAY)})
    assert_one_line(*run_cli(capsys, "tokenize", "-m", bad, "hi"),
                    f"tokenizer.ggml.tokens holds {len(tokens) - 3} tokens, the model's vocabulary {c.n_vocab}")
    # Hugging Face: an attention bias (Qwen-style), another rope scaling, another head size
    hf = write_hf(str(tmp_path / "hf"), c, w)
    save_file({"model.layers.0.self_attn.q_proj.bias": np.ones(c.n_embd, np.float32)},
              os.path.join(hf, "model-bias.safetensors"))
    assert_one_line(*run_cli(capsys, "tokenize", "-m", hf, "hi"), "tensor blk.0.attn_q.bias has no place")
    os.remove(os.path.join(hf, "model-bias.safetensors"))
    # another program's file beside the shards (Mistral's own consolidated.safetensors, a LoRA adapter) is not ours
    save_file({"layers.0.attention.wq.weight": np.ones((2, 2), np.float32)},
              os.path.join(hf, "consolidated.safetensors"))
    assert run_cli(capsys, "tokenize", "-m", hf, "hi")[0] == 0
    cfg = json.load(open(os.path.join(hf, "config.json")))
    for change, words in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling {'rope_type': 'yarn'"),
                          ({"rope_scaling": {"rope_type": "llama3", "factor": 0.0}}, "high_freq_factor > low_freq"),
                          ({"head_dim": 32}, "head_dim is 32; hotcold computes heads of hidden_size")):
        json.dump({**cfg, **change}, open(os.path.join(hf, "config.json"), "w"))
        assert_one_line(*run_cli(capsys, "tokenize", "-m", hf, "hi"), "config.json", words)
