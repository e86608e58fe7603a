"""`hotcold perplexity -f FILE --hellaswag`: multiple-choice accuracy as llama.cpp's perplexity --hellaswag scores it.

FILE holds tasks of 6 lines each, as llama.cpp reads hellaswag_val_full.txt: the context, the index (0-3) of the right
ending, the 4 endings. Each ending is scored after its context by the mean log-probability of its tokens (those after
the tokens all 4 sequences share); the likeliest is the model's choice. With a sparsity config or predictors the
endings are scored as generation computes them, so a sparse model's accuracy is measured, not the dense one's.
"""
from __future__ import annotations

import math

import numpy as np

from engine.config import HotcoldError
from engine.files import read_text

ENDINGS = 4


def read_tasks(path: str) -> list[tuple[str, int, list[str]]]:
    """(context, gold, endings) per task; one line naming the file and line where it is not that shape."""
    lines = read_text(path, "HellaSwag tasks").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines or len(lines) % (2 + ENDINGS):
        raise HotcoldError(f"{path}: HellaSwag tasks come as {2 + ENDINGS} lines each (the context, the right "
                           f"ending's index, {ENDINGS} endings); {len(lines)} lines")
    tasks = []
    for i in range(0, len(lines), 2 + ENDINGS):
        gold = lines[i + 1].strip()
        if gold not in [str(k) for k in range(ENDINGS)]:
            raise HotcoldError(f"{path}: line {i + 2}: {gold!r}, expected the right ending's index 0-{ENDINGS - 1}")
        tasks.append((lines[i], int(gold), lines[i + 2:i + 2 + ENDINGS]))
    return tasks


def ending_scores(model, context: str, endings: list[str]) -> np.ndarray:
    """(ENDINGS,) the mean log-probability of each ending's tokens after the tokens the sequences share."""
    import torch
    seqs = [model.tokenize(context + " " + e, special=False) for e in endings]
    if max(map(len, seqs)) > model.n_ctx:
        raise HotcoldError(f"a task of {max(map(len, seqs))} tokens does not fit the context of {model.n_ctx} "
                           "(raise --ctx)")
    shared = 0
    while all(len(s) > shared + 1 for s in seqs) and len({s[shared] for s in seqs}) == 1:
        shared += 1
    out = []
    start = max(shared, 2)  # (a context of one token: its first ending token, read after it alone, is not scored)
    for k, s in enumerate(seqs):  # the prefix s[:start - 1], the same in all four where shared >= 1: computed once
        logits = model.scored_logits(s, start - 1, prefix_held=k > 0 and shared >= 1)  # (len - start, n_vocab)
        logp = torch.log_softmax(logits.double(), -1)
        out.append(float(logp[torch.arange(len(s) - start), torch.tensor(s[start:])].mean()))
    return np.array(out)


def hellaswag(model, tasks: list, progress=None) -> dict:
    """Accuracy over the tasks, with a 95% interval (normal approximation), and each task's choice."""
    right, chosen = 0, []
    model.reset_counts()
    for k, (context, gold, endings) in enumerate(tasks):
        pick = int(np.argmax(ending_scores(model, context, endings)))
        chosen.append(pick)
        right += pick == gold
        if progress:
            progress(k, right / (k + 1))
    n = len(tasks)
    acc = right / n
    return {"tasks": n, "accuracy": acc, "ci95": 1.96 * math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,
            "choices": chosen, **model.sparsity_stats()}
