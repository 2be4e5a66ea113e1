"""File formats: exact round trips, interoperability with tiktoken and transformers, clear errors for
corrupt or inconsistent files."""

from __future__ import annotations

import json

import pytest

from gpt2kit import Tokenizer
from gpt2kit.errors import UserError
from gpt2kit.tokenizer.io import merges_from_ranks, read_tiktoken_file, read_vocab_and_merges

TEXT = (
    "Hello world! héllo wörld 中文 👍🏽\n\n  def f(x):\n        return x ** 2  # comment\n<|endoftext|>tail"
)


@pytest.fixture(scope="module")
def learned() -> Tokenizer:
    corpus = (TEXT * 3 + " the cat sat on the mat; the dog ate the hat.\n" * 20) * 4
    return Tokenizer.train(corpus, 400, special_tokens=["<|endoftext|>", "<|sep|>"], progress=False)


@pytest.fixture(scope="module")
def gpt2(gpt2_files_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_files_dir)


def test_save_and_reload_is_exact(learned, tmp_path):
    learned.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "gpt2kit.json",
    } <= names
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.ranks == learned.ranks and back.merges == learned.merges
    assert back.special_tokens == learned.special_tokens
    assert back.fingerprint == learned.fingerprint
    first = {n: (tmp_path / n).read_bytes() for n in ("vocab.json", "merges.txt")}
    back.save(tmp_path / "again")
    assert {n: (tmp_path / "again" / n).read_bytes() for n in first} == first


def test_save_merges_into_existing_gpt2kit_json(learned, tmp_path):
    (tmp_path / "gpt2kit.json").write_text(json.dumps({"train": {"steps": 10}}))
    learned.save(tmp_path)
    meta = json.loads((tmp_path / "gpt2kit.json").read_text())
    assert meta["train"] == {"steps": 10}
    assert meta["tokenizer"]["fingerprint"] == learned.fingerprint
    assert meta["tokenizer"]["normalization"] is None and meta["tokenizer"]["lowercase"] is False


def test_gpt2_files_round_trip_through_both_layouts(gpt2, gpt2_files_dir, tmp_path):
    gpt2.save_gpt2_files(tmp_path / "openai")
    gpt2.save(tmp_path / "hf")
    for d in ("openai", "hf"):
        back = Tokenizer.from_pretrained(tmp_path / d)
        assert back.fingerprint == gpt2.fingerprint
    # tiktoken's own loader accepts what we write (it asserts ranks == encoder.json)
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        str(tmp_path / "openai/vocab.bpe"), str(tmp_path / "openai/encoder.json")
    )
    assert ranks == gpt2.ranks
    # merges.txt lines are OpenAI's vocab.bpe lines
    ours = (tmp_path / "hf/merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    theirs = (gpt2_files_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    assert [x for x in ours if x] == [x for x in theirs if x]


def test_transformers_opens_saved_dirs_with_identical_ids(gpt2, learned, tmp_path):
    transformers = pytest.importorskip("transformers")
    for name, tok in (("gpt2", gpt2), ("learned", learned)):
        tok.save(tmp_path / name)
        hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / name)
        assert len(hf) == tok.vocab_size
        assert hf.eos_token_id == tok.eos_id
        assert hf(TEXT)["input_ids"] == tok.encode(TEXT, allowed_special="all")
        assert hf.decode(tok.encode_ordinary(TEXT)) == TEXT


def test_transformers_adds_no_token_when_there_are_no_specials(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.train(TEXT * 10, 300, special_tokens=[], progress=False)
    tok.save(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size == 300
    assert hf(TEXT)["input_ids"] == tok.encode_ordinary(TEXT)


def test_tiktoken_rank_file_round_trip(learned, tmp_path):
    from tiktoken.load import load_tiktoken_bpe

    path = learned.save_tiktoken_file(tmp_path / "learned.tiktoken")
    assert load_tiktoken_bpe(str(path)) == learned.ranks
    ranks, merges = read_tiktoken_file(path)
    assert ranks == learned.ranks and merges == learned.merges
    back = Tokenizer.from_tiktoken_file(path, special_tokens=learned.special_tokens)
    assert back.fingerprint == learned.fingerprint
    plain = Tokenizer.from_pretrained(path)  # <|endoftext|> goes right after the last rank
    assert plain.special_tokens == {"<|endoftext|>": len(learned.ranks)}
    assert plain.encode_ordinary(TEXT) == learned.encode_ordinary(TEXT)


def test_tokenizer_pickles_for_worker_processes(gpt2):
    import pickle

    gpt2.encode_ordinary("warm the tiktoken engine")
    back = pickle.loads(pickle.dumps(gpt2))
    assert back.fingerprint == gpt2.fingerprint
    assert back.encode(TEXT, allowed_special="all") == gpt2.encode(TEXT, allowed_special="all")


def test_merges_recovered_from_gpt2_ranks_alone(gpt2):
    # the first 3000 ranks are a valid BPE on their own
    ranks = {t: i for t, i in gpt2.ranks.items() if i < 3000}
    assert merges_from_ranks(ranks) == gpt2.merges[: 3000 - 256]


def _write(d, vocab, merges_lines):
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(
        json.dumps(vocab) if not isinstance(vocab, str) else vocab, encoding="utf-8"
    )
    (d / "merges.txt").write_text("\n".join(["#version: 0.2", *merges_lines]) + "\n", encoding="utf-8")
    return d


def test_corrupt_files_give_one_clear_line(learned, tmp_path):
    learned.save(tmp_path / "ok")
    vocab = json.loads((tmp_path / "ok/vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "ok/merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]

    cases = {
        "bad_json": ("{not json", merges, "not a JSON vocabulary"),
        "bad_line": (vocab, merges[:3] + ["onlyone"] + merges[3:], r"merges.txt:5: expected two tokens"),
        "unknown_part": (vocab, [*merges, "Ġzzz Ġqqq"], "not in the vocabulary"),
        "missing_byte": ({k: v for k, v in vocab.items() if k != "!"}, merges, "byte 33 has no token"),
        "reordered": (vocab, [merges[1], merges[0], *merges[2:]], "ids must increase"),
        "shared_id": ({**vocab, "extra": 5}, merges, "share an id"),
    }
    for name, (v, m, message) in cases.items():
        d = _write(tmp_path / name, v, m)
        with pytest.raises(UserError, match=message):
            Tokenizer.from_pretrained(d)
        try:
            Tokenizer.from_pretrained(d)
        except UserError as e:
            assert "\n" not in str(e)

    with pytest.raises(UserError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path / "ok" / "..")
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="not found"):
        read_vocab_and_merges(tmp_path / "nope.json", tmp_path / "nope.txt")


def test_edited_files_do_not_match_saved_fingerprint(learned, tmp_path):
    learned.save(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    last = max(v for k, v in vocab.items() if k not in learned.special_tokens)
    vocab = {k: v for k, v in vocab.items() if v != last}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="fingerprint"):
        Tokenizer.from_pretrained(tmp_path)


def test_fingerprint_is_stable_and_sensitive(learned, gpt2):
    assert gpt2.fingerprint == Tokenizer(gpt2.ranks, gpt2.merges, gpt2.special_tokens).fingerprint
    assert len(gpt2.fingerprint) == 64 and int(gpt2.fingerprint, 16) >= 0
    variants = {
        gpt2.fingerprint,
        learned.fingerprint,
        Tokenizer(gpt2.ranks, gpt2.merges, {"<|endoftext|>": 50256, "<|x|>": 50257}).fingerprint,
        Tokenizer(gpt2.ranks, gpt2.merges, gpt2.special_tokens, normalization="NFC").fingerprint,
        Tokenizer(gpt2.ranks, gpt2.merges, gpt2.special_tokens, lowercase=True).fingerprint,
    }
    assert len(variants) == 5
