"""Chat templates render exactly as transformers' apply_chat_template, and bad messages are refused."""

from __future__ import annotations

import pytest

from gpt2kit.align.chat import (
    DEFAULT_CHAT_TEMPLATE,
    apply_chat_template,
    assistant_spans,
    load_chat_template,
    save_chat_template,
)
from gpt2kit.errors import UserError

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say <b>hi</b> & \"bye\""},
    {"role": "assistant", "content": "hi\nbye"},
    {"role": "user", "content": "again"},
]
# a template using the features transformers' environment adds: tojson, loop controls, trimmed blocks
FANCY = """{% for m in messages %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  [{{ m['role'] | upper }}] {{ m['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{{ eos_token }}{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from gpt2kit.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(["hello world, a tiny corpus for a tiny tokenizer"] * 4, vocab_size=300).save(d)
    return d, transformers


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, FANCY])
@pytest.mark.parametrize("gen", [True, False])
def test_rendering_equals_transformers(hf_tokenizer, template, gen):
    d, transformers = hf_tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(d)
    want = tok.apply_chat_template(CONVO, chat_template=template, tokenize=False, add_generation_prompt=gen)
    assert apply_chat_template(CONVO, template, add_generation_prompt=gen) == want


def test_template_saved_in_checkpoint_is_what_transformers_reads(hf_tokenizer, tmp_path):
    d, transformers = hf_tokenizer
    import shutil

    shutil.copytree(d, tmp_path / "ck")
    save_chat_template(tmp_path / "ck", DEFAULT_CHAT_TEMPLATE)
    assert load_chat_template(tmp_path / "ck") == DEFAULT_CHAT_TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True) == apply_chat_template(CONVO)
    (tmp_path / "ck" / "chat_template.jinja").write_text(FANCY)
    assert load_chat_template(tmp_path / "ck") == FANCY
    assert load_chat_template(d.parent / "nothing-here") is None


def test_default_template_is_chatml():
    s = apply_chat_template([{"role": "user", "content": "Hi"}])
    assert s == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad, msg", [
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user"}], "'content' must be a string"),
    ([], "non-empty list"),
    (["hi"], "expected an object"),
])
def test_bad_messages_are_user_errors(bad, msg):
    with pytest.raises(UserError, match=msg):
        apply_chat_template(bad)


def test_template_errors_are_user_errors():
    with pytest.raises(UserError, match="syntax error"):
        apply_chat_template(CONVO, "{% for %}")
    with pytest.raises(UserError, match="nope"):
        apply_chat_template(CONVO, "{{ raise_exception('nope') }}")


def test_assistant_spans_cover_the_rendering_and_mark_replies():
    convo = CONVO[:3] + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    spans = assistant_spans(convo)
    assert "".join(t for t, _ in spans) == apply_chat_template(convo, add_generation_prompt=False)
    assert [t for t, a in spans if a] == ["hi\nbye<|im_end|>\n", "ok<|im_end|>\n"]


def test_resaving_the_tokenizer_keeps_the_template(tmp_path):
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.train(["a tiny corpus"] * 4, vocab_size=270)
    tok.save(tmp_path)
    save_chat_template(tmp_path, FANCY)
    tok.save(tmp_path)
    assert load_chat_template(tmp_path) == FANCY
