"""Training MoE and shared-layer models: exact resume, the metrics rows, one-line errors for bad flags."""

from __future__ import annotations

import json

import pytest
from train_helpers import assert_bitwise_equal, cli_main, params_of, tiny_flags, write_shards
from train_helpers import run_training as _run

MOE = dict(moe_experts=4, moe_top_k=2, moe_capacity_factor=1.0, grad_accum=2, max_steps=8, eval_every=4,
           save_every=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def _rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def test_moe_resume_is_bitwise_exact_and_metrics_carry_the_expert_load(shards, tmp_path):
    full = tmp_path / "full"
    _run(tiny_flags(shards, full, **MOE))
    out = tmp_path / "run"
    first = _run(tiny_flags(shards, out, **MOE), stop_after=5)
    assert first.step == 5
    _run({"out": str(out)}, resume=True)
    assert_bitwise_equal(params_of(out / "step-000008"), params_of(full / "step-000008"))
    assert _rows(out) == _rows(full)
    train = [r for r in _rows(full) if "loss" in r]
    assert all(len(r["moe_load"]) == 2 and len(r["moe_load"][0]) == 4 for r in train)
    assert all(0 <= r["moe_dropped"] < 1 and r["moe_aux_loss"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]


def test_shared_layers_train_and_report_honest_parameter_counts(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(tiny_flags(shards, out, share_layers="pairs", n_layer=4, max_steps=4))
    assert result.step == 4
    cfg = json.loads((out / "step-000004" / "config.json").read_text())
    assert cfg["n_layer"] == 4 and cfg["model_type"] == "gpt2kit"
    names = params_of(out / "step-000004").keys()
    assert {n.split(".")[2] for n in names if n.startswith("transformer.h.")} == {"0", "1"}


def test_expert_width_flag_reaches_the_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    _run(tiny_flags(shards, out, moe_experts=4, moe_top_k=2, moe_expert_hidden=24, max_steps=2))
    cfg = json.loads((out / "step-000002" / "config.json").read_text())
    assert cfg["gpt2kit_variant"]["moe_expert_hidden"] == 24
    assert params_of(out / "step-000002")["transformer.h.0.mlp.experts.3.c_fc.weight"].shape[0] == 24


def test_moe_first_layer_flag_reaches_the_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    _run(tiny_flags(shards, out, moe_experts=4, moe_first_layer=1, max_steps=2))
    cfg = json.loads((out / "step-000002" / "config.json").read_text())
    assert cfg["gpt2kit_variant"]["moe_first_layer"] == 1
    names = params_of(out / "step-000002").keys()
    assert "transformer.h.0.mlp.c_fc.weight" in names and "transformer.h.1.mlp.router.weight" in names


@pytest.mark.parametrize("flags,needle", [(["--moe-experts", "2", "--moe-top-k", "3"], "moe_top_k"),
                                          (["--moe-experts", "4", "--moe-capacity-factor", "0"], "moe_capacity_factor"),
                                          (["--moe-experts", "4", "--moe-expert-hidden", "-1"], "moe_expert_hidden")])
def test_bad_moe_flags_are_one_line_exit_2(shards, tmp_path, capsys, flags, needle):
    argv = ["train", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "gpt2-tiny",
            "--device", "cpu", "--max-steps", "1", *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
