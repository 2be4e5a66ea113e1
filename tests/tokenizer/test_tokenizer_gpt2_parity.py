"""GPT-2 exactness: both engines give tiktoken's ids (tiktoken built from the same OpenAI files with the
r50k pattern), decode inverts encode, and special tokens follow tiktoken's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit import Tokenizer
from gpt2kit.tokenizer import SpecialTokenError, TokenIdError

R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="module")
def gpt2(gpt2_files_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_files_dir)


@pytest.fixture(scope="module")
def gpt2_py(gpt2) -> Tokenizer:
    return gpt2.with_engine("python")


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files_dir):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        str(gpt2_files_dir / "vocab.bpe"), str(gpt2_files_dir / "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2-local", pat_str=R50K_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_gpt2_shape(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert len(gpt2.merges) == 50000
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert gpt2.normalization is None and gpt2.lowercase is False
    assert gpt2.normalize("Ünïcode ABC") == "Ünïcode ABC"


def _shared_text_files(shared_data):
    files = sorted(p for p in shared_data.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    assert files, "no text files in shared data"
    return files


def test_both_engines_match_tiktoken_on_every_shared_text_file(gpt2, gpt2_py, tiktoken_gpt2, shared_data):
    for path in _shared_text_files(shared_data):
        text = path.read_text(encoding="utf-8")
        expected = tiktoken_gpt2.encode_ordinary(text)
        assert gpt2.encode_ordinary(text) == expected, path
        assert gpt2_py.encode_ordinary(text) == expected, path
        assert gpt2.decode(expected) == text, path


unicode_text = st.lists(
    st.one_of(
        st.text(max_size=30),  # any code points (no surrogates)
        st.sampled_from(
            [
                "👍",
                "👍🏽",
                "👨‍👩‍👧",
                "🇯🇵",
                "中文字符",
                "日本語",
                "한국어",
                "e\u0301",
                "n\u0303\u0323",
                "<|endoftext|>",
                "<|endoftext",
                "|>",
                "'s",
                "'ll",
                "  ",
                "\n\n",
                "\t \n",
                "   x",
                "\u00a0",
                "\u3000",
                "123",
                "٣٤",
                "ﬁ",
                "Å",
                "\r\n",
            ]
        ),
        st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2028", max_size=8),  # whitespace runs
    ),
    max_size=12,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(unicode_text)
def test_hypothesis_unicode_matches_tiktoken_both_engines(gpt2, gpt2_py, tiktoken_gpt2, text):
    expected = tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.encode_ordinary(text) == expected
    assert gpt2_py.encode_ordinary(text) == expected
    expected_special = tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special="all") == expected_special
    assert gpt2_py.encode(text, allowed_special="all") == expected_special


@settings(max_examples=150, deadline=None)
@given(st.one_of(unicode_text, st.text()))
def test_decode_inverts_encode(gpt2, gpt2_py, text):
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text
    assert gpt2_py.decode(gpt2_py.encode_ordinary(text)) == text


@settings(max_examples=100, deadline=None)
@given(unicode_text)
def test_stream_decoder_never_splits_a_character(gpt2, text):
    ids = gpt2.encode_ordinary(text)
    dec = gpt2.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_stream_decoder_holds_partial_emoji(gpt2):
    ids = gpt2.encode_ordinary("👍")
    assert len(ids) > 1  # GPT-2 spells this emoji with several byte tokens
    dec = gpt2.stream_decoder()
    assert [dec.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.add(ids[-1]) == "👍"
    # a stream that stops inside a character ends with U+FFFD on flush, like decode()
    dec.add(ids[0])
    assert dec.flush() == gpt2.decode(ids[:1]) == "\ufffd"


def test_decode_invalid_utf8_is_replaced_like_tiktoken(gpt2, tiktoken_gpt2):
    ids = gpt2.encode_ordinary("👍 ok")[1:]
    assert gpt2.decode(ids) == tiktoken_gpt2.decode(ids)
    assert gpt2.decode_bytes(ids) == tiktoken_gpt2.decode_bytes(ids)


def test_special_tokens_follow_tiktoken(gpt2, gpt2_py, tiktoken_gpt2):
    text = "a<|endoftext|>b"
    for tok in (gpt2, gpt2_py):
        with pytest.raises(SpecialTokenError, match="<|endoftext|>"):
            tok.encode(text)
        with pytest.raises(ValueError):
            tok.encode(text, allowed_special="none_raise")
        assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
        assert tok.encode(text, disallowed_special=()) == tiktoken_gpt2.encode_ordinary(text)
        assert tok.encode(text, allowed_special="none") == tok.encode_ordinary(text)
    with pytest.raises(ValueError, match="unknown special token"):
        gpt2.encode("x", allowed_special={"<|im_start|>"})


def test_out_of_range_ids_are_a_clear_error(gpt2):
    for bad in ([50257], [-1], [0, 10**9], ["7"]):
        with pytest.raises(TokenIdError, match="not in the vocabulary"):
            gpt2.decode(bad)
    with pytest.raises(ValueError):
        gpt2.decode_bytes([50257])
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_batches_equal_single_calls(gpt2, gpt2_py):
    texts = ["Hello there", "", "<|endoftext|> twice <|endoftext|>", "中文 and 👍" * 20] * 5
    assert gpt2.encode_ordinary_batch(texts) == [gpt2.encode_ordinary(t) for t in texts]
    assert gpt2.encode_batch(texts, allowed_special="all") == [
        gpt2.encode(t, allowed_special="all") for t in texts
    ]
    assert gpt2_py.encode_ordinary_batch(texts, num_threads=2) == gpt2.encode_ordinary_batch(texts)


def test_lone_surrogates_are_replaced_like_tiktoken(gpt2, gpt2_py, tiktoken_gpt2):
    text = "a\ud800b \udfff"
    assert gpt2_py.encode_ordinary(text) == gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
