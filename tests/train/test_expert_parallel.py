"""Expert parallelism: 2 Gloo ranks (experts' compute sharded, tokens exchanged all-to-all) == one process."""

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
from gpt2kit.train.expert_parallel import enable_expert_parallel

SCRIPT = Path(__file__).parent / "dist_scripts" / "ep_parity.py"


@pytest.mark.slow  # two forked Gloo ranks: ~35 s on a loaded 2-core machine
def test_two_expert_parallel_ranks_match_one_process_after_10_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ep = torch.load(tmp_path / "ep2.pt", weights_only=True)
    assert single.keys() == ep.keys()
    assert max((single[k] - ep[k]).abs().max().item() for k in single) < 1e-6
    # and training moved the experts (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init = _model_like_script().state_dict()
    assert (init["transformer.h.1.mlp.experts.3.c_fc.weight"].double()
            - single["transformer.h.1.mlp.experts.3.c_fc.weight"]).abs().max() > 1e-3


def _model_like_script() -> GPT2Network:
    sys.path.insert(0, str(SCRIPT.parent))
    from ep_parity import config

    return GPT2Network(config())


def _model(E: int) -> GPT2Network:
    return GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=16, eos_token_id=0,
                                  moe_experts=E))


def test_experts_not_divisible_by_the_world_size_is_one_line():
    with pytest.raises(UserError, match="moe_experts=4 is not divisible by the world size 3"):
        enable_expert_parallel(_model(4), 0, 3, "ddp")
    with pytest.raises(UserError, match="needs an MoE model"):
        enable_expert_parallel(GPT2Network(GPT2Config.from_preset("gpt2-tiny")), 0, 2, "ddp")
    with pytest.raises(UserError, match="ddp or zero1"):
        enable_expert_parallel(_model(4), 0, 2, "fsdp")
    assert enable_expert_parallel(_model(4), 0, 2, "ddp") == 2
