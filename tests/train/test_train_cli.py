"""`gpt2kit train` from the command line: bad input is one line + exit 2; SIGTERM saves and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import assert_bitwise_equal, params_of, tiny_flags, write_shards
from train_helpers import cli_main as main

from gpt2kit.train.checkpoint import list_step_dirs


def _argv(flags: dict) -> list[str]:
    out = ["train"]
    for k, v in flags.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def _fails_with(argv, capsys, *needles):
    code = None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    for n in needles:
        assert n in last, last
    assert "Traceback" not in err
    return last


def test_bad_input_is_one_line_and_exit_2(shards, tmp_path, capsys):
    out = tmp_path / "run"
    base = tiny_flags(shards, out, max_steps=2)
    _fails_with(_argv(base) + ["--n-layers", "3"], capsys, "unknown option --n-layers", "did you mean --n-layer")
    _fails_with(_argv(base | {"block_size": 128}), capsys, "--block-size 128", "n_ctx=64")
    _fails_with(_argv(base | {"n_embd": 30, "n_head": 4}), capsys, "n_embd (30) must be divisible by n_head (4)")
    _fails_with(_argv(base | {"vocab_size": 50}), capsys, "--vocab-size 50", "shards' vocabulary (64")
    _fails_with(_argv(base | {"data": tmp_path / "nope"}), capsys, "data directory not found", "nope")
    _fails_with(_argv(base | {"max_steps": "many"}), capsys, "max_steps expects int")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlearning_rate = 1e-3\n")
    _fails_with(_argv(base) + ["--config", str(cfg)], capsys, "unknown key optim.learning_rate", "did you mean lr")
    _fails_with(["train", "--out", str(out), "--resume"], capsys, "config.toml not found")
    assert not out.exists()  # nothing was written by any of the failures


def test_existing_run_is_never_overwritten_and_a_corrupt_only_checkpoint_is_an_error(shards, tmp_path, capsys):
    out = tmp_path / "run"
    flags = tiny_flags(shards, out, max_steps=2, save_every=2, eval_every=0)
    assert main(_argv(flags)) == 0
    capsys.readouterr()
    weights = out / "step-000002" / "model.safetensors"
    before = weights.read_bytes()
    _fails_with(_argv(flags), capsys, "already holds checkpoints", "--resume")
    assert weights.read_bytes() == before
    state = out / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    truncated = state.read_bytes()
    _fails_with(["train", "--out", str(out), "--resume", "--max-steps", "4"], capsys,
                "step-000002 is unusable: trainer_state.pt is unreadable", "no sound checkpoint")
    assert state.read_bytes() == truncated and weights.read_bytes() == before  # left as they were
    assert [p.name for p in list_step_dirs(out)] == ["step-000002"]


def test_sigterm_finishes_the_step_saves_and_exits_0_then_resume_is_exact(shards, tmp_path):
    """A run stopped by SIGTERM at whatever step it has reached, then resumed, ends bitwise where an
    uninterrupted run does. The constant schedule makes the LR independent of max_steps, so the signalled
    run can be open-ended (no race with its own end) and the resumed one can stop a few steps later."""
    flags = tiny_flags(shards, tmp_path / "sig", max_steps=1_000_000, save_every=0, eval_every=0,
                       schedule="constant")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    helpers = os.path.join(os.path.dirname(__file__), "train_helpers.py")
    proc = subprocess.Popen([sys.executable, helpers, *_argv(flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: finishing this step" in stderr
    assert "stopped by SIGTERM at step" in stderr and "--resume" in stderr
    saved = list_step_dirs(tmp_path / "sig")
    assert len(saved) == 1
    k = int(saved[0].name.split("-")[1])
    assert k >= 3
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == k  # the step in flight was finished and logged, then saved

    n = k + 4
    assert main(["train", "--out", str(tmp_path / "sig"), "--resume", "--max-steps", str(n)]) == 0
    ref = tiny_flags(shards, tmp_path / "ref", max_steps=n, save_every=0, eval_every=0, schedule="constant")
    assert main(_argv(ref)) == 0
    assert_bitwise_equal(params_of(tmp_path / "sig" / f"step-{n:06d}"), params_of(tmp_path / "ref" / f"step-{n:06d}"))
