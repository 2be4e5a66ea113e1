"""Chat SFT (`gpt2kit finetune --jsonl --chat`) stops on Ctrl-C / SIGTERM with a resume checkpoint, and
`--resume` finishes with the same bytes as an uninterrupted run (dropout, new chat tokens, LoRA)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from align_helpers import CHATS, tiny_checkpoint

from gpt2kit.cli import main

STEPS = {"max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "batch_size": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint with dropout on (so the torch RNG state matters) and a chat file."""
    from gpt2kit.fileio import update_json

    d = tmp_path_factory.mktemp("sft_resume")
    init = tiny_checkpoint(d / "init")
    update_json(init / "config.json", {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    chats = d / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in CHATS * 4))
    return init, chats


def same_run(a, b, final="final") -> None:
    fa, fb = a / final, b / final
    names = sorted(p.name for p in fa.iterdir())
    assert names == sorted(p.name for p in fb.iterdir())
    weights = [n for n in names if n.endswith(".safetensors")]
    assert weights, names
    for n in weights:
        assert (fa / n).read_bytes() == (fb / n).read_bytes(), n
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert not list(a.glob("step-*")) and not (a / "latest").exists()


@pytest.mark.parametrize("variant", ["chat-tokens", "lora"])
def test_stop_and_resume_equals_an_uninterrupted_run(setup, tmp_path, variant):
    from gpt2kit.model.config import GPT2Config
    from gpt2kit.post.finetune import finetune_jsonl

    init, chats = setup
    assert GPT2Config.from_hf_dict(json.loads((init / "config.json").read_text())).dropout == 0.1

    def run(out, **kw):
        lora = None
        if variant == "lora":
            from gpt2kit.post.lora import LoraSettings, parse_targets

            lora = LoraSettings(r=2, alpha=4.0, dropout=0.1, targets=parse_targets("c_attn"))
        return finetune_jsonl(init, chats, out, STEPS, val_fraction=0.25, log=lambda m: None, chat=True,
                              chat_tokens=variant == "chat-tokens", lora=lora, **kw)

    full = run(tmp_path / "full")
    stopped = run(tmp_path / "part", stop_after=3)
    assert stopped.stopped_by == "stop_after" and stopped.steps == 3
    assert (tmp_path / "part" / "step-000003" / "trainer_state.pt").is_file()
    with pytest.raises(Exception, match="add --resume to continue it"):
        run(tmp_path / "part")
    resumed = run(tmp_path / "part", resume=True)
    same_run(tmp_path / "part", tmp_path / "full")
    assert resumed.before == full.before and resumed.after == full.after


def test_sigterm_saves_and_cli_resume_continues(setup, tmp_path, capsys, monkeypatch):
    import gpt2kit.train.optim as optim

    init, chats = setup
    argv = ["finetune", "--init", str(init), "--jsonl", str(chats), "--chat", "--max-steps", "5",
            "--batch-size", "3", "--lr", "3e-3", "--warmup-steps", "1"]
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0
    set_lr, calls = optim.set_lr, [0]

    def set_lr_then_sigterm(*a, **kw):  # set_lr runs once per step: a real signal during step 3
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return set_lr(*a, **kw)

    monkeypatch.setattr(optim, "set_lr", set_lr_then_sigterm)
    assert main(argv + ["--out", str(tmp_path / "part")]) == 0
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and "stopped by SIGTERM at step 3" in err, err
    assert (tmp_path / "part" / "step-000003").is_dir() and not (tmp_path / "part" / "final").exists()
    monkeypatch.setattr(optim, "set_lr", set_lr)
    assert main(argv + ["--out", str(tmp_path / "part")]) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "part"), "--resume"]) == 0
    same_run(tmp_path / "part", tmp_path / "full")
