"""`hotcold calibrate` and `--sparsity`: thresholds for a target or a perplexity bound, refused on other models,
applied in the FFN path of every command."""
import json
import math
import os

import pytest

from engine.api import load
from engine.config import HotcoldError
from engine.sparsity import SparsityConfig
from tiny_model import tiny_models
from tools.calibrate import calibrate, split_corpus
from tools.cli import main

CTX = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("tiny")), (("silu", 0), ("silu", 1), ("relu", 0)))


def cli_calibrate(tiny, out, *goal, model=("silu", 0)):
    out = [str(out)] if str(out).startswith("--out=") else ["-o", str(out)]
    return main(["calibrate", "-m", tiny[0][model], "-f", tiny[1], *goal, "--tokens", "96", "--heldout-tokens",
                 "128", "--ctx", str(CTX), *out, "-t", "1", "--json", "--backend", "torch"])


def test_target_sparsity_and_refusal_on_another_model(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "home" / "configs" / "s.json"  # its directory is made; ~ expanded after --out= too
    assert cli_calibrate(tiny, "--out=~/configs/s.json", "--target-sparsity", "0.5") == 0
    res = json.loads(capsys.readouterr().out)
    model = open(tiny[0]["silu", 0], "rb").read()
    assert cli_calibrate(tiny, tiny[0]["silu", 0], "--target-sparsity", "0.5") == 2  # -o onto the model
    assert "exists and is not a sparsity config; not replaced" in capsys.readouterr().err
    assert open(tiny[0]["silu", 0], "rb").read() == model
    assert set(res) >= {"sparsity", "ppl_dense", "ppl_sparse", "cett"}
    assert abs(res["sparsity"] - 0.5) < 0.1 and 0 < res["cett"] < 1
    cfg = json.loads(out.read_text())
    assert cfg["method"] == "quantile" and len(cfg["thresholds"]) == 2 and min(cfg["thresholds"]) > 0
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]
    # the config applies to its own model in every command, and to no other model
    assert main(["perplexity", "-m", tiny[0]["silu", 0], "-f", tiny[1], "--ctx", str(CTX), "--sparsity",
                 str(out), "--json", "-t", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.3 < res["sparsity"] < 0.7
    lines = tmp_path / "corpus.jsonl"  # .jsonl: the text fields are scored, as calibrate and profile read them
    lines.write_text(json.dumps({"text": open(tiny[1]).read()}) + "\n")
    assert main(["perplexity", "-m", tiny[0]["silu", 0], "-f", str(lines), "--ctx", str(CTX), "--sparsity",
                 str(out), "--json", "-t", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == res
    assert main(["perplexity", "-m", tiny[0]["silu", 0], "-f", str(lines), "--ctx", str(CTX), "--sparsity",
                 str(out), "-t", "1"]) == 0  # the text says the sparsity too
    assert f"perplexity: {res['ppl']:.4f} " in (text := capsys.readouterr().out)
    assert text.rstrip().endswith(f"ctx {CTX}, FFN sparsity {res['sparsity']:.1%})")
    for other in (("silu", 1), ("relu", 0)):
        with pytest.raises(HotcoldError, match=f"{out}: sparsity config of another model"):
            load(tiny[0][other], n_ctx=CTX, threads=1, sparsity=str(out))
        assert main(["perplexity", "-m", tiny[0][other], "-f", tiny[1], "--ctx", str(CTX), "--sparsity",
                     str(out)]) == 2
        err = capsys.readouterr().err
        assert "another model" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    for key, value, why in (("thresholds", [float("inf"), 0.1], "finite numbers >= 0"),  # inf: every neuron skipped
                            ("thresholds", 5, "finite numbers >= 0"),
                            ("fingerprint", "x", "fingerprint is not a JSON object")):
        bad.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(HotcoldError, match=why):
            load(tiny[0]["silu", 0], n_ctx=CTX, threads=1, sparsity=str(bad))


def test_the_same_weights_under_another_rope_or_threshold_are_another_model(tiny, tmp_path, capsys):
    """Sparsity configs, profiles, splits and bundles record the rope and the FATReLU threshold: the same weights with
    Llama 3.1's rope factors, or another threshold, compute other FFN inputs (files written before these keys were
    recorded are checked without them)."""
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from engine.loader import load_checkpoint
    from engine.fingerprint import check_fingerprint, fingerprint
    from predictors.bundle import model_fingerprint
    from tiny_model import tiny_config, tiny_weights, write_gguf
    c = tiny_config("silu")
    freqs = np.linspace(1.0, 8.0, c.head_dim // 2).astype(np.float32)
    scaled = write_gguf(str(tmp_path / "l31.gguf"), c, {**tiny_weights(c, 0), "rope_freqs.weight": freqs})
    out = tmp_path / "s.json"
    assert cli_calibrate(tiny, out, "--target-sparsity", "0.5") == 0  # on the same weights without rope factors
    capsys.readouterr()
    assert main(["perplexity", "-m", scaled, "-f", tiny[1], "--ctx", str(CTX), "--sparsity", str(out), "-t", "1"]) == 2
    assert "s.json: sparsity config of another model (rope 'base 10000.0, scale 1.0, freqs none'" in \
        capsys.readouterr().err
    ckpt = load_checkpoint(scaled)
    for fp in (fingerprint, lambda cf, t: model_fingerprint(SimpleNamespace(config=cf, tensors=t))):
        plain = fp(replace(ckpt.config, rope_freqs=None), ckpt.tensors)
        with pytest.raises(HotcoldError, match="of another model .rope"):
            check_fingerprint(plain, fp(ckpt.config, ckpt.tensors), "p", "profile")
        fat = fp(replace(ckpt.config, act="fatrelu", act_threshold=0.3), ckpt.tensors)
        with pytest.raises(HotcoldError, match="of another model .act_threshold 0.3, this model has 0.05"):
            check_fingerprint(fat, fp(replace(ckpt.config, act="fatrelu", act_threshold=0.05), ckpt.tensors), "p", "x")
        old = {k: v for k, v in plain.items() if k not in ("rope", "act_threshold")}
        check_fingerprint(old, fp(ckpt.config, ckpt.tensors), "p", "profile")  # written before they were recorded


def dense_ppl(path, tokens):
    """Perplexity of tokens on a fresh dense torch model, by hand: chunks of CTX, each begun with BOS (as llama.cpp),
    its tokens CTX/2 + 1 .. CTX - 1 scored from their prefix, batched as perplexity batches it (the first CTX/2
    tokens, then the scored positions: one forward over the chunk rounds in other bits)."""
    ref = load(path, n_ctx=CTX, threads=1, backend="torch")
    assert ref.tokenizer.add_bos and ref.sparsity is None
    nll, n = 0.0, 0
    for k in range(len(tokens) // CTX):
        chunk = [ref.tokenizer.bos_id] + tokens[k * CTX + 1:(k + 1) * CTX]
        ref.logits(chunk[:CTX // 2])
        logp = ref.logits(chunk[CTX // 2:-1], CTX // 2).double().log_softmax(-1)  # (CTX/2 - 1, n_vocab)
        for p in range(CTX // 2, CTX - 1):
            nll, n = nll - float(logp[p - CTX // 2, chunk[p + 1]]), n + 1
    return math.exp(nll / n)


@pytest.mark.parametrize("method", ["quantile", "cett", "greedy"])
def test_ppl_bound_is_met_on_heldout_text(tiny, tmp_path, method):
    model = load(tiny[0]["silu", 0], n_ctx=CTX, threads=1, backend="torch")
    tokens, heldout = split_corpus(model, [tiny[1]], 96, 128, CTX)
    cfg, res = calibrate(model, tokens, heldout, CTX, method, ppl_increase=3.0)
    assert res["ppl_dense"] == pytest.approx(dense_ppl(tiny[0]["silu", 0], heldout), rel=1e-9)
    assert res["ppl_sparse"] <= res["ppl_dense"] * 1.03 and res["sparsity"] > 0.05
    path = str(tmp_path / "s.json")
    cfg.save(path)
    again = load(tiny[0]["silu", 0], n_ctx=CTX, threads=1, backend="torch", sparsity=path)
    assert again.perplexity(heldout, CTX)["ppl"] == pytest.approx(res["ppl_sparse"], rel=1e-9)
    assert again.perplexity(heldout, CTX)["sparsity"] == pytest.approx(res["sparsity"], abs=1e-9)


def test_generate_with_sparsity_on_both_backends(tiny, tmp_path, capsys):
    """The same tokens from both backends under a sparsity config; generate's text and bench report the measured
    sparsity."""
    model = load(tiny[0]["silu", 0], n_ctx=64, threads=1, backend="torch")
    path = str(tmp_path / "s.json")
    SparsityConfig([0.05, 0.05], model.fingerprint, "manual").save(path)
    ids = model.tokenize("the cat sat on")
    outs = []
    for backend in ("torch", "kernels"):
        m = load(tiny[0]["silu", 0], n_ctx=64, threads=1, backend=backend, sparsity=path)
        out = m.generate(ids, 8, ignore_stop=True)
        assert 0.2 < out.stats["sparsity"] < 0.9
        outs.append(out.token_ids)
    assert outs[0] == outs[1]  # the kernel decode skips the same neurons as the torch path zeroes
    assert main(["generate", "-m", tiny[0]["silu", 0], "-p", "the cat", "-n", "4", "--sparsity", path, "-t", "1"]) == 0
    assert " | FFN sparsity " in capsys.readouterr().err
    assert main(["bench", "-m", tiny[0]["silu", 0], "-n", "4", "--prompt-tokens", "4", "--sparsity", path, "-t", "1",
                 "--json"]) == 0
    from tools.bench import format_bench
    res = json.loads(capsys.readouterr().out)
    assert 0.2 < res["sparsity"] < 0.9 and f"FFN sparsity {res['sparsity']:.1%}" in format_bench(res)


def test_bad_configs_are_refused(tiny, tmp_path):
    fp = load(tiny[0]["silu", 0], n_ctx=CTX, threads=1, backend="torch").fingerprint
    cases = {"garbage": "{not json", "list": "[1, 2]", "no thresholds": json.dumps({"fingerprint": fp}),
             "short": json.dumps({"thresholds": [0.1], "fingerprint": fp}),
             "negative": json.dumps({"thresholds": [0.1, -1], "fingerprint": fp})}
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(HotcoldError, match=str(path)):
            SparsityConfig.load(str(path), fp)
    with pytest.raises(HotcoldError, match="no such file"):
        SparsityConfig.load(str(tmp_path / "missing.json"), fp)


def test_interrupted_calibrate_resumes(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the search, then the same command: the evaluations done before are read back from
    OUT.progress.json rather than computed again, and the config is the one an uninterrupted run writes."""
    import tools.calibrate as cal
    real, searched = cal.Heldout.score, []  # searched: one entry per sparse evaluation computed

    def counting(self, model, cfg, steps=False):
        searched.extend([cfg] if cfg is not None else [])
        return real(self, model, cfg, steps)

    def interrupted(self, model, cfg, steps=False):
        if cfg is not None and len(searched) == 3:
            raise KeyboardInterrupt
        return counting(self, model, cfg, steps)

    full, out = tmp_path / "full.json", tmp_path / "s.json"
    monkeypatch.setattr(cal.Heldout, "score", counting)
    assert cli_calibrate(tiny, full, "--ppl-increase", "3") == 0
    n = len(searched)
    assert n >= 5
    searched.clear()
    monkeypatch.setattr(cal.Heldout, "score", interrupted)
    assert cli_calibrate(tiny, out, "--ppl-increase", "3") == 130
    progress = str(out) + ".progress.json"
    saved = json.load(open(progress))
    assert not out.exists() and len(saved["results"]) == 3
    first = next(iter(saved["results"]))
    saved["results"][first] = {"ppl": "abc"}  # a damaged entry is computed again, the others are read
    open(progress, "w").write(json.dumps(saved))
    searched.clear()
    capsys.readouterr()
    monkeypatch.setattr(cal.Heldout, "score", counting)
    assert cli_calibrate(tiny, out, "--ppl-increase", "3") == 0
    assert len(searched) == n - 2
    assert f"{progress}: saved evaluations unreadable: 1; computed again" in capsys.readouterr().err
    assert json.loads(out.read_text())["thresholds"] == json.loads(full.read_text())["thresholds"]
    assert not os.path.exists(progress)
    open(progress, "w").write("{garbage")  # unreadable as a whole: said, and started over
    capsys.readouterr()
    searched.clear()
    assert cli_calibrate(tiny, out, "--ppl-increase", "3") == 0 and len(searched) == n
    assert f"{progress}: not a calibrate progress file (invalid JSON" in capsys.readouterr().err
    searched.clear()  # stopped again, then run with another seed: its evaluations are not taken, and that is said
    monkeypatch.setattr(cal.Heldout, "score", interrupted)
    assert cli_calibrate(tiny, out, "--ppl-increase", "3") == 130 and os.path.exists(progress)
    searched.clear()
    monkeypatch.setattr(cal.Heldout, "score", counting)
    capsys.readouterr()
    assert cli_calibrate(tiny, out, "--ppl-increase", "3", "--seed", "5") == 0 and len(searched) == n
    assert f"{progress}: saved by a search with other settings (seed): started over" in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_the_work(tiny, tmp_path, capsys):
    a_file, a_dir = tmp_path / "file", tmp_path / "dir"
    a_file.write_text("x")
    a_dir.mkdir()
    for out, why in ((a_dir, "is a directory"), (a_file / "s.json", "exists and is not a directory")):
        assert cli_calibrate(tiny, out, "--target-sparsity", "0.5") == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err and "Traceback" not in err, err
    assert main(["calibrate", "-m", tiny[0]["silu", 0], "-f", str(tmp_path / "nosuch.txt"), "--ctx", str(CTX),
                 "--target-sparsity", "0.5", "-o", str(tmp_path / "new" / "deeper" / "s.json")]) == 2
    assert "nosuch.txt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a refused command makes no folders
    bundle = ("--predictors", str(tmp_path / "bundle"))  # options that do nothing there: refused, before loading
    for args, why in (((*bundle, "--target-sparsity", "0.5"), "--predictors takes --ppl-increase"),
                      ((*bundle, "--ppl-increase", "1", "--method", "cett"), "--method cett: with --predictors"),
                      (("--target-sparsity", "0.5", "--force"), "--force: overwrites a bundle")):
        assert cli_calibrate(tiny, tmp_path / "out", *args) == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corpus_too_short_for_both_parts(tiny, tmp_path, capsys):
    assert main(["calibrate", "-m", tiny[0]["silu", 0], "-f", tiny[1], "--target-sparsity", "0.5", "--tokens",
                 "4096", "--ctx", str(CTX), "-o", str(tmp_path / "s.json")]) == 2
    assert "fewer than --tokens 4096" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
    model = load(tiny[0]["silu", 0], n_ctx=CTX, backend="torch")  # held-out text alone (--predictors): --tokens
    stats, heldout = split_corpus(model, [tiny[1]], 0, 128, CTX)  # does not count
    assert stats == [] and heldout == split_corpus(model, [tiny[1]], 96, 128, CTX)[1]


@pytest.mark.slow
def test_smollm2_ppl_bound_holds_on_heldout_text(data_dir, tmp_path):
    """SmolLM2 calibrated on tiny-shakespeare: the config keeps held-out perplexity within 2% of dense."""
    model = load(None, n_ctx=256, threads=2, backend="torch")
    tokens, heldout = split_corpus(model, [os.path.join(data_dir, "tinyshakespeare.txt")], 512, 1024, 256)
    cfg, res = calibrate(model, tokens, heldout, 256, "quantile", ppl_increase=2.0)
    assert res["ppl_sparse"] <= res["ppl_dense"] * 1.02 and res["sparsity"] > 0.3
    path = str(tmp_path / "s.json")
    cfg.save(path)
    model.set_sparsity(path)
    again = model.perplexity(heldout, 256)
    assert again["ppl"] <= res["ppl_dense"] * 1.02 and again["sparsity"] == pytest.approx(res["sparsity"])


def test_predictor_thresholds_tuned_to_a_perplexity_bound(tiny, tmp_path, capsys):
    """calibrate --predictors: one offset on every layer's threshold, as large as the bound allows on held-out text
    scored through the predictor runtime; the written bundle reproduces that perplexity when it runs."""
    from predictors.bundle import load_bundle, model_fingerprint
    from test_hybrid import gate_bundle
    path = tiny[0]["relu", 0]
    model = load(path, n_ctx=CTX)
    gate_bundle(model, rank=8).save(str(tmp_path / "b"))
    found = {}
    for p in (2, 20):
        out = tmp_path / f"b{p}"
        assert main(["calibrate", "-m", path, "-f", tiny[1], "--predictors", str(tmp_path / "b"), "--ppl-increase",
                     str(p), "--tokens", "96", "--heldout-tokens", "128", "--ctx", str(CTX), "-o", str(out), "-t",
                     "1", "--json"]) == 0
        res = found[p] = json.loads(capsys.readouterr().out)
        assert res["ppl_sparse"] <= res["ppl_dense"] * (1 + p / 100) and 0 < res["predicted_sparsity"] < 1
        tuned = load_bundle(str(out), model_fingerprint(model.ckpt))
        assert tuned.training["ppl_tuned"]["offset"] == res["offset"]
        m = load(path, n_ctx=CTX, predictors=str(out))
        _, heldout = split_corpus(m, [tiny[1]], 96, 128, CTX)
        assert m.perplexity(heldout, ctx=CTX)["ppl"] == pytest.approx(res["ppl_sparse"], rel=1e-9)
    assert found[20]["predicted_sparsity"] >= found[2]["predicted_sparsity"]  # a looser bound skips more
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".progress.json")]  # gone once the bundle is written
    again = ["calibrate", "-m", path, "-f", tiny[1], "--predictors", str(tmp_path / "b"), "--ppl-increase", "2",
             "--tokens", "96", "--heldout-tokens", "128", "--ctx", str(CTX), "-o", str(tmp_path / "b2"), "-t", "1"]
    assert main(again) == 2
    assert "b2: a bundle is already there (--force overwrites it)" in capsys.readouterr().err
    (tmp_path / "b2.progress.json").write_text("{}")  # what a run with --force killed before it was removed leaves
    assert main(again) == 2
    assert (f"b2: a bundle is already there, with {tmp_path / 'b2.progress.json'} of a stopped run beside it "
            "(--force resumes that run if it had these settings)") in capsys.readouterr().err
    os.remove(tmp_path / "b2.progress.json")
    assert main(["calibrate", "-m", path, "-f", tiny[1], "--predictors", str(tmp_path / "b"), "--target-sparsity",
                 "0.5", "-o", str(tmp_path / "x"), "--ctx", str(CTX), "--tokens", "96", "--heldout-tokens",
                 "128"]) == 2
    assert "--ppl-increase" in capsys.readouterr().err
    prof = tmp_path / "prof"  # --force overwrites a bundle, never a directory of something else
    (prof / "activation").mkdir(parents=True)
    (prof / "manifest.json").write_text("{}")
    assert main(["calibrate", "-m", path, "-f", tiny[1], "--predictors", str(tmp_path / "b"), "--ppl-increase", "2",
                 "-o", str(prof), "--force", "--ctx", str(CTX), "--tokens", "96", "--heldout-tokens", "128"]) == 2
    assert "prof: holds 'activation', so it is not a predictor bundle" in capsys.readouterr().err
    assert sorted(os.listdir(prof)) == ["activation", "manifest.json"] and (prof / "manifest.json").read_text() == "{}"
