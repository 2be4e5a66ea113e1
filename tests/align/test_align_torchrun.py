"""Chat SFT, DPO, the reward model and RLOO under `torchrun --nproc_per_node=2` (Gloo on the CPU): each rank a share
of the global batch, gradients averaged; the result equals one process with the same global batch to
1e-6, rank 0 alone writes OUT and its metrics, and a run stopped in one process resumes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from align_helpers import CHATS, checkpoint_and_pairs
from safetensors.torch import load_file

TIMEOUT = 300
# lr 3e-4: the gradients agree to ~1e-7 (float summation order), but AdamW's normalised step magnifies a
# difference in a near-zero gradient entry up to lr, so at a larger lr the weights drift further (docs/align.md)
FLAGS = ["--max-steps", "6", "--lr", "3e-4", "--warmup-steps", "2", "--batch-size", "4", "--val-fraction", "0.25",
         "--threads", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2kit"]
COMMAND = {"dpo": ["dpo", "--beta", "0.1"], "reward": ["reward", "train"],
           # a rule reward from tests/align (on PYTHONPATH below); 2 prompts x k 2 per rank
           "rloo": ["rlhf", "--algo", "rloo", "--reward", "test_align_resume:says_a_lot_of_a", "--k", "2",
                    "--max-new-tokens", "6", "--kl-coef", "0.05"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("align_torchrun")
    init, pairs = checkpoint_and_pairs(d)
    (d / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS * 4))
    return init, pairs


def _run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


# The Bradley-Terry loss depends on score differences only, and ln_f.bias shifts every score by the same
# w . b: its true gradient is 0 and what autograd returns is float noise (~1e-9), which AdamW normalises
# into steps of up to lr, different for any other summation order (a second process, or a batch of
# another shape). Only that tensor is held to AdamW's bound, lr * steps.
NOISE_ONLY = {"transformer.ln_f.bias": 3e-4 * 6}


def assert_close_runs(a, b, weights: str = "model.safetensors") -> None:
    """Every logged number (loss, gradient norm, the batch metrics) of every step within 1e-6 (relative),
    the final weights within 1e-6 (but NOISE_ONLY), one metrics row per step."""
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [list(r) for r in ra] == [list(r) for r in rb]  # one row per step: rank 0 alone writes
    rel = max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(ra, rb) for k in x)
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert sorted(wa) == sorted(wb)
    diff = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    worst = max(v for k, v in diff.items() if k not in NOISE_ONLY)
    print(f"{a.name}: metrics rel diff {rel:.3g}, weights max abs diff {worst:.3g} "
          f"(noise-only tensors: {max(diff.get(k, 0.0) for k in NOISE_ONLY):.3g})")
    assert rel <= 1e-6, rel
    assert worst <= 1e-6, worst
    assert all(diff.get(k, 0.0) <= bound for k, bound in NOISE_ONLY.items()), diff
    assert not list(a.glob("step-*")) and not (a / "latest").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "reward", "rloo"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(setup, tmp_path, kind):
    init, pairs = setup
    data = ["--prompts" if kind == "rloo" else "--data", str(pairs)]
    flags = FLAGS[:FLAGS.index("--val-fraction")] + FLAGS[FLAGS.index("--threads"):] if kind == "rloo" else FLAGS
    args = [*COMMAND[kind], "--init", str(init), *data, *flags, "--json"]
    _run([sys.executable, "-m", "gpt2kit", *args, "--out", str(tmp_path / "one")])
    two = _run([*TORCHRUN, *args, "--out", str(tmp_path / "two"), "--save-every", "3"])
    assert two.stdout.count('"steps": 6') == 1, two.stdout  # rank 0 alone reports
    assert_close_runs(tmp_path / "two", tmp_path / "one")
    meta = json.loads((tmp_path / "two" / "gpt2kit.json").read_text())
    assert json.dumps(meta).count('"processes": 2') == 1


@pytest.mark.slow
def test_chat_sft_on_two_ranks_equals_one_process(setup, tmp_path):
    """The loss is a mean over assistant tokens, which the two shares hold different numbers of."""
    init, pairs = setup
    args = ["finetune", "--init", str(init), "--jsonl", str(pairs.parent / "chats.jsonl"), "--chat", "--chat-tokens",
            *FLAGS, "--json"]
    _run([sys.executable, "-m", "gpt2kit", *args, "--out", str(tmp_path / "one")])
    two = _run([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    assert two.stdout.count('"steps": 6') == 1, two.stdout
    assert_close_runs(tmp_path / "two", tmp_path / "one", weights="final/model.safetensors")


@pytest.mark.slow
def test_a_run_stopped_in_one_process_resumes_under_torchrun(setup, tmp_path):
    from gpt2kit.align.dpo import train_dpo

    init, pairs = setup
    o = {"max_steps": 6, "lr": 3e-4, "warmup_steps": 2, "batch_size": 4, "threads": 1}
    train_dpo(init, pairs, tmp_path / "one", overrides=o, val_fraction=0.25, log=lambda m: None)
    stopped = train_dpo(init, pairs, tmp_path / "part", overrides=o, val_fraction=0.25, log=lambda m: None,
                        stop_after=3)
    assert stopped["step"] == 3
    _run([*TORCHRUN, *COMMAND["dpo"], "--init", str(init), "--data", str(pairs), *FLAGS, "--out",
          str(tmp_path / "part"), "--resume"])
    assert_close_runs(tmp_path / "part", tmp_path / "one")


@pytest.mark.slow
def test_uneven_batch_and_ppo_are_one_line_under_torchrun(setup, tmp_path):
    init, pairs = setup
    flags = [f if f != "4" else "3" for f in FLAGS]
    proc = _run([*TORCHRUN, *COMMAND["dpo"], "--init", str(init), "--data", str(pairs), *flags, "--out",
                 str(tmp_path / "x")], ok=False)
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr + proc.stdout
    assert "--batch-size 3 is not a multiple of the 2 processes" in proc.stderr, proc.stderr[-3000:]
    proc = _run([*TORCHRUN, "rlhf", "--algo", "ppo", "--init", str(init), "--reward", "builtins:len", "--out",
                 str(tmp_path / "r")], ok=False)
    assert "rlhf --algo ppo runs in one process" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()
