"""Chat fine-tuning data: conversations rendered with the chat template, loss on the assistant's turns.

Records (one JSON object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"instruction": "...", "input": "..." (optional), "output": "..."}        (Alpaca)
An Alpaca record is the conversation [user: instruction (+ blank line + input), assistant: output].
Each record becomes one row of token ids with a per-token "learn" flag: true on the assistant replies
and their end marker, false on everything the model only reads (system, user, the template's headers).

`with_chat_tokens` + `grow_embedding` make `<|im_start|>` / `<|im_end|>` single special tokens: the tokenizer gains them
after its last id, the embedding grows by as many rows (the mean of the existing rows, so the new tokens
start as an average token) and the output head stays tied to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, require_file
from ..fileio import iter_jsonl
from .chat import CHAT_SPECIAL_TOKENS, assistant_spans

Pieces = list[tuple[str, bool]]  # (text, learned) pieces of one rendered conversation


def record_messages(obj, where: str) -> list[dict]:
    """The conversation of one chat or Alpaca record."""
    if isinstance(obj, dict) and "messages" in obj:
        return obj["messages"]
    if isinstance(obj, dict) and "instruction" in obj and "output" in obj:
        ins, inp, outp = obj["instruction"], obj.get("input", ""), obj["output"]
        if not all(isinstance(v, str) for v in (ins, inp or "", outp)):
            raise UserError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        return [{"role": "user", "content": ins + (f"\n\n{inp}" if inp else "")},
                {"role": "assistant", "content": outp}]
    raise UserError(f"{where}: expected {{\"messages\": [...]}} or an Alpaca record with 'instruction' and 'output'")


def read_chat_jsonl(path: str | Path, template: str | None = None) -> list[Pieces]:
    p = require_file(path, "--jsonl file")
    records = []
    for lineno, obj in iter_jsonl(p):
        where = f"{p}:{lineno}"
        try:
            pieces = assistant_spans(record_messages(obj, where), template)
        except UserError as e:
            msg = str(e)
            raise UserError(msg if msg.startswith(str(p)) else f"{where}: {msg}") from None
        if not any(learned for _, learned in pieces):
            raise UserError(f"{where}: the conversation has no assistant turn (nothing to learn)")
        records.append(pieces)
    if not records:
        raise UserError(f"{p}: no records")
    return records


def chat_rows(records: list[Pieces], tokenizer, block_size: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, learn flag per id) of each conversation, cut to block_size + 1 tokens (a long conversation
    keeps its beginning, the context of its first reply); conversations with no reply left are dropped."""
    rows = []
    for pieces in records:
        ids: list[int] = []
        learn: list[bool] = []
        for text, learned in pieces:
            t = tokenizer.encode(text, allowed_special="all")
            ids += t
            learn += [learned] * len(t)
        ids, learn = ids[: block_size + 1], learn[: block_size + 1]
        if not any(learn[1:]):
            continue  # the replies lie past the context: this conversation teaches nothing here
        rows.append((ids, learn))
    if not rows:
        raise UserError(f"no conversation has an assistant reply within the first {block_size} tokens")
    return rows


def with_chat_tokens(tokenizer, tokens: tuple[str, ...] = CHAT_SPECIAL_TOKENS):
    """The tokenizer with `tokens` as special tokens (new ids after its last one; present ones kept)."""
    from ..tokenizer import Tokenizer

    special = dict(tokenizer.special_tokens)
    new = [t for t in tokens if t not in special]
    if not new:
        return tokenizer
    for i, t in enumerate(new):
        special[t] = tokenizer.vocab_size + i
    return Tokenizer(tokenizer.ranks, tokenizer.merges, special, normalization=tokenizer.normalization,
                     lowercase=tokenizer.lowercase, name=tokenizer.name)


def grow_embedding(model, vocab_size: int):
    """Give `model` at least `vocab_size` token rows: new rows are the mean row (an average token), the
    output head stays tied to the embedding."""
    old = model.transformer.wte.weight
    if vocab_size <= old.shape[0]:
        return model
    grown = torch.nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        grown.weight[: old.shape[0]] = old
        grown.weight[old.shape[0]:] = old.mean(0, keepdim=True)
    model.transformer.wte = grown
    model.lm_head = torch.nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = model.transformer.wte.weight
    model.config = model.config.replace(vocab_size=vocab_size)
    return model


def chat_setup(init: str | Path, tokenizer, chat_tokens: bool) -> tuple[str, object]:
    """(template, tokenizer) for a chat fine-tune of `init`: its own template or ChatML, and the tokenizer
    with the chat tokens when asked."""
    from .chat import DEFAULT_CHAT_TEMPLATE, load_chat_template

    template = load_chat_template(init) or DEFAULT_CHAT_TEMPLATE
    return template, (with_chat_tokens(tokenizer) if chat_tokens else tokenizer)
