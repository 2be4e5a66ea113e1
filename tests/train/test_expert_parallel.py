"""Expert parallelism: 2 Gloo ranks (experts sharded, tokens exchanged all-to-all; the rest DDP or FSDP2)
== one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2kit.errors import UserError
from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.train.expert_parallel import shard_experts

SCRIPT = Path(__file__).parent / "dist_scripts" / "ep_parity.py"


def _run_script(out: Path, strategy: str, name: str) -> tuple[dict, dict]:
    """Run dist_scripts/ep_parity.py; the one-process and the 2-rank final state dicts (the same keys)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), strategy], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = torch.load(out / "single.pt", weights_only=True)
    ep = torch.load(out / f"{name}.pt", weights_only=True)
    assert single.keys() == ep.keys()
    return single, ep


@pytest.mark.slow  # two forked Gloo ranks: ~15 s on an idle 2-core machine (minutes when it is shared)
def test_two_expert_parallel_ranks_match_one_process_after_10_steps(tmp_path):
    single, ep = _run_script(tmp_path, "ddp", "ep2")
    assert max((single[k] - ep[k]).abs().max().item() for k in single) < 1e-6
    # each rank held half the experts and half their AdamW state, all of the rest; the clip was global
    one = torch.load(tmp_path / "single.rank0.sizes.pt", weights_only=True)
    for rank in (0, 1):
        mine = torch.load(tmp_path / f"ep2.rank{rank}.sizes.pt", weights_only=True)
        assert 2 * mine["expert_params"] == one["expert_params"] and mine["dense_params"] == one["dense_params"]
        assert 2 * mine["expert_optim"] == one["expert_optim"]  # AdamW's moments and step of 2 of the 4 experts
        assert mine["dense_optim"] == one["dense_optim"]
        assert mine["norm"] > 0.5 and abs(mine["norm"] - one["norm"]) < 1e-9  # clipping at 0.5 was active
    # and training moved the experts (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init = _model_like_script().state_dict()
    assert (init["transformer.h.1.mlp.experts.3.c_fc.weight"].double()
            - single["transformer.h.1.mlp.experts.3.c_fc.weight"]).abs().max() > 1e-3


@pytest.mark.slow  # two forked Gloo ranks under FSDP2
def test_fsdp_dense_part_with_expert_parallel_matches_one_process_after_10_steps(tmp_path):
    single, ep = _run_script(tmp_path, "fsdp", "ep2_fsdp")
    assert max((single[k] - ep[k]).abs().max().item() for k in single) < 1e-6
    one = torch.load(tmp_path / "single.rank0.sizes.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"ep2_fsdp.rank{r}.sizes.pt", weights_only=True) for r in (0, 1)]
    for mine in ranks:  # half the experts and their AdamW state per rank, as under DDP
        assert 2 * mine["expert_params"] == one["expert_params"] and 2 * mine["expert_optim"] == one["expert_optim"]
        assert mine["dense_params"] < 0.6 * one["dense_params"]  # and now the dense part is sharded too
        assert mine["norm"] > 0.5 and abs(mine["norm"] - one["norm"]) < 1e-9
    assert sum(m["dense_params"] for m in ranks) == one["dense_params"]  # FSDP's shards: every element once


def _model_like_script() -> GPT2Network:
    sys.path.insert(0, str(SCRIPT.parent))
    from ep_parity import config

    return GPT2Network(config())


def _model(E: int) -> GPT2Network:
    return GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=16, eos_token_id=0,
                                  moe_experts=E))


def test_experts_not_divisible_by_the_world_size_is_one_line():
    with pytest.raises(UserError, match="moe_experts=4 is not divisible by the world size 3"):
        shard_experts(_model(4), 0, 3, "ddp")
    with pytest.raises(UserError, match="needs an MoE model"):
        shard_experts(GPT2Network(GPT2Config.from_preset("gpt2-tiny")), 0, 2, "ddp")
    with pytest.raises(UserError, match="composes with --strategy ddp or fsdp .* not 'zero1'"):
        shard_experts(_model(4), 0, 2, "zero1")
    assert shard_experts(_model(4), 0, 2, "fsdp") is not None  # FSDP shards the dense part (test below)
    assert shard_experts(_model(4), 0, 1, "ddp") is None  # one process: nothing to shard


def test_a_rank_keeps_its_experts_under_their_one_process_names():
    torch.manual_seed(0)
    full = _model(4)
    torch.manual_seed(0)
    model = _model(4)
    shards = shard_experts(model, 1, 2, "ddp")
    names = [n for n in model.state_dict() if ".experts." in n and n.endswith("c_fc.weight")]
    assert names == [f"transformer.h.{i}.mlp.experts.{e}.c_fc.weight" for i in (0, 1) for e in (2, 3)]
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # the same weights as one process
    assert shards.num_params(sum(p.numel() for p in model.parameters())) == full.num_params()
    assert sorted(model._ddp_params_and_buffers_to_ignore) == sorted(
        n for n, _ in model.named_parameters() if ".experts." in n)  # DDP leaves the experts alone
    assert len(model.transformer.h[0].mlp.experts) == 2 and model.transformer.h[0].mlp.experts[3] is not None
