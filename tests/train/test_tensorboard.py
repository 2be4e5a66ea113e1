"""`--tensorboard`: the scalars a run logs, read back by TensorBoard's own reader under conventional tags."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_flags, write_shards

pytest.importorskip("tensorboard")

from gpt2kit.train.config import build_config  # noqa: E402
from gpt2kit.train.trainer import Trainer, tensorboard_tag  # noqa: E402


def test_tags():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("lr") == "train/lr"
    assert tensorboard_tag("tokens_per_s") == "train/tokens_per_sec"
    assert tensorboard_tag("val_loss") == "val/loss" and tensorboard_tag("val_bpc") == "val/bpc"
    assert tensorboard_tag("moe/load") == "moe/load"


def test_event_accumulator_reads_the_run_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_shards(tmp_path / "data", train_tokens=4000, val_tokens=1000)
    flags = tiny_flags(data, tmp_path / "run", max_steps=6, eval_every=3, save_every=6, log_every=2,
                       tensorboard=True)
    Trainer(build_config(flags)).fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_sec", "val/loss", "val/bpc"} <= tags
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [r["step"] for r in train] == [2, 4, 6]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert val and [e.step for e in acc.Scalars("val/bpc")] == [r["step"] for r in val]
    assert [e.value for e in acc.Scalars("val/bpc")] == pytest.approx([r["val_bpc"] for r in val], rel=1e-6)
    assert [e.value for e in acc.Scalars("val/loss")] == pytest.approx([r["val_loss"] for r in val], rel=1e-6)
