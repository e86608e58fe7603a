"""`hotcold relufy`: a ReLU model from a SiLU one, by swapping the FFN activation and fine-tuning on a corpus.

SmolLM2 with ReLU put in place of SiLU (tools/fixtures.py) is exactly sparse but writes nonsense: wikitext
perplexity in the thousands. A short fine-tune brings it back to coherent text while it stays exactly sparse
(ReLUfication, as in "ReLU Strikes Back" and ProSparse), which makes it a model on which recall, sparsity and the
perplexity cost of predictors mean something. `--l1 C` adds C times the mean activation to the loss, which
pushes the sparsity up (ProSparse's penalty).

Training runs the full float32 weights in torch: the computation of engine/model.py's TorchModel.forward (which runs
in inference mode over a KV cache) from its own pieces, batched, causal and differentiable; a test checks that the
engine's loss on the written model is the trainer's. AdamW with a short warmup and a cosine decay, on windows drawn
from the corpus by a generator seeded with the step number. The last `--heldout` tokens of the corpus are never
trained on: loss, perplexity and sparsity are measured there before and after. The result is written through
`hotcold export`'s writer (verified, renamed into place); while training, OUT.train.pt holds the weights, the
optimizer and the step, replaced every `--save-every` steps, and the same command resumes from it (bit for bit the
run it would have been).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from engine.api import check_context, perplexity_of
from engine.config import HotcoldError, blk, finite
from engine.files import check_writable, exists_error, write_atomic
from engine.fingerprint import weights_sha256
from engine.loader import Checkpoint, load_checkpoint
from engine.model import apply_rope, ffn_activation, rms_norm
from engine.qtensor import QTensor

RELUFY_ACTS = ("relu", "drelu")  # activations a model can be fine-tuned to (exact zeros)
STATE_SUFFIX = ".train.pt"
WARMUP = 0.1  # share of the steps with a linear warmup of the learning rate (at most 20 steps)
LR_FLOOR = 0.1  # the cosine decay ends at this share of the peak learning rate
EVAL_KEYS = ("loss", "ppl", "sparsity", "tokens")  # what `evaluate` measures


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run is: a saved state resumes only under the same settings."""
    model: str
    act: str
    steps: int
    batch: int
    ctx: int
    lr: float
    l1: float
    seed: int
    corpus: str  # sha256 of the training tokens
    threads: int  # a resumed run is the uninterrupted one bit for bit only on as many threads


def forward(ckpt: Checkpoint, w: dict, act: str, tokens: torch.Tensor, cos, sin, threshold: float = 0.0):
    """Logits (B, T, n_vocab) for tokens (B, T), each layer's mean ReLU(gate) (n_layer,) for the L1 penalty (dReLU:
    its gate branch), and each layer's share of zero activations (n_layer,): the reference forward of
    engine/model.py, batched, causal, without a cache, differentiable. threshold: FATReLU's."""
    c = ckpt.config
    B, T = tokens.shape
    hd, cs, sn = c.head_dim, cos[:T], sin[:T]
    x = w["token_embd.weight"][tokens]  # (B, T, n_embd)
    means, zeros = [], []
    for i in range(c.n_layer):
        xn = rms_norm(x, w[blk(i, "attn_norm")], c.rms_eps)
        q = apply_rope((xn @ w[blk(i, "attn_q")].T).view(B, T, c.n_head, hd), cs, sn)  # (B, T, H, hd)
        k = apply_rope((xn @ w[blk(i, "attn_k")].T).view(B, T, c.n_head_kv, hd), cs, sn)  # (B, T, Hkv, hd)
        v = (xn @ w[blk(i, "attn_v")].T).view(B, T, c.n_head_kv, hd)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=c.n_head != c.n_head_kv)  # (B, H, T, hd)
        x = x + o.transpose(1, 2).reshape(B, T, c.n_embd) @ w[blk(i, "attn_output")].T
        xn = rms_norm(x, w[blk(i, "ffn_norm")], c.rms_eps)
        g = xn @ w[blk(i, "ffn_gate")].T  # (B, T, n_ff)
        h = ffn_activation(g, xn @ w[blk(i, "ffn_up")].T, act, threshold)
        means.append(F.relu(g).mean())
        zeros.append((h.detach() == 0).float().mean())
        x = x + h @ w[blk(i, "ffn_down")].T
    x = rms_norm(x, w["output_norm.weight"], c.rms_eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T, torch.stack(means), torch.stack(zeros)


def check_source(ckpt: Checkpoint) -> None:
    """A model relufy can train: a SiLU llama with its gated FFN in llama.cpp's layout."""
    c = ckpt.config
    if c.arch != "llama" or not c.ffn_gated or any("ffn_down_t" in k for k in ckpt.tensors):
        raise HotcoldError(f"{ckpt.path}: relufy takes a llama model with a gated FFN in llama.cpp's layout")
    if c.attn_bias:  # its training forward has none
        raise HotcoldError(f"{ckpt.path}: relufy trains llama models without attention biases (this one has q, k and "
                           "v biases, a Qwen2's)")
    if c.act != "silu":  # it would only train a sparse model into ReLU, dropping a dReLU's or FATReLU's own rule
        raise HotcoldError(f"{ckpt.path}: a {c.act} model, already exactly sparse; relufy fine-tunes a SiLU model")


def trainable(ckpt: Checkpoint) -> dict[str, torch.nn.Parameter]:
    """Every weight as a float32 parameter."""
    check_source(ckpt)
    return {k: torch.nn.Parameter(torch.from_numpy(t.dequantize().copy())) for k, t in ckpt.tensors.items()}


def learning_rate(s: Settings, step: int) -> float:
    """Linear warmup to s.lr, then a cosine decay that reaches LR_FLOOR * s.lr at the last step."""
    warm = max(1, min(20, int(WARMUP * s.steps)))
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, s.steps - 1 - warm)
    return s.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


def batch(s: Settings, train: torch.Tensor, step: int) -> torch.Tensor:
    """(batch, ctx + 1) windows of the training tokens, drawn by a generator seeded with (seed, step)."""
    g = torch.Generator().manual_seed((s.seed * 1_000_003 + step) % 2**63)  # any --seed: torch takes 64 bits
    starts = torch.randint(0, train.numel() - s.ctx, (s.batch,), generator=g)
    return torch.stack([train[a:a + s.ctx + 1] for a in starts.tolist()])


@torch.no_grad()
def evaluate(ckpt: Checkpoint, w: dict, act: str, tokens: torch.Tensor, ctx: int, cos, sin,
             threshold: float = 0.0) -> dict:
    """Mean loss, perplexity and share of zero FFN activations over consecutive windows of tokens."""
    from tqdm import tqdm
    nll, n, zeros = 0.0, 0, 0.0
    for a in tqdm(range(0, tokens.numel() - 1, ctx), desc="held-out", unit="window", file=sys.stderr, disable=None,
                  leave=False):
        win = tokens[a:a + ctx + 1]
        logits, _, z = forward(ckpt, w, act, win[None, :-1], cos, sin, threshold)
        nll += float(F.cross_entropy(logits[0], win[1:], reduction="sum"))
        zeros += float(z.mean()) * (win.numel() - 1)
        n += win.numel() - 1
    return {"loss": nll / n, "ppl": perplexity_of(nll, n), "sparsity": zeros / n, "tokens": n}


# --- the run ------------------------------------------------------------------------------------------------
def load_state(path: str, s: Settings, w: dict, opt) -> tuple[int, dict]:
    """The step to start from and the run's record so far, after loading a saved state into w and opt."""
    if not os.path.exists(path):
        return 0, {"losses": [], "sparsity": []}
    try:
        st = torch.load(path, weights_only=True)
        found = st["settings"]
        if not isinstance(found, dict):
            raise ValueError
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise HotcoldError(f"{path}: unreadable training state ({type(e).__name__}); remove it to start over") from None
    want = dataclasses.asdict(s)
    if found != want:
        diff = next(k for k in [*want, *found] if found.get(k) != want.get(k))  # found may hold keys want has not
        what = "another model" if diff == "model" else "another corpus" if diff == "corpus" else \
            f"{diff} {found.get(diff)!r}, now {want.get(diff)!r}"
        raise HotcoldError(f"{path}: the state of a run with other settings ({what}); remove it to start over")
    problem = state_problem(st, s, w, opt)
    if problem:
        raise HotcoldError(f"{path}: damaged training state ({problem}); remove it to start over")
    with torch.no_grad():
        for k, p in w.items():
            p.copy_(st["weights"][k])
    return st["step"], st["record"]


def finite_numbers(xs) -> bool:
    return all(isinstance(v, (int, float)) and finite(v) for v in xs)


def state_problem(st: dict, s: Settings, w: dict, opt) -> str | None:
    """What is wrong with the saved state st of this run, checked all through (its optimizer state is loaded into
    opt); None if nothing."""
    step, record, weights = st.get("step"), st.get("record"), st.get("weights")
    if not isinstance(step, int) or not 0 < step <= s.steps:
        return f"step {step!r}"
    if not isinstance(record, dict) or not finite_numbers([record.get("train_s")]) or \
            any(not isinstance(record.get(k), list) or len(record[k]) != step or not finite_numbers(record[k])
                for k in ("losses", "sparsity")) or \
            any(not isinstance(record.get(k), dict) or not finite_numbers(record[k].get(m) for m in EVAL_KEYS)
                for k in ("source", "swapped")):
        return "its record of the run"
    if not isinstance(weights, dict) or set(weights) != set(w):
        return "not the weights of this model"
    for k, p in w.items():
        t = weights[k]
        if not isinstance(t, torch.Tensor) or t.dtype != p.dtype or t.shape != p.shape or not torch.isfinite(t).all():
            return f"weight {k} is not finite float32 of shape {tuple(p.shape)}"
    fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    try:
        opt.load_state_dict(st.get("opt"))
        if [{k: g.get(k) for k in f} for g, f in zip(opt.param_groups, fresh)] != fresh:
            return "optimizer settings differ"
    except Exception as e:  # a missing or foreign optimizer state: torch raises many kinds
        return f"optimizer state: {type(e).__name__}"
    for k, p in w.items():
        for name, v in opt.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor) or v.shape != (() if name == "step" else p.shape) or \
                    not torch.isfinite(v).all() or (name == "step" and float(v) != step):
                return f"optimizer {name} of weight {k}"
    return None


def save_state(path: str, s: Settings, step: int, w: dict, opt, record: dict) -> None:
    state = {"settings": dataclasses.asdict(s), "step": step, "record": record, "opt": opt.state_dict(),
             "weights": {k: p.detach() for k, p in w.items()}}
    write_atomic(path, lambda tmp: torch.save(state, tmp))  # torch's RuntimeError of an unwritable path: one line


def relufy(ckpt: Checkpoint, s: Settings, train: torch.Tensor, heldout: torch.Tensor, out: str, outtype: str,
           save_every: int = 50, on_step=None) -> dict:
    """Fine-tune ckpt with s.act in its FFN on the train tokens and write the model to out (GGUF, outtype as in
    `hotcold export`). Resumes from out + STATE_SUFFIX when it holds this run. on_step(step, loss) after each
    step. Returns the record: held-out {loss, ppl, sparsity} of the source model, of the activation swapped in
    before training, and after; each step's training loss and sparsity."""
    from tqdm import tqdm

    from tools.export import OUTTYPES, write_model
    w = trainable(ckpt)
    opt = torch.optim.AdamW(w.values(), lr=s.lr, weight_decay=0.0)
    cos, sin = (torch.from_numpy(t) for t in ckpt.config.rope_tables(s.ctx))
    state = out + STATE_SUFFIX
    start, record = load_state(state, s, w, opt)
    if start:
        print(f"resuming: {start} of {s.steps} steps done in {state}", file=sys.stderr)
    else:
        record["source"] = evaluate(ckpt, w, ckpt.config.act, heldout, s.ctx, cos, sin, ckpt.config.act_threshold)
        record["swapped"] = evaluate(ckpt, w, s.act, heldout, s.ctx, cos, sin)
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="relufy", unit="step", file=sys.stderr,
               disable=None)
    record.setdefault("train_s", 0.0)
    t0 = time.time()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(s, step)
        tok = batch(s, train, step)  # (B, ctx + 1)
        logits, means, zeros = forward(ckpt, w, s.act, tok[:, :-1], cos, sin)
        loss = F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
        value = float(loss.detach())
        if not math.isfinite(value):
            restart = f" and remove {state} to start over" if os.path.exists(state) else ""
            raise HotcoldError(f"training diverged at step {step + 1} (loss {value}): lower --lr ({s.lr}){restart}")
        (loss + s.l1 * means.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss, sparsity = value, float(zeros.mean())
        record["losses"].append(loss)
        record["sparsity"].append(sparsity)
        bar.set_postfix(loss=f"{loss:.3f}", sparsity=f"{sparsity:.3f}")
        if (step + 1) % save_every == 0 or step + 1 == s.steps:  # the last too: the evaluation and write remain
            record["train_s"] += time.time() - t0
            t0 = time.time()
            if not all(bool(p.isfinite().all()) for p in w.values()):  # never a resume point that cannot resume
                raise HotcoldError(f"training diverged at step {step + 1} (weights not finite): lower --lr ({s.lr}) "
                                   f"and remove {state} to start over")
            save_state(state, s, step + 1, w, opt, record)
        if on_step is not None:
            on_step(step, loss)
    record["after"] = evaluate(ckpt, w, s.act, heldout, s.ctx, cos, sin)
    c = dataclasses.replace(ckpt.config, act=s.act, act_threshold=0.0)
    tensors = {k: QTensor.from_float(p.detach().numpy()) for k, p in w.items()}
    write_model(out, dataclasses.replace(ckpt, config=c, tensors=tensors, predictors=None, gpuidx=None),
                OUTTYPES[outtype], False, None)
    with contextlib.suppress(FileNotFoundError):  # saved after the last step (a twin run may have removed it)
        os.remove(state)
    return record


# --- command line -----------------------------------------------------------------------------------------
def format_record(r: dict) -> str:
    rows = [("source model", r["source"]), ("activation swapped", r["swapped"]), ("fine-tuned", r["after"])]
    lines = [f"held-out: {r['after']['tokens']} tokens", f"{'':20} {'loss':>7} {'ppl':>9} {'sparsity':>9}"]
    lines += [f"{name:20} {m['loss']:7.3f} {m['ppl']:9.2f} {m['sparsity']:9.3f}" for name, m in rows]
    return "\n".join(lines)


def cmd_relufy(args) -> None:
    import hashlib
    import json

    from predictors.bundle import model_fingerprint
    from tools.profile import read_corpus
    ckpt = load_checkpoint(args.model)
    check_source(ckpt)
    check_context(ckpt, args.ctx)
    if os.path.isdir(args.out):
        raise HotcoldError(f"{args.out}: is a directory (the output is a GGUF file)")
    if not args.out.endswith(".gguf"):
        raise HotcoldError(f"{args.out}: the output is a GGUF file; name it *.gguf")
    check_writable(args.out)  # its training state goes beside it
    if os.path.exists(args.out) and not args.force:
        raise exists_error(args.out, resume_point=args.out + STATE_SUFFIX)
    torch.set_num_threads(args.threads)
    ids: list[int] = []
    for doc in read_corpus(args.files):
        ids += ckpt.tokenizer.encode(doc, special=False, add_bos=False)
    need = args.heldout + args.ctx + 1
    if len(ids) < need:
        raise HotcoldError(f"{', '.join(args.files)}: {len(ids)} tokens of corpus; relufy needs at least {need} "
                           f"(--heldout {args.heldout} plus one window of --ctx {args.ctx})")
    tokens = torch.tensor(ids, dtype=torch.int64)
    train, heldout = tokens[:len(ids) - args.heldout], tokens[len(ids) - args.heldout:]
    model = {**model_fingerprint(ckpt), "weights_sha256": weights_sha256(ckpt.tensors)}  # all of it: attention too
    s = Settings(json.dumps(model, sort_keys=True), args.act, args.steps, args.batch, args.ctx, args.lr, args.l1,
                 args.seed, hashlib.sha256(train.numpy().tobytes()).hexdigest(), args.threads)
    record = relufy(ckpt, s, train, heldout, args.out, args.outtype, args.save_every)
    if args.json:
        from tools.cli import emit_json
        emit_json(record | {"out": args.out})
        return
    print(format_record(record))
    print(f"trained {s.steps} steps of {s.batch} x {s.ctx} tokens in {record['train_s']:.0f} s; wrote {args.out}")


def add_command(sub) -> None:
    from tools.cli import add_model_args, at_least, number
    from tools.export import OUTTYPES
    p = sub.add_parser("relufy", help="fine-tune a SiLU model into an exactly sparse ReLU one")
    add_model_args(p, ctx=False, backend=False)  # it trains in torch: no decode backend
    p.add_argument("-f", "--file", dest="files", nargs="+", required=True, metavar="CORPUS",
                   help="training text: text files or .jsonl with a text field")
    p.add_argument("-o", "--out", required=True, metavar="OUT.gguf",
                   help="the model to write (OUT.gguf.train.pt holds the run until it ends: rerun to resume; "
                   "remove it to start over)")
    p.add_argument("--act", choices=RELUFY_ACTS, default="relu", help="the FFN activation to train to (default relu)")
    p.add_argument("--steps", type=at_least(1), default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch", type=at_least(1), default=4, help="windows a step (default 4)")
    p.add_argument("--ctx", type=at_least(2), default=256, help="window size in tokens (default 256)")
    p.add_argument("--lr", type=number(0.0, above=True), default=1e-4, help="peak learning rate of AdamW "
                   "(default 1e-4)")
    p.add_argument("--l1", type=number(0.0), default=0.0, help="weight of the mean ReLU(gate) in the loss: "
                   "higher gives sparser models (default 0)")
    p.add_argument("--heldout", type=at_least(2), default=4096, metavar="N",
                   help="the corpus's last N tokens are not trained on; loss and sparsity are measured there "
                   "(default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows drawn (default 0)")
    p.add_argument("--save-every", type=at_least(1), default=50, metavar="STEPS",
                   help="steps between saves of the resumable state (default 50)")
    p.add_argument("--outtype", choices=tuple(OUTTYPES), default="q8_0",
                   help="how the written weights are stored (default q8_0)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_relufy)
