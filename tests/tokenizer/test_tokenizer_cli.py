"""`gpt2kit tokenizer ...` through `gpt2kit.cli.main`: the happy path, and one clear line with exit code 2
for each kind of bad input."""

from __future__ import annotations

import io
import sys

import pytest

from gpt2kit.cli import main

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def run_cli(capsys, *argv, stdin: str | None = None):
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8")
    try:
        code = main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_train_info_encode_decode(capsys, corpus, tmp_path):
    out_dir = tmp_path / "tok"
    code, out, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "300",
        "--out",
        str(out_dir),
        "--no-progress",
    )
    assert code == 0, err
    assert "vocab size 300" in out
    code, out, _ = run_cli(capsys, "tokenizer", "info", str(out_dir), "--json")
    assert code == 0
    import json

    info = json.loads(out)
    assert info["vocab_size"] == 300 and info["merges"] == 300 - 257
    assert info["special_tokens"] == {"<|endoftext|>": 299}

    text = "Speak, speak. héllo 👍<|endoftext|>"
    code, out, err = run_cli(
        capsys, "tokenizer", "encode", "--tokenizer", str(out_dir), "--allowed-special", "all", stdin=text
    )
    assert code == 0, err
    ids = [int(x) for x in out.split()]
    assert ids[-1] == 299
    from gpt2kit import Tokenizer

    assert ids == Tokenizer.from_pretrained(out_dir).encode(text, allowed_special="all")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(out)
    code, out, _ = run_cli(
        capsys, "tokenizer", "decode", "--tokenizer", str(out_dir), "--input", str(ids_file)
    )
    assert code == 0 and out == text


def test_encode_matches_gpt2(capsys, gpt2_files_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Hello world", encoding="utf-8")
    code, out, _ = run_cli(
        capsys, "tokenizer", "encode", "--tokenizer", str(gpt2_files_dir), "--input", str(f)
    )
    assert (code, out) == (0, "15496 995\n")


def test_non_utf8_input_reports_file_and_offset(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(CORPUS.encode() + "caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(bad),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert_user_error(code, err, "latin1.txt", f"byte offset {len(CORPUS.encode()) + 3}", "--errors replace")
    assert not (tmp_path / "o").exists()
    code, out, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(bad),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "o"),
        "--errors",
        "replace",
        "--no-progress",
    )
    assert code == 0, err


def test_bad_training_inputs(capsys, corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = str(tmp_path / "o")
    base = ("tokenizer", "train", "--out", out, "--no-progress")
    cases = [
        (("--input", str(empty), "--vocab-size", "300"), ("empty",)),
        (("--input", str(corpus), "--vocab-size", "256"), ("vocab size 256", "257")),
        (("--input", str(corpus), "--vocab-size", "300", "--special-tokens", "<a>", "<a>"), ("<a>", "twice")),
        (("--input", str(tmp_path / "missing.txt"), "--vocab-size", "300"), ("missing.txt", "not found")),
        (("--input", str(tmp_path), "--vocab-size", "300"), ("not a file",)),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_user_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_out_is_never_overwritten_unless_asked(capsys, corpus, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = (
        "tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "300",
        "--out",
        str(out),
        "--no-progress",
    )
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "vocab.json").exists()


def test_bad_encode_and_decode_inputs(capsys, gpt2_files_dir, tmp_path):
    tok = str(gpt2_files_dir)
    code, _, err = run_cli(
        capsys, "tokenizer", "encode", "--tokenizer", tok, "--allowed-special", "<|im_start|>", stdin="hi"
    )
    assert_user_error(code, err, "unknown special token", "<|im_start|>")
    code, _, err = run_cli(capsys, "tokenizer", "encode", "--tokenizer", tok, stdin="a<|endoftext|>b")
    assert_user_error(code, err, "<|endoftext|>", "allowed_special")
    code, out, _ = run_cli(
        capsys, "tokenizer", "encode", "--tokenizer", tok, "--ordinary", stdin="a<|endoftext|>"
    )
    assert code == 0 and out.split()[-1] != "50256"
    code, _, err = run_cli(capsys, "tokenizer", "decode", "--tokenizer", tok, stdin="15496 99999")
    assert_user_error(code, err, "99999", "not in the vocabulary")
    code, _, err = run_cli(capsys, "tokenizer", "decode", "--tokenizer", tok, stdin="15496 abc")
    assert_user_error(code, err, "item 2", "'abc'")
    code, _, err = run_cli(capsys, "tokenizer", "info", str(tmp_path))
    assert_user_error(code, err, "no tokenizer files")
    code, _, err = run_cli(capsys, "tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"), stdin="x")
    assert_user_error(code, err, "not found")
