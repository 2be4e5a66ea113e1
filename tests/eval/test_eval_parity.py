"""Perplexity parity with transformers' GPT2LMHeadModel and Hugging Face's sliding-window recipe, and
`gpt2kit eval` end to end on a checkpoint made by gpt2kit."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from gpt2kit.cli import main
from shared_data import shared_path

N_CTX, STRIDE, LINES = 128, 64, 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_files_dir):
    """A random-init gpt2-tiny (n_ctx 128) with the GPT-2 tokenizer, saved by gpt2kit."""
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = dataclasses.replace(GPT2Config.from_preset("gpt2-tiny"), n_ctx=N_CTX)
    model = GPT2(config)
    with torch.no_grad():  # larger weights than the init so the model is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path, tokenizer=Tokenizer.from_pretrained(gpt2_files_dir))
    return path


@pytest.fixture(scope="module")
def wikitext_prefix(tmp_path_factory):
    src = shared_path("wikitext2", "valid.txt")
    with open(src, encoding="utf-8", newline="") as f:
        text = "".join(line for _, line in zip(range(LINES), f))
    out = tmp_path_factory.mktemp("text") / "valid_prefix.txt"
    out.write_text(text, encoding="utf-8", newline="")
    return out


def hf_sliding_window_ppl(model_dir, text: str, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, with transformers' own model and tokenizer.

    The guide's windows and -100 masks, verbatim; the summed NLL counts every token the loss averaged
    (`outputs.loss * n_scored`), where the guide's weight `num_valid_tokens - batch_size` is one token
    short for every window after the first.
    """
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(model_dir)
    encodings = tokenizer(text, return_tensors="pt")
    max_length = model.config.n_positions
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_scored = int((target_ids[:, 1:] != -100).sum())  # labels are shifted inside the loss
        nll_sum += float(loss) * n_scored
        n_tokens += n_scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def eval_json(capsys, *argv) -> dict:
    code = main(["eval", *map(str, argv), "--json", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.shared_data
@pytest.mark.slow
def test_perplexity_matches_transformers_sliding_window_recipe(checkpoint, wikitext_prefix, capsys):
    text = wikitext_prefix.read_text(encoding="utf-8")
    ref_ppl, ref_tokens = hf_sliding_window_ppl(checkpoint, text, STRIDE)
    # --limit counts lines: the whole file's first LINES lines are the prefix the reference read
    full = shared_path("wikitext2", "valid.txt")
    r = eval_json(capsys, checkpoint, "--text", full, "--stride", STRIDE, "--limit", LINES, "--batch-size", 3)
    assert r["tokens"] == ref_tokens and ref_tokens > 8 * N_CTX  # many windows, not one
    assert r["ppl"] == pytest.approx(ref_ppl, rel=1e-4)
    assert abs(math.log(r["ppl"]) - math.log(50257)) > 0.1  # the model is far from uniform
    assert r["ce"] == pytest.approx(math.log(r["ppl"]), rel=1e-9)
    assert r["bpc"] == pytest.approx(r["ce"] * r["tokens"] / math.log(2) / len(text), rel=1e-9)
    assert r["bpb"] == pytest.approx(r["ce"] * r["tokens"] / math.log(2) / len(text.encode()), rel=1e-9)
    assert r["word_ppl"] == pytest.approx(math.exp(r["ce"] * r["tokens"] / len(text.split())), rel=1e-9)
    assert (r["characters"], r["bytes"], r["words"]) == (len(text), len(text.encode()), len(text.split()))


@pytest.mark.shared_data
@pytest.mark.slow
def test_document_mode_and_detokenizer_run_on_wikitext(checkpoint, wikitext_prefix, capsys):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    r = eval_json(capsys, checkpoint, "--text", wikitext_prefix, "--mode", "document", "--detokenize", "wikitext")
    text = wikitext_prefix.read_text(encoding="utf-8")
    assert r["documents"] == 1 and r["mode"] == "document"
    assert r["words"] == len(text.split())  # units of the original text
    # document mode scores every token after an EOS prefix, in disjoint windows: check against HF
    from gpt2kit.eval.detokenize import wikitext_detokenize

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    ids = GPT2TokenizerFast.from_pretrained(checkpoint)(wikitext_detokenize(text)).input_ids
    full = [50256] + ids  # full[k] is the token the model reads when it predicts ids[k]
    nll, scored = 0.0, 0
    for p in range(0, len(ids), N_CTX):
        chunk = ids[p : p + N_CTX]
        end = p + len(chunk)
        inputs = full[max(0, end - N_CTX) : end]  # a short last window is filled out with earlier tokens
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0, -len(chunk) :]
        nll -= float(torch.log_softmax(logits.double(), -1)[range(len(chunk)), chunk].sum())
        scored += len(chunk)
    assert r["tokens"] == scored == len(ids)
    assert r["ce"] == pytest.approx(nll / scored, rel=1e-4)


def test_cli_tasks_on_a_gpt2kit_checkpoint(checkpoint, tmp_path, capsys):
    lam = tmp_path / "lambada.jsonl"
    lam.write_text('{"text": "The cat sat on the mat and looked at the dog"}\n'
                   '{"text": "She opened the door and saw her friend"}\n')
    r = eval_json(capsys, checkpoint, "--task", "lambada", "--file", lam, "--out", tmp_path / "res.json")
    assert r["examples"] == 2 and 0.0 <= r["acc"] <= 1.0 and r["ppl"] > 1.0
    assert json.loads((tmp_path / "res.json").read_text())["ppl"] == r["ppl"]
    assert "| acc |" in (tmp_path / "res.md").read_text()
    choice = tmp_path / "choice.jsonl"
    choice.write_text('{"context": "The sky is", "choices": ["blue", "a rock"], "label": 0}\n')
    r = eval_json(capsys, checkpoint, "--task", "choice", "--file", choice)
    assert r["acc"] in (0.0, 1.0) and r["acc_norm"] in (0.0, 1.0)
    wino = tmp_path / "w.jsonl"
    wino.write_text('{"sentence": "The cup fell off the shelf because _ was wobbly.", "option1": "the cup", '
                    '"option2": "the shelf", "answer": "2"}\n')
    r = eval_json(capsys, checkpoint, "--task", "winograd", "--file", wino)
    assert r["examples"] == 1 and r["acc"] in (0.0, 1.0)
    cls = tmp_path / "cls.jsonl"
    cls.write_text('{"text": "I loved it", "label": "pos"}\n{"text": "I hated it", "label": "neg"}\n')
    r = eval_json(capsys, checkpoint, "--task", "classify", "--file", cls, "--labels", "pos=good,neg=bad",
                  "--template", "Review: {text}\\nSentiment:", "--shots", 1)
    assert r["examples"] == 2 and r["shots"] == 1 and 0.0 <= r["macro_f1"] <= 1.0
    summ = tmp_path / "s.jsonl"
    summ.write_text('{"article": "The cat sat on the mat. It was warm.", "summary": "A cat sat."}\n')
    r = eval_json(capsys, checkpoint, "--task", "summarize", "--file", summ, "--max-new-tokens", 8)
    assert r["examples"] == 1 and 0.0 <= r["rouge1"] <= 1.0 and 0.0 <= r["bleu"] <= 100.0


def test_cli_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, gpt2_files_dir):
    def fails(*argv) -> str:
        code = main(["eval", *map(str, argv), "--json", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "empty" in fails(checkpoint, "--text", empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": oops}\n')
    assert f"{bad}:2:" in fails(checkpoint, "--task", "lambada", "--file", bad)
    assert "not found" in fails(checkpoint, "--text", tmp_path / "missing.txt")
    # a tokenizer whose ids the model has no embeddings for
    from gpt2kit.model import GPT2, GPT2Config

    small = GPT2(dataclasses.replace(GPT2Config.from_preset("gpt2-tiny"), vocab_size=1000, n_ctx=32,
                                     eos_token_id=999))
    small_dir = tmp_path / "small"
    small.save_pretrained(small_dir)
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    assert "vocab" in fails(small_dir, "--tokenizer", gpt2_files_dir, "--text", text)


def test_cli_reads_a_hugging_face_directory(tmp_path, capsys, gpt2_files_dir):
    """DIR written by transformers itself (GPT2LMHeadModel.save_pretrained + GPT2TokenizerFast)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from gpt2kit.tokenizer import Tokenizer

    files = tmp_path / "tokfiles"
    Tokenizer.from_pretrained(gpt2_files_dir).save(files)
    hf_dir = tmp_path / "hf"
    torch.manual_seed(1)
    model = GPT2LMHeadModel(HFConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # tied to wte: sharper, non-uniform predictions
    model.save_pretrained(hf_dir)
    GPT2TokenizerFast.from_pretrained(files).save_pretrained(hf_dir)
    for name in ("vocab.json", "merges.txt"):  # as in the hub's gpt2 folder (transformers 5 writes only
        (hf_dir / name).write_bytes((files / name).read_bytes())  # tokenizer.json)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    ref_ppl, ref_tokens = hf_sliding_window_ppl(hf_dir, text.read_text(encoding="utf-8"), 16)
    r = eval_json(capsys, hf_dir, "--text", text, "--stride", 16)
    assert r["tokens"] == ref_tokens and r["ppl"] == pytest.approx(ref_ppl, rel=1e-4)
    # the scoring core also takes transformers' model object itself; its lm_head runs at scored rows only
    from gpt2kit.eval.scoring import Request, score_requests

    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    requests = [Request([464, 2068, 7586], [21831, 18045]), Request([40], [716, 257, 3797])]
    fast = score_requests(hf_model, requests, batch_size=2)
    full = score_requests(hf_model, requests, batch_size=2, select_positions=False)
    assert [a.logprob for a in fast] == pytest.approx([b.logprob for b in full], rel=1e-5)
