"""RLOO: the leave-one-out baseline, and a run that raises a reward while the KL stays measured."""

from __future__ import annotations

import pytest
import torch
from align_helpers import tiny_checkpoint

from gpt2kit.errors import UserError


def says_a_lot_of_a(prompts, completions):
    """Reward for tests: the letter 'a', as often as possible."""
    return [c.count("a") / 4 for c in completions]


def test_leave_one_out_baseline():
    from gpt2kit.align.rlhf import rloo_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    a = rloo_advantages(r, 3)
    assert torch.allclose(a, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 11.5, 10 - 11.5, 13 - 10.0]))


def test_rloo_raises_the_reward(tmp_path):
    from gpt2kit.align.rlhf import train_rloo
    from gpt2kit.model import GPT2

    init = tiny_checkpoint(tmp_path / "init")
    r = train_rloo(init, says_a_lot_of_a, tmp_path / "out", k=4, beta=0.01, max_new_tokens=8,
                   overrides={"max_steps": 30, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "schedule": "constant"}, eval_samples=24,
                   log=lambda m: None)
    assert r["reward_after"] > r["reward_before"] + 0.5, r
    GPT2.from_pretrained(tmp_path / "out")  # a checkpoint the rest of gpt2kit opens


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    from gpt2kit.align.reward import RewardModel, save_reward_model
    from gpt2kit.align.rlhf import load_reward
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    a = tiny_checkpoint(tmp_path / "a")
    b = tiny_checkpoint(tmp_path / "b", vocab=280)
    (tmp_path / "rm").mkdir()
    save_reward_model(RewardModel(GPT2.from_pretrained(b), 0), b, tmp_path / "rm", {})
    with pytest.raises(UserError, match="vocab.json: the reward model's tokenizer is not the policy's"):
        load_reward(str(tmp_path / "rm"), Tokenizer.from_pretrained(a))
    with pytest.raises(UserError, match="module:function"):
        load_reward("no-such-thing", Tokenizer.from_pretrained(a))
