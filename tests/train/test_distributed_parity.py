"""Data parallelism on 2 CPU processes (Gloo) gives the same training as one process.

One run of dist_scripts/dist_parity.py (a subprocess, time-bounded) trains a tiny GPT-2 for 20 steps
with global batch 2B: once in a single process, and on 2 ranks with per-rank batch B under ddp, fsdp,
zero1 (and with gradient accumulation); checkpoints cross between 2 FSDP ranks and one process. The
tests compare the final parameters and count the gradient collectives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "dist_scripts" / "dist_parity.py"
TOL = 1e-5  # max abs difference of any parameter after 20 steps

pytestmark = pytest.mark.slow  # one ~30-60 s run of 2 ranks shared by the whole module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_parity")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True,
                              text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"dist_parity.py timed out after 240 s; output:\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"dist_parity.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


def params(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(runs / f"{name}.pt", weights_only=True)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b), "different parameter names"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_training_moves_the_parameters(runs):
    # Otherwise matching runs would prove nothing.
    assert max_abs_diff(params(runs, "single"), params(runs, "init")) > 1e-2


@pytest.mark.parametrize(
    "name",
    ["ddp", "ddp_accum2", "fsdp", "fsdp_keep_accum2", "zero1"],
)
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, name):
    assert max_abs_diff(params(runs, name), params(runs, "single")) <= TOL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1"])
def test_two_ranks_match_one_process_in_float32_too(runs, strategy):
    # Every parameter but the attention key bias: its true gradient is zero (a constant added to all
    # scores of a softmax row changes nothing), so it only ever receives rounding noise, which AdamW
    # scales up to steps of the order of the learning rate; it differs by up to ~1e-4 between any two
    # float32 runs that sum in a different order, one process included. The float64 runs cover it.
    a, b = params(runs, f"{strategy}_fp32"), params(runs, "single_fp32")
    assert a["transformer.wte.weight"].dtype == torch.float32
    C = a["transformer.wte.weight"].shape[1]
    query_and_value = torch.cat([torch.arange(0, C), torch.arange(2 * C, 3 * C)])  # c_attn is [q; k; v]
    for k in a:
        if k.endswith("attn.c_attn.bias"):
            a[k], b[k] = a[k][query_and_value], b[k][query_and_value]
    assert max_abs_diff(a, b) <= TOL


def test_tied_embedding_stays_tied_under_fsdp(runs):
    sd = params(runs, "fsdp")
    assert torch.equal(sd["transformer.wte.weight"], sd["lm_head.weight"])


def test_checkpoint_from_two_fsdp_ranks_resumes_in_one_process(runs):
    ckpt = runs / "ckpt_fsdp"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert (ckpt / "optimizer" / ".metadata").is_file()
    assert len(list((ckpt / "optimizer").glob("*.distcp"))) == 2  # one shard file per rank
    resumed = params(runs, "single_from_fsdp")
    assert max_abs_diff(resumed, params(runs, "fsdp")) <= TOL
    assert max_abs_diff(resumed, params(runs, "single")) <= TOL


def test_checkpoint_from_one_process_resumes_on_two_fsdp_ranks(runs):
    assert max_abs_diff(params(runs, "fsdp_from_single"), params(runs, "single")) <= TOL


def test_zero1_checkpoint_resumes_in_one_process(runs):
    assert max_abs_diff(params(runs, "single_from_zero1"), params(runs, "zero1")) <= TOL


def test_fsdp_checkpoint_resumes_under_zero1(runs):
    # Sharded-by-slice (FSDP) state loaded into whole-tensor shards (ZeRO-1) on 2 ranks.
    assert max_abs_diff(params(runs, "zero1_from_fsdp"), params(runs, "fsdp")) <= TOL


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(runs):
    comm = json.loads((runs / "comm.json").read_text())
    # Collectives per micro-step, for 2 optimizer steps.
    per_step = comm["ddp_accum1"][0][0]
    assert per_step >= 1 and comm["ddp_accum1"] == [[per_step]] * 2
    # 4 micro-steps: nothing until the last one, which all-reduces exactly as often as without accumulation.
    assert comm["ddp_accum4"] == [[0, 0, 0, per_step]] * 2
    # The nanoGPT bug: toggling sync after the forward pass still all-reduces in every micro-step.
    assert comm["ddp_accum4_sync_toggled_after_forward"] == [[per_step] * 4] * 2


def test_fsdp_accumulation_reduce_scatters_only_on_the_last_micro_step(runs):
    comm = json.loads((runs / "comm.json").read_text())
    groups = comm["fsdp_accum1"][0][0]
    assert groups == 3  # 2 blocks + the root, one reduce-scatter each
    assert comm["fsdp_accum4"] == [[0, 0, 0, groups]] * 2
