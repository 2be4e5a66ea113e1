"""`gpt2kit data contamination`: GPT-3 style n-gram overlap between training shards and evaluation text."""

from __future__ import annotations

import json
import random

from datatest_helpers import random_text, small_tokenizer, write_text

from gpt2kit.cli import main
from gpt2kit.data.contamination import contamination_report, normalized_words
from gpt2kit.data.readers import Document
from gpt2kit.data.shards import prepare


def test_contaminated_documents_are_found_and_ranked(tmp_path, capsys):
    tok_dir = small_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    train = [random_text(rng, 300) for _ in range(6)]
    for i, t in enumerate(train):
        write_text(tmp_path / "train" / f"{i}.txt", t)
    out = tmp_path / "shards"
    prepare([str(tmp_path / "train")], tok_dir, out, workers=1, progress=False)

    words = train[2].split(" ")
    leaked = " ".join(words[40:60]).upper().replace(" ", ",  ")  # 20 words; case and punctuation differ
    clean = "Zebra quokka " * 20  # words that never occur in training
    almost = " ".join(words[100:112]) + " zebra"  # only 12 shared words in a row: not a 13-gram
    mostly = " ".join(words[0:150])  # a long copied passage
    evals = [Document(clean, "clean"), Document(f"Intro text. {leaked} outro.", "leaked"),
             Document(almost, "almost"), Document("too short", "short"), Document(mostly, "mostly")]
    report = contamination_report(out, evals, n=13)
    assert report["eval_documents"] == 5 and report["too_short"] == 1 and report["checked"] == 4
    assert report["contaminated"] == 2 and report["share_contaminated"] == 0.5
    assert [r["source"] for r in report["worst"]] == ["mostly", "leaked"]
    assert report["worst"][0]["share"] == 1.0 and report["worst"][0]["matched"] == 150 - 12
    assert report["worst"][1]["matched"] == 20 - 12
    assert report["worst"][1]["example"] == " ".join(normalized_words(" ".join(words[40:53])))
    assert report["train_documents"] == 6

    # the CLI on files, as JSON
    ev = write_text(tmp_path / "eval.jsonl", "".join(json.dumps({"text": d.text}) + "\n" for d in evals))
    assert main(["data", "contamination", "--train", str(out), "--eval", str(ev), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["contaminated"] == 2 and cli["worst"][0]["source"] == f"{ev}:5"
