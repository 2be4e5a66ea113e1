"""The main job's plan: candidate shapes timed here, the largest that still sees enough tokens kept."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.train import budget
from gpt2kit.train.budget import Shape, plan_for_budget, time_training_step

SHAPES = (Shape(1, 1, 16), Shape(1, 2, 32), Shape(2, 2, 64))


def _fake_timing(seconds_per_step: dict[Shape, float], params: dict[Shape, int]):
    timed = []

    def fake(shape, *args, **kwargs):
        timed.append(shape)
        return seconds_per_step[shape], params[shape]

    return fake, timed


@pytest.mark.parametrize(
    "train_seconds, expected, timed",
    [
        (1000.0, Shape(2, 2, 64), 3),  # plenty of time: the largest
        (1.0, Shape(1, 2, 32), 3),  # the largest is short of tokens: stop at the one before it
        (0.1, Shape(1, 1, 16), 2),  # even the second is short: the smallest; the third is never timed
    ],
)
def test_plan_keeps_the_largest_shape_that_sees_enough_tokens(monkeypatch, train_seconds, expected, timed):
    step_s = {SHAPES[0]: 0.01, SHAPES[1]: 0.02, SHAPES[2]: 0.04}
    params = {SHAPES[0]: 100, SHAPES[1]: 1000, SHAPES[2]: 10_000}
    fake, seen = _fake_timing(step_s, params)
    monkeypatch.setattr(budget, "time_training_step", fake)
    # 8 x 16 = 128 tokens a step; at least 1 token per parameter
    plan = plan_for_budget(SHAPES, train_seconds, 64, 16, 8, lambda m: None, min_tokens_per_param=1.0)
    assert plan.shape == expected and len(seen) == timed == len(plan.measured)
    assert plan.steps == int(train_seconds / step_s[expected]) and plan.tokens == plan.steps * 128
    assert str(expected) in plan.describe()


def test_timing_trains_the_real_network_with_the_given_optimizer():
    calls, before = [], []

    def make(model):
        before.extend(p.detach().clone() for p in model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        calls.append((model, opt))
        return opt

    seconds, params = time_training_step(Shape(1, 2, 16), 32, 8, 2, make)
    assert seconds > 0 and len(calls) == 1
    assert params == 32 * 16 + 8 * 16 + (12 * 16 * 16 + 13 * 16) + 2 * 16  # wte, wpe, one block, ln_f
    model, opt = calls[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the steps updated it
    assert all(p.grad is None for p in model.parameters())  # and zeroed the gradients after each
