"""Reward model: Bradley-Terry training separates a rule's pairs; the saved directory gives the same
scores in transformers' GPT2ForSequenceClassification and in gpt2kit."""

from __future__ import annotations

import json

import pytest
import torch
from align_helpers import tiny_checkpoint

from gpt2kit.errors import UserError


def write_pairs(path, n=48):
    # the rule: the completion that says "yes" is preferred
    rows = []
    for i in range(n):
        words = ["the cat", "a dog", "the mat", "a red apple"][i % 4]
        yes, no = f" {words} yes.", f" {words} no."
        rows.append({"prompt": f"say it {i % 5}:", "chosen": yes, "rejected": no})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gpt2kit.align.reward import train_reward

    d = tmp_path_factory.mktemp("rm")
    init = tiny_checkpoint(d / "init")
    data = write_pairs(d / "pairs.jsonl")
    report = train_reward(init, data, d / "rm", {"max_steps": 30, "lr": 3e-3, "warmup_steps": 2, "batch_size": 8},
                          val_fraction=0.25, log=lambda m: None)
    return d, report


def test_training_learns_the_rule(trained):
    _, report = trained
    assert report["val_accuracy_after"] >= 0.9


def test_scores_equal_transformers_sequence_classification(trained):
    transformers = pytest.importorskip("transformers")
    from gpt2kit.align.pairs import Pair, pad_batch
    from gpt2kit.align.reward import load_reward_model, reward_rows

    d, _ = trained
    rm, tok = load_reward_model(d / "rm")
    pairs = [Pair("say it 1:", " the cat yes.", " a dog no, no no.", "t"), Pair("x", " yes", " the mat no.", "t")]
    c, r = reward_rows(pairs, tok, 64)
    idx, _ = pad_batch(c + r, tok.eos_id)  # right padding of different lengths
    ours = rm(idx)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(d / "rm").eval()
    attention = (torch.arange(idx.shape[1])[None] < torch.tensor([len(x) for x, _ in c + r])[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=attention).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert float(ours.std()) > 1e-3


def test_reward_model_is_refused_as_a_policy_and_vice_versa(trained, tmp_path):
    from gpt2kit.align.reward import load_reward_model

    d, _ = trained
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(d / "init")
