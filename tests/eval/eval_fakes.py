"""A language model and tokenizer small enough that every log-likelihood is known exactly.

`TableLM`: the logits for the next token are row `table[prev]` of a fixed [V, V] table, so
log P(next | ...prev) = log_softmax(table[prev])[next] depends only on the previous token. Tests compute
the expected score of any request by hand from the table and so can tell exactly which tokens were scored.

`PieceTokenizer`: GPT-2-like pre-tokens (a word with its leading space) cut into pieces of at most three
characters from a fixed vocabulary: " elephant" -> " el", "eph", "ant". Id 0 is <|endoftext|>.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import torch

EOT = "<|endoftext|>"


class PieceTokenizer:
    def __init__(self, pieces: list[str]):
        self.pieces = [EOT] + list(dict.fromkeys(pieces))
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.eos_id = 0
        self.vocab_size = len(self.pieces)

    @classmethod
    def for_texts(cls, *texts: str) -> PieceTokenizer:
        pieces: list[str] = []
        for text in texts:
            for word in re.findall(r"\s?\S+|\s+", text):
                pieces.extend(word[i : i + 3] for i in range(0, len(word), 3))
            pieces.extend(text)  # single characters: the fallback for pieces never seen
        return cls(pieces)

    def encode_ordinary(self, text: str) -> list[int]:
        out = []
        for word in re.findall(r"\s?\S+|\s+", text):
            for i in range(0, len(word), 3):
                piece = word[i : i + 3]
                if piece in self.ids:
                    out.append(self.ids[piece])
                else:
                    out.extend(self.ids[c] for c in piece)
        return out

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        out: list[int] = []
        for k, part in enumerate(text.split(EOT)):
            if k:
                out.append(self.eos_id)
            out.extend(self.encode_ordinary(part))
        return out

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


class TableLM(torch.nn.Module):
    def __init__(self, table: torch.Tensor, n_ctx: int = 64):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.config = SimpleNamespace(n_ctx=n_ctx, vocab_size=table.shape[0])
        self.calls: list[tuple[int, ...]] = []  # shapes of the batches the model was called with

    def forward(self, idx: torch.Tensor):
        assert idx.shape[1] <= self.config.n_ctx, "fed more positions than the context holds"
        self.calls.append(tuple(idx.shape))
        return SimpleNamespace(logits=self.table[idx])

    def logprob(self, prev: int, nxt: int) -> float:
        """log P(nxt | prev), computed in float64 from the table."""
        row = self.table[prev].double()
        return float(row[nxt] - torch.logsumexp(row, 0))

    def sequence_logprob(self, ids: list[int], first_scored: int) -> float:
        """Sum of log P(ids[i] | ids[i-1]) for i >= first_scored."""
        return sum(self.logprob(ids[i - 1], ids[i]) for i in range(first_scored, len(ids)))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, seed=None, **kw):
        """Greedy continuation (deterministic whatever the sampling options)."""
        out = idx.clone()
        for _ in range(max_new_tokens):
            nxt = self.table[out[:, -1]].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return out


def random_table(vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, generator=g) * scale


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
