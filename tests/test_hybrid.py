"""The predictor-driven runtime (engine/hybrid.py): dense equivalence, the hot part on a second device, audit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine.api import load
from engine.config import HotcoldError, blk
from predictors.bundle import Bundle, model_fingerprint
from predictors.metrics import layer_metrics
from predictors.model import Predictor, gate_map
from tiny_model import tiny_config, tiny_weights, write_gguf
from tools.predict import weight_bytes
from tools.bench import decode_speed, format_bench

TEXT = "the cat in a hat sat on the mat and the hat in the tin sat on a cat in the heat"


def tiny_path(tmp_path, act="relu", qtype=QT.Q8_0) -> str:
    c = tiny_config(act, n_layer=3)
    return write_gguf(str(tmp_path / f"{act}-{qtype.name}.gguf"), c, tiny_weights(c, seed=7), qtype)


def gate_bundle(model, rank: int = 16, threshold: float = 0.0) -> Bundle:
    """Predictors from the SVD of each layer's gate map: good, not perfect, so recall is below 1."""
    t = model.ckpt.tensors
    preds = [Predictor.from_linear(gate_map(t[blk(i, "ffn_gate")].dequantize(), t[blk(i, "ffn_norm")].dequantize()),
                                   rank) for i in range(model.config.n_layer)]
    return Bundle(preds, [threshold] * len(preds), model_fingerprint(model.ckpt))


def all_active_bundle(model) -> Bundle:
    """fc1 = 0: every logit is 0 >= threshold 0, so every neuron is predicted active."""
    c = model.config
    preds = [Predictor.from_weights(torch.zeros(4, c.n_embd), torch.ones(c.n_ff, 4)) for _ in range(c.n_layer)]
    return Bundle(preds, [0.0] * c.n_layer, model_fingerprint(model.ckpt))


def chunk_of(model, n: int = 40) -> list[int]:
    ids = model.tokenize(TEXT, special=False, add_bos=False)
    return (ids * (n // len(ids) + 1))[:n]


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_all_active_predictors_give_dense_logits(tmp_path, act):
    path = tiny_path(tmp_path, act)
    dense, sparse = load(path, n_ctx=64), load(path, n_ctx=64)
    sparse.set_predictors(all_active_bundle(sparse))
    chunk = chunk_of(dense)
    ref, got = dense.scored_logits(chunk, 20), sparse.scored_logits(chunk, 20)  # dense: batched; sparse: decode
    assert got.shape == ref.shape == (19, dense.config.n_vocab)
    assert float((got - ref).norm() / ref.norm()) < 0.03  # batched torch vs kernel decode, as in test_engine
    stats = sparse.runtime.stats()
    assert stats["tokens"] == 19 and stats["predicted_sparsity"] == 0.0  # each scored token a decode step


def hot_part_error(model, hot: list[np.ndarray], device: str) -> float:
    """The largest relative difference over layers between a HotPart on `device` (launch, then collect) and the CPU
    kernels' FFN over the same neurons, for random inputs with a random half of the hot neurons marked active; two
    tokens a layer (on CUDA the first captures the layer's graph, the second replays it on new inputs)."""
    from engine.hybrid import HotPart
    net, c = model.net, model.config
    part, rng, worst = HotPart(net, hot, device), np.random.default_rng(0), 0.0
    for i, L in [(i, L) for i, L in enumerate(net.layers) for _ in range(2)]:
        xn = rng.standard_normal(c.n_embd).astype(np.float32)
        on = rng.random(len(hot[i])) < 0.5
        part.mask_np[i][:] = on
        got, want = np.zeros(c.n_embd, np.float32), np.zeros(c.n_embd, np.float32)
        part.launch(i, xn)
        part.collect(got)
        net.ffn(L, xn, want, hot[i][on])
        worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return worst


def test_stage_x_rounds_as_the_kernels_do():
    """The hot part's x, rounded on the CPU (stage_x), is the kernels' own 8-bit x to the bit: the values their
    x scratch holds after a matvec on a block-quantized matrix (q times the block's scale; a K-quant's scales are
    multiples of a unit a super-block: `kernels.x_blocks`); unrounded for F16 (per 0)."""
    from engine import kernels as K
    from engine.hybrid import stage_x
    from engine.qtensor import QTensor
    from tests.test_kernels import super_source
    rng = np.random.default_rng(3)
    for qtype in (QT.Q8_0, QT.Q4_K):
        qt = super_source(rng, 8, 512, qtype) if qtype == QT.Q4_K else QTensor.from_float(
            rng.standard_normal((8, 512)), qtype)
        w = K.prepare(qt)
        per = K.x_blocks(w)
        assert per == (8 if qtype == QT.Q4_K else 1)
        X = tuple(np.zeros_like(a) for a in w.X)
        for scale in (1e-3, 1.0, 300.0):
            x = (rng.standard_normal(512) * scale).astype(np.float32)
            x[:64] *= np.float32(0.01)  # (two blocks of a K-quant's x well under their super-block's unit's 32)
            K.matvec(w, x, np.zeros(8, np.float32))
            xq, xd = w.X[1], w.X[2]
            got = np.zeros(512, np.float32)
            stage_x(x, X, per, got)
            assert np.array_equal(got, xq.astype(np.float32) * np.repeat(xd, 32)) and not np.array_equal(got, x)
            stage_x(x, X, 0, got)
            assert np.array_equal(got, x)


def test_hot_part_of_a_plain_ffn(tmp_path):
    """A FFN without a gate (h = act(up x)): the hot part's one matrix product is the up rows alone."""
    c = tiny_config("relu", n_layer=2, ffn_gated=False)
    model = load(write_gguf(str(tmp_path / "plain.gguf"), c, tiny_weights(c, seed=5), QT.Q8_0), n_ctx=64)
    hot = [np.arange(1, c.n_ff, 3, dtype=np.int32)] * c.n_layer
    assert model.net.layers[0].gate is None and hot_part_error(model, hot, "cpu") < 1e-5


def test_hot_part_on_a_second_device_matches_all_cpu(tmp_path):
    path = tiny_path(tmp_path)
    cpu, hybrid = load(path, n_ctx=64), load(path, n_ctx=64)
    bundle = gate_bundle(cpu, threshold=0.02)
    rng = np.random.default_rng(0)
    hot = [np.sort(rng.choice(cpu.config.n_ff, cpu.config.n_ff // 2, replace=False)).astype(np.int32)
           for _ in range(cpu.config.n_layer)]
    cpu.set_predictors(bundle)
    hybrid.set_predictors(bundle, hot, "cpu")
    chunk = chunk_of(cpu)
    a, b = cpu.scored_logits(chunk, 20), hybrid.scored_logits(chunk, 20)
    err = ((a - b).norm(dim=1) / a.norm(dim=1)).numpy()  # per position
    # the two parts sum in another order, so a logit within ~1e-7 of its threshold can flip one neuron now and then
    assert np.median(err) < 1e-5 and err.max() < 1e-2
    sa, sb = cpu.runtime.stats(), hybrid.runtime.stats()
    assert abs(sa["predicted_sparsity"] - sb["predicted_sparsity"]) < 1e-3 and sa["predicted_sparsity"] > 0.3
    assert sa["gpu_share"] == 0.0 and 0.3 < sb["gpu_share"] < 0.7  # half the neurons are hot
    dense = load(path, n_ctx=64).scored_logits(chunk, 20)
    assert float((a - dense).norm() / dense.norm()) > 1e-3  # and skipping them changes the logits
    assert hot_part_error(cpu, hot, "cpu") < 1e-5  # the hot part alone: float32 torch against the kernels


def test_audit_recall_equals_brute_force(tmp_path):
    path = tiny_path(tmp_path, qtype=QT.F32)  # F32 weights and KV cache: kernel decode and torch agree to rounding
    model = load(path, n_ctx=64, cache_type="f32")
    bundle = gate_bundle(model, rank=8, threshold=0.05)
    model.set_predictors(bundle, audit=True)
    chunk, start = chunk_of(model), 20
    model.scored_logits(chunk, start)
    stats = model.runtime.stats()
    run = model.runtime.running  # the predictors as the kernels hold them (Q8_0), dequantized
    # brute force: the torch reference with the same predictor masks, all positions at once, true masks h != 0
    ref = load(path, n_ctx=64, backend="torch")
    seen = {}

    def hook(i, x, h):  # x (T, n_embd), h (T, n_ff): keep both, then skip what the predictors skip
        seen[i] = x.clone(), h.clone()
        return h * run.active(i, x)

    ref.net.ffn_hook = hook
    ref.net.forward(chunk[:-1], 0)
    decoded = slice(start, len(chunk) - 1)  # the positions the runtime decoded one at a time: the scored ones
    assert stats["tokens"] == decoded.stop - decoded.start
    for i, m in enumerate(stats["per_layer"]):
        x, h = seen[i][0][decoded], seen[i][1][decoded]
        brute = layer_metrics(run.active(i, x), h != 0)
        for k in ("recall", "precision", "predicted_sparsity", "actual_sparsity"):
            assert m[k] == pytest.approx(brute[k], abs=1e-9), (i, k)
    assert 0.5 < stats["recall"] < 1.0  # imperfect predictors, so the audit has something to find


@pytest.mark.parametrize("qtype,trained,agree", [("F16", "F16", 1.0), ("Q8_0", "F16", 0.99),
                                                 ("Q4_1", "Q4_1", 0.999), ("Q8_0", "Q8_0", 0.999)])
def test_predictor_types_keep_the_bundles_decisions(tmp_path, qtype, trained, agree):
    """The kernels' copy of the predictors (Q8_0: about half of F16's bytes, Q4_1 a third) decides as the bundle
    does on real FFN inputs, at least `agree` of the neuron/token pairs; batched forwards use that same copy.
    A bundle trained for a type (its weights on that type's grid) runs in it by default, nearly exactly."""
    model = load(tiny_path(tmp_path), n_ctx=64)
    bundle = gate_bundle(model, rank=32, threshold=0.05)
    for p in bundle.predictors:
        p.round_to(trained)  # as bundles store them: float16 values, on the grid of the type trained for
    bundle.training["predictor_type"] = trained
    model.set_predictors(bundle, qtype=None if qtype == trained else qtype)
    rt, xs = model.runtime, {}
    assert rt.qtype == qtype

    def keep(i, x, h):
        xs[i] = x.clone()
        return h

    with model.net.torch.hooked(keep):
        model.logits(chunk_of(model))
    for i, x in xs.items():  # (T, n_embd)
        same = (rt.running.active(i, x) == bundle.active(i, x)).float().mean()
        assert same >= agree, (i, float(same))
        assert rt.fc1[i].qtype.name == qtype and rt.fc2t[i].qtype.name == qtype
    assert sum(m.nbytes for m in rt.fc1 + rt.fc2t) == weight_bytes(qtype) * bundle.n_params


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_predict_split_against_float64(qtype):
    """The decode step's predictor kernel against float64 over the same (dequantized) weights: z = relu(fc1 x),
    logits = fc2 z, and the split of the predicted set into cold ids and the hot mask. x has a mean far from 0,
    so that Q4_1's per-block offsets (which need the sums of x per block) weigh."""
    from engine import kernels as K
    from engine.hybrid import predict_split, predictor_matrix
    rng = np.random.default_rng(3)
    r, E, F = 40, 96, 160
    fc1 = predictor_matrix(torch.tensor(rng.standard_normal((r, E)) * 0.1, dtype=torch.float32), qtype)
    fc2t = predictor_matrix(torch.tensor(rng.standard_normal((r, F)) * 0.1, dtype=torch.float32), qtype)
    assert fc1.qtype.name == ("F32" if qtype == "F16" else qtype)  # random values are not float16 values
    hot_pos = np.full(F, -1, np.int32)
    hot_pos[::4] = np.arange(F // 4)
    z, logit, cold, hot_mask = (np.zeros(r, np.float32), np.zeros(F, np.float32), np.zeros(F, np.int32),
                                np.zeros(F // 4, np.float32))
    for _ in range(3):  # fresh x each time: nothing may carry over from the last call
        x = (rng.standard_normal(E) + 2.0).astype(np.float32)
        thr = np.float32(np.median(logit)) if logit.any() else np.float32(0.0)
        nc, nh = predict_split(fc1.W, fc1.X, fc2t.W, thr, x, hot_pos, z, logit, cold, hot_mask)
        z_ref = np.maximum(K.dequantize_rows(fc1, 0, r).astype(np.float64) @ x, 0)
        logit_ref = K.dequantize_rows(fc2t, 0, r).astype(np.float64).T @ z_ref
        np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-5 * np.abs(z_ref).max())
        np.testing.assert_allclose(logit, logit_ref, rtol=0, atol=1e-5 * np.abs(logit_ref).max())
        active = np.flatnonzero(logit >= thr)
        assert list(cold[:nc]) == [i for i in active if hot_pos[i] < 0]
        hot = [hot_pos[i] for i in active if hot_pos[i] >= 0]
        assert nh == hot_mask.sum() == len(hot) and list(np.flatnonzero(hot_mask)) == hot


def test_perplexity_runs_the_decode_path(tmp_path):
    path = tiny_path(tmp_path)
    dense, sparse = load(path, n_ctx=64), load(path, n_ctx=64)
    sparse.set_predictors(gate_bundle(sparse, threshold=0.02))
    tokens = chunk_of(dense, 96)
    d, s = dense.perplexity(tokens, 32), sparse.perplexity(tokens, 32)
    assert s["stats"]["tokens"] == 3 * 15 and s["sparsity"] == s["stats"]["predicted_sparsity"] > 0.3  # every scored
    short = sparse.perplexity(tokens, 4, chunks=1)  # token through a decode step, the first too (--ctx 4 had none)
    assert short["scored_tokens"] == short["stats"]["tokens"] == 1 and 0 <= short["sparsity"] < 1
    from tools.hellaswag import hellaswag
    task = (sparse.detokenize(tokens[:12]), 0, [sparse.detokenize(tokens[12 + 4 * k:16 + 4 * k]) for k in range(4)])
    h = hellaswag(sparse, [task])
    assert h["stats"]["tokens"] > 0 and h["sparsity"] == h["stats"]["predicted_sparsity"] > 0.3  # as perplexity's
    assert "stats" not in hellaswag(dense, [task]) and "sparsity" not in hellaswag(dense, [task])
    sparse.generate(tokens[:60], n=1)  # a long prompt is prefilled batched: no step, so no statistics, not 100%
    assert sparse.runtime.stats()["tokens"] == 0 and sparse.runtime.stats()["predicted_sparsity"] is None
    assert s["ppl"] != d["ppl"]
    sparse.set_predictors(all_active_bundle(sparse))
    assert sparse.perplexity(tokens, 32)["ppl"] == pytest.approx(d["ppl"], rel=5e-3)  # decode vs batched numerics


def test_refusals(tmp_path):
    path = tiny_path(tmp_path)
    other = load(tiny_path(tmp_path, "silu"), n_ctx=64)
    model = load(path, n_ctx=64)
    with pytest.raises(HotcoldError, match="another model"):
        gate_bundle(other).save(str(tmp_path / "b"))
        model.set_predictors(str(tmp_path / "b"))
    with pytest.raises(HotcoldError, match="kernel backend"):
        load(path, n_ctx=64, backend="torch").set_predictors(gate_bundle(model))
    c = model.config
    for hot, device, why in (([[300]] + [[1]] * (c.n_layer - 1), "cpu", "not increasing ids without repeats"),
                             ([[-1]] + [[1]] * (c.n_layer - 1), "cpu", "not increasing ids"),
                             ([[3.5]] + [[1]] * (c.n_layer - 1), "cpu", "not increasing ids"),
                             ([[2, 1]] + [[1]] * (c.n_layer - 1), "cpu", "not increasing ids"),
                             ([[1]] * c.n_layer, None, "without a device"),
                             ([[1]] * c.n_layer, "tpu", "not a torch device"),
                             ([[1]] * c.n_layer, "meta", "expected cpu, cuda or cuda:N")):
        with pytest.raises(HotcoldError, match=why):
            model.set_predictors(gate_bundle(model), hot, device)
    if not torch.cuda.is_available():
        with pytest.raises(HotcoldError, match="CUDA is not available here"):
            model.set_predictors(gate_bundle(model), [[1]] * c.n_layer, "cuda")
    model.set_predictors(gate_bundle(model))
    with pytest.raises(HotcoldError, match="own sparsity config"):
        model.set_sparsity(str(tmp_path / "any.json"))
    from tools.split import hot_neurons  # --gpu-budget without a recorded profile: refused with or without CUDA
    with pytest.raises(HotcoldError, match="--gpu-budget needs the activation counts"):
        hot_neurons(model, gate_bundle(model), None, 2**30, "auto", 64)
    assert hot_neurons(model, gate_bundle(model), None, 0, "cpu", 64)[1:] == (None, None)  # budget 0: all on the CPU
    from tools.split import write_gpuidx  # PowerInfer's split under another name: read as one, by its magic
    hot = [list(range(0, 64, 2))] * c.n_layer
    write_gpuidx(str(tmp_path / "split.idx"), {"n_layer": c.n_layer, "n_ff": c.n_ff, "gpu_neurons": hot,
                                               "ffn_gpu_bytes": 1})
    got = hot_neurons(model, gate_bundle(model), str(tmp_path / "split.idx"), None, "cpu", 64)[1]
    assert [list(g) for g in got] == hot
    with pytest.raises(HotcoldError, match="a GGUF of architecture 'llama', not a PowerInfer GPU index"):
        hot_neurons(model, gate_bundle(model), model.ckpt.path, None, "cpu", 64)  # the model given as its split


def test_cli_generate_reports_stats(tmp_path):
    path = tiny_path(tmp_path)
    model = load(path, n_ctx=64)
    gate_bundle(model, threshold=0.02).save(str(tmp_path / "bundle"))
    split = {"n_layer": 3, "n_ff": model.config.n_ff, "gpu_neurons": [list(range(0, 128, 2))] * 3}
    (tmp_path / "split.json").write_text(json.dumps(split))
    cmd = [sys.executable, "-m", "tools.cli", "generate", "-m", path, "-p", "the cat", "-n", "12", "--temperature",
           "0", "--json", "--predictors", str(tmp_path / "bundle"), "--audit-recall", "-c", "64", "-t", "1"]
    out = json.loads(subprocess.run(cmd + ["--split", str(tmp_path / "split.json"), "--hot-device", "cpu"],
                                    capture_output=True, text=True, check=True).stdout)
    s = out["stats"]
    for k in ("decode_tok_s", "predicted_sparsity", "gpu_share", "recall", "precision", "actual_sparsity"):
        assert isinstance(s[k], float), k
    assert 0.3 < s["gpu_share"] < 0.7 and len(s["per_layer"]) == 3
    plain = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert plain["token_ids"] == out["token_ids"] and plain["stats"]["gpu_share"] == 0.0
    assert s["hot_device"] == "cpu" and plain["stats"]["hot_device"] is None
    text = subprocess.run([a for a in cmd if a != "--json"] + ["--split", str(tmp_path / "split.json"), "--hot-device",
                                                            "cpu"], capture_output=True, text=True, check=True).stderr
    assert f"FFN neurons computed on the hot device (cpu, in torch): {s['gpu_share']:.1%}, on the CPU kernels" in text
    from tools.cli import format_runtime_stats  # nothing placed on a hot device: no GPU share of 0.0% to read
    assert format_runtime_stats(s).splitlines()[0].split() == ["layer", "recall", "precision", "pred.sp", "act.sp"]
    assert (f"FFN neurons all computed on the CPU kernels (no hot device) ({plain['stats']['tokens']} tokens"
            in format_runtime_stats(plain["stats"]))
    bad = subprocess.run(cmd[:-4] + ["-m", tiny_path(tmp_path, "silu")], capture_output=True, text=True)
    assert bad.returncode == 2 and "another model" in bad.stderr and "Traceback" not in bad.stderr
    # a split that cannot be read is refused on any machine, not only where a GPU would use it (--hot-device auto)
    nosuch = str(tmp_path / "nosuch.json")
    bad = subprocess.run(cmd + ["--split", nosuch], capture_output=True, text=True)
    assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", f"hotcold: error: {nosuch}: no such file\n")


def test_bench_hybrid_with_a_given_bundle(tmp_path, capsys, monkeypatch):
    """bench --hybrid -m MODEL --predictors BUNDLE (a ReLU model: no FATReLU fixture): the bundle's row beside the
    dense decode, with audited recall; the text report shows it."""
    from tools.bench_hybrid import format_hybrid
    from tools.cli import main
    path = tiny_path(tmp_path)
    gate_bundle(load(path, n_ctx=64), threshold=0.02).save(str(tmp_path / "bundle"))
    assert main(["bench", "--hybrid", "-m", path, "--predictors", str(tmp_path / "bundle"), "-n", "4",
                 "--prompt-tokens", "8", "-t", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    g = res["given"]
    assert res["fixture"] == [] and res["gpu"] is None and res["rounds"] == 3 and res["dense_tok_s"] > 0
    runs = []
    monkeypatch.setattr("tools.bench.decode_speed", lambda *a, f=decode_speed: runs.append(1) or f(*a))
    assert main(["bench", "--hybrid", "-m", path, "--predictors", str(tmp_path / "bundle"), "-n", "4",
                 "--prompt-tokens", "8", "-t", "1", "-r", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == 1 and len(runs) == 2  # -r 1: dense and the bundle once
    monkeypatch.undo()
    assert g["decode_tok_s"] > 0 and 0.3 < g["predicted_sparsity"] < 1 and 0 < g["recall"] < 1
    assert f"with predictors {tmp_path / 'bundle'}" in format_hybrid(res)
    assert main(["bench", "--hybrid", "-m", path, "--predictors", str(tmp_path / "bundle"), "--audit-recall"]) == 2
    assert "--audit-recall: bench --hybrid chooses its own" in capsys.readouterr().err
    assert main(["bench", "--hybrid", "-m", path, "--no-predictors"]) == 2
    assert "--no-predictors: bench --hybrid chooses its own" in capsys.readouterr().err
    for argv, why in ((["--hybrid", "--compare"], "--compare: bench --hybrid measures rows of its own"),
                      (["--sparsity-levels", "0.5"], "--sparsity-levels: the sparsities of --compare's rows")):
        assert main(["bench", "-m", path, *argv]) == 2 and why in capsys.readouterr().err  # not silently ignored
    # the context bench takes is what its prompt and tokens fill: all 256 of the model's, past them the flags named
    assert main(["bench", "-m", path, "--prompt-tokens", "252", "-n", "4", "-t", "1", "-r", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["decode_tokens"] == 4 and res["repetitions"] == 3  # llama-bench's -r: the runs' mean and sd
    for key in ("prefill_tok_s", "decode_tok_s"):
        xs = res["samples"][key]
        assert len(xs) == 3 and min(xs) > 0 and res[key] == pytest.approx(sum(xs) / 3)
        assert res[key + "_sd"] == pytest.approx(np.std(xs, ddof=1)) and res[key + "_sd"] > 0
    assert f"at {res['decode_tok_s']:.1f} ± {res['decode_tok_s_sd']:.1f} tok/s," in format_bench(res)
    assert "(3 runs: mean ± sd)" in format_bench(res)
    one = dict(res, repetitions=1, prefill_tok_s_sd=0.0, decode_tok_s_sd=0.0)
    assert "±" not in format_bench(one) and f"at {res['decode_tok_s']:.1f} tok/s," in format_bench(one)
    with pytest.raises(SystemExit) as e:
        main(["bench", "-m", path, "-r", "0"])
    assert e.value.code == 2 and "-r/--repetitions: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["bench", "-m", path, "--prompt-tokens", "253", "-n", "4"]) == 2
    assert "trained on (bench's context: --prompt-tokens 253 + -n 4)" in capsys.readouterr().err
    assert main(["generate", "-m", path, "-p", "hi", "-n", "1", "--hot-device", "cpu"]) == 2  # no predictors
    assert "--hot-device goes with --predictors" in capsys.readouterr().err
    # plain bench with predictors: their statistics beside the speed, and the first token timed with them too, in a
    # new process that reads the paths as given here (relative ones too); the speed is timed without the audit, whose
    # true active sets are computed in one more run alone
    from engine.sparsity import KernelSelector
    truths = []
    monkeypatch.setattr(KernelSelector, "__call__", lambda self, i, x, xn, f=KernelSelector.__call__: truths.append(i)
                        or f(self, i, x, xn))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "-m", os.path.basename(path), "--predictors", "bundle", "--audit-recall", "-n", "4",
                 "--prompt-tokens", "8", "-t", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    p = res["predictors"]
    assert len(truths) == len(p["per_layer"]) * p["tokens"] and p["tokens"] > 0  # as generate's statistics
    assert 0.3 < p["predicted_sparsity"] < 1 and 0 < p["recall"] < 1 and p["gpu_share"] == 0.0
    assert res["ttft_s"] > 0 and 0 < res["model_rss_bytes"] <= res["run_rss_bytes"]
    assert "MB after decoding" in format_bench(res) and p["hot_device"] is None
    assert "gpu share" not in format_bench(res) and "hot part on" not in format_bench(res)
    assert format_bench(res).split("predictors: ")[1].splitlines()[0].endswith(" (all on the CPU kernels)")
    assert "recall" in (text := format_bench(dict(res, predictors=dict(p, hot_device="cpu"))))
    assert text.split("predictors: ")[1].splitlines()[0].endswith(" (the hot part on cpu)")
    none = dict(res, predictors=dict.fromkeys(p))  # -n 1 after a batched prompt: no decode step, null rates
    assert "predictors: no decode step, no statistics" in format_bench(none)
    dense = load(path, n_ctx=32).decode_bytes_per_token()  # the bytes a step reads: the active rows and the predictors
    assert dense * (1 - p["predicted_sparsity"]) / 3 < res["bytes_per_token"] < dense


def offload_sequence(m, chunk: list[int]) -> torch.Tensor:
    """Logits of: 20 tokens prefilled, 19 decoded one at a time, a batched forward over the decoded keys, another
    text decoded from position 0 over the old one's cache entries, and a batch after it."""
    m.net.forward(chunk[:20], 0)
    steps = [m.net.forward([chunk[p]], p) for p in range(20, 39)]
    batch = m.net.forward(chunk[39:43], 39, all_logits=True)
    again = [m.net.forward([chunk[30 + p]], p) for p in range(6)]
    after = m.net.forward(chunk[36:39], 6, all_logits=True)
    return torch.cat([torch.stack(steps), batch, torch.stack(again), after])


def test_layer_offload_baseline_matches_all_cpu(tmp_path):
    from engine.hybrid import LayerOffload
    path = tiny_path(tmp_path, qtype=QT.F32)
    cpu, off = (load(path, n_ctx=64, cache_type="f32") for _ in range(2))  # the torch layers' cache is float32
    off.net = LayerOffload(off.net, 2, "cpu")  # layers 0-1 in torch on a second "device", layer 2 on the kernels
    chunk = chunk_of(cpu)
    a, b = offload_sequence(cpu, chunk), offload_sequence(off, chunk)
    assert float((a - b).norm() / a.norm()) < 1e-4
    with pytest.raises(ValueError, match="position 64 is past the context of 64"):
        off.net.forward([chunk[0]], 64)
    assert off.net.nbytes() == 2 * 4 * sum(cpu.net.mats[blk(0, n)].rows * 64 for n in
                                           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")) \
        + 2 * 4 * (64 * 128 + 2 * 64)  # float32: six matrices, the down projection and two norms per layer


def test_bench_gpu_rows_run_with_a_cpu_device_standing_in(tmp_path, monkeypatch):
    """bench --hybrid's GPU rows (hot shares of the FFN beside layer offload in the same memory) run only with
    CUDA; with torch's CPU device in place of it they run here, so that CI exercises their code."""
    import engine.hybrid as H
    import tools.bench_hybrid as B
    from engine.api import Model
    for cls in (H.HotPart, H.LayerOffload):
        monkeypatch.setattr(cls, "__init__", lambda self, net, arg, device, _init=cls.__init__: _init(self, net, arg,
                                                                                                       "cpu"))
    monkeypatch.setattr(H, "torch_device", lambda name, what: None)  # "cuda" taken as given
    base = load(tiny_path(tmp_path, "silu"), n_ctx=128)
    sample = chunk_of(base, 96)
    _, gs = B.gate_samples(base, sample)
    fx, bundle = B.fatrelu_fixture(base.ckpt, sample, 0.7, gs)
    model = Model(fx, 64)
    net = model.net
    cpu_only = B.Setup(model, runtime=B.Setup.predictors(model, bundle))
    runs = {(0.7, "dense"): B.Setup(model), (0.7, "predictors"): cpu_only}
    speed = B.best_speeds(runs, sample[:8], 4, rounds=1)
    rows = B.gpu_rows(runs, 0.7, bundle, gs, None, sample[:8], 4, speed)
    assert model.runtime is None and model.net is net  # left dense, on its own kernels
    assert ("hybrid", 0.5) in speed and ("offload", 0.5) in speed and ("hybrid", 0.0) not in speed
    assert rows[0]["decode_tok_s"] == speed[0.7, "predictors"]["decode_tok_s"]  # CPU only: its best over all turns
    assert [r["ffn_fraction"] for r in rows] == list(B.GPU_FRACTIONS)
    assert rows[0]["gpu_share"] == 0.0 and rows[-1]["gpu_share"] == 1.0 and rows[-1]["offload_layers"] == 3
    assert rows[0]["vram_bytes"] == 0 < rows[1]["vram_bytes"] < rows[-1]["vram_bytes"]
    assert rows[0]["hot_layer_us"] is None and all(r["hot_layer_us"] > 0 for r in rows[1:])
    text = B.format_hybrid({"model": "m", "threads": 2, "kv_cache": "f16", "decode_tokens": 4, "predictor_type": "F16",
                            "rounds": 1, "dense_tok_s": 1.0, "given": None, "fixture": [], "gpu": rows})
    assert "hot us/layer" in text
    assert all(r["decode_tok_s"] > 0 and r["offload_tok_s"] > 0 for r in rows)


def test_bench_speeds_are_the_best_of_runs_taken_in_turns(tmp_path, monkeypatch):
    """bench --hybrid times its configurations in turns and keeps each one's fastest run, also across groups that
    share one (the dense model as given); each run decodes in its own configuration, and the model is left dense."""
    import tools.bench as bench
    import tools.bench_hybrid as B
    from engine.sparsity import batched_net
    model = load(tiny_path(tmp_path), n_ctx=64)
    rt = B.Setup.predictors(model, gate_bundle(model))
    assert model.runtime is None
    runs = {"dense": B.Setup(model), "pred": B.Setup(model, runtime=rt)}
    seen, speeds = [], iter([5.0, 1.0, 7.0, 3.0, 6.0, 2.0, 4.0, 9.0])

    def fake(m, ids, n):
        seen.append(m.runtime is rt and m.net.runtime is rt)
        return {"decode_tok_s": next(speeds)}
    monkeypatch.setattr(bench, "decode_speed", fake)
    best = B.best_speeds(runs, [1, 2], 4, rounds=3)
    assert seen == [False, True] * 3 and best["dense"]["decode_tok_s"] == 7.0 and best["pred"]["decode_tok_s"] == 3.0
    B.best_speeds({"dense": runs["dense"]}, [1, 2], 4, best, rounds=2)  # 4.0 then 9.0
    assert best["dense"]["decode_tok_s"] == 9.0 and model.runtime is None and model.net.runtime is None
    monkeypatch.undo()
    audit = B.audited(model, gate_bundle(model), [1, 2, 3], None, 4)
    assert 0 < audit["recall"] <= 1 and audit.keys() == {"predicted_sparsity", "recall", "precision", "actual_sparsity"}
    model.install_runtime(rt)  # the timed runs' tokens and predictions: its row is one run's
    assert audit["predicted_sparsity"] == model.generate([1, 2, 3], 4, ignore_stop=True).stats["predicted_sparsity"]
    B.Setup(model).apply()
    assert model.runtime is None and batched_net(model.net).predict is None  # an audit leaves the model dense too


def test_rms_norm_of_float16_residuals():
    """Layers offloaded in float16 norm residuals of SmolLM2's size (hundreds to 25,000): squared in float16 they
    overflowed to inf and the normed input came out 0."""
    from engine.model import rms_norm
    x = torch.tensor([[300.0, -2.0, 0.5, 25000.0]])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    want = rms_norm(x, w, 1e-5)
    got = rms_norm(x.half(), w.half(), 1e-5)
    assert got.dtype == torch.float16 and torch.allclose(got.float(), want, rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hot_part_and_offload_on_cuda_match_all_cpu(tmp_path):
    from engine.hybrid import LayerOffload
    path = tiny_path(tmp_path)
    cpu, gpu, off = load(path, n_ctx=64), load(path, n_ctx=64), load(path, n_ctx=64)
    bundle = gate_bundle(cpu, threshold=0.02)
    hot = [np.arange(0, cpu.config.n_ff, 2, dtype=np.int32)] * cpu.config.n_layer
    cpu.set_predictors(bundle)
    gpu.set_predictors(bundle, hot, "cuda")
    assert hot_part_error(cpu, hot, "cuda") < 3e-3  # float16 rows, float32 sums: about 5e-4 expected
    chunk = chunk_of(cpu)
    a, b = cpu.scored_logits(chunk, 20), gpu.scored_logits(chunk, 20)
    # end to end the float16 rows flip some predictor decisions of the next layers: about 0.02 (0.09 at single
    # positions) from float16 on the CPU; a hot part lost or read a layer late measured 0.56-0.59
    assert float((a - b).norm() / a.norm()) < 0.1
    assert 0.3 < gpu.runtime.stats()["gpu_share"] < 0.7
    part = gpu.runtime.hot  # each layer's graph, replayed, gives what its ops give one by one
    assert all(step.graph is not None for step in part.steps)
    rng = np.random.default_rng(1)
    xn = rng.standard_normal(cpu.config.n_embd).astype(np.float32)
    for i in range(cpu.config.n_layer):
        part.mask_np[i][:] = rng.random(len(hot[i])) < 0.5
        replayed = np.zeros(cpu.config.n_embd, np.float32)
        part.launch(i, xn)
        part.collect(replayed)
        part.ffn(i)  # the same staged input
        torch.cuda.synchronize()
        assert np.allclose(replayed, part.y_np, rtol=1e-5, atol=1e-6)
    dense = load(path, n_ctx=64)
    off.net = LayerOffload(off.net, 2, "cuda")  # its decode steps replay one graph
    x, y = offload_sequence(dense, chunk), offload_sequence(off, chunk)
    assert float((x - y).norm() / x.norm()) < 0.03  # float16 layers: about 0.014 in an emulation on the CPU


def test_bench_times_the_first_token_of_the_model_as_it_runs(monkeypatch):
    """bench's time-to-first-token child gets the runtime flags the bench ran with: --no-predictors too (it would
    have decoded through an export's own predictors)."""
    import tools.bench as bench
    from tools.cli import build_parser
    seen = []
    monkeypatch.setattr(bench.subprocess, "run",
                        lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    for extra in ([], ["--no-predictors"]):
        bench.time_to_first_token(build_parser().parse_args(["bench", "-m", "x.gguf", "-t", "1", *extra]), 64)
    assert "--no-predictors" not in seen[0] and "--no-predictors" in seen[1] and "-t" in seen[1]
