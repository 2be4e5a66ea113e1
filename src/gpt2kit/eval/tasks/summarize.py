"""Summarization by prompting, as the GPT-2 paper does it on CNN/Daily Mail.

The prompt is the article followed by "\\nTL;DR:"; the model samples up to 100 new tokens with top-k
(k = 2) and the first three sentences of what it wrote are the summary. If the article is too long, its
*end* is cut so that the prompt plus the new tokens fit the context (the "TL;DR:" cue is always kept).
Scores use the reference libraries: ROUGE-1/2/L F-measure from `rouge-score` (with Porter stemming, as
the CNN/DM literature reports; 0..1, averaged over examples) and corpus BLEU from `sacrebleu` (0..100).

One JSON object per line: {"article": str, "summary": str} ("highlights", CNN/DM's name, is accepted).
"""

from __future__ import annotations

import re

import torch

from ...errors import UserError
from ..scoring import model_context_length, model_device
from .common import field, read_jsonl

TLDR = "\nTL;DR:"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, n: int) -> str:
    """The first n sentences of text (split after . ! ? followed by whitespace), whitespace collapsed."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    return " ".join(" ".join(s.split()) for s in sentences[:n])


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0..1) from Google's `rouge-score` package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("summarization needs the rouge-score package: pip install 'gpt2kit[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}


def bleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0..100) from `sacrebleu` with its default 13a tokenization."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("summarization needs the sacrebleu package: pip install 'gpt2kit[eval]'") from None
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def build_prompt_ids(tokenizer, article: str, n_ctx: int, max_new_tokens: int) -> list[int]:
    normalize = getattr(tokenizer, "normalize", lambda s: s)
    article_ids = tokenizer.encode_ordinary(normalize(article.strip()))
    cue_ids = tokenizer.encode_ordinary(normalize(TLDR))
    room = n_ctx - max_new_tokens - len(cue_ids)
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for the article in n_ctx={n_ctx}")
    return article_ids[:room] + cue_ids


def evaluate_summarize(
    model,
    tokenizer,
    path,
    *,
    max_new_tokens: int = 100,
    top_k: int = 2,
    temperature: float = 1.0,
    sentences: int = 3,
    seed: int = 1234,
    limit=None,
    progress=False,
    keep_outputs: bool = False,
) -> dict:
    from tqdm.auto import tqdm

    records = []
    for lineno, obj in read_jsonl(path, limit):
        key = "summary" if "summary" in obj or "highlights" not in obj else "highlights"
        records.append((field(path, lineno, obj, "article"), field(path, lineno, obj, key)))
    n_ctx = model_context_length(model)
    device = model_device(model)
    predictions, references = [], []
    for i, (article, reference) in enumerate(tqdm(records, desc="summarize", disable=None if progress else True)):
        prompt = build_prompt_ids(tokenizer, article, n_ctx, max_new_tokens)
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             eos_id=tokenizer.eos_id, seed=seed + i)
        new = out[0, len(prompt) :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        predictions.append(first_sentences(tokenizer.decode(new), sentences))
        references.append(" ".join(reference.split()))
    result = {"task": "summarize", "examples": len(records), **rouge_scores(predictions, references),
              "bleu": bleu_score(predictions, references)}
    if keep_outputs:
        result["outputs"] = predictions
    return result
