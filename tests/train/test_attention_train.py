"""Attention variants end to end: train, resume exactly, load everywhere gpt2kit loads; transformers refuses."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import assert_bitwise_equal, cli_main, params_of, tiny_flags, write_shards
from train_helpers import run_training as _run

HYBRID = dict(attention_layers="sliding,linear", window=8, max_steps=8, eval_every=4, save_every=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    _run(tiny_flags(shards, out, **HYBRID))
    return out


def test_variant_resume_is_bitwise_exact(shards, trained, tmp_path):
    out = tmp_path / "run"
    assert _run(tiny_flags(shards, out, **HYBRID), stop_after=5).step == 5
    _run({"out": str(out)}, resume=True)
    assert_bitwise_equal(params_of(out / "step-000008"), params_of(trained / "step-000008"))
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]


def test_variant_checkpoint_loads_in_gpt2kit_and_transformers_refuses_it(trained, tmp_path):
    from gpt2kit.eval.scoring import Request, score_requests
    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint

    ckpt = trained / "step-000008"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "gpt2kit" and cfg["gpt2kit_variant"]["attention_layers"] == ["sliding", "linear"]
    transformers = pytest.importorskip("transformers")
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(ckpt)

    model = GPT2.from_pretrained(ckpt).eval()
    assert model.config.layer_attention == ("sliding", "linear") and model.config.window == 8
    # generate (rolling window + state) equals greedy decoding by full forwards; --slide goes past n_ctx
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    out = generate(model, prompt, max_new_tokens=90, temperature=0, on_overflow="slide")
    assert out.shape == (1, 95)
    ids = prompt
    with torch.no_grad():
        for _ in range(40):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, :45], ids)
    # eval's scorer on a ragged (left-padded) batch equals the rows scored alone
    reqs = [Request([3, 4, 5, 6, 7, 8, 9], [10, 11]), Request([20, 21], [22, 23, 24])]
    both = score_requests(model, reqs, batch_size=2)
    alone = [score_requests(model, [r], batch_size=1)[0] for r in reqs]
    assert all(abs(a.logprob - b.logprob) <= 1e-4 for a, b in zip(both, alone))
    # quantize: the int8 checkpoint keeps the variant and stays close
    quantize_checkpoint(ckpt, tmp_path / "q8", QuantSpec(bits=8))
    q = GPT2.from_pretrained(tmp_path / "q8").eval()
    assert q.config.layer_attention == ("sliding", "linear")
    with torch.no_grad():
        x = torch.randint(1, 64, (1, 30))
        assert (q(x).logits - model(x).logits).abs().max() < 0.2


@pytest.mark.parametrize("flags,needle", [
    (["--attention", "sliding", "--window", "0"], "window"),
    (["--attention", "blocky"], "attention"),
    (["--attention", "fixed", "--block", "128"], "attention_block"),
])
def test_bad_attention_flags_are_one_line_exit_2(shards, tmp_path, capsys, flags, needle):
    argv = ["train", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "gpt2-tiny",
            "--n-ctx", "64", "--block-size", "32", "--device", "cpu", "--max-steps", "1", *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_train_a_variant(shards, tmp_path, strategy):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2kit",
           "train", "--data", str(shards), "--out", str(run), "--preset", "gpt2-tiny", "--n-layer", "2",
           "--n-head", "2", "--n-embd", "32", "--n-ctx", "64", "--block-size", "32", "--batch-size", "2",
           "--max-steps", "2", "--save-every", "2", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu",
           "--threads", "1", "--progress", "false", "--attention-layers", "sliding,linear", "--window", "8",
           "--strategy", strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((run / "step-000002" / "config.json").read_text())
    assert cfg["gpt2kit_variant"]["attention_layers"] == ["sliding", "linear"]
    state = torch.load(run / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2
