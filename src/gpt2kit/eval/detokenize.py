"""Detokenizers for word-tokenized benchmark text (WikiText, Penn Treebank).

WikiText and PTB were released already split into words ("did n't", "1 @,@ 000", "( see below )"),
which a byte-level BPE model never saw in training. The GPT-2 paper scores such text through
"invertible detokenizers" that undo these artifacts, while still normalising by the units of the
*original* text (words, bytes) so results remain comparable. OpenAI did not publish theirs; these follow
rules modelled on those of Megatron-LM and lm-evaluation-harness: each rule is
a fixed, deterministic rewrite of one artifact, applied in a fixed order.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Clitics the tokenizers split off a word: "it 's", "did n't", "we 've" -> "it's", "didn't", "we've".
_CLITIC = re.compile(r" (n't|'s|'m|'re|'ve|'ll|'d)(?=[\s.,;:!?)\]}]|$)")
# WikiText splits "didn't" as "didn 't" rather than "did n't".
_WIKI_NT = re.compile(r"n 't(?=[\s.,;:!?]|$)")
_SPACED_PUNCT = re.compile(r" ([.,;:!?%])(?= |$)", re.MULTILINE)
# Every line of the raw files starts and ends with one space.
_LINE_EDGE_SPACE = re.compile(r"^ | $", re.MULTILINE)
_PTB_NUMBER = re.compile(r"(?<!\S)N(?!\S)")  # PTB writes every number as the token N


def _pair(open_: str, close: str) -> re.Pattern:
    o, c = re.escape(open_), re.escape(close)
    if open_ == close:
        inner = rf"[^{o}\n]*?"
    else:
        inner = rf"[^{c}\n]*?"
    return re.compile(rf"{o} ({inner}) {c}")


_BRACKETS = [_pair("(", ")"), _pair("[", "]"), _pair("{", "}"), _pair('"', '"')]


def _tighten_brackets(text: str) -> str:
    """'( see below )' -> '(see below)', '" Halo "' -> '"Halo"' (innermost pairs on one line)."""
    for pattern in _BRACKETS:
        text = pattern.sub(lambda m: m.group(0)[0] + m.group(1) + m.group(0)[-1], text)
    return text


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization: '1 @,@ 000' -> '1,000', 'word , word' -> 'word, word', ..."""
    # Number separators were written as " @x@ ".
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = _WIKI_NT.sub("n't", text)
    text = _CLITIC.sub(r"\1", text)
    text = text.replace("s ' ", "s' ")  # plural possessive: "Linnaeus ' concept"
    text = _tighten_brackets(text)
    text = _SPACED_PUNCT.sub(r"\1", text)
    # Section headings: "= = History = =" -> "== History =="
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    return _LINE_EDGE_SPACE.sub("", text)


def ptb_detokenize(text: str) -> str:
    """Undo Penn Treebank's tokenization: clitics rejoined, ' N ' (any number) written as a digit."""
    text = _CLITIC.sub(r"\1", text)
    text = text.replace("s ' ", "s' ")
    text = _PTB_NUMBER.sub("1", text).replace("$ 1", "$1").replace("# 1", "#1")
    return _LINE_EDGE_SPACE.sub("", text)


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
}


def get_detokenizer(name: str | None) -> Callable[[str], str] | None:
    if name is None or name == "none":
        return None
    try:
        return DETOKENIZERS[name]
    except KeyError:
        from ..errors import UserError

        raise UserError(f"--detokenize must be one of {', '.join(DETOKENIZERS)}, got {name!r}") from None
