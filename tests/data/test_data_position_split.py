"""One document (or too few): `data prepare --val-fraction F` splits by position, as nanoGPT does, at a
line boundary; training on the result works; an empty train split is an error (one line, exit 2)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from datatest_helpers import EOS, random_text, small_tokenizer, write_text

from gpt2kit.cli import main
from gpt2kit.data import iter_split_documents
from gpt2kit.data.meta import document_ends
from gpt2kit.tokenizer import Tokenizer
from shared_data import shared_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import tiny_flags  # noqa: E402


def _prepare(src, tok, out, fraction, capsys) -> dict:
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--val-fraction", str(fraction), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "split by position" in err
    return json.loads((out / "meta.json").read_text())


def test_tinyshakespeare_splits_90_10_at_a_line_and_trains(gpt2_files_dir, tmp_path, capsys):
    src = shared_path("tinyshakespeare.txt")
    out = tmp_path / "ts"
    meta = _prepare(src, gpt2_files_dir, out, 0.1, capsys)
    assert meta["split_by"] == "position"
    train, val = (np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    share = len(train) / (len(train) + len(val))
    assert 0.895 < share < 0.905
    tok = Tokenizer.from_pretrained(gpt2_files_dir)
    head, tail = (list(iter_split_documents(out, s, tok)) for s in ("train", "val"))
    assert len(head) == len(tail) == 1
    text = src.read_text(encoding="utf-8")
    assert head[0] + tail[0] == text and head[0].endswith("\n")  # cut at a line boundary, nothing lost
    for s, docs in (("train", head), ("val", tail)):
        split = meta["splits"][s]
        assert split == {"documents": 1, "tokens": len(train if s == "train" else val),
                         "characters": len(docs[0]), "bytes": len(docs[0].encode("utf-8"))}
        assert document_ends(out, s).tolist() == [split["tokens"]]

    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer

    flags = tiny_flags(out, tmp_path / "run", preset="gpt2-tiny", max_steps=4, eval_every=4, save_every=4,
                       n_embd=32, eval_batches=2)
    result = Trainer(build_config(flags)).fit()
    assert result.step == 4 and np.isfinite(result.val["val_loss"]) and result.val["val_bpc"] > 0


def test_few_documents_keep_input_order_across_the_cut(tmp_path, capsys):
    tok = small_tokenizer(tmp_path / "tok")
    rng = random.Random(1)
    docs = ["\n".join(random_text(rng, 40) for _ in range(30)) + "\n" for _ in range(3)]
    src = write_text(tmp_path / "three.txt", EOS.join(docs))
    out = tmp_path / "shards"
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--val-fraction", "0.2", "--split-on", EOS, "--quiet"])
    assert code == 0
    assert "split by position" in capsys.readouterr().err
    t = Tokenizer.from_pretrained(tok)
    head, tail = (list(iter_split_documents(out, s, t)) for s in ("train", "val"))
    assert "".join(head + tail) == "".join(docs)  # the documents in order, the cut one in two halves
    assert len(head) + len(tail) == 4 and head[-1].endswith("\n")


def test_a_split_that_leaves_train_empty_is_an_error(tmp_path, capsys):
    tok = small_tokenizer(tmp_path / "tok")
    src = write_text(tmp_path / "short.txt", "the\n")
    out = tmp_path / "shards"
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--val-fraction", "0.9", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("gpt2kit data: error: the train split would be empty")
    assert not out.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_many_documents_still_split_by_document(tmp_path, capsys, fraction):
    tok = small_tokenizer(tmp_path / "tok")
    rng = random.Random(2)
    src = write_text(tmp_path / "many.txt", EOS.join(random_text(rng, 30) for _ in range(40)))
    out = tmp_path / "shards"
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--val-fraction", str(fraction), "--split-on", EOS, "--quiet"]) == 0
    assert "split by position" not in capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split_by"] == "documents"
    assert abs(meta["splits"]["val"]["documents"] - round(40 * fraction)) <= 1  # +-1 (shards module doc)
