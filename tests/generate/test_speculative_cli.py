"""`gpt2kit generate CKPT --draft DRAFT`: the same text as without the draft (greedy), clear errors."""

from __future__ import annotations

import pytest

from gpt2kit.cli import main
from gpt2kit.tokenizer import Tokenizer

TEXT = "to be or not to be, that is the question: whether tis nobler in the mind to suffer " * 30


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from test_speculative import perturbed, tiny

    tok = Tokenizer.train(TEXT, 300, progress=False)
    target = tiny(tok.vocab_size, 2, 32, seed=0)
    target.config.eos_token_id = tok.eos_id
    draft = perturbed(target, 0.3, seed=1)
    root = tmp_path_factory.mktemp("spec")
    target.save_pretrained(root / "target", tokenizer=tok)
    draft.save_pretrained(root / "draft", tokenizer=tok)
    other = Tokenizer.train(TEXT + "xyz " * 50, 290, progress=False)
    small = tiny(tok.vocab_size, 1, 16, seed=2)
    small.config.eos_token_id = other.eos_id
    small.save_pretrained(root / "other", tokenizer=other)
    return root


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_draft_gives_the_same_greedy_text(dirs, capsys):
    common = ["--prompt", "to be or", "--temperature", "0", "--max-new-tokens", "60", "--ignore-eos"]
    code, plain, _ = run_cli(capsys, dirs / "target", *common)
    assert code == 0
    code, spec, _ = run_cli(capsys, dirs / "target", *common, "--draft", dirs / "draft", "--draft-tokens", "3")
    assert code == 0 and spec == plain
    code, adaptive, _ = run_cli(capsys, dirs / "target", *common, "--draft", dirs / "draft", "--draft-adaptive")
    assert code == 0 and adaptive == plain


@pytest.mark.parametrize("extra,match", [
    (["--draft", "OTHER"], "tokenizer differs"),
    (["--draft", "DRAFT", "--draft-tokens", "0"], "--draft-tokens"),
    (["--draft", "DRAFT", "--repetition-penalty", "1.2"], "--repetition-penalty"),
    (["--draft", "MISSING"], "--draft"),
])
def test_bad_draft_arguments(dirs, capsys, extra, match):
    names = {"OTHER": dirs / "other", "DRAFT": dirs / "draft", "MISSING": dirs / "nope"}
    code, _, err = run_cli(capsys, dirs / "target", "--prompt", "to", *[str(names.get(a, a)) for a in extra])
    assert code == 2 and match in err
