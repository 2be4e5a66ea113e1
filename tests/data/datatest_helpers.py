"""Shared helpers for the data-layer tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import random
from pathlib import Path

EOS = "<|endoftext|>"

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more can out up who said "
    "what its about into than them only other time new some could these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great old"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    """English-looking filler: sentences of common words."""
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += "."
    return " ".join(out) + "."


def small_tokenizer(directory: Path) -> Path:
    """A small byte-level BPE (a few hundred ids) trained on filler text, saved in `directory`."""
    from gpt2kit.tokenizer import Tokenizer

    rng = random.Random(0)
    tok = Tokenizer.train([random_text(rng, 3000)], 320, progress=False)
    tok.save(directory)
    return directory


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path
