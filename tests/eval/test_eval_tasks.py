"""Task scoring with a model whose log-likelihoods are known: which tokens count, and how ties break."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_fakes import PieceTokenizer, TableLM, close, random_table

from gpt2kit.errors import UserError
from gpt2kit.eval.tasks import (
    evaluate_choice,
    evaluate_classify,
    evaluate_lambada,
    evaluate_summarize,
    evaluate_winograd,
)
from gpt2kit.eval.tasks.choice import pick
from gpt2kit.eval.tasks.classify import build_prompt, macro_f1, parse_label_words
from gpt2kit.eval.tasks.common import encode_pair
from gpt2kit.eval.tasks.summarize import bleu_score, first_sentences, rouge_scores
from gpt2kit.eval.tasks.winograd import read_winograd, schema_requests


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----- LAMBADA ---------------------------------------------------------------------------------------

def test_lambada_scores_the_last_word_with_its_leading_space(tmp_path):
    passages = ["the cat saw the elephant", "a dog met an elephants"]
    tok = PieceTokenizer.for_texts(*passages)
    table = random_table(tok.vocab_size, seed=7)
    ids = tok.ids
    # passage 1: every target token is the argmax -> counts as correct
    table[tok.encode(" the")[-1], ids[" el"]] = 20.0
    table[ids[" el"], ids["eph"]] = 20.0
    table[ids["eph"], ids["ant"]] = 20.0
    # passage 2: " elephants" -- its first three target tokens are greedy, the last ("s") is not -> wrong
    table[ids[" an"], ids[" el"]] = 20.0
    table[ids["ant"], ids[" ca"]] = 20.0
    model = TableLM(table, n_ctx=32)
    r = evaluate_lambada(model, tok, write_jsonl(tmp_path / "l.jsonl", [{"text": p} for p in passages]))
    target1 = [ids[" el"], ids["eph"], ids["ant"]]
    target2 = target1 + [ids["s"]]
    assert tok.encode(" elephant") == target1 and tok.encode(" elephants") == target2
    lp1 = model.sequence_logprob([tok.encode(" the")[-1]] + target1, 1)
    lp2 = model.sequence_logprob([ids[" an"]] + target2, 1)
    assert r["examples"] == 2 and r["target_tokens"] == 7
    assert r["acc"] == 0.5
    # ppl is exp(-mean per-example target log-likelihood), as lm-evaluation-harness's lambada_openai
    assert close(r["ppl"], math.exp(-(lp1 + lp2) / 2))
    # the target without its space would be other tokens, with another likelihood
    assert tok.encode("elephant") != target1


def test_lambada_bad_lines_name_file_and_line(tmp_path):
    tok = PieceTokenizer.for_texts("a b")
    model = TableLM(random_table(tok.vocab_size), n_ctx=8)
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a b"}\n\n{"text": "a b"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: not valid JSON"):
        evaluate_lambada(model, tok, f)
    f.write_text('{"text": "a b"}\n{"txt": "a b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: missing field 'text'"):
        evaluate_lambada(model, tok, f)
    f.write_text('{"text": "ab"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'text'"):
        evaluate_lambada(model, tok, f)
    f.write_text("\n \n")
    with pytest.raises(UserError, match="empty"):
        evaluate_lambada(model, tok, f)


def test_encode_pair_moves_trailing_space_to_the_continuation_and_uses_eos_for_no_context():
    tok = PieceTokenizer.for_texts("go home now")
    r = encode_pair(tok, "go home ", "now")
    assert r.context == tok.encode("go home") and r.continuation == tok.encode(" now")
    r = encode_pair(tok, "", "go home")
    assert r.context == [tok.eos_id] and r.continuation == tok.encode("go home")


# ----- Winograd --------------------------------------------------------------------------------------

WSC_XML = """<?xml version="1.0" encoding="UTF-8"?>
<collection>
<schema>
  <text>
    <txt1>The city councilmen refused the demonstrators a permit because</txt1>
    <pron>they</pron>
    <txt2>feared violence.</txt2>
  </text>
  <quote><quote1></quote1><pron>they</pron><quote2>feared violence.</quote2></quote>
  <answers>
    <answer>The city councilmen</answer>
    <answer>The demonstrators</answer>
  </answers>
  <correctAnswer>A</correctAnswer>
  <source>(Winograd 1972)</source>
</schema>
<schema>
  <text>
    <txt1>Jill saw Bill and waved at</txt1>
    <pron>his</pron>
    <txt2>dog.</txt2>
  </text>
  <answers><answer>Jill</answer><answer>Bill</answer></answers>
  <correctAnswer> B. </correctAnswer>
</schema>
</collection>
"""


def _wsc_tokenizer():
    return PieceTokenizer.for_texts(
        "The city councilmen refused the demonstrators a permit because the city councilmen the demonstrators",
        " feared violence.", "Jill saw Bill and waved at Jill's Bill's dog.", "they his",
    )


def test_winograd_partial_scoring_scores_only_what_follows_the_pronoun(tmp_path):
    path = tmp_path / "wsc.xml"
    path.write_text(WSC_XML, encoding="utf-8")
    tok = _wsc_tokenizer()
    schemas = read_winograd(path)
    assert [s.label for s in schemas] == [0, 1]
    partial, full = schema_requests(tok, schemas[0])
    # the option replaces the pronoun, lowercased mid-sentence; the continuation is the same for both
    assert partial[0].context == tok.encode(
        "The city councilmen refused the demonstrators a permit because the city councilmen")
    assert partial[1].context == tok.encode(
        "The city councilmen refused the demonstrators a permit because the demonstrators")
    assert partial[0].continuation == partial[1].continuation == tok.encode(" feared violence.")
    assert full[1].context == [tok.eos_id] and full[1].continuation == tok.encode(
        "The city councilmen refused the demonstrators a permit because the demonstrators feared violence.")
    # a possessive pronoun takes "'s", and the continuation attaches without a space before punctuation
    partial, _ = schema_requests(tok, schemas[1])
    assert partial[1].context == tok.encode("Jill saw Bill and waved at Bill's")
    assert partial[1].continuation == tok.encode(" dog.")


def test_winograd_picks_the_option_whose_continuation_is_likelier_ties_go_first(tmp_path):
    path = tmp_path / "wsc.xml"
    path.write_text(WSC_XML, encoding="utf-8")
    tok = _wsc_tokenizer()
    ids = tok.ids
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    # schema 1: " feared" is likelier after "...councilmen" ("men") than after "...demonstrators" ("ors")
    last_a, last_b = tok.encode(" councilmen")[-1], tok.encode(" demonstrators")[-1]
    table[last_a, ids[" fe"]] = 2.0
    table[last_b, ids[" fe"]] = 1.0
    # schema 2: both options end in "'s" -> identical partial scores -> the first option (A) wins, gold is B
    assert tok.encode(" Jill's")[-1] == tok.encode(" Bill's")[-1]
    model = TableLM(table, n_ctx=64)
    r = evaluate_winograd(model, tok, path)
    assert r["examples"] == 2 and r["acc"] == 0.5
    table[last_a, ids[" fe"]] = 0.5  # now the demonstrators are likelier: schema 1 turns wrong
    assert evaluate_winograd(TableLM(table, n_ctx=64), tok, path)["acc"] == 0.0


def test_winograd_jsonl_winogrande_format(tmp_path):
    rows = [{"sentence": "The cup fell off the shelf because _ was wobbly.", "option1": "the cup",
             "option2": "the shelf", "answer": "2"}]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    tok = PieceTokenizer.for_texts("The cup fell off the shelf because the cup the shelf was wobbly.")
    (s,) = read_winograd(path)
    partial, _ = schema_requests(tok, s)
    assert partial[1].context == tok.encode("The cup fell off the shelf because the shelf")
    assert partial[1].continuation == tok.encode(" was wobbly.")
    assert s.label == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"sentence": "no blank", "option1": "a", "option2": "b",
                                                        "answer": "1"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'_'"):
        read_winograd(bad)
    broken = tmp_path / "broken.xml"
    broken.write_text("<collection>\n<schema>\n</collection>\n")
    with pytest.raises(UserError, match=r"broken.xml:3: malformed XML"):
        read_winograd(broken)


# ----- multiple choice -------------------------------------------------------------------------------

def test_choice_acc_and_acc_norm_and_ties():
    # acc picks the largest sum; acc_norm divides by characters (the space before a choice not counted)
    assert pick([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)  # -2/char vs -1/char
    assert pick([-3.0, -3.0], ["abc", "xyz"]) == (0, 0)  # exact tie: the first choice
    assert pick([-2.0, -1.0, -1.0], ["a", "b", "c"]) == (1, 1)


def test_choice_end_to_end_scores_space_plus_choice(tmp_path):
    rows = [{"context": "the sky is", "choices": ["blue", "green and red"], "label": 1},
            {"context": "grass is", "choices": ["green", "blue"], "label": 0}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    tok = PieceTokenizer.for_texts("the sky is blue green and red grass is green blue")
    model = TableLM(random_table(tok.vocab_size, seed=11), n_ctx=32)
    r = evaluate_choice(model, tok, path)
    acc = acc_norm = 0
    for row in rows:
        ctx = tok.encode(row["context"])
        lps = [model.sequence_logprob(ctx + tok.encode(" " + c), len(ctx)) for c in row["choices"]]
        best = max(range(len(lps)), key=lambda i: (lps[i], -i))
        best_norm = max(range(len(lps)), key=lambda i: (lps[i] / len(row["choices"][i]), -i))
        acc += best == row["label"]
        acc_norm += best_norm == row["label"]
    assert r["acc"] == acc / 2 and r["acc_norm"] == acc_norm / 2


def test_choice_reads_hellaswag_records(tmp_path):
    row = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
           "endings": ["bakes [title] it.", "sings."], "label": 0}
    path = write_jsonl(tmp_path / "h.jsonl", [row])
    from gpt2kit.eval.tasks.choice import _question

    q = _question(path, 1, row)
    assert q.context == "Baking: She mixes flour. Then she"
    assert q.choices == ["bakes. it.", "sings."] and q.label == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'label'"):
        evaluate_choice(TableLM(random_table(3)), PieceTokenizer([]), bad)


# ----- classification --------------------------------------------------------------------------------

def test_macro_f1_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # a: tp1 fp1 fn1 -> 0.5; b: tp2 fp1 fn0 -> 0.8; c: tp0 -> 0
    assert close(macro_f1(gold, pred, ["a", "b", "c"]), (0.5 + 0.8 + 0.0) / 3)
    assert parse_label_words("pos=great, neg=awful") == {"pos": "great", "neg": "awful"}
    assert parse_label_words("yes,no") == {"yes": "yes", "no": "no"}
    with pytest.raises(UserError, match="--labels"):
        parse_label_words("only")


def test_classify_prompt_shots_and_scores(tmp_path):
    rows = [{"text": "I loved it", "label": "pos"}, {"text": "I hated it", "label": "neg"},
            {"text": "great fun", "label": "pos"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    words = {"pos": "good", "neg": "bad"}
    template = "Review: {text}\nSentiment:"
    prompt = build_prompt(template, "great fun", [("I hated it", "neg")], words)
    assert prompt == "Review: I hated it\nSentiment: bad\n\nReview: great fun\nSentiment:"
    tok = PieceTokenizer.for_texts(prompt, "Review: I loved it\nSentiment: good\n\n good")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    colon = tok.encode("Sentiment:")[-1]
    table[colon, tok.ids[" go"]] = 1.0  # the model always says " good"
    model = TableLM(table, n_ctx=64)
    r = evaluate_classify(model, tok, path, labels="pos=good,neg=bad", template=template)
    assert r["acc"] == pytest.approx(2 / 3)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    r1 = evaluate_classify(model, tok, path, labels="pos=good,neg=bad", template=template, shots=2, seed=3)
    assert r1["shots"] == 2 and r1["acc"] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="--shots 3"):
        evaluate_classify(model, tok, path, labels="pos=good,neg=bad", template=template, shots=3)
    with pytest.raises(UserError, match=r"c.jsonl:1: label 'pos' is not one of"):
        evaluate_classify(model, tok, path, labels="a=good,b=bad", template=template)


# ----- summarization ---------------------------------------------------------------------------------

def test_rouge_and_bleu_on_fixed_strings():
    pred, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
    r = rouge_scores(pred, ref)
    assert close(r["rouge1"], 5 / 6)  # the, cat, on, the, mat
    assert close(r["rouge2"], 3 / 5)  # the cat, on the, the mat
    assert close(r["rougeL"], 5 / 6)  # LCS "the cat on the mat"
    # sacrebleu: p1..p4 = 5/6, 3/5, 1/4, and 0 -> "exp" smoothing 1/(2*3); same length, no brevity penalty
    assert close(bleu_score(pred, ref), 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, tol=1e-4)
    assert close(bleu_score(ref, ref), 100.0) and close(rouge_scores(ref, ref)["rougeL"], 1.0)
    assert first_sentences("One. Two!  Three? Four.", 3) == "One. Two! Three?"


def test_summarize_prompts_with_tldr_and_scores_the_generation(tmp_path):
    article = "the cat sat on the mat all day long ."
    tok = PieceTokenizer.for_texts(article, "\nTL;DR:", " a dog ran .")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    chain = [tok.encode("\nTL;DR:")[-1]] + tok.encode(" a dog ran .") + [tok.eos_id]
    for a, b in zip(chain, chain[1:]):
        table[a, b] = 10.0
    model = TableLM(table, n_ctx=64)
    path = write_jsonl(tmp_path / "s.jsonl", [{"article": article, "summary": "a dog ran ."}])
    r = evaluate_summarize(model, tok, path, max_new_tokens=20, keep_outputs=True)
    assert r["outputs"] == ["a dog ran ."]
    assert close(r["rouge1"], 1.0) and close(r["bleu"], 100.0)
