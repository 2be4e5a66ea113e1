"""Tiny checkpoints for the alignment tests (a 300-token tokenizer, a 2-layer model)."""

from __future__ import annotations

from pathlib import Path

# chat records: a system turn, an Alpaca record, two assistant turns in one conversation
CHATS = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"},
                  {"role": "assistant", "content": "sat on the mat."}]},
    {"instruction": "the dog?", "input": "a bone", "output": "ate the bone."},
    {"messages": [{"role": "user", "content": "yes?"}, {"role": "assistant", "content": "no."},
                  {"role": "user", "content": "and?"}, {"role": "assistant", "content": "yes and no."}]},
]


# preference pairs of the resume and torchrun tests
PAIRS = [{"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " ate the bone."},
         {"prompt": "a red", "chosen": " apple, yes", "rejected": " sky"},
         {"prompt": "the dog ate", "chosen": " the bone.", "rejected": " a blue sky, no and yes."},
         {"prompt": "yes", "chosen": " and no.", "rejected": " no"}] * 3

CORPUS = ["the cat sat on the mat. the dog ate the bone. a red apple, a blue sky, yes and no."] * 8


def tiny_checkpoint(path: Path, seed: int = 0, vocab: int = 300, n_embd: int = 32) -> Path:
    import torch

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.train(CORPUS, vocab_size=vocab)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_ctx=64, n_layer=2, n_head=2, n_embd=n_embd, dropout=0.0,
                     attn_dropout=0.0, eos_token_id=tok.eos_id)
    GPT2(cfg).save_pretrained(path, tokenizer=tok)
    return path


def checkpoint_and_pairs(d: Path) -> tuple[Path, Path]:
    """(tiny checkpoint, PAIRS as JSONL) in directory d."""
    import json

    init = tiny_checkpoint(d / "init")
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return init, pairs
