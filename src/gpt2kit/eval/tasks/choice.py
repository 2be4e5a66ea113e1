"""Multiple choice by log-likelihood (lm-evaluation-harness's `multiple_choice`, HellaSwag-compatible).

Each choice is scored as the continuation " " + choice after the context. `acc` picks the choice with the
highest summed log-likelihood; `acc_norm` divides each by the choice's length in *characters* (without
the separating space) first, so long endings are not penalised for having more tokens. Ties go to the
lowest-numbered choice (numpy.argmax's rule, which lm-evaluation-harness inherits).

One JSON object per line, either
- {"context": str, "choices": [str, ...], "label": int}  ("query"/"gold" are accepted as synonyms), or
- HellaSwag's own records {"activity_label", "ctx_a", "ctx_b", "endings", "label"}, pre-processed as
  lm-evaluation-harness does (the WikiHow "[title]" markers and other bracketed artifacts removed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import UserError
from ..scoring import score_requests
from .common import argmax_first, encode_pair, field, read_jsonl


@dataclass
class Question:
    context: str
    choices: list[str]
    label: int


def hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _question(path, lineno: int, obj: dict) -> Question:
    if "endings" in obj:  # HellaSwag
        ctx = field(path, lineno, obj, "ctx_a") + " " + field(path, lineno, obj, "ctx_b").capitalize()
        context = hellaswag_clean(field(path, lineno, obj, "activity_label") + ": " + ctx)
        choices = [hellaswag_clean(e) for e in field(path, lineno, obj, "endings", list)]
        label = field(path, lineno, obj, "label", (int, str))
    else:
        key = "context" if "context" in obj or "query" not in obj else "query"
        context = field(path, lineno, obj, key)
        choices = field(path, lineno, obj, "choices", list)
        label = field(path, lineno, obj, "label" if "label" in obj or "gold" not in obj else "gold", (int, str))
    try:
        label = int(label)
    except ValueError:
        raise UserError(f"{path}:{lineno}: field 'label' must be an integer index, got {label!r}") from None
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise UserError(f"{path}:{lineno}: field 'choices' must hold at least two non-empty strings")
    if not 0 <= label < len(choices):
        raise UserError(f"{path}:{lineno}: field 'label' must be between 0 and {len(choices) - 1}, got {label}")
    return Question(context, choices, label)


def pick(logprobs: list[float], choices: list[str]) -> tuple[int, int]:
    """(index by acc, index by acc_norm) for one question's summed log-likelihoods."""
    normed = [lp / len(c) for lp, c in zip(logprobs, choices)]
    return argmax_first(logprobs), argmax_first(normed)


def evaluate_choice(model, tokenizer, path, *, limit=None, batch_size=16, progress=False) -> dict:
    questions = [_question(path, lineno, obj) for lineno, obj in read_jsonl(path, limit)]
    requests = [encode_pair(tokenizer, q.context, " " + c) for q in questions for c in q.choices]
    scores = score_requests(model, requests, batch_size=batch_size, progress=progress, desc="choice")
    correct = correct_norm = at = 0
    for q in questions:
        k = len(q.choices)
        best, best_norm = pick([s.logprob for s in scores[at : at + k]], q.choices)
        correct += best == q.label
        correct_norm += best_norm == q.label
        at += k
    n = len(questions)
    return {"task": "choice", "examples": n, "acc": correct / n, "acc_norm": correct_norm / n}
