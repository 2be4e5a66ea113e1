"""`gpt2kit data prepare`: shards decode back to exactly the input, with exact counts, split and readers."""

from __future__ import annotations

import io
import json
import random
import sys

import numpy as np
import pytest
from datatest_helpers import EOS, random_text, small_tokenizer, write_text

from gpt2kit.cli import main
from gpt2kit.data import iter_split_documents, read_meta
from gpt2kit.data.meta import document_ends
from gpt2kit.data.readers import ReadOptions, default_corpus, default_corpus_files
from gpt2kit.data.shards import SplitAssigner, prepare
from gpt2kit.tokenizer import Tokenizer
from shared_data import shared_path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def _tiktoken_gpt2(gpt2_dir):
    """GPT-2 straight from OpenAI's files through tiktoken: the peer our shards must agree with."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-files", pat_str=pat, mergeable_ranks=ranks, special_tokens={EOS: 50256})


def _bin(out, split, dtype=np.uint16):
    return np.fromfile(out / f"{split}.bin", dtype=dtype)


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "wikitext2/valid.txt"])
def test_reference_corpora_decode_exactly_with_exact_counts(name, gpt2_files_dir, tmp_path, capsys):
    src = shared_path(*name.split("/"))
    out = tmp_path / "shards"
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(gpt2_files_dir), "--out", str(out),
                 "--val-fraction", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    text = src.read_bytes().decode("utf-8")
    enc = _tiktoken_gpt2(gpt2_files_dir)
    ids = _bin(out, "train")
    expected = enc.encode_ordinary(text) + [50256]  # one file = one document, followed by EOS
    assert ids.tolist() == expected
    assert enc.decode(ids.tolist()) == text + EOS
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 50256 and meta["vocab_size"] == 50257
    assert meta["splits"]["train"] == {"documents": 1, "tokens": len(expected), "characters": len(text),
                                       "bytes": len(text.encode("utf-8"))}
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "characters": 0, "bytes": 0}
    assert _bin(out, "val").size == 0
    assert meta["tokenizer_fingerprint"] == Tokenizer.from_pretrained(gpt2_files_dir).fingerprint


def test_separated_documents_round_trip_through_both_splits(gpt2_files_dir, tmp_path):
    src = shared_path("tinyshakespeare.txt")
    text = src.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d]
    out = tmp_path / "s"
    prepare([str(src)], gpt2_files_dir, out, val_fraction=0.1, seed=3, workers=2, read=ReadOptions(split_on="\n\n"),
            dedup=False, progress=False)
    meta = read_meta(out)
    enc = _tiktoken_gpt2(gpt2_files_dir)
    got = {s: list(iter_split_documents(out, s)) for s in ("train", "val")}
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert len(got["val"]) == pytest.approx(0.1 * len(docs), abs=1)
    for s in ("train", "val"):
        ids = _bin(out, s)
        assert enc.decode(ids.tolist()) == "".join(d + EOS for d in got[s])
        assert meta["splits"][s]["documents"] == len(got[s])
        assert meta["splits"][s]["tokens"] == len(ids) == sum(len(enc.encode_ordinary(d)) + 1 for d in got[s])
        assert meta["splits"][s]["characters"] == sum(len(d) for d in got[s])
    # each split keeps the input order of its documents
    for s in ("train", "val"):
        it = iter(docs)
        assert all(any(d == x for x in it) for d in got[s])  # a subsequence of the input


def test_split_is_deterministic_exact_and_seeded():
    n = 1000
    a = [SplitAssigner(0.1, seed=7).split(i) for i in range(n)]
    assert a == [SplitAssigner(0.1, seed=7).split(i) for i in range(n)]
    assert a.count("val") in (99, 100, 101)
    b = [SplitAssigner(0.1, seed=8).split(i) for i in range(n)]
    assert a != b
    # every block of ~10 consecutive documents contributes one: val is spread over the corpus
    val_pos = [i for i, s in enumerate(a) if s == "val"]
    assert max(np.diff(val_pos)) < 20
    assert all(SplitAssigner(0.0, 1).split(i) == "train" for i in range(100))
    assert [SplitAssigner(0.37, 2).split(i) for i in range(1000)].count("val") in (369, 370, 371)


def test_document_in_parts_gives_the_ids_of_the_whole(tok_dir, tmp_path):
    rng = random.Random(1)
    parts = []
    for _ in range(400):  # awkward whitespace: runs of spaces, CRLF, tabs, blank lines
        parts.append(random_text(rng, rng.randint(1, 30)))
        parts.append(rng.choice([" ", "  ", "\n", "\r\n", "\n\n   ", "\t", " \n"]))
    text = "".join(parts)
    src = write_text(tmp_path / "big.txt", text)
    tok = Tokenizer.from_pretrained(tok_dir)
    for piece_chars in (200, 997):
        out = tmp_path / f"o{piece_chars}"
        prepare([str(src)], tok_dir, out, workers=2, read=ReadOptions(max_piece_chars=piece_chars), progress=False)
        assert _bin(out, "train").tolist() == tok.encode_ordinary(text) + [tok.eos_id]
        assert read_meta(out)["splits"]["train"]["characters"] == len(text)


def test_duplicate_multi_part_documents_are_found(tok_dir, tmp_path):
    rng = random.Random(2)
    big = random_text(rng, 2000)
    a = write_text(tmp_path / "in" / "a.txt", big)
    write_text(tmp_path / "in" / "b.txt", random_text(rng, 300))
    write_text(tmp_path / "in" / "c.txt", big)
    out = tmp_path / "o"
    prepare([str(a.parent)], tok_dir, out, workers=2, read=ReadOptions(max_piece_chars=1500), progress=False)
    meta = read_meta(out)
    assert meta["dedup"]["exact_removed"] == 1
    assert meta["splits"]["train"]["documents"] == 2


def test_jsonl_parquet_and_stdin_readers(tok_dir, tmp_path, monkeypatch):
    tok = Tokenizer.from_pretrained(tok_dir)
    texts = ["first record", "second one, with \"quotes\"\nand a newline", "third"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    out = tmp_path / "j"
    prepare([str(jl)], tok_dir, out, read=ReadOptions(field="body"), workers=1, progress=False)
    assert list(iter_split_documents(out, "train", tok)) == texts

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    out = tmp_path / "p"
    prepare([str(tmp_path / "d.parquet")], tok_dir, out, workers=1, progress=False)
    assert list(iter_split_documents(out, "train", tok)) == texts

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\n\nb\n\nc")))
    out = tmp_path / "s"
    prepare(["-"], tok_dir, out, read=ReadOptions(split_on="\n\n"), workers=1, dedup=False, progress=False)
    assert list(iter_split_documents(out, "train", tok)) == ["a", "b", "c"]


def test_train_tokenizer_first(tmp_path, capsys):
    rng = random.Random(3)
    for i in range(5):
        write_text(tmp_path / "in" / f"{i}.txt", random_text(rng, 400))
    out = tmp_path / "o"
    code = main(["data", "prepare", "--input", str(tmp_path / "in"), "--train-tokenizer", "--vocab-size", "300",
                 "--out", str(out), "--val-fraction", "0.2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = read_meta(out)
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    assert meta["tokenizer"] == str((out / "tokenizer").resolve())
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["vocab_size"] == tok.vocab_size == 300
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 5
    assert meta["splits"]["val"]["documents"] in (1, 2)  # round(0.2 * 5) + at most one from a partial block


def test_uint32_shards_for_large_vocabularies(tmp_path):
    from gpt2kit.tokenizer.io import gpt2_byte_ranks

    tok = Tokenizer(gpt2_byte_ranks(), [], {EOS: 70_000})
    tok.save(tmp_path / "tok")
    out = tmp_path / "o"
    write_text(tmp_path / "a.txt", "héllo")
    prepare([str(tmp_path / "a.txt")], tmp_path / "tok", out, workers=1, progress=False)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32"
    assert _bin(out, "train", np.uint32).tolist() == tok.encode_ordinary("héllo") + [70_000]
    assert document_ends(out, "train").tolist() == [len("héllo".encode()) + 1]


def test_default_corpus_is_the_standard_library():
    import sysconfig

    files = default_corpus_files()
    assert len(files) > 1000
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    root = sysconfig.get_paths()["stdlib"]
    assert all(str(f).startswith(root) for f in files)
    sources = [d.source for d in default_corpus()]
    assert len(sources) == len(set(sources)) > len(files)  # + one document per pydoc help topic
    assert any(s.startswith("pydoc_data.topics:") for s in sources)


def test_separated_documents_larger_than_a_part(tok_dir, tmp_path):
    rng = random.Random(4)
    docs = [random_text(rng, rng.choice([5, 60, 400])) for _ in range(30)]
    src = write_text(tmp_path / "docs.txt", "\n===\n".join(docs) + "\n===\n")
    tok = Tokenizer.from_pretrained(tok_dir)
    out = tmp_path / "o"
    prepare([str(src)], tok_dir, out, workers=2, read=ReadOptions(split_on="\n===\n", max_piece_chars=300),
            dedup=False, progress=False)
    assert list(iter_split_documents(out, "train", tok)) == docs
    assert _bin(out, "train").tolist() == [i for d in docs for i in tok.encode_ordinary(d) + [tok.eos_id]]


def test_whole_files_are_deferred_to_the_workers_with_the_same_text(tmp_path):
    import gzip

    from gpt2kit.data.readers import FilePiece, Piece, default_corpus_pieces, iter_pieces

    plain = write_text(tmp_path / "a.txt", "héllo wörld\n")
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress(b"zipped text"))
    big = write_text(tmp_path / "c.txt", "x " * 600)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "empty.txt").write_bytes(b"")  # found in a folder: skipped, as before
    opts = ReadOptions(max_piece_chars=1000)
    inputs = [str(plain), str(packed), str(big), str(tmp_path / "folder")]
    deferred = list(iter_pieces(inputs, opts, defer_whole_files=True))
    eager = list(iter_pieces(inputs, opts))
    # plain and small: deferred; compressed or larger than a piece: read as before
    assert [type(p) for p in deferred] == [FilePiece, Piece, Piece, Piece]
    assert deferred[0].read() == eager[0].text and deferred[0].source == eager[0].source and deferred[0].last
    assert [(p.text, p.source, p.last) for p in deferred[1:]] == [(p.text, p.source, p.last) for p in eager[1:]]
    # split documents are never deferred
    assert not any(isinstance(p, FilePiece)
                   for p in iter_pieces([str(plain)], ReadOptions(split_on="\n"), defer_whole_files=True))
    # the default corpus reads its deferred files exactly as default_corpus() does
    first = next(default_corpus_pieces(defer_files=True))
    doc = next(iter(default_corpus()))
    assert isinstance(first, FilePiece) and (first.source, first.read()) == (doc.source, doc.text)
