"""The learner: same merges as Hugging Face's trainer (so the tie-break is HF's), incremental counts equal
a full recount, held-out compression no worse than HF's, and the learned files open in HF and tiktoken."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit import Tokenizer
from gpt2kit.errors import UserError
from gpt2kit.tokenizer.pretokenize import byte_order, split_words
from gpt2kit.tokenizer.train import count_words, split_for_workers

MIXED = (
    "def encode(self, text: str) -> list[int]:\n    return [ord(c) for c in text]\n\n"
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!\n"
    "Ünïcödé façade naïve café — 中文字符 日本語 👍👍🏽 e\u0301 ﬁnance\n"
    "   indented    spaces\t\ttabs\r\nnumbers 12345 678 90\n"
)


def hf_train(text: str | list[str], vocab_size: int, min_frequency: int = 2, specials=("<|endoftext|>",)):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text] if isinstance(text, str) else text, trainer)
    return tok


def hf_merges(tok) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def ours_as_unicode(tok: Tokenizer) -> list[tuple[str, str]]:
    from gpt2kit.tokenizer.pretokenize import token_to_unicode

    return [(token_to_unicode(a), token_to_unicode(b)) for a, b in tok.merges]


def naive_learn(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Full recount of every pair after every merge (minbpe style): the definition, slow but obvious."""
    rank = {b: i for i, b in enumerate(byte_order())}
    ids_of = {bytes([b]): rank[b] for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in split_words(text))
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -ids_of[p[0]], -ids_of[p[1]]))
        if pairs[best] < 2:
            break
        merges.append(best)
        ids_of[best[0] + best[1]] = len(ids_of)
        new_words: Counter = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
    return (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")


def test_incremental_counts_equal_full_recount():
    text = MIXED * 3 + "aaaa aaa aa abab ababab " * 5 + "zzzz" * 7
    tok = Tokenizer.train(text, 256 + 120 + 1, progress=False)
    assert tok.merges == naive_learn(text, 120)


def test_same_merges_as_huggingface_trainer(shakespeare):
    text = shakespeare[:150_000] + MIXED * 20
    ours = Tokenizer.train(text, 1500, progress=False)
    theirs = hf_train(text, 1500)
    assert len(ours.merges) == 1500 - 257
    assert ours_as_unicode(ours) == hf_merges(theirs)


def tokens_per_byte(ids_count: int, text: str) -> float:
    return ids_count / len(text.encode("utf-8"))


def test_heldout_compression_vs_huggingface_and_files_load_everywhere(shakespeare, tmp_path):
    lines = shakespeare.splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    train, heldout = "".join(lines[:cut]), "".join(lines[cut:])
    vocab = 1024
    ours = Tokenizer.train(train, vocab, progress=False)
    theirs = hf_train(train, vocab)
    ours_tpb = tokens_per_byte(len(ours.encode_ordinary(heldout)), heldout)
    theirs_tpb = tokens_per_byte(len(theirs.encode(heldout).ids), heldout)
    assert ours.vocab_size == vocab
    assert ours_tpb <= 1.01 * theirs_tpb, (ours_tpb, theirs_tpb)

    ours.save(tmp_path / "tok")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "tok")
    ids = ours.encode_ordinary(heldout)
    assert hf(heldout)["input_ids"] == ids
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ours.save_tiktoken_file(tmp_path / "tok.tiktoken")
    enc = tiktoken.Encoding(
        "learned",
        pat_str=ours.tiktoken_encoding._pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "tok.tiktoken")),
        special_tokens=ours.special_tokens,
    )
    assert enc.encode_ordinary(heldout) == ids
    assert ours.with_engine("python").encode_ordinary(heldout) == ids
    assert ours.decode(ids) == heldout


def test_ids_layout_and_specials():
    tok = Tokenizer.train(MIXED * 5, 300, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)
    assert tok.vocab_size == 300
    assert tok.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299}
    assert tok.eos_id == 298
    # single bytes take GPT-2's ids, merges follow in order
    assert tok.ranks[b"!"] == 0 and tok.ranks[b" "] == 220
    assert tok.encode("x<|pad|>", allowed_special="all")[-1] == 299


def test_min_frequency_stops_early():
    tok = Tokenizer.train("abc abd", 1000, min_frequency=2, progress=False)
    # words "abc" and " abd": only (a, b) occurs twice; after it every pair occurs once
    assert tok.merges == [(b"a", b"b")]
    assert tok.vocab_size == 256 + 1 + 1


def test_normalization_and_lowercase_are_applied_and_saved(tmp_path):
    text = "Ｆｕｌｌｗｉｄｔｈ ﬁne CAFÉ Café cafe\u0301 " * 10
    tok = Tokenizer.train(text, 320, normalization="NFKC", lowercase=True, progress=False)
    assert tok.normalize("ＡＢ ﬁ É") == "ab fi é"
    assert tok.encode_ordinary("CAFÉ") == tok.encode_ordinary("café") == tok.encode_ordinary("cafe\u0301")
    plain = Tokenizer.train(text, 320, progress=False)
    assert plain.fingerprint != tok.fingerprint
    tok.save(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert (back.normalization, back.lowercase, back.fingerprint) == ("NFKC", True, tok.fingerprint)
    assert back.encode("CAFÉ<|endoftext|>", allowed_special="all") == tok.encode_ordinary("café") + [
        tok.eos_id
    ]
    assert back.with_engine("python").encode_ordinary("ＣＡＦÉ") == back.encode_ordinary("café")


def test_files_and_texts_train_the_same(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(MIXED * 3, encoding="utf-8")
    b.write_text("more text, more words\n" * 4, encoding="utf-8")
    from_files = Tokenizer.train([a, b], 400, progress=False)
    from_texts = Tokenizer.train([MIXED * 3, "more text, more words\n" * 4], 400, progress=False)
    assert from_files.merges == from_texts.merges
    from_names = Tokenizer.train([str(a), str(b)], 400, progress=False)  # path strings, as HF's train(files)
    assert from_names.merges == from_texts.merges


def test_parallel_counting_equals_serial(tmp_path, monkeypatch, shakespeare):
    import gpt2kit.tokenizer.train as train

    files = []
    for i in range(4):
        p = tmp_path / f"part{i}.txt"
        p.write_text(shakespeare[i * 50_000 : (i + 1) * 50_000] + MIXED, encoding="utf-8")
        files.append(p)
    serial = count_words(files + [MIXED * 50], workers=1)
    monkeypatch.setattr(train, "PARALLEL_MIN_CHARS", 0)
    parallel = count_words(files + [MIXED * 50], workers=2)
    assert parallel == serial
    assert sum(serial.values()) > 40_000
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff")
    with pytest.raises(UserError, match=r"bad\.txt: not valid UTF-8 at byte offset 5"):
        count_words([files[0], bad, files[1]], workers=2)  # raised in a worker, reported by the parent


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["word", " ", "  ", "\n", "\n\n", " x", "\t", "42", "!?", "é", "\n  y", "\x1c", "\u2028"]
        ),
        max_size=80,
    )
)
def test_splitting_for_workers_keeps_pretokenization(parts):
    text = "".join(parts)
    chunks = split_for_workers(text, size=7)
    assert "".join(chunks) == text
    assert Counter(w for c in chunks for w in split_words(c)) == Counter(split_words(text))


def test_bad_training_input(tmp_path):
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train("hello hello", 256, progress=False)  # 256 + <|endoftext|> needed
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(["", ""], 300, progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\nwor\xffld\n")
    with pytest.raises(UserError, match=r"bad\.txt: not valid UTF-8 at byte offset 9"):
        Tokenizer.train([bad], 300, progress=False)
    tok = Tokenizer.train([bad], 300, errors="replace", progress=False)
    assert "\ufffd" in tok.decode(tok.encode_ordinary("wor\ufffdld"))
    with pytest.raises(UserError, match="not found"):
        Tokenizer.train([Path(tmp_path / "missing.txt")], 300, progress=False)
    with pytest.raises(UserError, match="twice"):
        Tokenizer.train("hello", 300, special_tokens=["<s>", "<s>"], progress=False)
    with pytest.raises(UserError, match="normalization"):
        Tokenizer.train("hello", 300, normalization="NFD", progress=False)


def test_merge_giving_an_existing_token_is_skipped_and_counts_stay_consistent():
    from gpt2kit.tokenizer.train import merge_words

    order = byte_order()
    token_bytes = [bytes([b]) for b in order] + [b"ab"]  # id 256 = "ab", as if reached by another split
    a, b, c = (order.index(ord(ch)) for ch in "abc")
    words = [[a, b, c], [a, b, a, b], [b, c]]
    freqs = [5, 4, 3]
    merges = merge_words(words, freqs, 3, 257, token_bytes, min_frequency=1)
    # (a, b) has the top count (13) but would re-create "ab": it is skipped, never merged;
    # (b, c) is next (8); the (a, bc) it creates (5) beats (b, a) (4)
    assert merges[:2] == [(b, c), (a, 257)]
    assert token_bytes[257:259] == [b"bc", b"abc"]
    assert words[0] == [258] and words[2] == [257]
    assert (a, b) not in merges
