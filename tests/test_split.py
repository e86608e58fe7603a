"""The placement solver is optimal against brute force, respects the budget, and writes PowerInfer's .gpuidx."""
import itertools
import struct

import numpy as np
import pytest

from engine.config import HotcoldError
from engine.loader import open_gguf
from tiny_model import tiny_config, tiny_weights
from tools.split import group_values, plan, read_gpuidx, solve, write_split


def brute_force(counts, budget_groups, group):
    """The best summed count of any set of at most budget_groups groups, by trying every set."""
    vals = np.concatenate([group_values(np.asarray(c, float), group)[1] for c in counts])
    picks = np.array(list(itertools.product([0, 1], repeat=len(vals))))  # (2^n, n)
    return float((picks @ vals)[picks.sum(1) <= budget_groups].max())


def test_solver_matches_brute_force():
    """Counts from a few (many ties) to a long profile's; budgets from none to every group."""
    rng = np.random.default_rng(123)
    for _ in range(120):
        n_layer, group = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        n_ff = group * int(rng.integers(1, 14 // (n_layer * group) + 1))
        counts = [rng.integers(0, rng.choice([3, 100, 10**6]), n_ff) for _ in range(n_layer)]
        budget = int(rng.integers(0, n_layer * n_ff // group + 2))
        gpu = solve(counts, budget, group)
        assert sum(len(g) for g in gpu) <= budget * group
        assert sum(float(c[g].sum()) for c, g in zip(counts, gpu)) == brute_force(counts, budget, group)
        for g in gpu:
            assert list(g) == sorted(set(g.tolist())) and len(g) % group == 0


def test_hot_fraction_takes_the_most_frequent(tmp_path):
    c = tiny_config("relu")
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 1000, c.n_ff) for _ in range(c.n_layer)]
    split = plan(c, counts, hot_fraction=0.25, group=8)
    assert split["ffn_gpu_bytes"] <= split["ffn_budget_bytes"]
    placed = sum(len(g) for g in split["gpu_neurons"])
    assert placed == c.n_layer * c.n_ff // 4
    # with equal costs the optimum is the top groups by summed count, across layers
    allv = np.sort(np.concatenate([group_values(np.asarray(x, float), 8)[1] for x in counts]))[::-1]
    served = sum(float(x[g].sum()) for x, g in zip(counts, split["gpu_neurons"]))
    assert served == pytest.approx(allv[: placed // 8].sum())
    assert 0.25 < split["gpu_share_expected"] < 1


def test_impossible_budget_is_a_clear_error():
    c = tiny_config("relu")
    counts = [np.ones(c.n_ff) for _ in range(c.n_layer)]
    with pytest.raises(HotcoldError, match="does not hold the parts that always go"):
        plan(c, counts, gpu_budget=1000, n_ctx=256)
    with pytest.raises(HotcoldError):
        plan(c, counts, hot_fraction=1.5)
    assert c.n_ff % 7
    with pytest.raises(HotcoldError, match="--group 7 must divide"):  # a ragged group costs less: not solved by order
        plan(c, counts, hot_fraction=0.5, group=7)


def test_gpu_budget_first_pays_what_powerinfer_loads_before_its_split():
    """Attention weights and norms, predictors, the output matrix and norm (written out by an export where the
    embedding is tied), then the KV cache, priced from the model's tensor shapes: float16 matrices, float32 norms."""
    c = tiny_config("relu")
    shapes = {k: v.shape for k, v in tiny_weights(c).items()}
    attn = sum(2 * np.prod(shapes[f"blk.{i}.attn_{n}.weight"]) for i in range(c.n_layer) for n in ("q", "k", "v",
                                                                                                   "output"))
    attn += sum(4 * shapes[f"blk.{i}.{n}_norm.weight"][0] for i in range(c.n_layer) for n in ("attn", "ffn"))
    out = 2 * np.prod(shapes.get("output.weight", shapes["token_embd.weight"])) + 4 * c.n_embd
    kv = 2 * c.n_layer * 64 * shapes["blk.0.attn_k.weight"][0] * 2
    fixed = {"attention": attn, "predictors": 1000, "output": out, "kv_cache": kv}
    counts = [np.arange(c.n_ff) for _ in range(c.n_layer)]
    per_group = 4 * 3 * c.n_embd * 2  # gate, up and down rows of 4 neurons in float16
    for extra, groups in ((5 * per_group, 5), (5 * per_group - 1, 4)):
        split = plan(c, counts, gpu_budget=sum(fixed.values()) + extra, n_ctx=64, group=4, predictor_bytes=1000)
        assert split["fixed_bytes"] == fixed and list(fixed) == list(split["fixed_bytes"])  # PowerInfer's order
        assert split["ffn_gpu_bytes"] == groups * per_group == sum(map(len, split["gpu_neurons"])) * 3 * c.n_embd * 2


def test_gpuidx_format(tmp_path):
    c = tiny_config("relu")
    rng = np.random.default_rng(1)
    counts = [rng.integers(0, 50, c.n_ff) for _ in range(c.n_layer)]
    split = plan(c, counts, gpu_budget=2**22, n_ctx=64, group=4)
    with pytest.raises(HotcoldError, match="a directory; -o takes a file name"):  # not tmp_path/.json
        write_split(str(tmp_path) + "/", split)
    js, gi = write_split(str(tmp_path / "splits" / "split.json"), split)  # its directory is made
    raw = open(gi, "rb").read()
    assert raw[:4] == b"PWRI"
    r = open_gguf(gi)
    assert r.fields["general.architecture"].contents() == "generic.gpu_index"
    assert r.fields["generic.gpu_index.block_count"].contents() == c.n_layer
    cap = r.fields["split.vram_capacity"]
    assert cap.types[0].name == "UINT64" and cap.contents() == split["ffn_gpu_bytes"] > 0  # the hot rows' bytes
    names = [t.name for t in r.tensors]
    assert names == [f"blk.{i}.{k}" for i in range(c.n_layer) for k in ("gpu_idx", "gpu_bucket")]
    for t in r.tensors:  # I32 in PowerInfer's numbering (18, after I8 16 and I16 17), which gguf-py reads as IQ3_XXS
        assert t.tensor_type.name == "I32"
        assert struct.unpack_from("<I", raw, t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4]))[0] == 18
    for i in range(c.n_layer):
        idx, bucket = r.tensors[2 * i].data, r.tensors[2 * i + 1].data
        assert len(idx) == c.n_ff and list(bucket) == list(np.flatnonzero(idx)) == list(split["gpu_neurons"][i])
    back = read_gpuidx(gi, c.n_ff)  # what the runtime reads beside an export
    assert [list(b) for b in back] == [list(g) for g in split["gpu_neurons"]]
    from gguf import GGUFWriter

    def gpuidx(name, layer_tensors):
        wr = GGUFWriter(str(tmp_path / name), "generic.gpu_index")
        for i, ids in enumerate(split["gpu_neurons"]):
            for k, v in layer_tensors(ids).items():
                wr.add_tensor(f"blk.{i}.{k}", v if isinstance(v, np.ndarray) else np.asarray(v, np.int32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        return str(tmp_path / name)

    def one_hot(ids, value=1):
        idx = np.zeros(c.n_ff, np.int32)
        idx[ids] = value
        return idx
    # PowerInfer writes gpu_bucket for MoE models only: then gpu_idx says it
    idx_only = gpuidx("idx_only.gpuidx", lambda ids: {"gpu_idx": one_hot(ids)})
    assert [list(b) for b in read_gpuidx(idx_only, c.n_ff)] == [list(g) for g in split["gpu_neurons"]]
    for name, tensors, why in (  # PowerInfer reads gpu_idx: garbage there, or a bucket that disagrees, is refused
            ("garbage.gpuidx", lambda ids: {"gpu_idx": one_hot(ids, 0x7F7F7F7F), "gpu_bucket": ids},
             "blk.0.gpu_idx holds values other than 0 and 1"),
            ("disagree.gpuidx", lambda ids: {"gpu_idx": one_hot(ids[1:]), "gpu_bucket": ids},
             "blk.0.gpu_bucket and blk.0.gpu_idx name different neurons"),
            ("short.gpuidx", lambda ids: {"gpu_idx": one_hot(ids)[:-1]}, f"blk.0.gpu_idx is not {c.n_ff} integers"),
            ("float.gpuidx", lambda ids: {"gpu_idx": one_hot(ids).astype(np.float32) / 2}, "is not")):
        with pytest.raises(HotcoldError, match=why):
            read_gpuidx(gpuidx(name, tensors), c.n_ff)
    (tmp_path / "bad.gpuidx").write_bytes(raw[:100])
    with pytest.raises(HotcoldError, match="bad.gpuidx"):
        read_gpuidx(str(tmp_path / "bad.gpuidx"), c.n_ff)


def test_split_cli_on_a_real_profile(tmp_path, capsys):
    """profile -> split: the placement follows the measured counts and honours the budget."""
    import json
    import torch
    from tiny_model import write_gguf, tiny_weights
    from tools.cli import main
    c = tiny_config("relu")
    model = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c, seed=0))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat, and then the dog ate in the hat. " * 12)
    prof = tmp_path / "prof"
    assert main(["profile", "-m", model, "-f", str(corpus), "--ctx", "32", "--tokens", "128",
                 "--samples-per-layer", "8", "-o", str(prof), "-t", "1", "--backend", "torch"]) == 0
    capsys.readouterr()
    assert main(["split", "--profile", str(prof), "--hot-fraction", "0.5", "--group", "8",
                 "-o", str(tmp_path / "s"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    split = json.loads((tmp_path / "s.json").read_text())
    assert res["gpuidx"].endswith("s.gpuidx") and open(res["gpuidx"], "rb").read(4) == b"PWRI"
    assert sum(len(g) for g in split["gpu_neurons"]) == c.n_layer * c.n_ff // 2
    counts = [torch.load(prof / "activation" / f"activation_{i}.pt").numpy() for i in range(c.n_layer)]
    # hot neurons fire at least as often as cold ones, group granularity aside
    for cn, g in zip(counts, split["gpu_neurons"]):
        cold = np.setdiff1d(np.arange(c.n_ff), g)
        assert cn[g].mean() >= cn[cold].mean()
    assert split["gpu_share_expected"] >= 0.5
    assert main(["split", "--profile", str(prof), "--gpu-budget", "1K", "-o", str(tmp_path / "t")]) == 2
    assert "GPU budget of 1.0 KiB does not hold the parts that always go to the GPU (" in capsys.readouterr().err
    from engine.api import load
    from test_hybrid import gate_bundle
    bundle = gate_bundle(load(model, n_ctx=32), rank=4)
    bundle.save(str(tmp_path / "preds"))
    for opts, pred_bytes in ((["--predictors", str(tmp_path / "preds")], 2 * bundle.n_params),
                             (["--predictor-bytes", "3K"], 3072)):
        assert main(["split", "--profile", str(prof), "--gpu-budget", "1G", *opts, "-o", str(tmp_path / "p"),
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["fixed_bytes"]["predictors"] == pred_bytes > 0
        assert main(["split", "--profile", str(prof), "--hot-fraction", "0.5", *opts, "-o", str(tmp_path / "p")]) == 2
        assert "--hot-fraction is a share of the FFN bytes alone" in capsys.readouterr().err
    assert main(["split", "--profile", str(prof), "--gpu-budget", "1G", "--ctx", "257", "-o", str(tmp_path / "t")]) == 2
    assert "a context of 257 tokens is longer than the 256 the model was trained on" in capsys.readouterr().err
    (prof / "summary.json").write_text(json.dumps({"speed": 5}))  # the report takes the rest from the counts
    assert main(["profile", "--report", str(prof)]) == 0
    assert capsys.readouterr().out.startswith(f"model: {model}\n")
    with pytest.raises(SystemExit):
        main(["split", "--profile", str(prof), "--gpu-budget=-5G", "-o", str(tmp_path / "t")])
    assert "expected a size such as 512M or 2G, got '-5G'" in capsys.readouterr().err
    old = json.dumps(dict(split, gpu_share_expected=0.25))
    (tmp_path / "v.json").write_text(old)  # both files renamed together, or neither
    (tmp_path / "v.gpuidx").mkdir()
    assert main(["split", "--profile", str(prof), "--hot-fraction", "0.5", "-o", str(tmp_path / "v")]) == 2
    assert "v.gpuidx: a directory is in the way" in capsys.readouterr().err
    assert (tmp_path / "v.json").read_text() == old and not list(tmp_path.glob("*.tmp*"))
    # a split replaces its own files, never another file given as -o (here the profile's manifest)
    assert main(["split", "--profile", str(prof), "--hot-fraction", "0.25", "-o", str(tmp_path / "s")]) == 0
    manifest = (prof / "manifest.json").read_text()
    assert main(["split", "--profile", str(prof), "--hot-fraction", "0.5", "-o", str(prof / "manifest")]) == 2
    assert "manifest.json: exists and is not a hotcold split; not replaced" in capsys.readouterr().err
    assert (prof / "manifest.json").read_text() == manifest
    (tmp_path / "x.gpuidx").write_bytes(open(model, "rb").read())
    assert main(["split", "--profile", str(prof), "--hot-fraction", "0.5", "-o", str(tmp_path / "x")]) == 2
    assert "x.gpuidx: exists and is not a .gpuidx" in capsys.readouterr().err
    bundle = tmp_path / "bundle"  # a predictor bundle where a profile belongs
    bundle.mkdir()
    from predictors.bundle import FORMAT
    (bundle / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    assert main(["split", "--profile", str(bundle), "--hot-fraction", "0.5", "-o", str(tmp_path / "w")]) == 2
    assert "bundle: a predictor bundle, not a profile directory" in capsys.readouterr().err
    # a model of the same shape with other weights: its profile and split are refused
    other = write_gguf(str(tmp_path / "o.gguf"), c, tiny_weights(c, seed=1))
    assert main(["split", "--profile", str(prof), "-m", other, "--hot-fraction", "0.5", "-o", str(tmp_path / "u")]) == 2
    assert "profile of another model" in capsys.readouterr().err
    import shutil
    moved = tmp_path / "moved_prof"  # the model the profile recorded is gone: -m is asked for
    shutil.copytree(prof, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps(dict(manifest, model=str(tmp_path / "gone.gguf"))))
    assert main(["split", "--profile", str(moved), "--hot-fraction", "0.5", "-o", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err == (f"hotcold: error: {tmp_path / 'gone.gguf'}: the model profile {moved} was made "
                                       "with is not there; give -m MODEL\n")
    assert main(["split", "--profile", str(moved), "-m", model, "--hot-fraction", "0.5", "-o",
                 str(tmp_path / "g")]) == 0
    from engine.api import load
    from tools.split import hot_neurons
    from test_hybrid import gate_bundle
    m = load(other, n_ctx=32)
    with pytest.raises(HotcoldError, match="split of another model"):
        hot_neurons(m, gate_bundle(m), str(tmp_path / "s.json"), None, "cpu", 32)
    own = load(model, n_ctx=32)
    from tools.split import write_gpuidx
    hot = split["gpu_neurons"]
    bad = {"bad.json": [g[:-1] + [c.n_ff] for g in hot], "dup.json": [g[:1] + g for g in hot],
           "float.json": [[i + 0.5 for i in g] for g in hot], "huge.json": [[2**40] for _ in hot]}
    for name, ids in bad.items():
        (tmp_path / name).write_text(json.dumps(dict(split, gpu_neurons=ids)))
    for name, ids in (("neg.gpuidx", [[-1] + g for g in hot]), ("dup.gpuidx", bad["dup.json"])):
        write_gpuidx(str(tmp_path / name), dict(split, gpu_neurons=ids))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "none.json").write_text(json.dumps({k: v for k, v in split.items() if k != "gpu_neurons"}))
    (tmp_path / "fp.json").write_text(json.dumps(dict(split, fingerprint="x")))
    for name, why in (("bad.json", "layer 0's hot neuron ids are not increasing ids without repeats"),
                      ("dup.json", "without repeats"), ("neg.gpuidx", "name different neurons"),
                      ("dup.gpuidx", "name different neurons"), ("float.json", "integer ids"),
                      ("huge.json", "without repeats"),
                      ("list.json", "not a hotcold split"), ("none.json", "not a hotcold split \\(no gpu_neurons\\)"),
                      ("fp.json", "fingerprint is not a JSON object")):
        with pytest.raises(HotcoldError, match=why):
            hot_neurons(own, gate_bundle(own), str(tmp_path / name), None, "cpu", 32)
    assert len(hot_neurons(own, gate_bundle(own), str(tmp_path / "s.json"), None, "cpu", 32)[1]) == c.n_layer
    split = json.loads((tmp_path / "s.json").read_text())  # -o s twice: replaced by the second (0.25) split


def test_gpu_budget_solved_on_the_spot_when_neurons_are_not_a_multiple_of_32(tmp_path):
    """generate/perplexity/bench --gpu-budget place groups that divide n_ff: they have no --group to change."""
    from engine.api import load
    from test_hybrid import gate_bundle
    from tiny_model import tiny_weights, write_gguf
    from tools.cli import main
    from tools.split import hot_neurons
    c = tiny_config("relu", n_ff=48)
    model = write_gguf(str(tmp_path / "m.gguf"), c, tiny_weights(c, seed=0))
    (tmp_path / "c.txt").write_text("the cat sat on the mat, and then the dog ate in the hat. " * 6)
    assert main(["profile", "-m", model, "-f", str(tmp_path / "c.txt"), "--ctx", "32", "--tokens", "64",
                 "--samples-per-layer", "8", "-o", str(tmp_path / "prof"), "-t", "1", "--backend", "torch"]) == 0
    m = load(model, n_ctx=32)
    bundle = gate_bundle(m)
    bundle.corpus["profile"] = str(tmp_path / "prof")
    _, hot, device = hot_neurons(m, bundle, None, 2**30, "cpu", 32)
    assert device == "cpu" and [len(h) for h in hot] == [c.n_ff] * c.n_layer  # a budget past the whole FFN
