"""The alignment commands end to end, and bad input: one line naming file:line, exit code 2."""

from __future__ import annotations

import json

import pytest
from align_helpers import tiny_checkpoint

from gpt2kit.cli import main


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "the cat", "chosen": " sat yes.", "rejected": " sat no."}


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("cli") / "init"))


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("rows, want", [
    ([GOOD, {"prompt": "x", "chosen": "y"}], "bad.jsonl:2: missing field 'rejected'"),
    ([{"prompt": "a", "chosen": "b", "rejected": "b"}] * 3, "bad.jsonl:1: 'chosen' equals 'rejected' in every record"),
    ([GOOD, "{not json"], "bad.jsonl:2:"),
    ([GOOD, {"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}],
     "bad.jsonl:2: prompt: messages[0]: unknown role 'wizard'"),
])
@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_bad_pairs(init, tmp_path, capsys, rows, want, command):
    data = write(tmp_path / "bad.jsonl", rows)
    argv = (["reward", "train"] if command == "reward" else ["dpo"]) + ["--init", init, "--data", data,
                                                                        "--out", str(tmp_path / "o")]
    line = one_error_line(capsys, argv + ["--max-steps", "1"])
    assert want in line
    assert not (tmp_path / "o").exists()


def test_chat_file_with_an_unknown_role(init, tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "yo"}]},
                                           {"messages": [{"role": "robot", "content": "beep"}]}])
    line = one_error_line(capsys, ["finetune", "--init", init, "--jsonl", data, "--chat", "--out", str(tmp_path / "o")])
    assert "chat.jsonl:2: messages[0]: unknown role 'robot'" in line


def test_rlhf_refuses_a_reward_model_with_another_tokenizer(init, tmp_path, capsys):
    other = tiny_checkpoint(tmp_path / "other", vocab=280)
    data = write(tmp_path / "p.jsonl", [GOOD, GOOD | {"chosen": " a"}])
    assert main(["reward", "train", "--init", str(other), "--data", data, "--out", str(tmp_path / "rm"),
                 "--max-steps", "1", "--val-fraction", "0"]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, ["rlhf", "--init", init, "--reward", str(tmp_path / "rm"), "--out", str(tmp_path / "o")])
    assert "rm/vocab.json: the reward model's tokenizer is not the policy's" in line


def test_pipeline_and_generate_chat(init, tmp_path, capsys):
    chats = write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "the cat?"},
                                                           {"role": "assistant", "content": "sat."}]}] * 8)
    assert main(["finetune", "--init", init, "--jsonl", chats, "--chat", "--out", str(tmp_path / "sft"),
                 "--max-steps", "2", "--no-progress"]) == 0
    sft = str(tmp_path / "sft" / "final")
    pairs = write(tmp_path / "pairs.jsonl", [GOOD, GOOD | {"prompt": "a dog"}, GOOD | {"prompt": "yes"}] * 3)
    assert main(["reward", "train", "--init", sft, "--data", pairs, "--out", str(tmp_path / "rm"),
                 "--max-steps", "2", "--json"]) == 0
    assert main(["dpo", "--init", sft, "--data", pairs, "--out", str(tmp_path / "dpo"), "--max-steps", "2",
                 "--loss", "ipo", "--json"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(rows[0])
    assert main(["rlhf", "--init", str(tmp_path / "dpo"), "--reward", str(tmp_path / "rm"), "--prompts", pairs,
                 "--out", str(tmp_path / "rl"), "--max-steps", "2", "--k", "2", "--max-new-tokens", "4"]) == 0
    assert main(["reward", "score", "--rm", str(tmp_path / "rm"), "--data", pairs, "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "rl"), "--chat", "--prompt", "the cat?", "--max-new-tokens", "5",
                 "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>" not in out  # the reply only, not the rendered prompt
