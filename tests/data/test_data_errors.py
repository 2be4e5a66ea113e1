"""Bad input: one clear line on stderr, exit code 2, and nothing half-written left behind."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datatest_helpers import random_text, small_tokenizer, write_text

from gpt2kit.cli import main
from gpt2kit.data import check_fingerprint, read_meta
from gpt2kit.errors import UserError
from gpt2kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def _prepare(*args: str, workers: int = 1) -> list[str]:
    return ["data", "prepare", *args, "--quiet", "--workers", str(workers)]


def _fails(capsys, argv, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_leftovers(parent, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]  # no temporary directories


def test_missing_and_empty_inputs(tok_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, _prepare("--input", str(tmp_path / "nope.txt"), "--tokenizer", str(tok_dir), "--out", str(out)),
           "--input not found", "nope.txt")
    write_text(tmp_path / "empty.txt", "")
    _fails(capsys, _prepare("--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir), "--out", str(out)),
           "--input is empty", "empty.txt")
    _fails(capsys, _prepare("--input", str(tmp_path / "*.md"), "--tokenizer", str(tok_dir), "--out", str(out)),
           "matches no files")
    (tmp_path / "folder").mkdir()
    _fails(capsys, _prepare("--input", str(tmp_path / "folder"), "--tokenizer", str(tok_dir), "--out", str(out)),
           "has no files")
    _fails(capsys, _prepare("--input", str(tmp_path / "empty.txt"), "--out", str(out)), "--tokenizer")
    _no_leftovers(tmp_path)


def test_invalid_jsonl_line_fails_with_file_and_line_or_is_skipped(tok_dir, tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "good one"}\n{"text": "fine too"}\n{"text": broken\n{"other": 1}\n{"text": "last"}\n')
    out = tmp_path / "out"
    _fails(capsys, _prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out)),
           f"{src}:3", "invalid JSON", "--on-bad-line skip")
    _no_leftovers(tmp_path)
    assert main(_prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out),
                         "--on-bad-line", "skip")) == 0
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == 3
    assert meta["read"]["bad_records_skipped"] == 2
    assert f"{src}:3" in capsys.readouterr().err  # the skip is reported with an example


@pytest.mark.parametrize("workers", [1, 2])  # with 2, the file is read (and fails) in a worker process
def test_failure_midway_leaves_no_partial_output(tok_dir, tmp_path, capsys, workers):
    rng = random.Random(0)
    for i in range(30):
        write_text(tmp_path / "in" / f"{i:02d}.txt", random_text(rng, 200))
    (tmp_path / "in" / "99.txt").write_bytes(b"valid start \xff\xfe invalid")
    out = tmp_path / "out"
    _fails(capsys, _prepare("--input", str(tmp_path / "in"), "--tokenizer", str(tok_dir), "--out", str(out),
                            workers=workers),
           "99.txt", "not valid UTF-8 at byte 12", "--errors replace")
    _no_leftovers(tmp_path)
    assert main(_prepare("--input", str(tmp_path / "in"), "--tokenizer", str(tok_dir), "--out", str(out),
                         "--errors", "replace", workers=workers)) == 0
    assert read_meta(out)["splits"]["train"]["documents"] == 31


def test_existing_output_is_never_replaced_without_overwrite(tok_dir, tmp_path, capsys):
    src = write_text(tmp_path / "a.txt", "some text")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, _prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(_prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and read_meta(out)["splits"]["train"]["documents"] == 1


def test_fingerprint_mismatch_is_one_line_exit_2(tok_dir, tmp_path, capsys):
    src = write_text(tmp_path / "a.txt", "some text to tokenize")
    out = tmp_path / "out"
    assert main(_prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out))) == 0
    assert main(["data", "inspect", str(out), "--tokenizer", str(tok_dir)]) == 0
    other = tmp_path / "other"
    Tokenizer.train([random_text(random.Random(5), 500)], 290, progress=False).save(other)
    _fails(capsys, ["data", "inspect", str(out), "--tokenizer", str(other)], "fingerprint mismatch")
    _fails(capsys, ["data", "contamination", "--train", str(out), "--eval", str(src), "--tokenizer", str(other)],
           "fingerprint mismatch")
    with pytest.raises(UserError, match="fingerprint mismatch"):
        check_fingerprint(read_meta(out), Tokenizer.from_pretrained(other))


def test_corrupt_shard_directories(tok_dir, tmp_path, capsys):
    src = write_text(tmp_path / "a.txt", "some text to tokenize")
    out = tmp_path / "out"
    assert main(_prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(out))) == 0
    _fails(capsys, ["data", "inspect", str(tmp_path / "missing")], "data directory not found")
    bin_path = out / "train.bin"
    ids = np.fromfile(bin_path, dtype=np.uint16)
    ids[:-1].tofile(bin_path)
    _fails(capsys, ["data", "inspect", str(out)], "train.bin", "corrupt")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta)[:-5])
    _fails(capsys, ["data", "inspect", str(out)], "meta.json", "not valid JSON")
    meta["dtype"] = "int8"
    (out / "meta.json").write_text(json.dumps(meta))
    _fails(capsys, ["data", "inspect", str(out)], "dtype")


def test_bad_flags(tok_dir, tmp_path, capsys):
    src = write_text(tmp_path / "a.txt", "text")
    base = _prepare("--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"))
    _fails(capsys, [*base, "--val-fraction", "1.5"], "--val-fraction")
    _fails(capsys, [*base, "--near-dup-threshold", "0"], "--near-dup-threshold")
    _fails(capsys, [*base, "--vocab-size", "300"], "--train-tokenizer")
    _fails(capsys, [*base, "--split-on", ""], "--split-on")
    _no_leftovers(tmp_path)
