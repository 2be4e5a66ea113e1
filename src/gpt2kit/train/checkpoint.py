"""Checkpoints of a run directory: atomic step directories, `latest`, `best/`, keep-last-K, exact resume.

A step directory `step-000040/` is a complete model checkpoint directory (what `model.save_pretrained`
writes: config.json, model.safetensors, tokenizer files, gpt2kit.json) plus `trainer_state.pt`: the
optimizer, the step, RNG states, the data cursor and counters, plus the size and SHA-256 of every other
file, so a truncated or damaged checkpoint is detected on resume. `trainer_state.pt` holds only tensors and
plain containers and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_dir, atomic_write_text

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
FORMAT = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_step_dirs(run_dir: str | Path) -> list[Path]:
    """Step checkpoint directories of a run, oldest first (by step number, which is also name order)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


# --- plain-container encoding of RNG / loader states (weights_only=True cannot read numpy objects) ------


def to_safe(obj: Any) -> Any:
    """Recursively replace numpy arrays and scalars by tensors/bytes/Python numbers."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [to_safe(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype", "shape"}:
            arr = np.frombuffer(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
            return arr.reshape(obj["shape"]).copy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [from_safe(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# --- files and hashes ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file under `directory` except the trainer state itself."""
    return {
        f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.relative_to(directory).as_posix() != STATE_FILE
    }


def _fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --- save ------------------------------------------------------------------------------------------------


def commit_checkpoint(
    run_dir: str | Path,
    step: int,
    staging: Path,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Finish a staged checkpoint: write trainer_state.pt (with the manifest of the files beside it),
    rename the staging directory to RUN/step-XXXXXX, point `latest` at it, keep only the last K.

    The staging directory already holds the model files and the optimizer state; until the rename
    nothing named step-XXXXXX exists, so an interrupted save leaves the previous checkpoints as they were.
    """
    run_dir = Path(run_dir)
    target = run_dir / step_dir_name(step)
    state = dict(trainer_state)
    state["format"] = FORMAT
    state["step"] = step
    state["files"] = file_manifest(staging)
    torch.save(state, staging / STATE_FILE)
    _fsync_tree(staging)
    if target.exists():  # the same step saved again (a stop right after a periodic save): replace it
        old = run_dir / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    atomic_write_text(run_dir / "latest", target.name + "\n")
    for old in list_step_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    save_model_dir,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Single-process convenience: stage `save_model_dir(path)`'s files, then `commit_checkpoint`."""
    run_dir = Path(run_dir)
    staging = run_dir / f".{step_dir_name(step)}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_model_dir(staging)
        return commit_checkpoint(run_dir, step, staging, trainer_state, keep_last)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_best(run_dir: str | Path, save_model_dir, metrics: dict[str, Any]) -> Path:
    """Replace RUN/best atomically with the current model and the metrics that made it best."""
    target = Path(run_dir) / "best"
    with atomic_dir(target, overwrite=True) as tmp:
        save_model_dir(tmp)
        (tmp / "best.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return target


# --- load / verify ---------------------------------------------------------------------------------------


def load_trainer_state(step_dir: str | Path) -> dict[str, Any]:
    path = Path(step_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint(step_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(trainer state, '') for a sound checkpoint, else (None, what is wrong with it)."""
    if not (step_dir / STATE_FILE).is_file():
        return None, f"{STATE_FILE} is missing"
    try:
        state = load_trainer_state(step_dir)
    except Exception as e:  # a truncated zip, a foreign pickle, ...: all mean "not usable"
        return None, f"{STATE_FILE} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not isinstance(state, dict) or state.get("format") != FORMAT or "files" not in state:
        return None, f"{STATE_FILE} is not a gpt2kit trainer state (format {FORMAT})"
    for name, rec in state["files"].items():
        f = step_dir / name
        if not f.is_file():
            return None, f"{name} is missing"
        size = f.stat().st_size
        if size != rec["size"]:
            return None, f"{name} is truncated or altered ({size} bytes, expected {rec['size']})"
        if _sha256(f) != rec["sha256"]:
            return None, f"{name} is corrupt (SHA-256 differs from the one recorded at save time)"
    return state, ""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_resume_checkpoint(run_dir: str | Path, warn=_warn) -> tuple[Path, dict[str, Any]]:
    """Newest sound step checkpoint of the run and its trainer state.

    A damaged newer checkpoint is moved aside to `step-XXXXXX.corrupt` (never deleted) with a warning,
    and the previous one is used; no sound checkpoint at all is a UserError.
    """
    run_dir = Path(run_dir)
    candidates = list_step_dirs(run_dir)
    if not candidates:
        raise UserError(f"--resume: no checkpoint (step-XXXXXX/) in run directory {run_dir}")
    problems: list[tuple[Path, str]] = []
    for step_dir in reversed(candidates):
        state, problem = check_checkpoint(step_dir)
        if state is None:
            problems.append((step_dir, problem))
            continue
        for bad, why in problems:
            aside = bad.with_name(bad.name + ".corrupt")
            n = 1
            while aside.exists():
                n += 1
                aside = bad.with_name(f"{bad.name}.corrupt{n}")
            os.replace(bad, aside)
            warn(f"checkpoint {bad} is unusable: {why}; moved it to {aside.name}, resuming from {step_dir.name}")
        return step_dir, state
    bad, why = problems[0]
    more = f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""
    raise UserError(f"--resume: checkpoint {bad} is unusable: {why}{more}; no sound checkpoint in {run_dir}")
