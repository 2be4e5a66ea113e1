"""End to end: `torchrun --standalone --nproc_per_node=2 -m gpt2kit train ... --strategy S` on CPU, then
`gpt2kit train --out RUN --resume` continues the run in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

VOCAB = 64
TIMEOUT = 240


def write_shards(directory: Path) -> Path:
    """Token shards in `gpt2kit data prepare`'s format: counting sequences (learnable), EOS = 0."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 6000), ("val", 1000)):
        tokens: list[int] = []
        while len(tokens) < n:
            start, length = int(rng.integers(1, VOCAB)), int(rng.integers(8, 40))
            tokens += [(start + i) % (VOCAB - 1) + 1 for i in range(length)] + [0]
        np.array(tokens, dtype=np.uint16).tofile(directory / f"{split}.bin")
        splits[split] = {"documents": tokens.count(0), "tokens": len(tokens),
                         "characters": len(tokens), "bytes": len(tokens)}
    meta = {"format": 1, "dtype": "uint16", "vocab_size": VOCAB, "eos_id": 0,
            "tokenizer_fingerprint": "synthetic", "tokenizer": "", "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("dist_cli") / "data")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def _optimizer_steps(step_dir: Path) -> set[int]:
    """Load the DCP optimizer state into a one-process AdamW; return the Adam step counts it holds."""
    from gpt2kit.model import GPT2
    from gpt2kit.train import distributed as D
    from gpt2kit.train.optim import param_groups

    model = GPT2.from_pretrained(step_dir)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    D.load_optimizer_state(model, opt, step_dir / "optimizer")
    assert len(opt.state) == len({id(p) for p in model.parameters()})
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in opt.state.values())
    return {int(s["step"]) for s in opt.state.values()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1"])
def test_torchrun_two_processes_then_resume_in_one(shards, tmp_path, strategy):
    run = tmp_path / "run"
    flags = ["--data", str(shards), "--out", str(run), "--preset", "gpt2-tiny", "--n-layer", "2",
             "--n-head", "2", "--n-embd", "32", "--n-ctx", "64", "--block-size", "16", "--batch-size", "2",
             "--max-steps", "4", "--save-every", "2", "--eval-every", "4", "--eval-batches", "2",
             "--log-every", "1", "--seed", "1", "--device", "cpu", "--threads", "1", "--progress", "false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([*torchrun, "-m", "gpt2kit", "train", *flags, "--strategy", strategy])

    step4 = run / "step-000004"
    assert (step4 / "model.safetensors").is_file() and (step4 / "config.json").is_file()
    assert len(list((step4 / "optimizer").glob("*.distcp"))) == 2  # every rank wrote its part
    state = torch.load(step4 / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # rank 0 alone writes metrics: one row per step, not two
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert _optimizer_steps(step4) == {4}  # the 2-rank optimizer state, whole, in one process

    proc = _run([sys.executable, "-m", "gpt2kit", "train", "--out", str(run), "--resume", "--max-steps", "6"])
    assert "resuming" in proc.stdout + proc.stderr
    step6 = run / "step-000006"
    state6 = torch.load(step6 / "trainer_state.pt", weights_only=True)
    assert state6["world_size"] == 1 and state6["step"] == 6
    assert _optimizer_steps(step6) == {6}  # continued from the loaded state, not restarted at 0
