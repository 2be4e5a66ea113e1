"""`Tokenizer`: GPT-2's byte-level BPE behind one class with two engines.

- "tiktoken" (default): our ranks handed to `tiktoken.Encoding` (built locally, never downloaded).
- "python": `bpe.ReferenceBPE`, the readable merge loop used to prove the fast engine.
Both give identical ids. Optional pre-processing (Unicode normalization, lower-casing) is saved with the
tokenizer and applied by `encode*` before splitting; the GPT-2 default is none, i.e. exactly tiktoken.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import regex

from ..errors import UserError
from .bpe import ReferenceBPE
from .pretokenize import GPT2_PATTERN, check_normalization, make_normalizer
from .stream import StreamDecoder

EOS = "<|endoftext|>"
ENGINES = ("tiktoken", "python")


class TokenIdError(UserError, ValueError):
    """A token id outside the vocabulary was given to decode."""


class SpecialTokenError(UserError, ValueError):
    """Text holds a special token that the caller did not allow (tiktoken raises ValueError here too)."""


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _kept_chat_template(path: Path) -> dict:
    """{"chat_template": ...} of an existing tokenizer_config.json: re-saving a tokenizer into a chat
    checkpoint keeps its template (gpt2kit.align.chat)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"chat_template": old["chat_template"]} if isinstance(old, dict) and "chat_template" in old else {}


class Tokenizer:
    def __init__(
        self,
        ranks: dict[bytes, int],
        merges: list[tuple[bytes, bytes]],
        special_tokens: dict[str, int] | None = None,
        normalization: str | None = None,
        lowercase: bool = False,
        engine: Literal["tiktoken", "python"] = "tiktoken",
        name: str = "gpt2kit",
    ):
        if engine not in ENGINES:
            raise UserError(f"unknown tokenizer engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self._ranks = dict(ranks)
        self._merges = list(merges)
        self._special = dict(special_tokens or {})
        from .io import check_ranks_follow_merges

        check_ranks_follow_merges(self._ranks, self._merges, "Tokenizer(ranks, merges)")
        clash = set(self._special.values()) & set(self._ranks.values())
        if clash:
            raise UserError(f"special token ids {sorted(clash)[:5]} are also ids of byte-level tokens")
        self._normalization = check_normalization(normalization)
        self._lowercase = bool(lowercase)
        self._normalizer = make_normalizer(self._normalization, self._lowercase)
        self.engine = engine
        self.name = name
        self._n_vocab = max([*self._ranks.values(), *self._special.values()]) + 1
        # id -> bytes for decoding (None marks an id that no token has)
        self._id_bytes: list[bytes | None] = [None] * self._n_vocab
        for t, i in self._ranks.items():
            self._id_bytes[i] = t
        for s, i in self._special.items():
            self._id_bytes[i] = s.encode("utf-8")
        self._tiktoken = None
        self._reference: ReferenceBPE | None = None
        self._special_regex: dict[frozenset[str], regex.Pattern] = {}
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, engine: Literal["tiktoken", "python"] = "tiktoken"
    ) -> Tokenizer:
        """Load from a directory holding `encoder.json`+`vocab.bpe` (OpenAI), `vocab.json`+`merges.txt`
        (Hugging Face / gpt2kit checkpoint; its `gpt2kit.json` supplies the saved pre-processing), or only a
        `tokenizer.json` (a GPT-2-style byte-level BPE; other kinds are refused), or a
        tiktoken rank file `*.tiktoken` (with `<|endoftext|>` after the last rank), or a hub id (gpt2kit.hub)."""
        from ..errors import require_dir
        from ..fileio import read_json
        from ..hub import resolve_checkpoint
        from .io import read_vocab_and_merges

        if Path(path).suffix == ".tiktoken" and Path(path).is_file():
            return cls.from_tiktoken_file(path, engine=engine)
        d = require_dir(resolve_checkpoint(path, "tokenizer directory"), "tokenizer directory")
        if (d / "vocab.json").exists() and (d / "merges.txt").exists():
            ranks, merges, special = read_vocab_and_merges(d / "vocab.json", d / "merges.txt")
        elif (d / "encoder.json").exists() and (d / "vocab.bpe").exists():
            ranks, merges, special = read_vocab_and_merges(d / "encoder.json", d / "vocab.bpe")
        elif (d / "tokenizer.json").exists():
            from .io import read_tokenizer_json

            ranks, merges, special = read_tokenizer_json(d / "tokenizer.json")
        else:
            raise UserError(
                f"{d}: no tokenizer files (expected vocab.json + merges.txt, encoder.json + vocab.bpe, "
                "or a GPT-2-style tokenizer.json)"
            )
        settings: dict = {}
        if (d / "gpt2kit.json").exists():
            meta = read_json(d / "gpt2kit.json", "gpt2kit.json")
            settings = meta.get("tokenizer", {}) if isinstance(meta, dict) else {}
            if not isinstance(settings, dict):
                raise UserError(f"{d / 'gpt2kit.json'}: field 'tokenizer' must be an object")
        tok = cls(
            ranks,
            merges,
            special,
            normalization=settings.get("normalization"),
            lowercase=bool(settings.get("lowercase", False)),
            engine=engine,
            name=d.name or "gpt2kit",
        )
        saved = settings.get("fingerprint")
        if saved is not None and saved != tok.fingerprint:
            raise UserError(
                f"{d}: tokenizer files do not match the fingerprint in gpt2kit.json "
                f"(saved {saved[:12]}, files give {tok.fingerprint[:12]}); were the files edited?"
            )
        return tok

    @classmethod
    def from_tiktoken_file(
        cls, path: str | os.PathLike, special_tokens: dict[str, int] | None = None, **kwargs
    ) -> Tokenizer:
        """Load a tiktoken rank file; without `special_tokens`, `<|endoftext|>` gets the next free id."""
        from .io import read_tiktoken_file

        ranks, merges = read_tiktoken_file(path)
        if special_tokens is None:
            special_tokens = {EOS: max(ranks.values()) + 1}
        return cls(ranks, merges, special_tokens, **kwargs)

    @classmethod
    def train(
        cls,
        texts_or_files: str | os.PathLike | Iterable[str | os.PathLike],
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (EOS,),
        normalization: str | None = None,
        lowercase: bool = False,
        progress: bool = True,
        workers: int | None = None,
        errors: Literal["strict", "replace"] = "strict",
    ) -> Tokenizer:
        """Learn a byte-level BPE from texts (`str` items) and/or files (`pathlib.Path` items; a short
        one-line `str` naming an existing file is read as that file too).

        See `gpt2kit.tokenizer.train.learn_bpe` for the algorithm and its tie-break rule.
        """
        from .train import learn_bpe

        normalization = check_normalization(normalization)
        ranks, merges, special = learn_bpe(
            texts_or_files,
            vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            normalization=normalization,
            lowercase=lowercase,
            progress=progress,
            workers=workers,
            errors=errors,
        )
        return cls(ranks, merges, special, normalization=normalization, lowercase=lowercase)

    def with_engine(self, engine: Literal["tiktoken", "python"]) -> Tokenizer:
        """The same tokenizer on another engine ("python" is the pure-Python reference)."""
        import copy

        if engine not in ENGINES:
            raise UserError(f"unknown tokenizer engine {engine!r}: expected one of {', '.join(ENGINES)}")
        tok = copy.copy(self)  # shares the read-only tables and whatever engines are built already
        tok.engine = engine
        return tok

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Rows an embedding needs: highest id + 1 (= byte-level tokens + specials for gap-free files)."""
        return self._n_vocab

    @property
    def eos_id(self) -> int:
        """Id of `<|endoftext|>` (GPT-2: 50256), the document separator."""
        try:
            return self._special[EOS]
        except KeyError:
            raise UserError(
                f"tokenizer {self.name!r} has no {EOS} token (train it with that special token)"
            ) from None

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        return list(self._merges)

    @property
    def ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    @property
    def normalization(self) -> str | None:
        return self._normalization

    @property
    def lowercase(self) -> bool:
        return self._lowercase

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides the ids: ranks, merges, specials, pattern, pre-processing."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            head = {
                "format": "gpt2kit-bpe-1",
                "pattern": GPT2_PATTERN,
                "normalization": self._normalization,
                "lowercase": self._lowercase,
                "special_tokens": sorted(self._special.items()),
            }
            h.update(json.dumps(head, sort_keys=True).encode())
            # one update per section (the digest is that of the concatenation: same as line by line)
            ranks = sorted(self._ranks.items(), key=operator.itemgetter(1))
            h.update("".join([f"{i}:{t.hex()}\n" for t, i in ranks]).encode())
            h.update("".join([f"m{a.hex()} {b.hex()}\n" for a, b in self._merges]).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        pre = (
            f", normalization={self._normalization!r}, lowercase={self._lowercase}"
            if self._normalizer
            else ""
        )
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={len(self._special)}{pre}, engine={self.engine!r})"
        )

    # ---------------------------------------------------------------- engines
    @property
    def tiktoken_encoding(self):
        """The `tiktoken.Encoding` built from our ranks (built on first use)."""
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(
                self.name, pat_str=GPT2_PATTERN, mergeable_ranks=self._ranks, special_tokens=self._special
            )
        return self._tiktoken

    @property
    def reference(self) -> ReferenceBPE:
        if self._reference is None:
            self._reference = ReferenceBPE(self._ranks, self._merges)
        return self._reference

    def _encode_plain(self, text: str) -> list[int]:
        """Encode already pre-processed text with no special-token handling."""
        if self.engine == "tiktoken":
            return self.tiktoken_encoding.encode_ordinary(text)
        return self.reference.encode_ordinary(text)

    # ---------------------------------------------------------------- encoding
    def normalize(self, text: str) -> str:
        """The saved pre-processing (Unicode normalization, lower-casing); identity for GPT-2."""
        return self._normalizer(text) if self._normalizer else text

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, treating special-token text as ordinary text."""
        if self._normalizer is not None:
            text = self._normalizer(text)
        return self._encode_plain(text)

    def encode(
        self,
        text: str,
        allowed_special: Literal["all", "none", "none_raise"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """tiktoken's semantics: allowed special texts become their ids; a disallowed one raises
        `SpecialTokenError` (a ValueError); specials in neither set are encoded as ordinary text.
        `allowed_special` also takes minbpe's "none" (ignore all specials) and "none_raise" (= the default)."""
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        if disallowed:
            m = self._special_pattern(disallowed).search(text)
            if m:
                raise SpecialTokenError(
                    f"text contains the special token {m.group()!r} at character {m.start()}; pass "
                    f"allowed_special={{{m.group()!r}}} (or 'all') to encode it as a special token, or "
                    "disallowed_special=() / encode_ordinary to encode it as normal text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        if self.engine == "tiktoken" and self._normalizer is None:
            return self.tiktoken_encoding.encode(text, allowed_special=allowed, disallowed_special=())
        out: list[int] = []
        start = 0
        for m in self._special_pattern(allowed).finditer(text):
            out.extend(self.encode_ordinary(text[start : m.start()]))
            out.append(self._special[m.group()])
            start = m.end()
        out.extend(self.encode_ordinary(text[start:]))
        return out

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self._map_threads(self.encode_ordinary, texts, num_threads)

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: Literal["all", "none", "none_raise"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
        num_threads: int | None = None,
    ) -> list[list[int]]:
        def one(text: str) -> list[int]:
            return self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

        return self._map_threads(one, texts, num_threads)

    def _map_threads(self, fn, texts: Sequence[str], num_threads: int | None) -> list[list[int]]:
        # tiktoken releases the GIL while encoding, so threads give real parallelism on the fast engine.
        num_threads = num_threads or _default_threads()
        if num_threads <= 1 or len(texts) <= 1 or self.engine == "python":
            return [fn(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as ex:
            return list(ex.map(fn, texts))

    def _resolve_special(self, allowed_special, disallowed_special) -> tuple[frozenset[str], frozenset[str]]:
        everything = frozenset(self._special)
        if allowed_special == "all":
            allowed = everything
        elif allowed_special == "none":
            return frozenset(), frozenset()
        elif allowed_special == "none_raise":
            allowed = frozenset()
        elif isinstance(allowed_special, str):
            raise UserError(
                f"allowed_special must be 'all', 'none', 'none_raise' or a set, got {allowed_special!r}"
            )
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - everything
            if unknown:
                raise SpecialTokenError(
                    f"unknown special token {sorted(unknown)[0]!r}: this tokenizer's special tokens are "
                    f"{sorted(everything) or 'none'}"
                )
        if disallowed_special == "all":
            disallowed = everything - allowed
        elif isinstance(disallowed_special, str):
            raise UserError(f"disallowed_special must be 'all' or a set, got {disallowed_special!r}")
        else:
            disallowed = frozenset(disallowed_special)
            unknown = disallowed - everything
            if unknown:
                raise SpecialTokenError(f"unknown special token {sorted(unknown)[0]!r} in disallowed_special")
        return allowed, disallowed

    def _special_pattern(self, specials: frozenset[str]) -> regex.Pattern:
        pat = self._special_regex.get(specials)
        if pat is None:
            # longest first, so a special that is a prefix of another never wins the alternation
            pat = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
            self._special_regex[specials] = pat
        return pat

    # ---------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        id_bytes = self._id_bytes
        if not isinstance(ids, list):
            ids = list(ids)
        try:
            if not ids or min(ids) >= 0:  # negative ids would index from the end
                return b"".join([id_bytes[i] for i in ids])
        except (IndexError, TypeError):  # too large, a gap (None), or not an int
            pass
        for i in ids:  # slow path only to name the offending id
            if not isinstance(i, int) or i < 0 or i >= self._n_vocab or id_bytes[i] is None:
                raise TokenIdError(
                    f"token id {i!r} is not in the vocabulary (valid ids: 0..{self._n_vocab - 1})"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (like tiktoken)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def stream_decoder(self) -> StreamDecoder:
        """Incremental decoder: `.add(id) -> str` emits only complete characters; `.flush()` the rest."""
        return StreamDecoder(self.decode_bytes)

    # ---------------------------------------------------------------- saving
    def settings(self) -> dict:
        """What `gpt2kit.json` records under "tokenizer" (HF's files have no keys for these)."""
        return {
            "type": "byte-level-bpe",
            "pattern": "gpt2",
            "normalization": self._normalization,
            "lowercase": self._lowercase,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self._special),
            "fingerprint": self.fingerprint,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json` (so
        `transformers.GPT2TokenizerFast.from_pretrained(dir)` opens it with the same ids) and merge the
        settings into `gpt2kit.json` under "tokenizer". Existing model files in `directory` are kept."""
        from ..fileio import atomic_write_json, update_json
        from .io import write_vocab_and_merges

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_vocab_and_merges(d / "vocab.json", d / "merges.txt", self._ranks, self._merges, self._special)
        # GPT-2 uses <|endoftext|> as bos/eos/unk. Without it, say so explicitly: transformers would
        # otherwise add its default "<|endoftext|>" as an extra token.
        eos = EOS if EOS in self._special else None
        specials_map: dict = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
        extra = [s for s in self._special if s != EOS]
        if extra:
            specials_map["additional_special_tokens"] = extra
        atomic_write_json(d / "special_tokens_map.json", specials_map)
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "add_bos_token": False,
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "added_tokens_decoder": {
                str(i): {
                    "content": s,
                    "special": True,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                }
                for s, i in sorted(self._special.items(), key=lambda kv: kv[1])
            },
            **specials_map,
        }
        config.update(_kept_chat_template(d / "tokenizer_config.json"))
        atomic_write_json(d / "tokenizer_config.json", config)
        update_json(d / "gpt2kit.json", {"tokenizer": self.settings()})
        return d

    def save_gpt2_files(self, directory: str | os.PathLike) -> Path:
        """OpenAI's layout: `encoder.json` + `vocab.bpe` (what `tiktoken.load.data_gym_to_mergeable_bpe_ranks` reads)."""
        from .io import write_vocab_and_merges

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_vocab_and_merges(d / "encoder.json", d / "vocab.bpe", self._ranks, self._merges, self._special)
        return d

    def save_tiktoken_file(self, path: str | os.PathLike) -> Path:
        """tiktoken's rank file (special tokens are not part of that format)."""
        from .io import write_tiktoken_file

        write_tiktoken_file(path, self._ranks)
        return Path(path)
