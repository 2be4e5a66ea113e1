"""Properties that hold for any byte-level BPE, checked on a small learned tokenizer (no reference data
needed): both engines agree, decode inverts encode, streaming never splits a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit import Tokenizer
from gpt2kit.tokenizer import SpecialTokenError, TokenIdError

CORPUS = (
    "Emoji 👍🏽 and CJK 中文字符, combining e\u0301 and n\u0303, tabs\tand  runs   of spaces.\n"
    "def f(x):\n    return x ** 2  # <|endoftext|> in a comment\n\n"
    * 3
    + "The quick brown fox jumps over the lazy dog; the dog sleeps.\n" * 10
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, 420, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)


text_strategy = st.lists(
    st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            ["👍🏽", "中文", "e\u0301", "<|endoftext|>", "<|pad|>", "   ", "\n\n", " the", "dog"]
        ),
    ),
    max_size=10,
).map("".join)


@settings(max_examples=120, deadline=None)
@given(text_strategy)
def test_engines_agree_and_decode_inverts(tok, text):
    py = tok.with_engine("python")
    ids = tok.encode_ordinary(text)
    assert py.encode_ordinary(text) == ids
    assert tok.decode(ids) == text
    special = tok.encode(text, allowed_special="all")
    assert py.encode(text, allowed_special="all") == special
    assert tok.decode(special) == text
    dec = tok.stream_decoder()
    assert "".join([dec.add(i) for i in special]) + dec.flush() == text


def test_specials_and_bad_ids(tok):
    eos, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    # the small corpus runs out of pairs seen twice before 420: specials follow the last merge
    assert tok.vocab_size == 256 + len(tok.merges) + 2 and pad == tok.vocab_size - 1 == eos + 1
    with pytest.raises(SpecialTokenError):
        tok.encode("x<|pad|>")
    assert tok.encode("x<|pad|>", allowed_special={"<|pad|>"})[-1] == pad
    with pytest.raises(SpecialTokenError):  # <|endoftext|> is still disallowed
        tok.encode("<|endoftext|><|pad|>", allowed_special={"<|pad|>"})
    assert tok.encode("<|endoftext|>", disallowed_special=()) == tok.encode_ordinary("<|endoftext|>")
    with pytest.raises(TokenIdError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenIdError):
        tok.stream_decoder().add(-1)
