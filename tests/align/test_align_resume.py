"""An interrupted DPO / reward-model / RLHF run resumes exactly: the final weights and metrics equal an
uninterrupted run's, bit for bit (as pre-training's resume tests)."""

from __future__ import annotations

import os
import signal

import pytest
from align_helpers import checkpoint_and_pairs

from gpt2kit.cli import main

STEPS = {"max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    init, pairs = checkpoint_and_pairs(d)
    return d, init, pairs


def same_result(a, b) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert not list(a.glob("step-*")) and not (a / "latest").exists()  # the finished run is the checkpoint only


def says_a_lot_of_a(prompts, completions):
    return [c.count("a") / 4 for c in completions]


@pytest.mark.parametrize("kind", ["dpo", "reward", "ppo", "rloo"])
def test_stop_and_resume_equals_an_uninterrupted_run(setup, tmp_path, kind):
    from gpt2kit.align.dpo import train_dpo
    from gpt2kit.align.reward import train_reward
    from gpt2kit.align.rlhf import train_rlhf

    _, init, pairs = setup
    quiet = lambda m: None  # noqa: E731

    def run(out, **kw):
        if kind == "dpo":
            return train_dpo(init, pairs, out, overrides=STEPS, val_fraction=0.25, log=quiet, **kw)
        if kind == "reward":
            return train_reward(init, pairs, out, overrides=STEPS, val_fraction=0.25, log=quiet, **kw)
        return train_rlhf(init, says_a_lot_of_a, out, algo=kind, k=2, kl_coef=0.05, kl_target=1.0, kl_horizon=20,
                          max_new_tokens=6, eval_samples=4, overrides=STEPS | {"batch_size": 2}, log=quiet, **kw)

    full = tmp_path / "full"
    run(full)
    part = tmp_path / "part"
    stopped = run(part, stop_after=3)
    assert stopped["stopped_by"] == "stop_after" and stopped["step"] == 3
    assert (part / "step-000003" / "trainer_state.pt").is_file() and (part / "latest").is_file()
    with pytest.raises(Exception, match="add --resume to continue it"):
        run(part)
    run(part, resume=True)
    same_result(part, full)


def sigterm_at_step_3(prompts, completions, _calls=[0]):  # noqa: B006 (a counter across calls)
    _calls[0] += 1
    if _calls[0] == 3 + 1:  # the first call scores the "before" samples
        os.kill(os.getpid(), signal.SIGTERM)
    return says_a_lot_of_a(prompts, completions)


def test_sigterm_saves_and_resume_continues_from_the_cli(setup, tmp_path, capsys, monkeypatch):
    d, init, pairs = setup
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    argv = ["rlhf", "--init", str(init), "--prompts", str(pairs), "--algo", "ppo", "--k", "2", "--max-new-tokens",
            "6", "--max-steps", "5", "--batch-size", "2", "--lr", "3e-3"]
    assert main(argv + ["--reward", "test_align_resume:says_a_lot_of_a", "--out", str(tmp_path / "full")]) == 0
    assert main(argv + ["--reward", "test_align_resume:sigterm_at_step_3", "--out", str(tmp_path / "part")]) == 0
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and "stopped by SIGTERM at step 3" in err
    assert (tmp_path / "part" / "step-000003").is_dir()
    assert main(argv + ["--reward", "test_align_resume:says_a_lot_of_a", "--out", str(tmp_path / "part"),
                        "--resume"]) == 0
    same_result(tmp_path / "part", tmp_path / "full")
