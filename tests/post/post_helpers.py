"""Small, fast building blocks for the post-training tests: a synthetic corpus with real structure, a BPE
tokenizer trained on it, token shards, and tiny GPT-2 checkpoints (random or briefly trained)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

SUBJECTS = ["the cat", "a dog", "my friend", "the king", "an old man", "the queen", "a bird", "the child"]
VERBS = ["sees", "likes", "finds", "follows", "calls", "helps", "hears", "watches"]
OBJECTS = ["the river", "a red ball", "the castle", "her brother", "the moon", "a small house", "the sea"]
ENDINGS = ["today", "at night", "in the morning", "again", "with joy", "every day"]


def corpus(n_sentences: int, seed: int = 0, vocab=(SUBJECTS, VERBS, OBJECTS, ENDINGS)) -> str:
    """Sentences from a tiny grammar: learnable in a few hundred steps by a tiny model."""
    rng = random.Random(seed)
    subjects, verbs, objects, endings = vocab
    lines = []
    for _ in range(n_sentences):
        lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(endings)}.")
    paragraphs = [" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    return "\n\n".join(paragraphs) + "\n"


# a second "domain": same kind of text, different words (fine-tuning moves the model there)
DOMAIN_B = (
    ["the ship", "a sailor", "the captain", "a storm"],
    ["crosses", "leaves", "reaches", "fights"],
    ["the harbour", "a distant island", "the cold wave", "the northern coast"],
    ["at dawn", "before winter", "without fear"],
)


def make_tokenizer(directory: Path, vocab_size: int = 320):
    from gpt2kit.tokenizer import Tokenizer

    text = corpus(400, seed=1) + corpus(200, seed=2, vocab=DOMAIN_B)
    tok = Tokenizer.train([text], vocab_size, progress=False)
    tok.save(directory)
    return Tokenizer.from_pretrained(directory)


def make_shards(directory: Path, text: str, tokenizer_dir: Path, val_fraction: float = 0.1, seed: int = 0) -> Path:
    from gpt2kit.data import prepare

    src = directory.with_suffix(".txt")
    src.write_text(text, encoding="utf-8")
    prepare([str(src)], str(tokenizer_dir), directory, val_fraction=val_fraction, seed=seed, workers=1,
            read=_split_paragraphs(), dedup=False, progress=False, log=lambda m: None)
    return directory


def _split_paragraphs():
    from gpt2kit.data.readers import ReadOptions

    return ReadOptions(split_on="\n\n")


def tiny_config(tokenizer, **kw):
    from gpt2kit.model import GPT2Config

    base = dict(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, n_ctx=64, n_layer=2, n_head=2,
                n_embd=64, dropout=0.0, attn_dropout=0.0)
    base.update(kw)
    return GPT2Config(**base)


def random_checkpoint(directory: Path, tokenizer, seed: int = 0, **kw) -> Path:
    from gpt2kit.model import GPT2

    torch.manual_seed(seed)
    GPT2(tiny_config(tokenizer, **kw)).save_pretrained(directory, tokenizer=tokenizer)
    return directory


def train_checkpoint(run_dir: Path, shards: Path, steps: int, seed: int = 0, init_from: str = "", **overrides) -> Path:
    """Train with gpt2kit's trainer; returns the final checkpoint directory."""
    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer

    flat = dict(data=str(shards), out=str(run_dir), preset="gpt2-tiny", n_ctx=64, block_size=32, batch_size=8,
                max_steps=steps, lr=3e-3, warmup_steps=10, eval_every=0, save_every=0, log_every=10 ** 6,
                seed=seed, progress=False, dropout=0.0, attn_dropout=0.0, init_from=init_from, device="cpu")
    flat.update(overrides)
    trainer = Trainer(build_config(flat), log=lambda message: None)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return Path(result.last_checkpoint)


_WORKSPACE: dict[str, Path] = {}


def workspace() -> dict[str, Path]:
    """Built once per test process and shared by the post tests: tokenizer, shards of two domains, and a
    tiny model trained on domain A (the paths live in a temporary directory removed at exit)."""
    if _WORKSPACE:
        return _WORKSPACE
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="gpt2kit-post-"))
    atexit.register(shutil.rmtree, root, True)
    make_tokenizer(root / "tok")
    shards_a = make_shards(root / "shards_a", corpus(1200, seed=3), root / "tok")
    shards_b = make_shards(root / "shards_b", corpus(600, seed=4, vocab=DOMAIN_B), root / "tok")
    ckpt = train_checkpoint(root / "run_a", shards_a, steps=100)
    _WORKSPACE.update(root=root, tok=root / "tok", shards_a=shards_a, shards_b=shards_b, ckpt=ckpt)
    return _WORKSPACE
