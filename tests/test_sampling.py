"""llama.cpp's sampler chain (engine.sampling): each step against a plain transcription of llama.cpp's, on random
logits and random settings; DRY against a brute-force search for repeats; mirostat's state; and the samplers on
SmolLM2 through the CLI and the server."""
import json
import math
import random
import re

import numpy as np
import pytest

from engine.config import HotcoldError
from engine.sampling import Sampler, z_lengths
from tools.cli import build_parser, main, sampler_of


def softmax(cands: list) -> list[float]:
    top = max(z for _, z in cands)
    e = [math.exp(z - top) for _, z in cands]
    return [x / sum(e) for x in e]


def reference_chain(logits: np.ndarray, s: Sampler) -> dict[int, float]:
    """llama.cpp's chain after the penalties, step by step on a sorted list of (id, logit), XTC's coin taken as
    heads: {id: probability} of the tokens the draw can take."""
    cands = [(i, float(z)) for i, z in enumerate(logits)]
    if s.top_n_sigma > 0:
        zs = [z for _, z in cands]
        mean = sum(zs) / len(zs)
        sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / len(zs))
        cands = [(i, z) for i, z in cands if z >= max(zs) - s.top_n_sigma * sd]
    cands.sort(key=lambda c: -c[1])
    if 0 < s.top_k < len(cands):
        cands = cands[:s.top_k]
    if s.typical_p < 1:
        p = softmax(cands)
        entropy = -sum(q * math.log(q) for q in p if q > 0)
        order = sorted(range(len(cands)), key=lambda i: abs(-math.log(p[i]) - entropy))
        total, last = 0.0, len(order)
        for j, i in enumerate(order):
            total += p[i]
            if total > s.typical_p:
                last = j + 1
                break
        cands = sorted((cands[i] for i in order[:last]), key=lambda c: -c[1])
    if s.top_p < 1:
        p, total = softmax(cands), 0.0
        for j, q in enumerate(p):
            total += q
            if total >= s.top_p:
                cands = cands[:j + 1]
                break
    if s.min_p > 0:
        cands = [c for c in cands if c[1] >= cands[0][1] + math.log(s.min_p)]
    if s.xtc_probability > 0 and s.xtc_threshold <= 0.5 and len(cands) > 1:
        p, last = softmax(cands), 0
        for j, q in enumerate(p):
            if q < s.xtc_threshold:
                break
            last = j
        cands = cands[last:]
    t = s.temperature
    if s.dynatemp_range > 0 and len(cands) > 1:
        p = softmax(cands)
        entropy = -sum(q * math.log(q) for q in p if q > 0)
        lo, hi = max(0.0, t - s.dynatemp_range), t + s.dynatemp_range
        t = lo + (hi - lo) * (entropy / math.log(len(cands))) ** s.dynatemp_exponent
    return dict(zip([i for i, _ in cands], softmax([(i, z / t) for i, z in cands])))


def test_the_chain_agrees_with_llama_cpps_steps():
    """On 400 random settings of top-n-sigma, top-k, typical, top-p, min-p, XTC (always on when asked for), the
    temperature and the dynamic temperature: the same tokens with the same probabilities."""
    rng = random.Random(7)
    for case in range(400):
        s = Sampler(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, 5, 40]),
                    top_p=rng.choice([1.0, 0.9, 0.5]), min_p=rng.choice([0.0, 0.05, 0.2]),
                    typical_p=rng.choice([1.0, 0.95, 0.5]), xtc_probability=rng.choice([0.0, 1.0]),
                    xtc_threshold=rng.choice([0.05, 0.1, 0.3]), top_n_sigma=rng.choice([-1.0, 1.0, 2.5]),
                    dynatemp_range=rng.choice([0.0, 0.5]), dynatemp_exponent=rng.choice([1.0, 2.0]), seed=case)
        logits = (np.random.default_rng(case).standard_normal(300) * rng.choice([1.0, 3.0, 6.0])).astype(np.float32)
        ids, p = s.distribution(logits)
        got = {int(i): float(q) / p.sum() for i, q in zip(ids, p) if q > 0}
        want = reference_chain(logits, s)
        assert got.keys() == want.keys(), (case, s)
        assert [got[i] for i in want] == pytest.approx(list(want.values()), rel=1e-9, abs=1e-12), (case, s)
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, xtc_probability=1.0, xtc_threshold=0.15)
    assert s.distribution(np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32)))[1].tolist() == pytest.approx(
        [0, 0, 1, 0.5])  # 0.4 and 0.3 out, 0.2 (the least of those >= 0.15) kept, and 0.1


def test_temperature_zero_takes_the_likeliest_token_the_chain_leaves():
    """Greedy is the top token, unless typical or XTC dropped it (then the likeliest they left) or a dynamic
    temperature's range warms the draw again, as llama.cpp's chain at temperature 0."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert Sampler(temperature=0).greedy and Sampler(temperature=0, mirostat=2).choose(logits) == 0
    xtc = Sampler(temperature=0, top_p=1, min_p=0, xtc_probability=1, xtc_threshold=0.1)
    assert not xtc.greedy and xtc.reach == 40 and {xtc.choose(logits) for _ in range(20)} == {2}
    warm = Sampler(temperature=0, top_p=1, min_p=0, dynatemp_range=1.5, seed=1)
    assert len({warm.choose(logits) for _ in range(200)}) > 1


def dry_reference(recent: list, s: Sampler, breakers: set, n_vocab: int) -> np.ndarray:
    """DRY's penalties by brute force: for every earlier place, how many of the context's last tokens (none a breaker)
    also end there; the token that came next would repeat that many, and loses multiplier * base ** (n - allowed)
    for the longest of them; breakers are never punished."""
    last = recent[-s.dry_penalty_last_n:] if s.dry_penalty_last_n > 0 else list(recent)
    out = np.zeros(n_vocab)
    if len(last) <= s.dry_allowed_length:
        return out
    limit = 0
    while limit < len(last) and last[-1 - limit] not in breakers:
        limit += 1
    best: dict[int, int] = {}
    for end in range(len(last) - 1):  # last[..end] against last[..-1]
        n = 0
        while n < end + 1 and n < limit and last[end - n] == last[-1 - n]:
            n += 1
        if n >= s.dry_allowed_length and last[end + 1] not in breakers:
            best[last[end + 1]] = max(best.get(last[end + 1], 0), n)
    for t, n in best.items():
        out[t] = s.dry_multiplier * s.dry_base ** (n - s.dry_allowed_length)
    return out


def test_dry_agrees_with_a_brute_force_search_for_repeats():
    """On 300 random contexts over a small alphabet (repeats everywhere), with random breakers, lengths and
    windows: each token loses what the brute force says; the Z-array is the brute force's too."""
    rng = random.Random(11)
    for case in range(300):
        recent = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        s = Sampler(dry_multiplier=rng.choice([0.8, 2.0]), dry_base=rng.choice([1.0, 1.75, 3.0]),
                    dry_allowed_length=rng.choice([0, 1, 2, 4]), dry_penalty_last_n=rng.choice([-1, 8, 30]))
        s.breaker_ids = np.array(rng.sample(range(6), rng.choice([0, 1])), np.int64)
        logits = np.random.default_rng(case).standard_normal(8).astype(np.float32)
        got = logits.astype(np.float64) - s.dry(logits, recent)
        want = dry_reference(recent, s, set(s.breaker_ids.tolist()), 8)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (case, recent, s)
        assert z_lengths(recent) == [next((k for k in range(len(recent) - i) if recent[k] != recent[i + k]),
                                          len(recent) - i) for i in range(len(recent))]
    assert Sampler(dry_multiplier=1.0).dry(np.zeros(4, np.float32), [1, 2, 3, 1, 2, 3, 1, 2]).tolist() == [
        0, 0, 0, -1.75 ** 3]  # "1 2" then 3 three times: 3 would repeat 5 tokens, 2 over the allowed 2


def mirostat_reference(logits: np.ndarray, version: int, temperature: float, tau: float, eta: float, steps: int,
                       seed: int) -> tuple[list[int], float]:
    """llama.cpp's mirostat samplers transcribed, drawing as hotcold draws: the tokens and the last mu."""
    rng, mu, out = np.random.default_rng(seed), 2 * tau, []
    for _ in range(steps):
        cands = sorted(((i, float(z) / temperature) for i, z in enumerate(logits)), key=lambda c: -c[1])
        p = softmax(cands)
        if version == 2:
            k = next((j for j, q in enumerate(p) if -math.log2(q) > mu), len(p)) or 1
        else:
            m = min(100, len(p)) - 1
            tb = sum(math.log((i + 2) / (i + 1)) * math.log(p[i] / p[i + 1]) for i in range(m))
            t2 = sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(m))
            s_hat = tb / t2
            eps = s_hat - 1
            k = max(int((eps * 2 ** mu / (1 - len(logits) ** -eps)) ** (1 / s_hat)), 1)
        p = [q / sum(p[:k]) for q in p[:k]]
        c = np.cumsum(p)
        j = min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), k - 1)
        mu -= eta * (-math.log2(p[j]) - tau)
        out.append(cands[j][0])
    return out, mu


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_agrees_with_llama_cpps(version):
    """30 steps on the same logits: the same tokens, and mu moved the same way (towards tau)."""
    logits = (np.random.default_rng(3).standard_normal(500) * 3).astype(np.float32)
    s = Sampler(mirostat=version, temperature=0.9, mirostat_tau=4.0, mirostat_eta=0.2, seed=5)
    got = [s.choose(logits) for _ in range(30)]
    want, mu = mirostat_reference(logits, version, 0.9, 4.0, 0.2, 30, 5)
    assert got == want and s.mu == pytest.approx(mu)
    assert s.penalized(logits, [1, 2, 3]) is logits  # no penalties nor DRY under mirostat, as llama.cpp


@pytest.mark.parametrize("kw,why", [({"mirostat": 3}, "0 (off), 1 or 2"), ({"typical_p": 1.5}, "from 0 to 1"),
                                    ({"dry_base": 0.5}, "at least 1"), ({"dry_sequence_breakers": ["a", ""]},
                                                                          "strings that are not empty"),
                                    ({"xtc_threshold": -0.1}, "from 0 to 1"), ({"dry_penalty_last_n": -2}, "-1 (all)"),
                                    ({"top_n_sigma": math.inf}, "a number, finite")])
def test_bad_sampler_settings_are_named(kw, why):
    with pytest.raises(HotcoldError, match=re.escape(why)):
        Sampler(**kw)


def test_samplers_on_smollm2_cli_and_server(smollm, capsys):
    """DRY breaks SmolLM2's greedy loop on a repetitive prompt (fewer repeated 4-grams); the new samplers' flags and
    llama.cpp's spellings of them reach the sampler, and bad values are one line."""
    prompt = "one, two, three, one, two, three, one, two, three,"  # greedy: "one, two, three," to the end
    ids = smollm.tokenize(prompt)

    def repeats(out) -> int:
        grams = [tuple(out[i:i + 4]) for i in range(len(out) - 3)]
        return len(grams) - len(set(grams))
    plain = smollm.generate(ids, 48, Sampler(temperature=0), ignore_stop=True).token_ids
    dry = Sampler(temperature=0, dry_multiplier=0.8)
    smollm.check_sampler(dry)  # the breakers: tokens holding a newline, a colon, a quote or an asterisk
    assert smollm.tokenize("\n", add_bos=False)[0] in dry.breaker_ids.tolist()
    with pytest.raises(HotcoldError, match="DRY sequence breaker 'User:': no token of the vocabulary holds it whole"):
        smollm.check_sampler(Sampler(dry_multiplier=0.8, dry_sequence_breakers=("\n", "User:")))
    unlooped = smollm.generate(ids, 48, dry, ignore_stop=True).token_ids
    assert repeats(plain) > 30 and repeats(unlooped) < 5, (smollm.detokenize(plain), smollm.detokenize(unlooped))
    assert main(["generate", "-p", prompt, "-n", "48", "--temperature", "0", "--ignore-eos", "--json",
                 "--dry-multiplier", "0.8"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == unlooped
    for flags, want in ((["--typical", "0.9"], {"typical_p": 0.9}), (["--top-nsigma", "1.5"], {"top_n_sigma": 1.5}),
                        (["--mirostat", "2", "--mirostat-ent", "3", "--mirostat-lr", "0.2"],
                         {"mirostat": 2, "mirostat_tau": 3, "mirostat_eta": 0.2}),
                        (["--xtc-probability", "0.5", "--xtc-threshold", "0.2"],
                         {"xtc_probability": 0.5, "xtc_threshold": 0.2}),
                        (["--dynatemp-range", "0.3", "--dynatemp-exp", "2"],
                         {"dynatemp_range": 0.3, "dynatemp_exponent": 2}),
                        (["--dry-multiplier", "0.5", "--dry-base", "2", "--dry-allowed-length", "3",
                          "--dry-penalty-last-n", "64", "--dry-sequence-breaker", "none"],
                         {"dry_multiplier": 0.5, "dry_base": 2, "dry_allowed_length": 3, "dry_penalty_last_n": 64,
                          "dry_sequence_breakers": ()}),
                        (["--dry-sequence-breaker", "a", "--dry-sequence-breaker", "bc"],
                         {"dry_sequence_breakers": ("a", "bc")}),
                        (["--dry-sequence-breaker", "a", "--dry-sequence-breaker", "none", "--dry-sequence-breaker",
                          "b"], {"dry_sequence_breakers": ("b",)})):
        sampler = sampler_of(build_parser("generate").parse_args(["generate", "-p", "Hello", *flags]))
        assert {k: getattr(sampler, k) for k in want} == want, flags
    assert main(["generate", "-p", "Hello", "-n", "4", "--seed", "1", "--json", "--mirostat", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    for flags, why in ((["--mirostat", "3"], "must be from 0 to 2, got 3"),
                       (["--dry-base", "0.5"], "must be a number >= 1"), (["--typical", "2"], "--typical-p/--typical")):
        with pytest.raises(SystemExit):
            main(["generate", "-p", "Hello", *flags])
        assert why in capsys.readouterr().err, flags
