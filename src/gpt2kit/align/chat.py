"""Chat templates: turning a list of messages into the one string a GPT-2 reads, as transformers does.

The template is a Jinja string stored in a checkpoint's `tokenizer_config.json` under `chat_template`
(or in a `chat_template.jinja` file beside it, transformers' newer layout). It is rendered in jinja2's
`ImmutableSandboxedEnvironment` with the same settings transformers uses (`trim_blocks`, `lstrip_blocks`,
`loopcontrols`, a `raise_exception` global and a `tojson` filter that does not escape HTML), so
`apply_chat_template(messages, t)` equals `tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)` for the same template `t`.

The default is ChatML:

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    Hello!<|im_end|>

An assistant turn ends with `<|im_end|>`: generation stops on that string (or on the token, when the
checkpoint has it as a special token, see `CHAT_SPECIAL_TOKENS`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# the tokens a chat fine-tune may add to the vocabulary (gpt2kit finetune --chat --add-chat-tokens)
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (IM_START, IM_END)
# what ends an assistant turn: a generator stops when its text reaches one of these
CHAT_STOP_STRINGS: tuple[str, ...] = (IM_END,)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# ChatML. Every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an
# assistant turn. The template checks roles itself too, so a checkpoint's copy refuses what we refuse.
DEFAULT_CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """The messages as a list of {"role", "content"} dicts, or a UserError naming what is wrong."""
    if not isinstance(messages, list | tuple) or not messages:
        raise UserError(f"{where}: expected a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}]: expected an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}]: 'content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def apply_chat_template(messages: Sequence[dict], template: str | None = None,
                        add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render `messages` with `template` (None: DEFAULT_CHAT_TEMPLATE). Extra keyword arguments reach the
    template as variables (transformers passes the special tokens, e.g. eos_token, the same way)."""
    import jinja2

    msgs = check_messages(list(messages))
    variables = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", **kwargs}
    try:
        return _compiled(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"chat template: {e}") from None


def load_chat_template(checkpoint_dir: str | Path) -> str | None:
    """The checkpoint's template: `chat_template.jinja` if present, else `chat_template` in
    `tokenizer_config.json` (a string, or transformers' list of {"name", "template"} where "default"
    is taken); None when it has neither."""
    d = Path(checkpoint_dir)
    f = d / CHAT_TEMPLATE_FILE
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    from ..fileio import read_json

    value = read_json(cfg, "tokenizer config").get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"{cfg}: 'chat_template' must be a string or a list with a 'default' entry")


def save_chat_template(checkpoint_dir: str | Path, template: str) -> None:
    """Store `template` as `chat_template` in the checkpoint's `tokenizer_config.json` (atomic merge)."""
    from ..fileio import update_json

    update_json(Path(checkpoint_dir) / "tokenizer_config.json", {"chat_template": template})


def assistant_spans(messages: Sequence[dict], template: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_reply) pieces whose concatenation is the
    full rendering: what a chat fine-tune learns (the replies, with their end marker) and what it only
    reads. Found by rendering prefixes, so it works for any template whose rendering of a conversation
    extends the rendering of its beginning."""
    msgs = check_messages(list(messages))
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = apply_chat_template(msgs[:i], template, add_generation_prompt=True) if i else ""
        end = apply_chat_template(msgs[: i + 1], template, add_generation_prompt=False)
        if not (start.startswith(done) and end.startswith(start)):
            raise UserError("chat template: rendering a conversation does not extend rendering its start; "
                            "cannot tell which text is the assistant's")
        pieces += [(start[len(done):], False), (end[len(start):], True)]
        done = end
    full = apply_chat_template(msgs, template, add_generation_prompt=False)
    if not full.startswith(done):
        raise UserError("chat template: the full rendering does not extend its assistant turns")
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    return [(t, a) for t, a in pieces if t]


__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "CHAT_STOP_STRINGS",
    "CHAT_TEMPLATE_FILE",
    "DEFAULT_CHAT_TEMPLATE",
    "IM_END",
    "IM_START",
    "ROLES",
    "apply_chat_template",
    "assistant_spans",
    "check_messages",
    "load_chat_template",
    "save_chat_template",
]
