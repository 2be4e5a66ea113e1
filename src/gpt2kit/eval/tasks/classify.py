"""Classification by prompting: a template, one word per label, optional k-shot examples.

The prompt is `template` with `{text}` filled in; each label word is scored as the continuation
" " + word and the most likely label wins (ties: the label listed first). With k shots, k labelled
examples -- from `shots_file`, or else drawn from the evaluation file itself, never the example being
classified -- are written before it, each as `template + " " + word`, separated by blank lines. The draw
is fixed by `seed`, so runs repeat exactly. Reported: accuracy and macro-F1, the unweighted mean over
every label given in `labels` of its F1 = 2TP / (2TP + FP + FN), taken as 0 when TP = 0 (as
scikit-learn's `f1_score(average="macro", labels=..., zero_division=0)`).

One JSON object per line: {"text": str, "label": str}.
"""

from __future__ import annotations

import random
from pathlib import Path

from ...errors import UserError
from ..scoring import score_requests
from .common import argmax_first, encode_pair, field, read_jsonl

DEFAULT_TEMPLATE = "{text}\nAnswer:"


def parse_label_words(spec: str) -> dict[str, str]:
    """'positive=great,negative=terrible' or 'positive,negative' -> {label: word}."""
    words: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        label, _, word = item.partition("=")
        label, word = label.strip(), (word.strip() or label.strip())
        if not label:
            raise UserError(f"--labels: empty label in {spec!r} (expected 'label=word,label=word')")
        words[label] = word
    if len(words) < 2:
        raise UserError(f"--labels needs at least two labels, got {spec!r} (expected 'label=word,label=word')")
    return words


def macro_f1(gold: list[str], predicted: list[str], labels: list[str]) -> float:
    """Unweighted mean over `labels` of per-label F1 (0 where precision and recall are both 0)."""
    total = 0.0
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


def _read_examples(path, label_words: dict[str, str], limit=None) -> list[tuple[str, str]]:
    examples = []
    for lineno, obj in read_jsonl(path, limit):
        text = field(path, lineno, obj, "text")
        label = str(field(path, lineno, obj, "label", (str, int)))
        if label not in label_words:
            raise UserError(f"{path}:{lineno}: label {label!r} is not one of --labels ({', '.join(label_words)})")
        examples.append((text, label))
    return examples


def build_prompt(template: str, text: str, shots: list[tuple[str, str]], label_words: dict[str, str]) -> str:
    parts = [template.format(text=t) + " " + label_words[label] for t, label in shots]
    parts.append(template.format(text=text))
    return "\n\n".join(parts)


def evaluate_classify(
    model,
    tokenizer,
    path: str | Path,
    *,
    labels: str,
    template: str = DEFAULT_TEMPLATE,
    shots: int = 0,
    shots_file: str | Path | None = None,
    seed: int = 1234,
    limit=None,
    batch_size=16,
    progress=False,
) -> dict:
    if "{text}" not in template:
        raise UserError("--template must contain {text}")
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--template: only {{text}} may be filled in (escape other braces as {{{{ }}}}): {e}") from None
    label_words = parse_label_words(labels)
    examples = _read_examples(path, label_words, limit)
    pool = _read_examples(shots_file, label_words) if shots_file else examples
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    available = len(pool) - (0 if shots_file else 1)
    if shots > available:
        raise UserError(f"--shots {shots} needs at least {shots} other labelled examples, found {available}")

    rng = random.Random(seed)
    names = list(label_words)
    requests = []
    for i, (text, _) in enumerate(examples):
        candidates = range(len(pool)) if shots_file else [j for j in range(len(pool)) if j != i]
        chosen = [pool[j] for j in rng.sample(list(candidates), shots)] if shots else []
        prompt = build_prompt(template, text, chosen, label_words)
        requests.extend(encode_pair(tokenizer, prompt, " " + label_words[name]) for name in names)
    scores = score_requests(model, requests, batch_size=batch_size, progress=progress, desc="classify")
    k = len(names)
    predicted = [names[argmax_first([s.logprob for s in scores[i * k : (i + 1) * k]])] for i in range(len(examples))]
    gold = [label for _, label in examples]
    n = len(examples)
    return {
        "task": "classify",
        "examples": n,
        "shots": shots,
        "acc": sum(g == p for g, p in zip(gold, predicted)) / n,
        "macro_f1": macro_f1(gold, predicted, names),
    }
