"""De-duplication: exactly the expected documents go, MinHash estimates are unbiased, normalization counts."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datatest_helpers import WORDS, random_text, small_tokenizer, write_text

from gpt2kit.data import iter_split_documents, read_meta
from gpt2kit.data.dedup import Deduplicator, densify, exact_key, minhash_bins, shingle_hashes
from gpt2kit.data.shards import prepare
from gpt2kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def _edit_words(rng: random.Random, text: str, share: float) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(share * len(words))):
        words[i] = rng.choice(WORDS) + "x"  # a word that never occurs in the originals
    return " ".join(words)


def _jaccard(tok: Tokenizer, a: str, b: str, n: int = 4) -> float:
    sa = set(shingle_hashes(np.array(tok.encode_ordinary(a), dtype=np.uint16), n).tolist())
    sb = set(shingle_hashes(np.array(tok.encode_ordinary(b), dtype=np.uint16), n).tolist())
    return len(sa & sb) / len(sa | sb)


def test_fixture_removes_exactly_the_expected_documents(tok_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tok_dir)
    rng = random.Random(0)
    originals = [random_text(rng, 400) for _ in range(12)]
    near = _edit_words(rng, originals[4], 0.01)  # 1% of words changed: Jaccard ~0.95
    far = _edit_words(rng, originals[6], 0.30)  # 30% changed: Jaccard ~0.2, a different document
    near_of_near = _edit_words(rng, near, 0.01)
    # the fixture really sits on both sides of the 0.8 threshold, far from it
    assert _jaccard(tok, originals[4], near) > 0.9
    assert _jaccard(tok, near_of_near, originals[4]) > 0.85
    assert _jaccard(tok, originals[6], far) < 0.5
    assert max(_jaccard(tok, a, b) for a in originals for b in originals if a is not b) < 0.1
    docs = [*originals[:8], originals[2], near, far, *originals[8:], originals[2], near_of_near, originals[11]]
    names = []
    for i, d in enumerate(docs):
        names.append(str(write_text(tmp_path / "in" / f"{i:02d}.txt", d)))
    out = tmp_path / "o"
    prepare([str(tmp_path / "in")], tok_dir, out, workers=2, near_dup_threshold=0.8, progress=False)
    meta = read_meta(out)
    report = [json.loads(line) for line in (out / "dedup.jsonl").read_text().splitlines()]
    removed = {(r["kind"], r["source"], r["duplicate_of"]) for r in report}
    assert removed == {
        ("exact", names[8], names[2]),
        ("near", names[9], names[4]),
        ("exact", names[15], names[2]),
        ("near", names[16], names[4]),
        ("exact", names[17], names[14]),  # originals[11] first came as file 14
    }
    assert meta["dedup"]["exact_removed"] == 3 and meta["dedup"]["near_removed"] == 2
    kept = list(iter_split_documents(out, "train", tok))
    assert kept == [*originals[:8], far, *originals[8:]]
    assert meta["dedup"]["removed_bytes"] == sum(len(docs[i].encode()) for i in (8, 9, 15, 16, 17))


def test_no_dedup_keeps_everything(tok_dir, tmp_path):
    write_text(tmp_path / "in" / "a.txt", "same text")
    write_text(tmp_path / "in" / "b.txt", "same text")
    out = tmp_path / "o"
    prepare([str(tmp_path / "in")], tok_dir, out, dedup=False, workers=1, progress=False)
    assert read_meta(out)["splits"]["train"]["documents"] == 2


def test_exact_duplicates_after_the_tokenizers_normalization(tmp_path):
    from gpt2kit.tokenizer.io import gpt2_byte_ranks

    Tokenizer(gpt2_byte_ranks(), [], {"<|endoftext|>": 256}, normalization="NFC", lowercase=True).save(tmp_path / "t")
    write_text(tmp_path / "in" / "a.txt", "Caf\u00e9 Olé")
    write_text(tmp_path / "in" / "b.txt", "CAFE\u0301 OLÉ")  # decomposed é, upper case: the same after NFC + lower
    out = tmp_path / "o"
    prepare([str(tmp_path / "in")], tmp_path / "t", out, workers=1, progress=False)
    meta = read_meta(out)
    assert meta["dedup"]["exact_removed"] == 1
    assert meta["normalization"] == "NFC" and meta["lowercase"] is True
    assert list(iter_split_documents(out, "train")) == ["café olé"]  # stored as normalized
    assert meta["splits"]["train"]["characters"] == len("café olé")


def test_minhash_estimates_jaccard_without_bias():
    rng = np.random.default_rng(0)
    errors = []
    for length in (8, 40, 300, 3000):  # short documents leave most bins empty: densification must hold
        for _ in range(60):
            a = rng.integers(0, 50_000, length)
            b = a.copy()
            k = max(1, int(rng.uniform(0.02, 0.4) * length))
            b[rng.choice(length, k, replace=False)] = rng.integers(0, 50_000, k)
            sa, sb = set(shingle_hashes(a, 4).tolist()), set(shingle_hashes(b, 4).tolist())
            true = len(sa & sb) / len(sa | sb)
            est = float(np.mean(densify(minhash_bins(a)) == densify(minhash_bins(b))))
            errors.append(est - true)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.015  # unbiased
    assert errors.std() < 0.06  # about sqrt(J(1-J)/128) for 128 slots


def test_parts_merge_to_the_signature_of_the_whole():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, 5000)
    whole = densify(minhash_bins(ids))
    halves = densify(np.minimum(minhash_bins(ids[:2500]), minhash_bins(ids[2500:])))
    assert np.mean(whole == halves) > 0.97  # only the 4 shingles across the cut are missing


def test_lsh_candidates_are_confirmed_by_the_threshold():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 50_000, 400)
    dedup = Deduplicator(threshold=0.8)
    assert dedup.check(exact_key("a"), densify(minhash_bins(base)), "a") is None
    medium = base.copy()
    medium[::6] = rng.integers(0, 50_000, len(medium[::6]))  # Jaccard ~0.25: must stay
    assert dedup.check(exact_key("b"), densify(minhash_bins(medium)), "b") is None
    close = base.copy()
    close[200] = 7
    removal = dedup.check(exact_key("c"), densify(minhash_bins(close)), "c")
    assert removal is not None and removal.kind == "near" and removal.duplicate_of == "a" and removal.jaccard > 0.9
    assert dedup.check(exact_key("a"), None, "a2").kind == "exact"


def test_band_index_matches_datasketch_minhash_lsh():
    """Our LSH banding is datasketch's: same (bands, rows) choice and the same candidates."""
    from datasketch import MinHashLSH
    from datasketch.lsh import _optimal_param

    from gpt2kit.data.dedup import BandIndex, optimal_bands

    for threshold in (0.5, 0.7, 0.8, 0.9):
        assert optimal_bands(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)

    class Sketch:  # what MinHashLSH reads from a MinHash
        def __init__(self, values):
            self.hashvalues = values.astype(np.uint64)

        def __len__(self):
            return len(self.hashvalues)

    rng = np.random.default_rng(3)
    bands, rows = optimal_bands(0.8, 128)
    ours, theirs = BandIndex(bands, rows), MinHashLSH(num_perm=128, params=(bands, rows))
    base = [rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32) for _ in range(50)]
    sigs = []
    for _ in range(400):  # variants of a few bases, so many pairs share some bands and not others
        s = base[rng.integers(len(base))].copy()
        k = rng.integers(0, 40)
        s[rng.choice(128, k, replace=False)] = rng.integers(0, 2**32, k, dtype=np.uint64).astype(np.uint32)
        sigs.append(s)
    agree = 0
    for i, s in enumerate(sigs):
        keys = ours.keys(s)
        got, want = ours.query(keys), set(theirs.query(Sketch(s)))
        assert got == want
        agree += bool(got)
        ours.insert(i, keys)
        theirs.insert(i, Sketch(s))
    assert agree > 100  # the comparison exercised real candidates
