"""LAMBADA (OpenAI's jsonl, one `{"text": ...}` per line): predict the last word of a passage.

As lm-evaluation-harness's `lambada_openai`: the context is the passage up to its last space, the target
is the last word *with its leading space*; accuracy counts an example only if every target token is the
model's greedy (argmax) choice, and `ppl` is exp(-mean over examples of the target's summed
log-likelihood) -- a perplexity per target word, not per token.
"""

from __future__ import annotations

import math
from pathlib import Path

from ...errors import UserError
from ..scoring import score_requests
from .common import encode_pair, field, read_jsonl


def lambada_pair(text: str) -> tuple[str, str]:
    """(context, target): the target is " " + the passage's last space-separated word."""
    context, sep, word = text.rpartition(" ")
    if not sep or not word or not context.strip():
        raise ValueError("needs a context and a final word separated by a space")
    return context, " " + word


def evaluate_lambada(model, tokenizer, path: str | Path, *, limit=None, batch_size=16, progress=False) -> dict:
    requests = []
    for lineno, obj in read_jsonl(path, limit):
        text = field(path, lineno, obj, "text")
        try:
            context, target = lambada_pair(text)
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: field 'text' {e}") from None
        requests.append(encode_pair(tokenizer, context, target))
    scores = score_requests(model, requests, batch_size=batch_size, progress=progress, desc="lambada")
    n = len(scores)
    mean_ll = sum(s.logprob for s in scores) / n
    return {
        "task": "lambada",
        "examples": n,
        "acc": sum(s.greedy for s in scores) / n,
        "ppl": math.exp(-mean_ll),
        "target_tokens": sum(s.n_tokens for s in scores),
    }
