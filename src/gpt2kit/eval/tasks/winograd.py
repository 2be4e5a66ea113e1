"""Winograd schemas with partial scoring (Trinh & Le 2018), as the GPT-2 paper scores them.

Each candidate replaces the pronoun; the model scores only what *follows* the pronoun, conditioned on the
sentence up to and including the candidate: P(" feared violence." | "The city councilmen refused the
demonstrators a permit because the city councilmen"). The candidate with the higher log-likelihood of
that shared continuation is the answer; a tie goes to the first candidate. `acc_full` is the same choice
made by the log-likelihood of the whole substituted sentence (full scoring), for reference.

Two formats are read:
- the WSC XML as published (WSCollection.xml: <schema> with <text><txt1/><pron/><txt2/></text>,
  <answers><answer/>...</answers>, <correctAnswer>A</correctAnswer>);
- JSONL, one schema per line: WinoGrande's {"sentence": "... _ ...", "option1", "option2", "answer": "1"}
  or {"sentence": "... _ ...", "options": [...], "label": 0-based index}.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError, require_file
from ..scoring import Request, score_requests
from .common import argmax_first, encode_pair, field, read_jsonl


@dataclass
class Schema:
    prefix: str  # sentence before the pronoun (no trailing space)
    options: list[str]  # candidate replacements for the pronoun
    suffix: str  # sentence after the pronoun, starting with its separating space (if any)
    label: int  # index of the correct option
    where: str  # file:line or file#schema for messages


# Determiners and pronouns that start a candidate and must be lowercased inside a sentence.
_CAPITALISED = {"A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their"}
_POSSESSIVE = {"my", "his", "her", "our", "their", "its", "your"}


def substitute(option: str, pronoun: str, prefix: str) -> str:
    """The candidate as it reads in place of the pronoun: possessive pronouns take "'s"; a leading
    "The"/"A"/... is lowercased unless the pronoun starts a sentence."""
    if pronoun.lower() in _POSSESSIVE:
        option += "'s"
    first = option.split(" ", 1)[0]
    starts_sentence = not prefix.strip() or prefix.rstrip()[-1] in ".!?"
    if first in _CAPITALISED and not starts_sentence:
        option = first.lower() + option[len(first) :]
    return option


def _join(right: str) -> str:
    """`right` as it follows a word: after one space, unless it starts with punctuation or a clitic."""
    if not right or right[0] in ".,;:!?'" or right[0].isspace():
        return right
    return " " + right


def read_wsc_xml(path: str | Path, limit: int | None = None) -> list[Schema]:
    path = require_file(path, "Winograd XML file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise UserError(f"{path}:{line}: malformed XML (column {col})") from None
    schemas: list[Schema] = []
    for n, node in enumerate(root.iter("schema"), start=1):
        if limit is not None and len(schemas) >= limit:
            break
        where = f"{path}: schema {n}"

        def text_of(xpath: str, node=node, where=where) -> str:
            el = node.find(xpath)
            if el is None:
                raise UserError(f"{where}: missing <{xpath}>")
            return " ".join("".join(el.itertext()).split())

        txt1, pron, txt2 = text_of("text/txt1"), text_of("text/pron"), text_of("text/txt2")
        answers = [" ".join("".join(a.itertext()).split()) for a in node.findall("answers/answer")]
        if len(answers) < 2:
            raise UserError(f"{where}: expected at least two <answer> elements, got {len(answers)}")
        letter = text_of("correctAnswer").strip(" .")[:1].upper()
        if not letter or not "A" <= letter < chr(ord("A") + len(answers)):
            raise UserError(f"{where}: <correctAnswer> must be a letter A..{chr(ord('A') + len(answers) - 1)}")
        options = [substitute(a, pron, txt1) for a in answers]
        schemas.append(Schema(txt1, options, _join(txt2), ord(letter) - ord("A"), where))
    if not schemas:
        raise UserError(f"{path}: no <schema> elements (the file is empty)")
    return schemas


def read_winograd_jsonl(path: str | Path, limit: int | None = None) -> list[Schema]:
    schemas = []
    for lineno, obj in read_jsonl(path, limit):
        where = f"{path}:{lineno}"
        sentence = field(path, lineno, obj, "sentence")
        if sentence.count("_") != 1:
            raise UserError(f"{where}: field 'sentence' must contain exactly one '_' (the blank)")
        if "options" in obj:
            options = field(path, lineno, obj, "options", list)
            label = field(path, lineno, obj, "label", int)
        else:
            options = [field(path, lineno, obj, "option1"), field(path, lineno, obj, "option2")]
            answer = str(field(path, lineno, obj, "answer", (str, int)))
            if answer not in ("1", "2"):
                raise UserError(f"{where}: field 'answer' must be \"1\" or \"2\", got {answer!r}")
            label = int(answer) - 1
        if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise UserError(f"{where}: expected at least two non-empty string options")
        if not 0 <= label < len(options):
            raise UserError(f"{where}: field 'label' must be between 0 and {len(options) - 1}, got {label}")
        prefix, rest = sentence.split("_")
        # WinoGrande: the option fills the blank (the text before it keeps its own space).
        schemas.append(Schema(prefix, options, _join(rest.strip()), label, where))
    return schemas


def read_winograd(path: str | Path, limit: int | None = None) -> list[Schema]:
    """WSC XML if the file starts with '<', otherwise JSONL."""
    path = require_file(path, "Winograd file")
    with open(path, "rb") as f:
        head = f.read(512).lstrip()
    if head.startswith(b"<"):
        return read_wsc_xml(path, limit)
    return read_winograd_jsonl(path, limit)


def _context(schema: Schema, option: str) -> str:
    if not schema.prefix or schema.prefix.endswith(" "):
        return schema.prefix + option
    return schema.prefix + " " + option


def schema_requests(tokenizer, schema: Schema) -> tuple[list[Request], list[Request]]:
    """(partial, full) requests, one per option: partial scores the text after the pronoun given the
    sentence up to the substituted option; full scores the whole substituted sentence after EOS."""
    if not schema.suffix.strip():
        raise UserError(f"{schema.where}: nothing follows the pronoun, so partial scoring has nothing to score")
    partial, full = [], []
    for option in schema.options:
        ctx = _context(schema, option)
        partial.append(encode_pair(tokenizer, ctx, schema.suffix))
        full.append(encode_pair(tokenizer, "", ctx + schema.suffix))
    return partial, full


def evaluate_winograd(model, tokenizer, path, *, limit=None, batch_size=16, progress=False) -> dict:
    schemas = read_winograd(path, limit)
    partial: list[Request] = []
    full: list[Request] = []
    for s in schemas:
        p, f = schema_requests(tokenizer, s)
        partial += p
        full += f
    scores = score_requests(model, partial + full, batch_size=batch_size, progress=progress, desc="winograd")
    part_scores, full_scores = scores[: len(partial)], scores[len(partial) :]
    correct = correct_full = 0
    at = 0
    for s in schemas:
        k = len(s.options)
        correct += argmax_first([x.logprob for x in part_scores[at : at + k]]) == s.label
        correct_full += argmax_first([x.logprob for x in full_scores[at : at + k]]) == s.label
        at += k
    n = len(schemas)
    return {"task": "winograd", "examples": n, "acc": correct / n, "acc_full": correct_full / n}
