"""hotcold relufy: fine-tuning a SiLU model into a ReLU one, resumable, written as a GGUF the engine runs."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.api import load
from engine.config import HotcoldError
from engine.loader import load_checkpoint
from tiny_model import tiny_models
from tools.cli import main
from tools.relufy import STATE_SUFFIX, Settings, relufy

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("tiny")), (("silu", 0), ("drelu", 0)))


def tiny_run(tiny, out, steps=6, l1=0.0, **kw):
    ckpt = load_checkpoint(tiny[0]["silu", 0])
    with open(tiny[1]) as fh:
        ids = torch.tensor(ckpt.tokenizer.encode(fh.read(), special=False, add_bos=False))
    s = Settings("tiny", "relu", steps, 2, 16, 1e-2, l1, 0, "cat text", 1)
    return relufy(ckpt, s, ids[:-64], ids[-64:], str(out), "f16", save_every=2, **kw), ids[-64:]


def tensors(path):
    return {k: t.data.tobytes() for k, t in load_checkpoint(str(path)).tensors.items()}


def test_resumed_run_equals_uninterrupted_and_the_engine_runs_what_was_trained(tiny, tmp_path):
    whole, heldout = tiny_run(tiny, tmp_path / "whole.gguf")
    assert whole["after"]["loss"] < whole["swapped"]["loss"] - 1.0  # it learned (the tiny text repeats)
    assert 0.2 < whole["after"]["sparsity"] < 0.9

    def stop(step, loss):
        if step == 3:  # after the state of step 4 was saved
            raise KeyboardInterrupt

    out = tmp_path / "cut.gguf"
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tiny, out, on_step=stop)
    assert os.path.exists(f"{out}{STATE_SUFFIX}") and not os.path.exists(out)
    steps = []
    resumed, _ = tiny_run(tiny, out, on_step=lambda step, loss: steps.append(step))
    assert steps == [4, 5]  # resumed, not started over
    assert not os.path.exists(f"{out}{STATE_SUFFIX}")
    assert resumed["losses"] == whole["losses"]
    assert tensors(out) == tensors(tmp_path / "whole.gguf")

    # the written model is the trained one: the engine's loss on the held-out text is the trainer's (f16 weights)
    model = load(str(out), n_ctx=128, threads=1)
    assert model.config.act == "relu"
    ids, nll = heldout.tolist(), 0.0
    for a in range(0, len(ids) - 1, 16):  # the trainer's windows of ctx 16
        win = ids[a:a + 17]
        nll += float(F.cross_entropy(model.logits(win[:-1]), torch.tensor(win[1:]), reduction="sum"))
    loss = nll / (len(ids) - 1)
    assert abs(loss - whole["after"]["loss"]) < 0.02, (loss, whole["after"]["loss"])

    # the L1 penalty on the activations makes the model sparser
    sparse, _ = tiny_run(tiny, tmp_path / "l1.gguf", l1=1.0)
    assert sparse["after"]["sparsity"] > whole["after"]["sparsity"] + 0.05, (sparse["after"], whole["after"])


def interrupted(tiny, out) -> str:
    """The state file of a run to `out` stopped after its first step."""
    def stop(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_run(tiny, out, on_step=stop)
    return f"{out}{STATE_SUFFIX}"


def test_a_state_of_other_settings_or_a_corrupt_one_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "r.gguf"
    state = interrupted(tiny, out)
    saved = open(state, "rb").read()
    argv = ["relufy", "-m", tiny[0]["silu", 0], "-f", tiny[1], "-o", str(out), "--steps", "6", "--batch", "2",
            "--ctx", "16", "--heldout", "64", "-t", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "r.gguf.train.pt: the state of a run with other settings" in err and "\n" not in err.strip()
    assert open(state, "rb").read() == saved  # nothing lost
    with open(state, "r+b") as fh:
        fh.truncate(len(saved) // 2)
    assert main(argv) == 2
    assert "unreadable training state" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    assert main(argv[:4] + [str(short)] + argv[5:] + ["--force"]) == 2
    assert "tokens of corpus; relufy needs at least" in capsys.readouterr().err
    out.write_bytes(b"keep")
    assert main(argv) == 2
    assert f"r.gguf: already exists, with {state} of a stopped run beside it (--force resumes that run if it had " \
        "these settings)" in capsys.readouterr().err  # a run with --force killed before (or just after) writing r.gguf
    os.rename(state, state + ".aside")
    assert main(argv) == 2
    assert "r.gguf: already exists (--force overwrites it)" in capsys.readouterr().err
    os.rename(state + ".aside", state)
    assert main(argv[:6] + [str(short / "r.gguf")] + argv[7:]) == 2  # a folder above it is a file (missing ones are
    assert "short.txt: exists and is not a directory" in capsys.readouterr().err  # made, as for every output)
    with pytest.raises(SystemExit):
        main(argv + ["--lr", "0"])
    assert "--lr: must be a number > 0" in capsys.readouterr().err
    assert main(argv[:-4] + ["--ctx", "300"] + argv[-2:]) == 2  # past the model's training context
    assert "a context of 300 tokens is longer than the 256 the model was trained on" in capsys.readouterr().err
    assert out.read_bytes() == b"keep" and open(state, "rb").read()[:8] == saved[:8]
    assert main([a if a != tiny[0]["silu", 0] else tiny[0]["drelu", 0] for a in argv[:7]] + ["-t", "1"]) == 2
    assert "drelu0.gguf: a drelu model, already exactly sparse; relufy fine-tunes a SiLU model" in \
        capsys.readouterr().err
    diverged = [str(tmp_path / "d.gguf") if a == str(out) else a for a in argv]
    diverged += ["--lr", "1e30", "--seed", str(10**14)]
    assert main(diverged) == 2  # a seed past 64 bits is taken; a NaN loss is said, and no state kept to resume from
    err = capsys.readouterr().err
    assert "training diverged at step" in err and err.strip().endswith("lower --lr (1e+30)"), err  # no state to remove
    assert not [f for f in os.listdir(tmp_path) if f.startswith("d.gguf")]


@pytest.mark.slow
def test_smollm2_relufied_learns_on_held_out_text(tmp_path, capsys):
    """SmolLM2 with ReLU swapped in writes nonsense (held-out loss far above the SiLU model's); a few steps on
    tiny-shakespeare already bring the held-out loss down, exactly sparse, and the engine runs the result."""
    out = tmp_path / "relu.gguf"
    assert main(["relufy", "-f", os.path.join(DATA, "tinyshakespeare.txt"), "-o", str(out), "--steps", "4",
                 "--batch", "2", "--ctx", "64", "--heldout", "512", "--lr", "3e-4", "--json", "-t", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["source"]["loss"] < r["swapped"]["loss"] - 1.0
    assert r["after"]["loss"] < r["swapped"]["loss"] - 1.0
    assert r["source"]["sparsity"] < 1e-4 and r["after"]["sparsity"] > 0.3
    model = load(str(out), n_ctx=64, threads=2)
    assert model.config.act == "relu"
    done = model.generate(model.tokenize("To be, or not to be"), n=8, ignore_stop=True)
    assert len(done.token_ids) == 8
    assert np.isfinite(model.logits(model.tokenize("the king")).numpy()).all()


def test_a_damaged_state_is_refused_and_kept(tiny, tmp_path):
    """A saved state of this very run is checked all through before the run resumes from it."""
    out = tmp_path / "d.gguf"
    state = interrupted(tiny, out)
    saved = torch.load(state, weights_only=True)
    name = "blk.0.ffn_gate.weight"

    def nan_weight(st):
        st["weights"][name][0, 0] = float("nan")

    def nan_moment(st):
        st["opt"]["state"][0]["exp_avg"].view(-1)[0] = float("nan")

    cases = [(lambda st: st["weights"].update({name: torch.zeros(3)}), f"weight {name} is not finite float32"),
             (nan_weight, f"weight {name} is not finite float32"),
             (lambda st: st["weights"].pop(name), "not the weights of this model"),
             (lambda st: st["opt"].pop("param_groups"), "optimizer state: KeyError"),
             (lambda st: st["opt"]["param_groups"][0].update(betas=(0.5, 0.5)), "optimizer settings differ"),
             (nan_moment, "optimizer exp_avg of weight"),
             (lambda st: st["opt"]["state"][0].update(step=torch.tensor(7.0)), "optimizer step of weight"),
             (lambda st: st.update(record="x"), "its record of the run"),
             (lambda st: st["record"]["losses"].pop(), "its record of the run"),
             (lambda st: st["record"].pop("swapped"), "its record of the run"),
             (lambda st: st.update(step=99), "step 99")]
    for damage, msg in cases:
        st = copy.deepcopy(saved)
        damage(st)
        torch.save(st, state)
        before = open(state, "rb").read()
        with pytest.raises(HotcoldError) as e:
            tiny_run(tiny, out)
        err = str(e.value)
        assert err.startswith(f"{state}: damaged training state ({msg}") and "\n" not in err, err
        assert err.endswith("; remove it to start over"), err
        assert open(state, "rb").read() == before and not out.exists()
