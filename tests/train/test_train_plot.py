"""`gpt2kit plot`: a PNG with the curves of several runs; bad input is a clear error."""

from __future__ import annotations

import json

import pytest

from gpt2kit.errors import UserError
from gpt2kit.train.plot import plot_runs, read_metrics


def _fake_run(d, lr_scale=1.0):
    d.mkdir()
    rows = [{"step": s, "loss": 5 / s**0.3, "lr": lr_scale * 1e-3 * min(1, s / 5)} for s in range(1, 31)]
    rows += [{"step": s, "val_loss": 5.2 / s**0.3, "val_ppl": 1.0, "val_bpc": 2 / s**0.2} for s in (10, 20, 30)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_writes_a_png_comparing_runs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", 2.0)
    train, evals = read_metrics(a)
    assert len(train) == 30 and [r["step"] for r in evals] == [10, 20, 30]
    out = plot_runs([a, b], tmp_path / "cmp.png", smooth=3)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real, non-trivial image


def test_plot_bad_input(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        read_metrics(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        read_metrics(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(bad)
