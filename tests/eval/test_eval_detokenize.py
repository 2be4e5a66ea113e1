"""Detokenizers and the report format, on fixed strings."""

from __future__ import annotations

import json

import pytest

from gpt2kit.errors import UserError
from gpt2kit.eval.detokenize import get_detokenizer, ptb_detokenize, wikitext_detokenize
from gpt2kit.eval.report import to_markdown, write_report


@pytest.mark.parametrize("raw,clean", [
    (" = Homarus gammarus = \n", "= Homarus gammarus =\n"),
    (" = = Description = = \n", "== Description ==\n"),
    ("weigh 0 @.@ 7 – 2 @.@ 2 kg ( 1 @.@ 5 lb ) .", "weigh 0.7 – 2.2 kg (1.5 lb)."),
    ("the 1 @,@ 000 @-@ strong army , led by him ; it won .", "the 1,000-strong army, led by him; it won."),
    ('becoming " lobster red " on cooking', 'becoming "lobster red" on cooking'),
    ("it 's what they did n't and didn 't do", "it's what they didn't and didn't do"),
    ("since Linnaeus ' concept", "since Linnaeus' concept"),
    ("Is it ? Yes ! 50 % : done", "Is it? Yes! 50%: done"),
])
def test_wikitext_detokenizer(raw, clean):
    assert wikitext_detokenize(raw) == clean


def test_ptb_detokenizer():
    raw = " the company 's stock rose N N to $ N in N years and viewers ' opinions \n they do n't care \n"
    assert ptb_detokenize(raw) == ("the company's stock rose 1 1 to $1 in 1 years and viewers' opinions\n"
                                   "they don't care\n")


def test_get_detokenizer():
    assert get_detokenizer(None) is None and get_detokenizer("ptb") is ptb_detokenize
    with pytest.raises(UserError, match="--detokenize"):
        get_detokenizer("bogus")


def test_report_json_and_markdown(tmp_path):
    result = {"task": "lambada", "acc": 0.5, "ppl": 12.3456789, "examples": 2, "outputs": ["x"]}
    md = to_markdown(result, "LAMBADA")
    assert "| acc | 0.5000 |" in md and "| ppl | 12.3457 |" in md and "outputs" not in md
    json_path, md_path = write_report(result, tmp_path / "r.json", "LAMBADA")
    assert json.loads(json_path.read_text()) == result and md_path.read_text() == md
