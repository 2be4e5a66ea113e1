"""lm-evaluation-harness's `hf` model and `gpt2kit eval --task lambada` on the same checkpoint and local
LAMBADA jsonl: the same accuracy (exactly) and perplexity (1e-4 relative). Offline: a local task YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "post"))
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_lm_eval_lambada_equals_gpt2kit_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'gpt2kit[lm-eval]')")
    from post_helpers import corpus, workspace

    from gpt2kit.cli import main
    from lm_eval_parity import lm_eval_lambada

    ckpt = workspace()["ckpt"]  # a tiny model trained on this grammar: accuracy is well above zero
    f = tmp_path / "lambada.jsonl"
    passages = [" ".join(p.split(". ")[:2]) for p in corpus(100, seed=11).split("\n\n")][:20]
    f.write_text("".join(json.dumps({"text": p.strip()}) + "\n" for p in passages))
    assert main(["eval", str(ckpt), "--task", "lambada", "--file", str(f), "--json"]) == 0
    out = capsys.readouterr().out
    ours = json.loads(out[out.index("{"):])
    ours = ours.get("lambada", ours)
    theirs = lm_eval_lambada(ckpt, f)
    assert theirs["examples"] == 20
    assert 0.1 < theirs["acc"] < 1.0
    assert ours["acc"] == theirs["acc"]
    assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=1e-4)
