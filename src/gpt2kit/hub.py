"""Hub ids -> local checkpoint directories, through huggingface_hub and its cache.

Wherever gpt2kit accepts a checkpoint directory it also accepts a Hugging Face hub id: `gpt2`,
`openai-community/gpt2-medium`, `user/repo@revision`. An existing local path always wins. Files come from
huggingface_hub's cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` honoured); the cache is tried first
with `local_files_only`, so nothing touches the network once a model is cached. Only the files a
checkpoint needs are fetched: the config, the tokenizer files and `model.safetensors` (`pytorch_model.bin`
only when the repository has no safetensors; it is read later with `torch.load(weights_only=True)`).

This module sits just above `errors`/`fileio` so the tokenizer and the model may both import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

# Files of a checkpoint besides its weights (gpt2kit.json carries pre-processing and quantization).
_CHECKPOINT_FILES = [
    "config.json",
    "gpt2kit.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "encoder.json",
    "vocab.bpe",
]
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# The hub moved OpenAI's and DistilBERT's models under organisations and redirects the old names online;
# offline that redirect is not available, so the known legacy names are mapped here.
LEGACY_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# [owner/]name[@revision], with the hub's own character rules for owner and name
_HUB_ID = re.compile(r"^(?:(?P<owner>[A-Za-z0-9][\w.-]{0,95})/)?(?P<name>[\w][\w.-]{0,95})(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(canonical repo id, revision or None) when `text` is spelled like a hub id, else None."""
    m = _HUB_ID.match(text)
    if m is None or text.startswith(".") or ".." in text:
        return None
    name, owner = m.group("name"), m.group("owner")
    if owner is None and name not in LEGACY_IDS:
        # a bare word is a mistyped local directory far more often than an owner-less hub repo (the hub
        # moved those under organisations): no network for it
        return None
    repo = f"{owner}/{name}" if owner else LEGACY_IDS[name]
    return repo, m.group("rev")


def resolve_checkpoint(path_or_id: str | os.PathLike, what: str = "checkpoint directory") -> Path:
    """A local directory for `path_or_id`: the path itself when it exists, else the hub snapshot of that id.

    Raises UserError (one line) when neither a local path nor a reachable/cached hub repository matches.
    """
    p = Path(path_or_id)
    if p.exists():
        return p
    parsed = parse_hub_id(str(path_or_id))
    if parsed is None:
        raise UserError(f"{what} not found: {p}")
    repo, revision = parsed
    return _snapshot(repo, revision, str(path_or_id), what)


def _snapshot(repo: str, revision: str | None, asked: str, what: str) -> Path:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UserError(
            f"{what} not found: {asked} (no such directory; to use it as a hub id install huggingface_hub: "
            "pip install 'gpt2kit[hub]')"
        ) from None
    from huggingface_hub import constants

    label = repo + (f"@{revision}" if revision else "")
    cached = _download(repo, revision, local_only=True)
    if cached is not None and _has_weights(cached):
        return cached
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{what} not found: {asked} (no such directory, and hub model {label} is not in the cache at "
            f"{constants.HF_HUB_CACHE} while HF_HUB_OFFLINE is set)"
        )
    try:
        weights = _weights_to_fetch(repo, revision)
        got = _download(repo, revision, local_only=False, weights=weights)
    except Exception as e:  # noqa: BLE001 - every hub/network failure becomes the one line below
        if not _is_hub_error(e):
            raise
        raise UserError(f"{what} not found: {asked} (no such directory; hub model {label}: {_reason(e)})") from None
    if got is None or not _has_weights(got):
        raise UserError(f"hub model {label} has no {SAFETENSORS_FILE} or {TORCH_FILE}")
    return got


def _download(repo: str, revision: str | None, local_only: bool, weights: list[str] | None = None) -> Path | None:
    """The snapshot directory, or None when `local_only` and the cache has no snapshot of it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _CHECKPOINT_FILES + (weights if weights is not None else [SAFETENSORS_FILE, TORCH_FILE])
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=local_only))
    except LocalEntryNotFoundError:
        if local_only:
            return None
        raise


def _weights_to_fetch(repo: str, revision: str | None) -> list[str]:
    """Safetensors when the repository has them; the PyTorch pickle only otherwise (never both)."""
    from huggingface_hub import HfApi

    # model_info is one request (list_repo_files retries a refused connection for ~25 s)
    files = {s.rfilename for s in HfApi().model_info(repo, revision=revision).siblings or []}
    if SAFETENSORS_FILE in files:
        return [SAFETENSORS_FILE]
    if TORCH_FILE in files:
        return [TORCH_FILE]
    raise UserError(f"hub model {repo}: no {SAFETENSORS_FILE} or {TORCH_FILE} in the repository")


_HTTP_CLIENTS = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (
        (directory / SAFETENSORS_FILE).is_file() or (directory / TORCH_FILE).is_file()
    )


def _is_hub_error(e: Exception) -> bool:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    if isinstance(e, (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError)):
        return True
    # transport errors of whichever HTTP client huggingface_hub runs on (httpx, or a fork of it)
    return any(c.__module__.split(".")[0] in _HTTP_CLIENTS for c in type(e).__mro__)


def _reason(e: Exception) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, RevisionNotFoundError):
        return "no such revision"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository (or it is private/gated)"
    lines = str(e).strip().splitlines()
    text = lines[0][:200] if lines else type(e).__name__
    return f"the hub cannot be reached or refused the request ({text})"
