"""Interrupt and exact resume of the alignment trainers (DPO, reward model, RLOO, PPO).

While a run is in progress, OUT is a run directory in pre-training's format (gpt2kit.train.checkpoint):
on Ctrl-C / SIGTERM (or every --save-every steps) the trainer finishes its step and writes
OUT/step-XXXXXX/ (the model files, loadable as they are, + trainer_state.pt: optimizer, step, RNG and
data-order states, metrics so far; read with weights_only=True) and `latest`. `--resume` continues from
the newest sound one; the finished run replaces OUT with the final checkpoint, as an uninterrupted run
writes it, bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..train.checkpoint import (
    capture_rng_state,
    find_resume_checkpoint,
    list_step_dirs,
    restore_rng_state,
    save_checkpoint,
)


def prepare_out(out: str | Path, kind: str, overwrite: bool, resume: bool) -> tuple[Path, dict[str, Any] | None,
                                                                                     Path | None]:
    """(OUT, trainer state or None, its step directory or None). Without --resume OUT must be empty (or
    --overwrite); an interrupted run there is pointed out."""
    out = Path(out)
    if resume:
        step_dir, state = find_resume_checkpoint(out)
        if state.get("kind") != kind:
            raise UserError(f"--resume: {step_dir} is a {state.get('kind') or 'pre-training'} checkpoint, "
                            f"not a {kind} run")
        return out, state, step_dir
    if out.exists() and any(out.iterdir()) and not overwrite:
        hint = " (an interrupted run: add --resume to continue it)" if list_step_dirs(out) else ""
        raise UserError(f"output exists and is not empty: {out}{hint} (choose another path or pass --overwrite)")
    return out, None, None


def rng_state(rng: random.Random) -> dict[str, Any]:
    return {"global": capture_rng_state(), "own": rng.getstate()}


def restore_rng(state: dict[str, Any], rng: random.Random) -> None:
    from ..train.checkpoint import _as_tuple

    restore_rng_state(state["global"])
    rng.setstate(_as_tuple(state["own"]))


def batch_loop_state(opt, take, metrics: list, before: dict, **extra: Any) -> dict[str, Any]:
    """The resume state of a loop over seeded batches (DPO, reward model): AdamW, batch order, RNGs."""
    return {"optimizer": opt.state_dict(), "batches": take.state_dict(), "rng": rng_state(take.rng),
            "metrics": metrics, "before": before, **extra}


def restore_batch_loop(state: dict[str, Any], opt, take) -> tuple[list, int]:
    """Load `batch_loop_state` back; (metrics so far, steps done)."""
    opt.load_state_dict(state["optimizer"])
    take.load_state_dict(state["batches"])
    restore_rng(state["rng"], take.rng)
    return list(state["metrics"]), int(state["step"])


class Progress:
    """The loop's stop/save policy: after each step, save on a signal, `stop_after` (tests) or every
    `save_every` steps; `should_stop` tells the loop to return."""

    def __init__(self, out: Path, kind: str, save_every: int = 0, stop_after: int | None = None,
                 log: Callable[[str], None] | None = None, env=None):
        from ..train.trainer import StopRequest

        self.out, self.kind, self.save_every, self.stop_after = out, kind, int(save_every or 0), stop_after
        self.env = env  # under torchrun (align.parallel): all ranks agree on a stop, rank 0 saves
        self.log = log or (lambda m: None)
        self.stop = StopRequest(self.log)
        self.stopped_by: str | None = None
        self.saved: Path | None = None

    def __enter__(self) -> Progress:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def after_step(self, step: int, max_steps: int, save_model: Callable[[Path], None],
                   state: Callable[[], dict[str, Any]]) -> bool:
        """Called with the number of steps done; True when the loop must stop (a checkpoint was saved)."""
        if self.stop_after is not None and step >= self.stop_after and self.stop.requested is None:
            self.stop.requested = "stop_after"
        if self.env is not None:
            from .parallel import agree_stop

            self.stop.requested = agree_stop(self.stop.requested, self.env)
        periodic = self.save_every and step % self.save_every == 0 and step < max_steps
        if self.stop.requested or periodic:
            if self.env is None:
                self.saved = save_checkpoint(self.out, step, save_model, {"kind": self.kind, **state()}, keep_last=1)
            else:
                from ..train.checkpoint import step_dir_name
                from .parallel import main_only

                main_only(self.env, lambda: save_checkpoint(self.out, step, save_model,
                                                            {"kind": self.kind, **state()}, keep_last=1))
                self.saved = self.out / step_dir_name(step)
        if self.stop.requested and step < max_steps:
            self.stopped_by = self.stop.requested
            self.log(f"stopped by {self.stopped_by} at step {step}: saved {self.saved}; "
                     "run the same command with --resume to continue")
            return True
        return False

    def report(self, step: int) -> dict[str, Any]:
        """What an interrupted run returns."""
        return {"out": str(self.out), "stopped_by": self.stopped_by, "step": step, "checkpoint": str(self.saved),
                "resume": "run the same command with --resume to continue"}
