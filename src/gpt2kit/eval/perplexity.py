"""Perplexity of a text file: strided sliding windows (Hugging Face) or disjoint document windows
(lm-evaluation-harness).

Sliding mode is Hugging Face's "Perplexity of fixed-length models" recipe, window for window: windows of
`n_ctx` tokens start every `stride` tokens; in each only the tokens not scored by an earlier window count
(the last `end - prev_end` labels), so every token has up to `n_ctx - stride` tokens of context. The very
first token has no context and is never scored (and, as in the recipe, when `stride == n_ctx` the first
token of every window is not scored either).

Document mode is lm-evaluation-harness's `loglikelihood_rolling` for WikiText: each document gets an EOS
token as its context, so *every* token is scored, and is cut into disjoint windows of `n_ctx` predicted
tokens; the last window is filled out with earlier tokens as context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..errors import UserError
from .metrics import LMStats
from .scoring import Request, model_context_length, score_requests

EOT_TEXT = "<|endoftext|>"


def sliding_window_requests(tokens: Sequence[int], n_ctx: int, stride: int) -> list[Request]:
    """Hugging Face's strided windows as scoring requests (context = the unscored head of the window)."""
    if not 1 <= stride <= n_ctx:
        raise UserError(f"--stride must be between 1 and the model's context ({n_ctx}), got {stride}")
    n = len(tokens)
    requests: list[Request] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        trg_len = end - prev_end
        # Labels before end - trg_len are masked with -100 in the recipe; label 0 of a window is dropped
        # by the shift inside the loss.
        first_scored = max(end - trg_len, begin + 1)
        if first_scored < end:
            requests.append(Request(tokens[begin:first_scored], tokens[first_scored:end]))
        prev_end = end
        if end == n:
            break
    return requests


def document_requests(tokens: Sequence[int], n_ctx: int, eos_id: int) -> list[Request]:
    """lm-evaluation-harness's rolling windows (context_len=1) made disjoint, with EOS as the prefix."""
    n = len(tokens)
    if n == 0:
        return []
    first = min(n_ctx, n)
    requests = [Request([eos_id], tokens[:first])]
    predicted = first
    while predicted < n:
        pred_len = min(n - predicted, n_ctx)
        end = predicted + pred_len
        # The window's inputs are tokens[end - n_ctx - 1 : end - 1]; the ones before the predicted
        # tokens are context only.
        requests.append(Request(tokens[end - n_ctx - 1 : end - pred_len], tokens[end - pred_len : end]))
        predicted = end
    return requests


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def split_documents(text: str, how: str = "auto") -> list[str]:
    """Cut a file into documents whose concatenation is the file (EOS markers and blank documents dropped).

    how: "eos" (split at `<|endoftext|>`), "wikitext" (a new article starts at each top-level heading
    line " = Title = "), "blank" (blank lines separate documents), "none" (one document), or "auto":
    eos if the marker occurs, else wikitext if top-level headings occur, else none.
    """
    if how == "auto":
        if EOT_TEXT in text:
            how = "eos"
        elif any(_WIKITEXT_TITLE.match(line) for line in text.splitlines(keepends=True)):
            how = "wikitext"
        else:
            how = "none"
    if how == "none":
        docs = [text]
    elif how == "eos":
        docs = text.split(EOT_TEXT)
    elif how in ("wikitext", "blank"):
        docs, current, after_blank = [], [], False
        for line in text.splitlines(keepends=True):
            starts = _WIKITEXT_TITLE.match(line) if how == "wikitext" else (after_blank and line.strip())
            if starts and "".join(current).strip():
                docs.append("".join(current))
                current = []
            current.append(line)
            after_blank = not line.strip()
        docs.append("".join(current))
    else:
        raise UserError(f"--doc-split must be auto, eos, wikitext, blank or none, got {how!r}")
    return [d for d in docs if d.strip()]


def encode_text(tokenizer, text: str) -> list[int]:
    """The tokenizer's saved pre-processing, then BPE; a literal <|endoftext|> becomes the EOS token."""
    normalize = getattr(tokenizer, "normalize", None)
    if normalize is not None:
        text = normalize(text)
    return list(tokenizer.encode(text, allowed_special="all"))


def evaluate_text(
    model,
    tokenizer,
    text: str,
    *,
    mode: str = "sliding",
    stride: int | None = None,
    detokenize: Callable[[str], str] | None = None,
    doc_split: str = "auto",
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Cross-entropy, perplexity, bits per character/byte and word perplexity of `text`.

    Units (characters, bytes, words) are counted on `text` as given; the model reads `detokenize(text)`.
    """
    if not text.strip():
        raise UserError("the text to evaluate is empty")
    n_ctx = model_context_length(model)
    detok = detokenize or (lambda s: s)
    stats = LMStats()
    if mode == "sliding":
        stride = n_ctx // 2 if stride is None else stride
        tokens = encode_text(tokenizer, detok(text))
        requests = sliding_window_requests(tokens, n_ctx, stride)
        stats.add_text(text)
        documents = 1
    elif mode == "document":
        eos_id = tokenizer.eos_id
        docs = split_documents(text, doc_split)
        requests = []
        for doc in docs:
            requests.extend(document_requests(encode_text(tokenizer, detok(doc)), n_ctx, eos_id))
            stats.add_text(doc)
        documents = len(docs)
        tokens = None
    else:
        raise UserError(f"--mode must be sliding or document, got {mode!r}")
    if not requests:
        raise UserError("the text is too short to score: it needs at least two tokens")
    _check_ids_fit(model, requests)

    scores = score_requests(model, requests, batch_size=batch_size, n_ctx=n_ctx, progress=progress, desc="perplexity")
    stats.nll = -sum(s.logprob for s in scores)
    stats.tokens = sum(s.n_tokens for s in scores)
    result = stats.as_dict()
    result.update(
        mode=mode,
        n_ctx=n_ctx,
        stride=stride if mode == "sliding" else n_ctx,
        windows=len(requests),
        documents=documents,
        text_tokens=len(tokens) if tokens is not None else stats.tokens,
    )
    return result


def _check_ids_fit(model, requests: Sequence[Request]) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    top = max(max(max(r.context), max(r.continuation)) for r in requests)
    if top >= vocab:
        raise UserError(
            f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab} entries "
            "(tokenizer and checkpoint do not belong together)"
        )
