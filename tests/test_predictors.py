"""Activation predictors: SVD start, training to the recall target, metrics, bundles and PowerInfer directories.

The data is a synthetic ReLU FFN with learnable structure: residuals x = s (mu + z P + noise) with z from a
low-rank Gaussian and a per-token scale s (residual norms vary), and a neuron active when its gate
pre-activation W_gate diag(g) x / rms(x) is positive. Every gate row leans against the mean direction mu, so
most neurons are inactive most of the time, as in ReLU LLMs (about 89% here).
"""
import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine.config import HotcoldError
from engine.qtensor import QTensor
from predictors.bundle import (Bundle, fold_thresholds, load_bundle, model_fingerprint, read_powerinfer_dir,
                               write_powerinfer_dir)
from predictors.metrics import format_table, layer_metrics, summarize, tune_threshold
from predictors.model import Predictor, gate_map
from predictors.train import (WEIGHT_CAP, Masks, TrainSet, input_scale, rank_cap, rank_ladder, row_blocks, split_rows,
                              train_layer)
from tiny_model import one_thread, tiny_config, tiny_weights  # noqa: F401 (autouse fixture)

N_EMBD, N_FF, K = 64, 256, 16


def relu_ffn(seed: int = 0):
    """A ReLU FFN's gate W (n_ff, n_embd), norm g, and a sampler of (x, active mask) from its residual stream."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((K, N_EMBD)) / np.sqrt(K)  # (K, n_embd): the low-rank directions x moves in
    mu = rng.standard_normal(N_EMBD)
    mu_hat = mu / np.linalg.norm(mu)
    w = rng.standard_normal((N_FF, N_EMBD)) / np.sqrt(N_EMBD)
    w -= np.outer(w @ mu_hat + 1.2 / np.linalg.norm(mu), mu_hat)  # w . mu = -1.2 for every neuron
    g = 1 + 0.1 * rng.standard_normal(N_EMBD)

    def sample(n: int, seed: int):
        r = np.random.default_rng(seed)
        s = np.exp(0.5 * r.standard_normal((n, 1)))  # (n, 1) token scale
        x = s * (mu + r.standard_normal((n, K)) @ p + 0.05 * r.standard_normal((n, N_EMBD)))  # (n, n_embd)
        pre = (x / np.sqrt((x ** 2).mean(1, keepdims=True))) @ (w * g).T  # (n, n_ff) gate pre-activation
        return x.astype(np.float32), pre > 0

    return w.astype(np.float32), g.astype(np.float32), sample


@pytest.fixture(scope="module")
def ffn():
    w, g, sample = relu_ffn()
    x, y = sample(4000, 1)
    x_test, y_test = sample(1000, 2)
    return SimpleNamespace(m=gate_map(w, g), x=x, y=y, x_test=x_test, y_test=y_test)


def held_out(pred: Predictor, threshold: float, ffn) -> dict:
    return layer_metrics(pred.active(torch.from_numpy(ffn.x_test), threshold).numpy(), ffn.y_test)


# --- model -----------------------------------------------------------------------------------------------
def test_svd_init_passes_a_linear_map_through_relu(ffn):
    x = torch.from_numpy(ffn.x[:50])
    full = Predictor.from_linear(ffn.m, 2 * N_EMBD)  # every singular direction: exact
    assert full.rank == 2 * N_EMBD and full.fc1.weight.shape == (2 * N_EMBD, N_EMBD)
    torch.testing.assert_close(full.logits(x), x @ ffn.m.T, rtol=1e-4, atol=1e-4)
    whitened = Predictor.from_linear(ffn.m, 2 * N_EMBD, torch.from_numpy(ffn.x))
    torch.testing.assert_close(whitened.logits(x), x @ ffn.m.T, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="even rank"):
        Predictor.from_linear(ffn.m, 33)


def test_svd_init_alone_reaches_the_targets(ffn):
    pred, thr, m = train_layer(ffn.x, ffn.y, rank=32, epochs=0, init=ffn.m, recall_target=0.97, progress=False)
    h = held_out(pred, thr, ffn)
    assert m["epochs"] == 0 and pred.rank == 32
    assert h["recall"] >= 0.95
    assert h["predicted_sparsity"] >= 0.8 * h["actual_sparsity"]


def test_training_from_scratch_reaches_the_targets(ffn):
    pred, thr, m = train_layer(ffn.x, ffn.y, rank=32, epochs=10, recall_target=0.97, progress=False)
    h = held_out(pred, thr, ffn)
    assert h["recall"] >= 0.95
    assert h["predicted_sparsity"] >= 0.6 * h["actual_sparsity"]
    assert m["recall"] >= 0.97 and 0.8 < m["actual_sparsity"] < 0.95  # validation split, by construction
    assert set(m) >= {"recall", "precision", "predicted_sparsity", "actual_sparsity", "rank", "threshold", "seconds"}
    assert torch.equal(pred.fc2.weight, pred.fc2.weight.half().float())  # shipped as float16 values


def test_training_for_q4_1_tunes_on_the_weights_decoding_reads(ffn):
    """qtype Q4_1: the shipped weights lie on Q4_1's grid (fc1 by rows, fc2 by columns, as the kernels block them),
    the threshold is tuned on them, and the 4-bit predictor keeps nearly all of the float16 one's sparsity."""
    kw = dict(rank=32, epochs=0, init=ffn.m, recall_target=0.97, progress=False)
    f16, thr16, m16 = train_layer(ffn.x, ffn.y, **kw)
    q4, thr4, m4 = train_layer(ffn.x, ffn.y, qtype="Q4_1", **kw)
    for w in (q4.fc1.weight, q4.fc2.weight.T):  # re-quantizing the shipped values changes them by ulps at most
        a = np.ascontiguousarray(w.detach().numpy())
        again = QTensor.from_float(a, QT.Q4_1).dequantize().reshape(a.shape)
        np.testing.assert_allclose(again, a, atol=1e-3 * np.abs(a).max())
        assert len(np.unique(a[:, :32])) > 16  # not float16 values alone: 16 levels per block row at most
        assert all(len(np.unique(row)) <= 16 for row in a[:, :32])
    assert not torch.equal(q4.fc2.weight, f16.fc2.weight) and thr4 != thr16
    assert m4["recall"] >= 0.97  # the target, on the 4-bit weights
    assert m4["predicted_sparsity"] >= 0.9 * m16["predicted_sparsity"]
    h = held_out(q4, thr4, ffn)
    assert h["recall"] >= 0.95 and h["predicted_sparsity"] >= 0.6 * h["actual_sparsity"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_on_cuda_reaches_the_targets(ffn):
    """--device cuda: trained there, shipped as a CPU predictor that meets the same targets as a CPU-trained one."""
    pred, thr, m = train_layer(ffn.x, ffn.y, rank=32, epochs=4, init=ffn.m, recall_target=0.97, device="cuda",
                               progress=False)
    assert pred.fc1.weight.device.type == "cpu" and m["recall"] >= 0.97
    h = held_out(pred, thr, ffn)
    assert h["recall"] >= 0.95 and h["predicted_sparsity"] >= 0.6 * h["actual_sparsity"]


def test_training_improves_on_a_weak_start(ffn):
    """At rank 8 the SVD start keeps little; training must lift it, and the best epoch is kept."""
    _, _, start = train_layer(ffn.x, ffn.y, rank=8, epochs=0, init=ffn.m, recall_target=0.97, progress=False)
    _, _, trained = train_layer(ffn.x, ffn.y, rank=8, epochs=4, init=ffn.m, recall_target=0.97, progress=False)
    assert trained["predicted_sparsity"] > start["predicted_sparsity"] + 0.02


def test_contribution_weighting_keeps_more_of_the_output_at_the_same_sparsity(ffn):
    """Weighted by contribution, the active labels of neurons with large outputs (here: large down norms, heavy
    tailed) weigh more: at the same predicted sparsity on held-out samples, the predictor keeps a larger share of
    the total contribution than one trained with every active label equal."""
    norms = np.exp(1.5 * np.random.default_rng(5).standard_normal(N_FF)).astype(np.float32)  # (n_ff,) ||down_i||

    def contrib(x, y):  # |h_i| ||down_i|| with h_i the gate pre-activation where active
        pre = (x / np.sqrt((x ** 2).mean(1, keepdims=True))) @ ffn.m.numpy().T
        return (np.maximum(pre, 0) * norms * y).astype(np.float32)

    kw = dict(rank=8, epochs=4, init=ffn.m, recall_target=0.97, progress=False)
    kept = {}
    c_test = contrib(ffn.x_test, ffn.y_test)
    for name, C in (("count", None), ("contribution", contrib(ffn.x, ffn.y))):
        pred, _, _ = train_layer(ffn.x, ffn.y, C=C, **kw)
        logits = pred.logits(torch.from_numpy(ffn.x_test)).detach()
        t = float(torch.quantile(logits.flatten(), 0.85))  # the same predicted sparsity for both: 85%
        kept[name] = float((c_test * (logits >= t).numpy()).sum() / c_test.sum())
    assert kept["contribution"] > kept["count"] + 0.1, kept


def test_batches_from_stored_samples_are_the_dense_reference(ffn):
    """What train_layer keeps (float16 inputs, bit-packed masks, the training split's active contributions in its
    order) makes, batch by batch, exactly what the dense arrays made: X[tr] / scale, Y[tr], and each active label's
    weight pos_weight x its contribution over the mean (capped), 1 elsewhere; n_ff 250 is not a whole byte."""
    x16 = ffn.x.astype(np.float16)  # as profiles store them
    X, Y = torch.from_numpy(x16.astype(np.float32)), torch.from_numpy(ffn.y[:, :250])  # (N, n_embd), (N, n_ff)
    C = torch.exp(3 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(3))) * Y  # heavy tailed: capped
    tr, _ = split_rows(len(X), 0.1, 8192, 0)
    scale = input_scale(torch.from_numpy(x16), tr)
    assert scale == float(X[tr].pow(2).mean(1).sqrt().median().clamp(min=1e-12))
    train = TrainSet(torch.from_numpy(x16), Masks.pack(Y), tr, scale, "cpu", row_blocks(C, 333))
    y_tr, c_tr = Y[tr], C[tr]
    pos = float(y_tr.sum())
    pos_weight = torch.tensor((y_tr.numel() - pos) / max(pos, 1.0))
    c_tr = pos_weight * (c_tr / c_tr[y_tr].mean().clamp(min=1e-30)).clamp(max=WEIGHT_CAP)
    assert torch.equal(train.pos_weight, pos_weight) and (c_tr == pos_weight * WEIGHT_CAP).any()
    for idx in (torch.randperm(len(tr))[:256], torch.arange(len(tr) - 7, len(tr))):
        x, y, w = train.batch(idx)
        assert torch.equal(x, X[tr][idx] / scale) and torch.equal(y, y_tr[idx])
        assert torch.equal(w, torch.where(y_tr[idx], c_tr[idx], 1.0))


def test_stored_samples_train_the_predictor_of_the_dense_arrays(ffn):
    """train_layer on float16 inputs, bit-packed masks and contributions in blocks gives bit for bit the predictor,
    threshold and metrics of float32 inputs, bool masks and a dense contribution array of the same values."""
    x16 = ffn.x.astype(np.float16)
    C = (np.abs(ffn.x @ ffn.m.numpy().T) * ffn.y).astype(np.float32)  # (N, n_ff)
    kw = dict(rank=8, epochs=2, init=ffn.m, recall_target=0.97, progress=False)
    dense = train_layer(x16.astype(np.float32), ffn.y, C=C, **kw)
    stored = train_layer(x16, Masks.pack(ffn.y), C=row_blocks(C, 1000), **kw)
    for a, b in zip(dense[0].parameters(), stored[0].parameters()):
        assert torch.equal(a, b)
    assert dense[1] == stored[1]
    assert {k: v for k, v in dense[2].items() if k != "seconds"} == {k: v for k, v in stored[2].items()
                                                                     if k != "seconds"}


def test_auto_rank_takes_the_smallest_rung_that_is_good_enough(ffn):
    pred, _, m = train_layer(ffn.x, ffn.y, rank="auto", epochs=0, init=ffn.m, recall_target=0.97,
                             max_rank=64, sparsity_goal=0.8, progress=False)
    assert pred.rank == m["rank"] == 32
    pred, _, _ = train_layer(ffn.x, ffn.y, rank="auto", epochs=0, init=ffn.m, recall_target=0.97,
                             max_rank=64, sparsity_goal=1.01, progress=False)  # unreachable: best of the ladder
    assert pred.rank == 64


def test_rank_budget():
    assert rank_cap(576, 1536) == 120  # SmolLM2: 120 * (576 + 1536) <= 10% of 3 * 576 * 1536
    assert 120 * (576 + 1536) <= 0.1 * 3 * 576 * 1536
    assert rank_ladder(120) == [32, 64, 120] and rank_ladder(16) == [16]
    with pytest.raises(HotcoldError, match="budget"):
        rank_cap(8, 8, budget=0.01)


# --- metrics ---------------------------------------------------------------------------------------------
def test_metrics_follow_the_design_definitions():
    true = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)
    m = layer_metrics(pred, true)
    assert m["recall"] == pytest.approx(2 / 3)  # 2 of the 3 active found
    assert m["precision"] == pytest.approx(2 / 3)  # 2 of the 3 predicted are active
    assert m["predicted_sparsity"] == pytest.approx(5 / 8)
    assert m["actual_sparsity"] == pytest.approx(5 / 8)
    s = summarize([m, {**m, "recall": 1.0}])
    assert s["recall"] == pytest.approx(5 / 6) and len(s["per_layer"]) == 2
    assert "all" in format_table([{**m, "rank": 8, "seconds": 1.0}])
    with pytest.raises(ValueError, match="differ in shape"):  # (4, 2) against (2, 4): as many values, not the same
        layer_metrics(pred.reshape(4, 2), true)


def test_metrics_are_scikit_learns():
    """layer_metrics counts; scikit-learn's recall_score and precision_score (the reference) give the same floats,
    also with nothing active or nothing predicted."""
    from sklearn.metrics import precision_score, recall_score
    rng = np.random.default_rng(0)
    true, pred = rng.random((300, 77)) < 0.2, rng.random((300, 77)) < 0.4
    for p, t in ((pred, true), (pred, np.zeros_like(true)), (np.zeros_like(pred), true)):
        m = layer_metrics(p, t)
        assert m["recall"] == float(recall_score(t.ravel(), p.ravel(), zero_division=1.0))
        assert m["precision"] == float(precision_score(t.ravel(), p.ravel(), zero_division=1.0))
        assert m["predicted_sparsity"] == float(1.0 - p.mean()) and m["actual_sparsity"] == float(1.0 - t.mean())


def test_threshold_keeps_the_recall_target_and_skips_the_most():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    labels = torch.tensor([[True, False, True, False, True, False, True, False]])
    t = tune_threshold(logits, labels, 0.75)  # 3 of the 4 positives: the third largest positive logit
    assert t == 1.0
    t = tune_threshold(logits, labels, 1.0)
    assert t == -1.0
    assert tune_threshold(logits, torch.zeros_like(labels), 0.99) > 5.0  # nothing active: skip everything


# --- bundles ---------------------------------------------------------------------------------------------
def tiny_ckpt(seed: int = 0, act: str = "relu"):
    c = tiny_config(act=act)
    return SimpleNamespace(config=c, tensors={k: QTensor.from_float(v) for k, v in tiny_weights(c, seed).items()})


def tiny_bundle(ckpt, seed: int = 0) -> Bundle:
    c = ckpt.config
    gen = torch.Generator().manual_seed(seed)
    preds = [Predictor.from_weights(torch.randn(r, c.n_embd, generator=gen) / 8,
                                    torch.randn(c.n_ff, r, generator=gen) / 8).round_to_half()
             for r in (16, 24)]  # ranks may differ per layer
    return Bundle(preds, [-0.25, -0.125], model_fingerprint(ckpt), metrics=[{"recall": 0.99}, {"recall": 0.98}],
                  sparsity={"method": "exact"}, corpus={"tokens": 1000}, training={"recall_target": 0.99})


def masks(preds, thresholds, x):
    return [p.active(x, t) for p, t in zip(preds, thresholds)]


def test_bundle_round_trips_through_safetensors(tmp_path):
    ckpt = tiny_ckpt()
    b = tiny_bundle(ckpt)
    path = str(tmp_path / "bundle")
    b.save(path)
    assert sorted(os.listdir(path)) == ["manifest.json", "predictors.safetensors"]
    back = load_bundle(path, model_fingerprint(ckpt))
    x = torch.randn(64, ckpt.config.n_embd, generator=torch.Generator().manual_seed(1))
    for p, q in zip(b.predictors, back.predictors):
        assert torch.equal(p.logits(x), q.logits(x))
    for i, m in enumerate(masks(b.predictors, b.thresholds, x)):
        assert torch.equal(m, back.active(i, x))
    assert back.ranks == [16, 24] and back.thresholds == b.thresholds
    assert back.metrics[1] == {"recall": 0.98} and back.sparsity == {"method": "exact"}
    with open(os.path.join(path, "manifest.json")) as fh:
        assert json.load(fh)["fingerprint"]["act"] == "relu"


def test_bundle_for_another_model_is_refused(tmp_path):
    path = str(tmp_path / "bundle")
    tiny_bundle(tiny_ckpt()).save(path)
    with pytest.raises(HotcoldError, match=r"bundle.*another model.*ffn_sha256") as e:
        load_bundle(path, model_fingerprint(tiny_ckpt(seed=1)))
    assert "\n" not in str(e.value)
    with pytest.raises(HotcoldError, match=r"another model \(act 'relu', this model has 'silu'\)"):
        load_bundle(path, model_fingerprint(tiny_ckpt(act="silu")))  # same weights, other activation


def test_damaged_bundles_are_refused(tmp_path):
    path = str(tmp_path / "bundle")
    ckpt = tiny_ckpt()
    with pytest.raises(HotcoldError, match="no such predictor bundle"):
        load_bundle(path)
    tiny_bundle(ckpt).save(path)
    with open(os.path.join(path, "predictors.safetensors"), "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\1")
    with pytest.raises(HotcoldError, match="does not match manifest.json"):
        load_bundle(path)
    with pytest.raises(HotcoldError, match="7 predictors"):
        Bundle([Predictor(64, 128, 8)] * 7, [0.0] * 7, model_fingerprint(ckpt))

    def edited(change):  # a freshly saved bundle whose manifest `change` edits
        tiny_bundle(ckpt).save(path)
        mpath = os.path.join(path, "manifest.json")
        m = json.load(open(mpath))
        change(m)
        json.dump(m, open(mpath, "w"))
        return path
    for change, why in ((lambda m: m.update(fingerprint="x"), "'fingerprint' missing or not a dict"),
                        (lambda m: m.update(layers=3), "'layers' missing or not a list"),
                        (lambda m: m["layers"][1].update(threshold="abc"), "layer 1: expected"),
                        (lambda m: m["layers"][0].update(rank=None), "layer 0: expected"),
                        (lambda m: m.update(training="x"), "'training' not an object"),
                        (lambda m: m.update(training={"predictor_type": "Q9_9"}), "predictor_type 'Q9_9'"),
                        (lambda m: m.update(sparsity={"thresholds": "a"}),
                         "sparsity thresholds: expected a finite number for each of the 2 layers"),
                        (lambda m: m["layers"][0]["metrics"].update(recall="high"), "metric 'recall' is not a"),
                        # JSON integers past a float (OverflowError tracebacks before)
                        (lambda m: m["layers"][0].update(threshold=10 ** 400), "layer 0: expected"),
                        (lambda m: m["layers"][1]["metrics"].update(recall=10 ** 400), "metric 'recall' is not a")):
        with pytest.raises(HotcoldError, match=f"manifest.json: not a predictor bundle manifest .*{why}"):
            load_bundle(edited(change), model_fingerprint(ckpt))
    b = tiny_bundle(ckpt)
    with torch.no_grad():
        b.predictors[1].fc2.weight[3, 0] = float("nan")
    b.save(path)
    with pytest.raises(HotcoldError, match="layer 1: weights that are not finite"):
        load_bundle(path)


# --- PowerInfer directories ------------------------------------------------------------------------------
def test_powerinfer_directory_round_trip(tmp_path):
    ckpt = tiny_ckpt()
    b = tiny_bundle(ckpt)
    path = str(tmp_path / "pi")
    effective = write_powerinfer_dir(path, b.predictors, b.thresholds)
    assert effective == b.thresholds  # same sign: folded exactly
    t = -math.sqrt(b.thresholds[0] * b.thresholds[1])  # both negative: their geometric mean
    with open(os.path.join(path, "config.json")) as fh:
        assert json.load(fh) == {"sparse_threshold": t}
    sd = torch.load(os.path.join(path, "model_1.pt"), weights_only=True)
    assert sorted(sd) == ["fc1.weight", "fc2.weight"] and sd["fc2.weight"].shape == (ckpt.config.n_ff, 24)
    preds, thresholds = read_powerinfer_dir(path)
    assert thresholds == [t, t]
    x = torch.randn(256, ckpt.config.n_embd, generator=torch.Generator().manual_seed(2))
    for a, c in zip(masks(b.predictors, b.thresholds, x), masks(preds, thresholds, x)):
        assert torch.equal(a, c)
    # and back into a bundle
    Bundle(preds, thresholds, model_fingerprint(ckpt)).save(str(tmp_path / "again"))
    again = load_bundle(str(tmp_path / "again"), model_fingerprint(ckpt))
    for a, c in zip(masks(b.predictors, b.thresholds, x), masks(again.predictors, again.thresholds, x)):
        assert torch.equal(a, c)
    # taken where a bundle is (--predictors, --bundle): for a model of its shapes, which alone can be checked
    direct = load_bundle(path, model_fingerprint(ckpt))
    for a, c in zip(masks(b.predictors, b.thresholds, x), masks(direct.predictors, direct.thresholds, x)):
        assert torch.equal(a, c)
    write_powerinfer_dir(str(tmp_path / "pi2"), tiny_bundle(ckpt, seed=1).predictors, b.thresholds)
    other_weights = load_bundle(str(tmp_path / "pi2"), model_fingerprint(ckpt))  # what calibrate's resume key reads
    assert other_weights.training["weights_sha256"] != direct.training["weights_sha256"]
    other = tiny_ckpt()
    other.config = replace(other.config, n_ff=96)
    with pytest.raises(HotcoldError, match=f"{path}: layer 0 predictor maps 64 -> 128, the model has n_embd 64 and "
                                           "n_ff 96"):
        load_bundle(path, model_fingerprint(other))


def test_a_bundle_save_that_fails_leaves_the_old_bundle_whole(tmp_path, monkeypatch):
    """Its two files are renamed together: the tensors were renamed before the manifest was written, so a full disk
    between them left new tensors under the old manifest (a bundle that no longer loads)."""
    import predictors.bundle as B
    ckpt = tiny_ckpt()
    path = str(tmp_path / "b")
    tiny_bundle(ckpt, seed=0).save(path)
    before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}

    def full(obj):
        def write(tmp):
            raise OSError(28, "No space left on device", tmp)
        return write
    monkeypatch.setattr(B, "json_writer", full)
    with pytest.raises(HotcoldError, match="manifest.json: cannot write \\(No space left on device\\)"):
        tiny_bundle(ckpt, seed=1).save(path)
    assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == before
    load_bundle(path, model_fingerprint(ckpt))


def test_bundle_api_takes_other_dtypes_and_refuses_bad_input():
    ckpt = tiny_ckpt()
    b = tiny_bundle(ckpt)
    x = np.random.default_rng(0).standard_normal((5, ckpt.config.n_embd))  # float64 numpy
    assert torch.equal(b.active(1, x), b.active(1, torch.from_numpy(x).float()))
    assert torch.equal(b.active(1, torch.from_numpy(x).half()), b.active(1, torch.from_numpy(x).half().float()))
    with pytest.raises(HotcoldError, match="predictor input of shape \\(5, 63\\), expected \\(..., 64\\)"):
        b.active(0, x[:, 1:])
    with pytest.raises(HotcoldError, match="layer -1: the bundle has layers 0-1"):
        b.active(-1, x)
    for t in (float("nan"), float("inf")):
        with pytest.raises(HotcoldError, match="each must be a finite number"):
            fold_thresholds(b.predictors, [t, 0.5])


def test_fold_never_lowers_recall_when_it_cannot_be_exact():
    preds = [Predictor.from_weights(torch.randn(8, 16), torch.randn(32, 8)) for _ in range(3)]
    folded, t, effective = fold_thresholds(preds, [-0.5, 0.25, -1e-6])
    assert t == -1.0
    assert effective[0] == -0.5 and effective[1] <= 0.25 and effective[2] <= -1e-6
    x = torch.randn(100, 16)
    for p, q, want, got in zip(preds, folded, [-0.5, 0.25, -1e-6], effective):
        assert torch.equal(q.active(x, t), p.active(x, got))
        assert bool((p.active(x, want) & ~q.active(x, t)).sum() == 0)  # nothing the original kept is dropped
    _, t, _ = fold_thresholds(preds, 0.0)
    assert t == 0.0


@pytest.mark.parametrize("ts", [[0.003, 0.04, 0.01], [-0.001, -10.0, -0.5], [0.5, 2.0, 1.0]])
def test_fold_is_exact_for_thresholds_of_one_sign(ts):
    """Small thresholds too (T their geometric mean: every fc2 scale within [1/256, 256], float16 keeps it)."""
    preds = [Predictor.from_weights(torch.randn(8, 16), torch.randn(32, 8)) for _ in range(3)]
    folded, t, effective = fold_thresholds(preds, ts)
    assert effective == ts and t == pytest.approx(math.copysign(math.sqrt(min(map(abs, ts)) * max(map(abs, ts))),
                                                                ts[0]))
    x = torch.randn(1000, 16)
    for p, q, want in zip(preds, folded, ts):
        assert 1 / 256 <= float(q.fc2.weight.detach().abs().max() / p.fc2.weight.detach().abs().max()) <= 256
        assert torch.equal(q.active(x, t), p.active(x, want))


def test_powerinfer_directory_errors(tmp_path):
    with pytest.raises(HotcoldError, match="not a PowerInfer predictor directory"):
        read_powerinfer_dir(str(tmp_path))
    torch.save({"fc1.weight": torch.zeros(4, 8), "fc2.weight": torch.zeros(16, 4)}, tmp_path / "model_1.pt")
    with pytest.raises(HotcoldError, match="model_0.pt is missing"):
        read_powerinfer_dir(str(tmp_path))
    torch.save({"fc1.weight": torch.zeros(4, 8), "fc2.weight": torch.zeros(16, 4)}, tmp_path / "model_99999999999.pt")
    with pytest.raises(HotcoldError, match="model_0.pt is missing"):  # not range(10^11) first
        read_powerinfer_dir(str(tmp_path))
    os.remove(tmp_path / "model_99999999999.pt")
    for sd in ({"weight": torch.zeros(4, 8)}, {"fc1.weight": [[1.0]], "fc2.weight": [[1.0]]},
               {"fc1.weight": torch.zeros(4, 8), "fc1.bias": torch.zeros(4), "fc2.weight": torch.zeros(16, 4)},
               {0: torch.zeros(1), "fc1.weight": torch.zeros(4, 8), "fc2.weight": torch.zeros(16, 4)}):
        torch.save(sd, tmp_path / "model_0.pt")
        with pytest.raises(HotcoldError, match="of two tensors, fc1.weight and fc2.weight"):
            read_powerinfer_dir(str(tmp_path))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model_0.pt")  # a module: torch's error is paragraphs long
    with pytest.raises(HotcoldError, match="model_0.pt: unreadable predictor") as e:
        read_powerinfer_dir(str(tmp_path))
    assert "\n" not in str(e.value)
    torch.save({"fc1.weight": torch.zeros(4, 8), "fc2.weight": torch.zeros(16, 4)}, tmp_path / "model_0.pt")
    for t in ("NaN", "1e999", "true", "1" + "0" * 400):  # an integer past a float: math.isfinite raised
        (tmp_path / "config.json").write_text(f'{{"sparse_threshold": {t}}}')
        with pytest.raises(HotcoldError, match="sparse_threshold must be a finite number"):
            read_powerinfer_dir(str(tmp_path))
