"""Knowledge distillation: train a (smaller) student on token shards to match a frozen teacher.

  loss = alpha * CE(student, data) + (1 - alpha) * tau^2 * KL(q_tau || p_tau)
q_tau = softmax(teacher logits / tau), p_tau = softmax(student logits / tau); the tau^2 factor keeps the
soft term's gradient on the same scale as the CE term's when tau changes (Hinton et al. 2015). The KL is
summed over the vocabulary and averaged over the same target positions as the CE (padding excluded).
The teacher runs in eval mode under no_grad; teacher, student and shards must share one tokenizer
(checked by fingerprint). Everything else -- optimizer, schedule, checkpoints, resume, validation (plain
CE of the student) -- is gpt2kit's trainer, so a distilled run and a from-scratch run differ only in the
loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..model.gpt2 import GPT2Output
from ..train.trainer import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * tau^2 * KL(q_tau || p_tau), averaged over counted targets.

    logits [B, T, V]; targets [B, T] (-100 = ignore); mask [B, T] bool (False = ignore).
    """
    counted = targets != -100
    if mask is not None:
        counted = counted & mask.to(torch.bool)
    n = counted.sum().clamp(min=1)
    s = student_logits.float()[counted]  # [N, V]
    ce = F.cross_entropy(s, targets[counted], reduction="sum") / n
    if alpha >= 1.0:
        return ce
    t = teacher_logits.float()[counted]
    log_p = F.log_softmax(s / tau, dim=-1)
    log_q = F.log_softmax(t / tau, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum() / n
    return alpha * ce + (1.0 - alpha) * tau * tau * kl


class DistillationModel(nn.Module):
    """Wraps the student so `forward(idx, targets, loss_mask).loss` is the distillation loss (what the
    trainer back-propagates). The teacher is not a submodule: it is never saved, wrapped or optimized."""

    def __init__(self, student: nn.Module, teacher: nn.Module, alpha: float, tau: float):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list hides it from .parameters() / .state_dict()
        self.alpha, self.tau = alpha, tau

    def forward(self, idx, targets=None, loss_mask=None, **kwargs):
        if targets is None:
            return self.student(idx, **kwargs)
        teacher = self._teacher[0]
        with torch.no_grad():
            t_logits = teacher(idx).logits
        s_out = self.student(idx)
        loss = distillation_loss(s_out.logits, t_logits, targets, self.alpha, self.tau, loss_mask)
        return GPT2Output(None, loss, None, getattr(s_out, "aux_loss", None))  # an MoE student's balance loss


class DistillTrainer(Trainer):
    def __init__(self, cfg, teacher: nn.Module, alpha: float, tau: float, **kwargs):
        super().__init__(cfg, **kwargs)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.step_model = DistillationModel(self.model, self.teacher, alpha, tau)

    def _save_model_files(self, directory: Path, full_state):
        super()._save_model_files(directory, full_state)
        from ..fileio import update_json

        update_json(Path(directory) / "gpt2kit.json", {"distillation": self.distill_info})


def student_overrides(student: str) -> dict[str, Any]:
    """--student: a preset name, a config.json file (HF GPT-2 keys) or a checkpoint directory's config."""
    from ..fileio import read_json
    from ..model import PRESETS, GPT2Config

    if student in PRESETS:
        return {"preset": student}
    p = Path(student)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"--student must be a preset ({', '.join(PRESETS)}) or a config.json file, got {student!r}")
    cfg = GPT2Config.from_hf_dict(read_json(p, "--student config"), source=str(p))
    shape = {"preset": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_ctx": cfg.n_ctx}
    # an MoE / shared-layer student keeps its variant (the [model] keys have the config's names)
    return shape | {k: v for k, v in cfg.variant().items() if k.startswith("moe_") or k == "share_layers"}


def distill(teacher_dir: str | Path, student: str, data: str | Path, out: str | Path, alpha: float = 0.5,
            tau: float = 1.0, overrides: dict[str, Any] | None = None, overwrite: bool = False):
    """Distil `teacher_dir` into a fresh student (preset or config) on shards `data`; returns the TrainResult."""
    from ..data import check_fingerprint, read_meta
    from ..model import GPT2
    from ..train.config import build_config
    from .common import checkpoint_meta, load_tokenizer

    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    if not tau > 0:
        raise UserError(f"--temperature must be > 0, got {tau}")
    checkpoint_meta(teacher_dir)  # a readable checkpoint (a quantized teacher is fine: it only runs forward)
    teacher_tok = load_tokenizer(teacher_dir)
    meta = read_meta(data)
    try:
        check_fingerprint(meta, teacher_tok)
    except UserError as e:
        raise UserError(f"teacher and student data use different tokenizers: {e}") from None
    if Path(student).is_dir() and any((Path(student) / f).exists() for f in ("vocab.json", "encoder.json")):
        s_tok = load_tokenizer(student)
        if s_tok.fingerprint != teacher_tok.fingerprint:
            raise UserError(f"tokenizer mismatch: teacher {teacher_dir} has {teacher_tok.fingerprint[:16]}, "
                            f"student {student} has {s_tok.fingerprint[:16]}; distillation needs one tokenizer")
    teacher = GPT2.from_pretrained(teacher_dir)
    flat: dict[str, Any] = {}
    flat.update(overrides or {})
    flat.update(student_overrides(student))
    flat.update(data=str(data), out=str(out), vocab_size=teacher.config.vocab_size)
    if "block_size" not in flat:  # the trainer's default (256), but never longer than either context
        from ..model import GPT2Config

        student_ctx = flat.get("n_ctx") or GPT2Config.from_preset(flat["preset"]).n_ctx
        flat["block_size"] = min(256, teacher.config.n_ctx, student_ctx)
    cfg = build_config(flat)
    if cfg.data.block_size > teacher.config.n_ctx:
        raise UserError(f"--block-size {cfg.data.block_size} is longer than the teacher's context "
                        f"n_ctx={teacher.config.n_ctx}")
    trainer = DistillTrainer(cfg, teacher, alpha, tau, overwrite=overwrite)
    trainer.distill_info = {"teacher": str(teacher_dir), "alpha": alpha, "temperature": tau,
                            "teacher_fingerprint": teacher_tok.fingerprint}
    try:
        return trainer.fit()
    finally:
        trainer.close()
