"""gpt2kit.train.distributed in one process: the same calls the trainer makes under torchrun must be
exact no-ops / identities here, the DCP optimizer checkpoint must resume bitwise, and bad launches must
be one clear error."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.errors import UserError
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import distributed as D

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def tiny_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    cfg = GPT2Config.from_preset("gpt2-tiny", vocab_size=97, eos_token_id=96, n_ctx=32, dropout=0.0,
                                 attn_dropout=0.0)
    return GPT2(cfg)


def groups(model) -> list[dict]:
    names = [n for n, _ in D.unwrap(model).named_parameters()]
    decay = [n for n in names if n.endswith(".weight") and ".h." in n and "ln_" not in n]
    return [{"params": decay, "weight_decay": 0.1}, {"params": [n for n in names if n not in decay],
                                                      "weight_decay": 0.0}]


def data(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 97, (3, 13), generator=g) for _ in range(steps)]


def train(model, opt, batches, accum: int = 1) -> None:
    for b in batches:
        for i, chunk in enumerate(b.chunk(accum)):
            with D.no_grad_sync(model, enabled=not D.is_last_micro_step(i, accum)):
                (model(chunk[:, :-1], chunk[:, 1:]).loss / accum).backward()
        D.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----- launch -------------------------------------------------------------------------------------


def test_without_torchrun_variables_it_is_one_process_and_no_process_group():
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
    assert env.device == torch.device("cpu") and env.backend is None and not env.distributed
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "env_vars, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK < WORLD_SIZE"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero'"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "_DEVICE": "meta"},
         "only cpu"),
    ],
)
def test_a_broken_launch_environment_is_one_clear_error(monkeypatch, env_vars, message):
    env_vars = dict(env_vars)
    device = env_vars.pop("_DEVICE", "cpu")
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=message):
        D.init_distributed(device)
    assert not torch.distributed.is_initialized()


def test_cuda_without_a_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="CUDA is not available"):
        D.init_distributed("cuda")


def test_torchrun_with_one_process_joins_a_gloo_group(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    env = D.init_distributed("cpu", timeout_s=30)
    try:
        assert env.backend == "gloo" and env.distributed and env.world_size == 1
        assert D.init_distributed("cpu") == env  # idempotent
        model = tiny_model()
        assert D.wrap_model(model, "fsdp", env) is model  # nothing to shard over one rank
        assert D.all_reduce_mean(torch.tensor(3.0), env).item() == 3.0
        assert D.any_rank(True, env) and not D.any_rank(False, env)
        D.barrier(env)
    finally:
        D.cleanup()
    assert not torch.distributed.is_initialized()


# ----- wrapping and optimizer ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "none"])
def test_one_process_gets_the_bare_model_and_plain_adamw(strategy):
    env = D.init_distributed("cpu")
    model = tiny_model()
    wrapped = D.wrap_model(model, strategy, env)
    assert wrapped is model
    opt = D.build_optimizer(wrapped, groups(wrapped), strategy, env, lr=1e-3, betas=(0.9, 0.95))
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="--strategy 'zero3'"):
        D.wrap_model(tiny_model(), "zero3", D.init_distributed("cpu"))


def test_param_groups_must_hold_the_wrapped_models_parameters():
    model = tiny_model()
    stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="after wrap_model"):
        D.build_optimizer(model, [{"params": [stray]}], "none", D.init_distributed("cpu"), lr=1e-3)
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        D.build_optimizer(model, [{"params": ["nope"]}], "none", D.init_distributed("cpu"), lr=1e-3)


def test_unwrap_sees_through_torch_compile():
    model = tiny_model()
    assert D.unwrap(torch.compile(model)) is model
    assert D.transformer_blocks(model) == list(model.transformer.h)


def test_bad_mixed_precision_is_a_user_error():
    with pytest.raises(UserError, match="mixed precision 'int8'"):
        D._mp_policy("int8")


def test_clip_grad_norm_matches_torch():
    a, b = tiny_model(), tiny_model()
    x = data(1)[0]
    for m in (a, b):
        m(x[:, :-1], x[:, 1:]).loss.backward()
    norm = D.clip_grad_norm_(a, 0.05)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6) and norm.item() > 0.05  # it did clip
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=0)


def test_single_process_reductions_are_identities():
    env = D.init_distributed("cpu")
    assert D.all_reduce_mean(2.5, env) == 2.5
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_mean(t, env), t)
    assert D.any_rank(True, env) is True and D.any_rank(False, env) is False


# ----- state ---------------------------------------------------------------------------------------


def test_gather_full_state_dict_is_a_cpu_copy_with_the_models_names():
    model = tiny_model()
    sd = D.gather_full_state_dict(model)
    assert list(sd) == list(model.state_dict())
    sd["transformer.wte.weight"].zero_()
    assert model.transformer.wte.weight.abs().sum() > 0  # a copy, not a view
    other = tiny_model(seed=1)
    D.load_full_state_dict(other, D.gather_full_state_dict(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_optimizer_checkpoint_without_process_group_resumes_bitwise(tmp_path):
    env = D.init_distributed("cpu")
    batches = data(6)

    model = tiny_model()
    opt = D.build_optimizer(model, groups(model), "none", env, lr=3e-3, betas=(0.9, 0.95))
    train(model, opt, batches)
    uninterrupted = D.gather_full_state_dict(model)

    model = tiny_model()
    opt = D.build_optimizer(model, groups(model), "none", env, lr=3e-3, betas=(0.9, 0.95))
    train(model, opt, batches[:3])
    weights = D.gather_full_state_dict(model)
    D.save_optimizer_state(model, opt, tmp_path / "optimizer")
    assert (tmp_path / "optimizer" / ".metadata").is_file()

    resumed = tiny_model(seed=123)
    D.load_full_state_dict(resumed, weights)
    opt2 = D.build_optimizer(resumed, groups(resumed), "none", env, lr=3e-3, betas=(0.9, 0.95))
    D.load_optimizer_state(resumed, opt2, tmp_path / "optimizer")
    for p, q in zip(model.parameters(), resumed.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    train(resumed, opt2, batches[3:])
    final = D.gather_full_state_dict(resumed)
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_missing_or_mismatched_optimizer_checkpoint_is_a_user_error(tmp_path):
    env = D.init_distributed("cpu")
    model = tiny_model()
    opt = D.build_optimizer(model, groups(model), "none", env, lr=1e-3)
    with pytest.raises(UserError, match="no .metadata"):
        D.load_optimizer_state(model, opt, tmp_path / "nothing")
    D.save_optimizer_state(model, opt, tmp_path / "optimizer")
    torch.manual_seed(0)
    bigger = GPT2(GPT2Config.from_preset("gpt2-tiny", vocab_size=101, eos_token_id=96, n_ctx=32))
    opt_big = D.build_optimizer(bigger, groups(bigger), "none", env, lr=1e-3)
    with pytest.raises(UserError, match="does not fit.*Size mismatch.*wte.weight") as e:
        D.load_optimizer_state(bigger, opt_big, tmp_path / "optimizer")
    assert "\n" not in str(e.value)  # one line, no DCP traceback
