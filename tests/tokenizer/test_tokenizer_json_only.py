"""A Hugging Face directory holding only tokenizer.json (written by `tokenizers` from GPT-2's files) opens in
Tokenizer.from_pretrained with the ids `tokenizers` gives; tokenizer.json files of other kinds are refused."""

from __future__ import annotations

import json
import re

import pytest

from gpt2kit.errors import UserError
from gpt2kit.tokenizer import Tokenizer

TEXT = "def parse(self, line):\n    return line.strip()  # naïve — 東京 \n\n\tx = 1_000<|endoftext|>tail"


def _gpt2_tokenizer_json(gpt2_dir, out):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    hf = tokenizers.Tokenizer(models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    out.mkdir()
    hf.save(str(out / "tokenizer.json"))
    return hf


def test_tokenizer_json_only_gives_the_ids_of_tokenizers(gpt2_files_dir, tmp_path):
    hf = _gpt2_tokenizer_json(gpt2_files_dir, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["tokenizer.json"]
    tok = Tokenizer.from_pretrained(tmp_path / "hf")
    ref = Tokenizer.from_pretrained(gpt2_files_dir)
    ids = tok.encode(TEXT, allowed_special="all")
    assert ids == hf.encode(TEXT).ids == ref.encode(TEXT, allowed_special="all")
    assert tok.eos_id == 50256 and tok.vocab_size == 50257 and tok.fingerprint == ref.fingerprint
    assert tok.decode(ids) == TEXT


def test_merges_as_strings_load_too(gpt2_files_dir, tmp_path):
    _gpt2_tokenizer_json(gpt2_files_dir, tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # the older file layout
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path / "old").encode_ordinary(TEXT) == \
        Tokenizer.from_pretrained(gpt2_files_dir).encode_ordinary(TEXT)


def _variant(tmp_path, name, edit):
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (tmp_path / name).mkdir()
    (tmp_path / name / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path / name


@pytest.mark.parametrize("name, edit, message", [
    ("wordpiece", lambda d: d["model"].update(type="WordPiece"), "only byte-level BPE"),
    ("whitespace", lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    ("prefix", lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "not GPT-2's"),
    ("lower", lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer (Lowercase)"),
    ("suffix", lambda d: d["model"].update(end_of_word_suffix="</w>"), "end_of_word_suffix"),
])
def test_other_kinds_are_refused_in_one_line(gpt2_files_dir, tmp_path, name, edit, message):
    _gpt2_tokenizer_json(gpt2_files_dir, tmp_path / "hf")
    with pytest.raises(UserError, match=re.escape(message)):
        Tokenizer.from_pretrained(_variant(tmp_path, name, edit))
