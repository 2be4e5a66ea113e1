"""Chat fine-tuning: the loss covers the assistant turns only, chat tokens grow a tied embedding, the
template lands in the checkpoint where transformers reads it, and bad records are one line with file:line."""

from __future__ import annotations

import json

import pytest
import torch
from align_helpers import CHATS, tiny_checkpoint

from gpt2kit.errors import UserError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_learn_exactly_the_assistant_tokens(tmp_path):
    from gpt2kit.align.sft import chat_rows, read_chat_jsonl
    from gpt2kit.post.finetune import completion_batch
    from gpt2kit.tokenizer import Tokenizer

    ck = tiny_checkpoint(tmp_path / "ck")
    tok = Tokenizer.from_pretrained(ck)
    rows = chat_rows(read_chat_jsonl(write(tmp_path / "c.jsonl", CHATS)), tok, 200)
    batch = completion_batch(rows, tok.eos_id)
    learned = [tok.decode(batch.targets[i][batch.loss_mask[i]].tolist()) for i in range(3)]
    assert learned == ["sat on the mat.<|im_end|>\n", "ate the bone.<|im_end|>\n", "no.<|im_end|>\nyes and no.<|im_end|>\n"]


def test_chat_finetune_with_new_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2kit.align.chat import apply_chat_template, load_chat_template
    from gpt2kit.model import GPT2
    from gpt2kit.post.finetune import finetune_jsonl
    from gpt2kit.tokenizer import Tokenizer

    ck = tiny_checkpoint(tmp_path / "ck")
    data = write(tmp_path / "c.jsonl", CHATS * 4)
    r = finetune_jsonl(ck, data, tmp_path / "out", {"max_steps": 12, "lr": 3e-3, "warmup_steps": 1, "batch_size": 4},
                       val_fraction=0.25, log=lambda m: None, chat=True, chat_tokens=True)
    assert r.after["val_loss"] < r.before["val_loss"]
    final = tmp_path / "out" / "final"
    tok = Tokenizer.from_pretrained(final)
    old = Tokenizer.from_pretrained(ck)
    assert tok.special_tokens["<|im_start|>"] == old.vocab_size and tok.vocab_size == old.vocab_size + 2
    model = GPT2.from_pretrained(final)
    assert model.config.vocab_size == tok.vocab_size
    assert model.lm_head.weight is model.transformer.wte.weight
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    msgs = CHATS[0]["messages"]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == apply_chat_template(msgs, load_chat_template(final))
    assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")
    assert len(tok.encode("<|im_start|>", allowed_special="all")) == 1
    hf = transformers.GPT2LMHeadModel.from_pretrained(final).eval()
    ids = torch.tensor([tok.encode(text, allowed_special="all")])
    assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("row, msg", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, ":2: messages\\[0\\]: unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, ":2: the conversation has no assistant turn"),
    ({"text": "hi"}, ":2: expected"),
])
def test_bad_chat_records(tmp_path, row, msg):
    from gpt2kit.align.sft import read_chat_jsonl

    with pytest.raises(UserError, match=msg):
        read_chat_jsonl(write(tmp_path / "bad.jsonl", [CHATS[0], row]))
