"""`hotcold profile` on tiny random models: counts and samples against a brute-force dense pass, resuming,
and refusals that leave what was written intact."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.api import load
from engine.config import HotcoldError
from engine.sparsity import SparsityConfig, batched_net
from tiny_model import CAT_TEXT, DIGIT_LIMIT, tiny_config, tiny_models, tiny_weights, write_gguf
from tools.cli import main
from tools.profile import corpus_tokens, read_corpus, run_profile

CTX = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("tiny")), (("relu", 0), ("silu", 0), ("relu", 1)))


def relu_model(tiny, seed=0, backend="torch"):
    return load(tiny[0]["relu", seed], n_ctx=CTX, threads=1, backend=backend)


def brute_force(model, tokens, n_windows):
    """Per layer: active masks (n_tokens, n_ff) = h != 0, and FFN inputs (n_tokens, n_embd), from a dense pass."""
    net, L = batched_net(model.net), model.config.n_layer
    masks, xs = [[] for _ in range(L)], [[] for _ in range(L)]

    def hook(i, x, h):
        masks[i].append((h != 0).numpy())
        xs[i].append(x.numpy().copy())
        return h

    net.ffn_hook = hook
    for w in range(n_windows):
        net.forward(tokens[w * CTX:(w + 1) * CTX], 0)
    net.ffn_hook = None
    return [np.concatenate(m) for m in masks], [np.concatenate(x) for x in xs]


TOPS = {"top10": 13, "top20": 26, "top50": 64}  # the 10, 20, 50% most frequent of 128 neurons, rounded


def check_summary(summary, counts, n_tokens):
    """Per-layer sparsity and skew of a summary against activation counts (n_layer, n_ff), by the definitions:
    sparsity = 1 - activations / (tokens * n_ff); topN = activations of the N% most frequent neurons / all."""
    assert counts.shape[1] == 128 and summary["tokens"] == n_tokens
    for i, layer in enumerate(counts):
        ranked = sorted(layer.tolist(), reverse=True)
        assert summary["sparsity"][i] == pytest.approx(1 - sum(ranked) / (n_tokens * 128), abs=1e-12)
        for top, k in TOPS.items():
            assert summary["skew"][top][i] == pytest.approx(sum(ranked[:k]) / sum(ranked), abs=1e-12)
    assert summary["mean_sparsity"] == pytest.approx(np.mean(summary["sparsity"]), abs=1e-12)


def tree_digest(path):
    """A hash of every file under path, to show that a refused command changed nothing."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(os.path.join(root, f).encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_counts_and_samples_match_brute_force(tiny, tmp_path, backend):
    model = relu_model(tiny, backend=backend)
    tokens = corpus_tokens(model, [tiny[1]], None, CTX)
    n_windows = len(tokens) // CTX
    summary = run_profile(model, tokens, str(tmp_path), ctx=CTX, cap=40, seed=3, progress=False)
    masks, xs = brute_force(model, tokens, n_windows)
    for i in range(model.config.n_layer):
        counts = torch.load(tmp_path / "activation" / f"activation_{i}.pt", weights_only=True)
        assert counts.dtype == torch.int64 and counts.shape == (model.config.n_ff,)
        assert np.array_equal(counts.numpy(), masks[i].sum(0))
    assert 0.2 < summary["mean_sparsity"] < 0.8  # a random ReLU FFN: about half the neurons fire
    check_summary(summary, np.stack([m.sum(0) for m in masks]), n_windows * CTX)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"]["rows"] == 40
    seen = []
    for chunk in manifest["samples"]["chunks"]:
        x, packed, pos = (np.load(tmp_path / chunk[k]) for k in ("x", "mask", "pos"))
        assert x.dtype == np.float16 and packed.dtype == np.uint8 and len(pos) == chunk["rows"]
        assert np.all(pos // CTX == chunk["window"])
        mask = np.unpackbits(packed, axis=-1, count=model.config.n_ff).astype(bool)
        for i in range(model.config.n_layer):
            assert np.array_equal(mask[i], masks[i][pos])
            assert np.array_equal(x[i], xs[i][pos].astype(np.float16))
        seen += pos.tolist()
    assert len(set(seen)) == 40 and max(seen) < n_windows * CTX


def test_interrupted_profile_resumes_to_the_same_counts(tiny, tmp_path, capsys):
    model = relu_model(tiny)
    tokens = corpus_tokens(model, [tiny[1]], None, CTX)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()  # what a run killed while writing its first manifest leaves: not a stranger's folder
    (whole / "manifest.json.tmp99999999").write_text("{")
    run_profile(model, tokens, str(whole), ctx=CTX, cap=25, seed=1, progress=False)
    assert not (whole / "manifest.json.tmp99999999").exists()

    class Stop(Exception):
        pass

    def stop_after_3(w):
        if w == 2:
            raise Stop

    with pytest.raises(Stop):
        run_profile(model, tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False, on_window=stop_after_3)
    assert not (parts / "activation").exists()
    with np.load(parts / "progress.npz") as z:
        assert int(z["windows_done"]) == 3
    # the counts depend on how the model runs: a resume that would mix backends is refused, and so is a model whose
    # layer-0 FFN (its fingerprint) is the same but not its attention
    with pytest.raises(HotcoldError, match="with other settings \\(backend differs: torch there, kernels now\\)"):
        run_profile(relu_model(tiny, backend="kernels"), tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False)
    c = tiny_config("relu")
    w = tiny_weights(c, 0)
    tuned = write_gguf(str(tmp_path / "tuned.gguf"), c, {**w, "blk.1.attn_q.weight": 1.5 * w["blk.1.attn_q.weight"]})
    tuned = load(tuned, n_ctx=CTX, threads=1, backend="torch")
    assert tuned.fingerprint == model.fingerprint
    with pytest.raises(HotcoldError, match="holds a profile made with other settings \\(weights_sha256 differs: "):
        run_profile(tuned, tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False)
    manifest = (parts / "manifest.json").read_text()
    older = json.loads(manifest)
    older["settings"]["threads"] = 7  # another -t: the thread count to resume with is said
    (parts / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(HotcoldError, match="\\(threads differs: 7 there, 1 now\\); -t 7 to resume it, or choose"):
        run_profile(model, tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False)
    del older["settings"]["threads"]  # as a hotcold that did not record it wrote it
    (parts / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(HotcoldError, match="holds a profile made by an older hotcold, which did not record threads"):
        run_profile(model, tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False)
    (parts / "manifest.json").write_text(manifest)
    capsys.readouterr()
    run_profile(model, tokens, str(parts), ctx=CTX, cap=25, seed=1, progress=False)
    assert f"resuming: 3 of {len(tokens) // CTX} windows profiled in {parts}" in capsys.readouterr().err
    for i in range(model.config.n_layer):
        a = torch.load(whole / "activation" / f"activation_{i}.pt", weights_only=True)
        b = torch.load(parts / "activation" / f"activation_{i}.pt", weights_only=True)
        assert torch.equal(a, b)
    for f in sorted(os.listdir(whole / "samples")):
        assert np.array_equal(np.load(whole / "samples" / f), np.load(parts / "samples" / f)), f


def test_profile_cli_and_report(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    assert main(["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--ctx", str(CTX), "--tokens", "128",
                 "--samples-per-layer", "16", "-o", str(out), "-t", "1"]) == 0
    printed = capsys.readouterr().out
    assert "layer  sparsity" in printed and "top10" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 128 and len(summary["sparsity"]) == 2
    assert all(0 < s < 1 for s in summary["skew"]["top20"])
    counts = [torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True).numpy() for i in range(2)]
    check_summary(summary, np.stack(counts), 128)
    assert main(["profile", "--report", str(out)]) == 0
    assert "mean" in capsys.readouterr().out
    assert main(["profile", "--report", str(out), "--json"]) == 0
    res = capsys.readouterr()
    reported = json.loads(res.out)
    assert reported["mean_sparsity"] == pytest.approx(np.mean(summary["sparsity"])) and reported["tokens"] == 128
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # a note says why there is no plot
        assert reported["plot"] is None and "no plot: matplotlib is not installed" in res.err
    else:
        assert reported["plot"] == str(out / "activation_frequency.png") and "no plot" not in res.err
    assert set(reported) == {"tokens", "n_ff", "sparsity", "mean_sparsity", "skew", "model", "speed", "plot"}
    # the same command again finds the profile complete and leaves its counts as they were
    before = tree_digest(out / "activation")
    assert main(["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--ctx", str(CTX), "--tokens", "128",
                 "--samples-per-layer", "16", "-o", str(out), "-t", "1"]) == 0
    assert tree_digest(out / "activation") == before
    capsys.readouterr()
    # --json; a relative -m is recorded absolute (train-predictors takes it from anywhere); --tokens past the text
    monkeypatch.chdir(os.path.dirname(tiny[0]["relu", 0]))
    out2 = tmp_path / "p2"
    assert main(["profile", "-m", os.path.basename(tiny[0]["relu", 0]), "-f", tiny[1], "--ctx", str(CTX), "--tokens",
                 "100000", "--samples-per-layer", "16", "-o", str(out2), "-t", "1", "--json"]) == 0
    printed, err = capsys.readouterr()
    got = json.loads(printed)
    assert got["model"] == tiny[0]["relu", 0] and os.path.isabs(got["model"]) and got["sparsity"] == [
        pytest.approx(s) for s in json.loads((out2 / "summary.json").read_text())["sparsity"]]
    assert "tokens profiled, fewer than --tokens 100000 (the corpus has " in err
    assert json.loads((out2 / "manifest.json").read_text())["model"] == tiny[0]["relu", 0]
    n = int(err.split("the corpus has ")[1].split(")")[0])
    assert n % CTX and got["tokens"] == n // CTX * CTX  # the tail past the last whole window is not profiled: said
    assert main(["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--ctx", str(CTX), "--samples-per-layer", "16",
                 "-o", str(tmp_path / "p3"), "-t", "1", "--json"]) == 0
    assert f"{got['tokens']} tokens profiled, fewer than the corpus's {n} (whole windows of --ctx {CTX})" in \
        capsys.readouterr().err


def test_jsonl_corpus(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": n}) for n, t in enumerate(CAT_TEXT.split(", "))) + "\n")
    assert read_corpus([str(path)]) == CAT_TEXT.split(", ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(HotcoldError, match=r"bad.jsonl:2: no \"text\""):
        read_corpus([str(bad)])
    for line, why in (('{"text": "a"', "JSONDecodeError: Expecting ',' delimiter"),
                      ("[" * 100000, "RecursionError"),
                      *[('{"n": ' + "1" * 5000 + "}", "ValueError: Exceeds the limit")] * DIGIT_LIMIT):
        bad.write_text('{"text": "a"}\n' + line + "\n")
        with pytest.raises(HotcoldError, match=f"bad.jsonl:2: invalid JSON \\({why}"):
            read_corpus([str(bad)])
    bom = tmp_path / "bom.jsonl"  # as Windows editors save it
    bom.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    assert read_corpus([str(bom)]) == CAT_TEXT.split(", ")


def run_cli(tiny, corpus, out, model=("relu", 0), ctx=CTX):
    return main(["profile", "-m", tiny[0][model], "-f", *corpus, "--ctx", str(ctx), "-o", str(out), "-t", "1"])


def test_bad_inputs_are_refused_and_nothing_written_is_lost(tiny, tmp_path, capsys):
    out = tmp_path / "p"
    assert run_cli(tiny, [tiny[1]], out) == 0
    capsys.readouterr()
    digest = tree_digest(out)
    empty, short, binary = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    short.write_text("the cat")
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    cases = [([str(empty)], out, "model", "empty corpus"),
             ([str(short)], out, "model", "shorter than one window"),
             ([str(binary)], out, "model", "unreadable corpus"),
             ([str(tmp_path / "missing.txt")], out, "model", "no such file"),
             ([str(tmp_path)], out, "model", "unreadable corpus"),  # a directory
             ([tiny[1]], out, ("relu", 1), "profile of another model"),
             ([tiny[1]], out, ("silu", 0), "no natural zeros")]
    for corpus, o, model, msg in cases:
        assert run_cli(tiny, corpus, o, model=("relu", 0) if model == "model" else model) == 2, msg
        assert msg in capsys.readouterr().err
        assert tree_digest(out) == digest, msg
    assert run_cli(tiny, [tiny[1]], out, ctx=16) == 2  # other settings: refused too
    assert "other settings" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert run_cli(tiny, [tiny[1]], foreign) == 2
    assert "holds no profile" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]
    bundle = tmp_path / "bundle"  # a predictor bundle's manifest.json is not taken for a profile's
    bundle.mkdir()
    from predictors.bundle import FORMAT
    (bundle / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    assert run_cli(tiny, [tiny[1]], bundle) == 2
    assert "bundle: a predictor bundle, not a profile directory" in capsys.readouterr().err
    assert main(["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--tokens", "1", "--ctx", str(CTX), "-o",
                 str(tmp_path / "few")]) == 2
    assert f"--tokens 1: fewer than one window of --ctx {CTX}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # numpy's generator takes seeds >= 0: a traceback, after the manifest
        main(["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--seed", "-5", "-o", str(tmp_path / "neg")])
    assert e.value.code == 2 and "argument --seed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "neg")
    assert main(["profile", "--report", str(out), "-f", tiny[1], "-o", str(tmp_path / "p2")]) == 2  # not ignored
    assert "takes no -f or -o" in capsys.readouterr().err and not (tmp_path / "p2").exists()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text(json.dumps({"fingerprint": relu_model(tiny).fingerprint, "settings": 5}))
    assert run_cli(tiny, [tiny[1]], odd) == 2
    assert "manifest.json: not a profile manifest (its settings are not a JSON object)" in capsys.readouterr().err
    from engine.files import output_lock
    with output_lock(str(tmp_path / "busy")):  # another hotcold writing it: refused, not interleaved
        assert run_cli(tiny, [tiny[1]], tmp_path / "busy") == 2
    assert "busy: another hotcold is writing this output now" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "busy") and run_cli(tiny, [tiny[1]], tmp_path / "busy") == 0
    with output_lock(str(tmp_path / "m")), pytest.raises(HotcoldError, match="another hotcold"):
        with output_lock(str(tmp_path / "m.powerinfer.gguf")):  # export -o m and -o m.powerinfer.gguf: one file
            pass


def test_a_model_of_the_same_weights_and_another_fatrelu_threshold_is_another_profile(tmp_path, capsys):
    """The fingerprint and the weights' hash are the same; the counts are not: refused, not mixed."""
    models = []
    for t in (0.1, 0.3):
        c = tiny_config("fatrelu", t)
        models.append(write_gguf(str(tmp_path / f"fat{t}.gguf"), c, tiny_weights(c, seed=0)))
    corpus = tmp_path / "c.txt"
    corpus.write_text(CAT_TEXT * 8)
    argv = ["-f", str(corpus), "--ctx", str(CTX), "-o", str(tmp_path / "p"), "-t", "1"]
    assert main(["profile", "-m", models[0], *argv]) == 0
    capsys.readouterr()
    assert main(["profile", "-m", models[1], *argv]) == 2
    assert "p: profile of another model (act_threshold 0.1" in capsys.readouterr().err
    # the same model again is the same profile, rope_freqs (a tuple, a list once in JSON) and all
    c = tiny_config("fatrelu", 0.1)
    llama31 = write_gguf(str(tmp_path / "llama31.gguf"), c, {**tiny_weights(c, seed=0), "rope_freqs.weight":
                                                             np.linspace(1, 8, c.head_dim // 2).astype(np.float32)})
    argv[argv.index("-o") + 1] = str(tmp_path / "p31")
    assert main(["profile", "-m", llama31, *argv]) == 0 and main(["profile", "-m", llama31, *argv]) == 0


def test_outputs_written_together_or_not_at_all(tmp_path):
    """write_all: a failure leaves every old file as it was, no temporary file, and names the path it failed on;
    the temporaries a killed process left are removed."""
    from engine.config import HotcoldError
    from engine.files import write_all
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old a")
    b.write_text("old b")

    def fail(tmp):
        raise PermissionError(13, "Permission denied", tmp)
    def text(t):
        return lambda tmp: open(tmp, "w").write(t)
    with pytest.raises(HotcoldError, match=r"b.json: cannot write \(Permission denied\)"):
        write_all([(str(a), text("new a")), (str(b), fail)])
    assert (a.read_text(), b.read_text(), sorted(os.listdir(tmp_path))) == ("old a", "old b", ["a.json", "b.json"])
    def torch_full(tmp):  # torch.save on a full disk: a RuntimeError (a traceback before), safetensors' its own
        open(tmp, "w").write("half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore lines")
    full = r"^\S*b.json: cannot write \((No space left on device|\[enforce fail .* 598)\)$"
    with pytest.raises(HotcoldError, match=full):
        write_all([(str(a), text("new a")), (str(b), torch_full)])
    assert (a.read_text(), b.read_text(), sorted(os.listdir(tmp_path))) == ("old a", "old b", ["a.json", "b.json"])
    # a writer killed outright (SIGKILL) left its temporary file: the next write of that path removes it, not
    # a temporary of a process still running
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"b.json.tmp{int(dead.stdout)}").write_text("half")
    (tmp_path / f"b.json.tmp{os.getppid()}").write_text("in progress")
    write_all([(str(a), text("new a")), (str(b), text("new b"))])
    assert (a.read_text(), b.read_text(), sorted(os.listdir(tmp_path))) == (
        "new a", "new b", ["a.json", "b.json", f"b.json.tmp{os.getppid()}"])


def test_silu_profile_with_a_sparsity_config(tiny, tmp_path):
    """A SiLU model is profiled by the thresholds of its config: a neuron counts where |h_i| * ||down[:, i]|| is
    above its layer's threshold. The reference pass applies that rule itself, with the norms of ffn_down's columns
    taken from the stored weights, and zeroes the other neurons (layer 1 reads what layer 0's thresholded FFN wrote)."""
    model = load(tiny[0]["silu", 0], n_ctx=CTX, threads=1, backend="torch")
    tokens = corpus_tokens(model, [tiny[1]], 4 * CTX, CTX)
    cfg = SparsityConfig([0.05, 0.08], model.fingerprint, "manual")
    run_profile(model, tokens, str(tmp_path), ctx=CTX, n_tokens=4 * CTX, sparsity=cfg, cap=8, progress=False)
    net = batched_net(model.net)
    assert net.sparsity is None  # the profile took its config off again: the pass below is dense but for the hook
    norms = []
    for i in range(2):
        down = model.ckpt.tensors[f"blk.{i}.ffn_down.weight"].dequantize().astype(np.float64)  # (n_embd, n_ff)
        norms.append(torch.from_numpy(np.sqrt((down ** 2).sum(0))).float())
    expected = np.zeros((2, model.config.n_ff), dtype=np.int64)

    def hook(i, x, h):
        m = h.abs() * norms[i] > cfg.thresholds[i]  # (T, n_ff)
        expected[i] += m.sum(0).numpy()
        return h * m

    net.ffn_hook = hook
    for w in range(4):
        net.forward(tokens[w * CTX:(w + 1) * CTX], 0)
    net.ffn_hook = None
    for i in range(2):
        got = torch.load(tmp_path / "activation" / f"activation_{i}.pt", weights_only=True).numpy()
        assert np.array_equal(got, expected[i])
    assert 0.1 < expected.sum() / (4 * CTX * 2 * model.config.n_ff) < 0.9


def refused(capsys, argv, path):
    """Run argv, which must fail as one line `hotcold: error: PATH: ...` with exit code 2; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hotcold: error: {path}: ") and "\n" not in err, err
    return err


def test_a_damaged_resume_point_is_refused_and_kept(tiny, tmp_path, capsys):
    """progress.npz and the samples it vouches for are checked before a profile resumes from them."""
    model = relu_model(tiny)
    tokens = corpus_tokens(model, [tiny[1]], None, CTX)
    n_windows = len(tokens) // CTX
    cut = tmp_path / "cut"

    def stop(w):
        if w == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the CLI's settings: the whole corpus, every token sampled, seed 0 (and
        # the torch backend on 1 thread, as the command below runs)
        run_profile(model, tokens, str(cut), ctx=CTX, cap=100_000, seed=0, progress=False, on_window=stop)
    with np.load(cut / "progress.npz") as z:
        counts = z["counts"]

    def progress(c=counts, done=3):
        return lambda d: np.savez(d / "progress.npz", counts=c, windows_done=done)

    def truncate(d):
        with open(d / "samples" / "mask_000001.npy", "r+b") as fh:
            fh.truncate(200)

    nan = counts.astype(float)
    nan[0, 0] = np.nan
    cases = [(progress(done=1000), "progress.npz", f"windows_done 1000, expected 0 to {n_windows}"),
             (progress(done=-3), "progress.npz", "windows_done -3"),
             (progress(done=np.array([3, 3])), "progress.npz", "windows_done (2,)"),
             (progress(c=nan), "progress.npz", "counts float64"),
             (progress(c=counts[:1]), "progress.npz", "expected int64 (2, 128)"),
             (progress(c=-counts), "progress.npz", "counts outside 0 to 96"),
             (progress(c=counts + 1000), "progress.npz", "counts outside 0 to 96"),
             (lambda d: (d / "progress.npz").write_bytes(b"junk"), "progress.npz", "unreadable progress record"),
             (lambda d: os.remove(d / "samples" / "x_000002.npy"), "samples/x_000002.npy", "no such file"),
             (truncate, "samples/mask_000001.npy", "unreadable sample chunk"),
             (lambda d: np.save(d / "samples" / "x_000000.npy", np.zeros((2, 3, 64), np.float16)),
              "samples/x_000000.npy", "expected float16 (2, 32, 64)")]
    for n, (damage, name, msg) in enumerate(cases):
        d = tmp_path / f"case{n}"
        shutil.copytree(cut, d)
        damage(d)
        digest = tree_digest(d)
        err = refused(capsys, ["profile", "-m", tiny[0]["relu", 0], "-f", tiny[1], "--ctx", str(CTX), "-o", str(d),
                               "-t", "1", "--backend", "torch"], d / name)
        assert msg in err and err.endswith(f"; delete {d} to start over"), err
        assert tree_digest(d) == digest, msg


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished profile of the ReLU model: 2 layers of 128 neurons, 64 wide, 40 sampled tokens."""
    out = tmp_path_factory.mktemp("finished") / "p"
    model = relu_model(tiny)
    run_profile(model, corpus_tokens(model, [tiny[1]], None, CTX), str(out), ctx=CTX, cap=40, seed=3, progress=False)
    return out


def damaged(finished, tmp_path, damage):
    d = tmp_path / "p"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(finished, d)
    damage(d)
    return d


def test_damaged_activation_counts_are_refused_naming_the_file(finished, tmp_path, capsys):
    act = "activation/activation_1.pt"
    tokens = json.loads((finished / "manifest.json").read_text())["settings"]["tokens"]

    def save(obj):
        return lambda d: torch.save(obj, d / act)

    def write(data):
        return lambda d: (d / act).write_bytes(data(d))

    def edit_manifest(d):
        m = json.loads((d / "manifest.json").read_text())
        del m["fingerprint"]
        (d / "manifest.json").write_text(json.dumps(m))

    cases = [(write(lambda d: os.urandom(2000)), act, "unreadable activation counts"),
             (write(lambda d: b""), act, "unreadable activation counts"),
             (write(lambda d: (d / act).read_bytes()[:300]), act, "unreadable activation counts"),
             (lambda d: os.remove(d / act), act, "no such file"),
             (save({"a": torch.zeros(3)}), act, "counts dict"),
             (save(torch.zeros(1000, dtype=torch.int64)), act, "int64 (1000,), expected int64 (128,)"),
             (save(torch.full((128,), float("nan"))), act, "counts torch.float32 (128,)"),
             (save(torch.full((128,), -5)), act, f"counts outside 0 to {tokens}"),
             (save(torch.full((128,), tokens + 1)), act, f"counts outside 0 to {tokens}"),
             (edit_manifest, "manifest.json", "not a profile manifest")]
    for damage, name, msg in cases:
        d = damaged(finished, tmp_path, damage)
        err = refused(capsys, ["split", "--profile", str(d), "--hot-fraction", "0.3", "-o", str(tmp_path / "s")],
                      d / name)
        assert msg in err, err
    assert main(["profile", "--report", str(damaged(finished, tmp_path, save(torch.zeros(7))))]) == 2
    assert "activation_1.pt: not activation counts" in capsys.readouterr().err


def test_damaged_sample_chunks_are_refused_naming_the_file(tiny, finished, tmp_path, capsys):
    """train-predictors reads only sample chunks of the profile's format, inside the profile directory."""
    chunk = json.loads((finished / "manifest.json").read_text())["samples"]["chunks"][1]
    x, mask = chunk["x"], chunk["mask"]

    def npy(name, edit):
        return lambda d: np.save(d / name, edit(np.load(d / name)))

    def nan(a):
        a = a.copy()
        a[1, 0, 3] = np.nan
        return a

    def entry(**kw):
        def edit(d):
            m = json.loads((d / "manifest.json").read_text())
            m["samples"]["chunks"][1].update(kw)
            (d / "manifest.json").write_text(json.dumps(m))
        return edit

    rows = chunk["rows"]
    cases = [(npy(mask, lambda a: a.astype(np.float32)), mask, f"float32 (2, {rows}, 16), expected uint8"),
             (npy(mask, lambda a: a[:, :1]), mask, f"uint8 (2, 1, 16), expected uint8 (2, {rows}, 16)"),
             (npy(x, lambda a: a[:, :, :50]), x, f"float16 (2, {rows}, 50), expected float16 (2, {rows}, 64)"),
             (npy(x, lambda a: a[:1]), x, f"float16 (1, {rows}, 64)"),
             (npy(x, nan), x, "non-finite FFN inputs of layer 1"),
             (lambda d: (d / x).write_bytes(os.urandom(3000)), x, "unreadable sample chunk"),
             (lambda d: os.remove(d / mask), mask, "no such file"),
             (entry(x="/etc/passwd"), "manifest.json", "sample file '/etc/passwd' is not a path inside"),
             (entry(mask="../../outside.npy"), "manifest.json", "sample file '../../outside.npy' is not a path inside"),
             (entry(rows="7"), "manifest.json", "a sample chunk entry without a number of rows")]
    for damage, name, msg in cases:
        d = damaged(finished, tmp_path, damage)
        err = refused(capsys, ["train-predictors", "--profile", str(d), "-o", str(tmp_path / "b"), "--epochs", "1",
                               "--rank", "4", "--layers", "1", "-t", "1"], d / name)
        assert msg in err, err
        assert not (tmp_path / "b").exists()
