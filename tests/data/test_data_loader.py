"""ShardLoader / iter_eval_batches: masks, ranges, rank disjointness, resumable cursor, dynamic lengths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2kit.data import ShardLoader, iter_eval_batches
from gpt2kit.data.loader import ScheduledLengths, UniformLengths, parse_seq_len_sampler
from gpt2kit.errors import UserError

EOS = 0


def write_shards(d, docs: list[np.ndarray], index: bool = True):
    """A shard directory by hand: documents followed by EOS, meta.json as `prepare` writes it."""
    d.mkdir(parents=True, exist_ok=True)
    stream = np.concatenate([np.append(doc, EOS) for doc in docs]).astype("<u2") if docs else np.zeros(0, "<u2")
    stream.tofile(d / "train.bin")
    np.zeros(0, "<u2").tofile(d / "val.bin")
    if index:
        np.cumsum([len(doc) + 1 for doc in docs]).astype("<u8").tofile(d / "train.idx")
    empty = {"documents": 0, "tokens": 0, "characters": 0, "bytes": 0}
    meta = {"format": 1, "dtype": "uint16", "vocab_size": 65536, "eos_id": EOS, "tokenizer_fingerprint": "test",
            "splits": {"train": {"documents": len(docs), "tokens": len(stream), "characters": 0, "bytes": 0},
                       "val": empty}}
    (d / "meta.json").write_text(json.dumps(meta))
    return stream


@pytest.fixture
def packed_dir(tmp_path):
    """10,000 tokens whose values are their positions (+1), EOS every 97: a window shows where it came from."""
    ids = np.arange(1, 10_001, dtype=np.int64)
    docs = np.split(ids, np.arange(97, len(ids), 97))
    stream = write_shards(tmp_path / "p", docs)
    return tmp_path / "p", stream


@pytest.fixture
def padded_dir(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 60_000, int(n)) for n in rng.integers(1, 60, size=200)]
    write_shards(tmp_path / "d", docs)
    return tmp_path / "d", docs


def _window_start(stream: np.ndarray, row: torch.Tensor) -> int:
    """Position of `row` in the stream (rows are contiguous slices; non-EOS values are unique)."""
    first_real = int(np.flatnonzero(row.numpy() != EOS)[0])
    return int(np.flatnonzero(stream == row[first_real].item())[0]) - first_real


def test_packed_windows_are_slices_in_range(packed_dir):
    d, stream = packed_dir
    loader = ShardLoader(d, batch_size=8, block_size=64, seed=1)
    for _ in range(50):
        b = loader.next_batch()
        assert b.idx.shape == b.targets.shape == (8, 64) and b.idx.dtype == torch.long and b.loss_mask is None
        for x, y in zip(b.idx, b.targets):
            s = _window_start(stream, x)
            assert 0 <= s and s + 65 <= len(stream)
            assert torch.equal(x, torch.from_numpy(stream[s : s + 64].astype(np.int64)))
            assert torch.equal(y, torch.from_numpy(stream[s + 1 : s + 65].astype(np.int64)))


def test_two_ranks_never_read_the_same_window(packed_dir):
    d, stream = packed_dir
    seen = []
    for rank in range(2):
        loader = ShardLoader(d, batch_size=4, block_size=64, seed=5, rank=rank, world_size=2)
        positions = set()
        for _ in range(loader.batches_per_epoch):  # one epoch: 77 windows per rank
            for x in loader.next_batch().idx:
                s = _window_start(stream, x)
                positions.update(range(s, s + 64))
        seen.append(positions)
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    # together the ranks cover most of the stream in one epoch
    assert len(seen[0] | seen[1]) > 0.95 * len(stream) - 2 * 64 * 4


def test_padded_masks_exactly_the_padding(padded_dir):
    d, docs = padded_dir
    by_first = {}
    for doc in docs:
        by_first.setdefault((int(doc[0]), len(doc)), doc)
    loader = ShardLoader(d, batch_size=16, block_size=40, mode="padded", seed=3)
    truncated = short = 0
    for _ in range(30):
        b = loader.next_batch()
        for x, y, m in zip(b.idx, b.targets, b.loss_mask):
            assert x[0].item() == EOS  # the separator before the document
            n_real = int(m.sum())
            doc = next(v for (first, _), v in by_first.items() if first == x[1].item() and
                       np.array_equal(v[: min(len(v), 39)], x[1 : 1 + min(len(v), 39)].numpy()))
            if len(doc) < 40:  # document, its EOS as a target, then padding
                short += 1
                assert n_real == len(doc) + 1
                assert y[: len(doc)].tolist() == doc.tolist() and y[len(doc)].item() == EOS
                assert m[: len(doc) + 1].all() and not m[len(doc) + 1 :].any()
                assert (x[len(doc) + 1 :] == EOS).all() and (y[len(doc) + 1 :] == EOS).all()
            else:  # truncated to T: every position is a real target
                truncated += 1
                assert m.all() and y.tolist() == doc[:40].tolist()
    assert short and truncated


def test_padded_ranks_get_disjoint_documents(padded_dir):
    d, docs = padded_dir
    got = []
    for rank in range(3):
        loader = ShardLoader(d, batch_size=5, block_size=64, mode="padded", seed=2, rank=rank, world_size=3)
        rows = set()
        for _ in range(len(docs) // 3 // 5):
            b = loader.next_batch()
            for x, m in zip(b.idx, b.loss_mask):
                rows.add(tuple(x[1 : int(m.sum())].tolist()))
        got.append(rows)
    assert not (got[0] & got[1]) and not (got[0] & got[2]) and not (got[1] & got[2])


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_restoring_the_cursor_reproduces_the_next_batches(packed_dir, padded_dir, mode, tmp_path):
    d = packed_dir[0] if mode == "packed" else padded_dir[0]
    sampler = UniformLengths([8, 16, 32])
    a = ShardLoader(d, batch_size=7, block_size=32, mode=mode, seed=11, seq_len_sampler=sampler)
    for _ in range(60):  # crosses epoch boundaries in both modes
        a.next_batch()
    state = a.state_dict()
    json.dumps(state)  # plain ints and strings
    torch.save(state, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    b = ShardLoader(d, batch_size=7, block_size=32, mode=mode, seed=11, seq_len_sampler=sampler)
    b.load_state_dict(state)
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.idx, y.idx) and torch.equal(x.targets, y.targets)
        assert (x.loss_mask is None and y.loss_mask is None) or torch.equal(x.loss_mask, y.loss_mask)
    other = ShardLoader(d, batch_size=7, block_size=32, mode=mode, seed=12)
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(state)


def test_same_seed_same_batches_other_seed_other_batches(packed_dir):
    d, _ = packed_dir
    a, b, c = (ShardLoader(d, batch_size=4, block_size=32, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch().idx, b.next_batch().idx, c.next_batch().idx
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_dynamic_lengths_follow_the_distribution(packed_dir):
    d, _ = packed_dir
    sampler = parse_seq_len_sampler("uniform:16@1,32@1,64@2")
    loader = ShardLoader(d, batch_size=2, block_size=64, seed=0, seq_len_sampler=sampler)
    lengths = [loader.next_batch().idx.shape[1] for _ in range(2000)]
    counts = {t: lengths.count(t) / len(lengths) for t in (16, 32, 64)}
    assert set(lengths) == {16, 32, 64}
    for t, p in ((16, 0.25), (32, 0.25), (64, 0.5)):
        assert abs(counts[t] - p) < 4 * (p * (1 - p) / 2000) ** 0.5  # within 4 standard errors
    schedule = parse_seq_len_sampler("schedule:0=16,10=32,25=64")
    assert isinstance(schedule, ScheduledLengths)
    loader = ShardLoader(d, batch_size=2, block_size=64, seq_len_sampler=schedule)
    assert [loader.next_batch().idx.shape[1] for _ in range(30)] == [16] * 10 + [32] * 15 + [64] * 5
    # every rank draws the same T at the same step
    r0 = ShardLoader(d, batch_size=2, block_size=64, seed=4, rank=0, world_size=2, seq_len_sampler=sampler)
    r1 = ShardLoader(d, batch_size=2, block_size=64, seed=4, rank=1, world_size=2, seq_len_sampler=sampler)
    assert [r0.next_batch().idx.shape[1] for _ in range(20)] == [r1.next_batch().idx.shape[1] for _ in range(20)]
    with pytest.raises(UserError):
        parse_seq_len_sampler("gaussian:5")
    too_long = ShardLoader(d, batch_size=2, block_size=32, seq_len_sampler=UniformLengths([64]))
    with pytest.raises(UserError, match="block_size"):
        too_long.next_batch()


def test_eval_batches_predict_every_token_once(packed_dir):
    d, stream = packed_dir
    targets = []
    batches = list(iter_eval_batches(d, "train", batch_size=8, block_size=100))
    for b in batches:
        mask = torch.ones_like(b.targets, dtype=torch.bool) if b.loss_mask is None else b.loss_mask
        targets.append(b.targets[mask])
        assert torch.equal(b.idx[:, 1:][mask[:, :-1]], b.targets[:, :-1][mask[:, :-1]])
    assert torch.cat(targets).tolist() == stream[1:].tolist()
    assert sum(b.loss_mask is not None for b in batches) == 1  # only the batch with the short last window
    again = list(iter_eval_batches(d, "train", batch_size=8, block_size=100))
    assert all(torch.equal(x.idx, y.idx) for x, y in zip(batches, again))
    # two ranks split the windows between them
    r = [list(iter_eval_batches(d, "train", 8, 100, rank=k, world_size=2)) for k in range(2)]
    assert sum(b.idx.shape[0] for b in r[0] + r[1]) == sum(b.idx.shape[0] for b in batches)
    with pytest.raises(UserError, match="empty"):
        next(iter_eval_batches(d, "val", 8, 100))


def test_index_file_is_optional_and_errors_are_clear(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 100, 5) for _ in range(4)]
    write_shards(tmp_path / "n", docs, index=False)
    b = ShardLoader(tmp_path / "n", batch_size=4, block_size=8, mode="padded").next_batch()
    assert sorted(int(m.sum()) for m in b.loss_mask) == [6, 6, 6, 6]
    with pytest.raises(UserError, match="too few"):
        ShardLoader(tmp_path / "n", batch_size=1, block_size=64)
    with pytest.raises(UserError, match="world_size"):
        ShardLoader(tmp_path / "n", batch_size=1, block_size=4, rank=2, world_size=2)
    (tmp_path / "n" / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="does not match meta.json"):
        ShardLoader(tmp_path / "n", batch_size=1, block_size=4)
