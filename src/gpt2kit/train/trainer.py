"""The training loop: maximum likelihood on token shards, with exact resume.

One optimizer step = `grad_accum` micro-batches; the loss of each is weighted by its share of the step's
counted targets, so k micro-batches of B rows give the gradient of one batch of k*B rows even when padding
masks differ. A step whose loss or gradient norm is not finite is skipped (parameters and optimizer state
untouched) and counted; `max_bad_steps` in a row stop the run. SIGINT/SIGTERM let the current step finish,
save a checkpoint and return normally. Everything that decides the next step -- parameters, AdamW state,
step counter (the schedule is a pure function of it), RNG states, the data cursor -- is in the checkpoint,
so a resumed run is bitwise identical on CPU to one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import atomic_write_text
from ..model.meta import on_meta
from ..model.moe import read_moe_metrics
from ..runtime import retain_freed_memory
from . import checkpoint as ckpt
from . import distributed as dist_api
from .config import TrainConfig, build_config, flag_name, read_toml, to_toml
from .optim import lr_at, optimizer_for, param_groups, set_lr
from .precision import cpu_dtype


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- signals -----------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM set a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None] = _say):
        self.requested: str | None = None
        self._log = log
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        self._log(f"\n{name} received: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----- metrics -------------------------------------------------------------------------------------------


# metrics.jsonl keys -> the TensorBoard tags people look for; val_* -> val/*, other keys -> train/<key>
_TB_TAGS = {"tokens_per_s": "train/tokens_per_sec"}


def tensorboard_tag(key: str) -> str:
    if "/" in key:
        return key
    if key in _TB_TAGS:
        return _TB_TAGS[key]
    if key.startswith("val_"):
        return "val/" + key[4:]
    return "train/" + key


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and, when asked and installed, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop rows from after the checkpoint: the resumed run writes them again
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                _say("warning: --tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(tensorboard_tag(k), v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ----- one optimizer step ----------------------------------------------------------------------------


def count_targets(batch) -> int:
    """Targets that count toward the loss in one micro-batch."""
    counted = batch.targets != -100
    if batch.loss_mask is not None:
        counted &= batch.loss_mask.to(torch.bool)
    return int(counted.sum())


@dataclass
class StepStats:
    loss: float  # mean NLL per counted target over the whole step
    targets: int  # counted targets (this process)
    tokens: int  # input positions processed (this process)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    env: dist_api.DistEnv | None = None,
) -> StepStats:
    """Accumulate into .grad the gradient of the mean NLL over all counted targets of `micro_batches`.

    Each micro-batch's mean loss is weighted by n_i / N (its counted targets over the step's), summed
    over ranks too: DDP/FSDP average gradients over W ranks, so the weight is W * n_i / N_global.
    `sync(skip)` is entered around forward AND backward (skip=True on all but the last micro-batch).
    """
    counts = [count_targets(b) for b in micro_batches]
    total = sum(counts)
    world = 1
    if env is not None and env.distributed and env.world_size > 1:
        t = torch.tensor(float(total), device=env.device)
        torch.distributed.all_reduce(t)
        total, world = int(t.item()), env.world_size
    loss_sum = torch.zeros((), dtype=torch.float32)
    tokens = 0
    for i, (b, n) in enumerate(zip(micro_batches, counts)):
        last = i == len(micro_batches) - 1
        with sync(not last) if sync is not None else contextlib.nullcontext():
            with autocast():
                out = model(b.idx, targets=b.targets, loss_mask=b.loss_mask)
            weight = world * n / max(total, 1)
            loss = out.loss.float() * weight
            if getattr(out, "aux_loss", None) is not None:  # MoE: each micro-batch's aux loss, averaged
                loss = loss + out.aux_loss.float() / len(micro_batches)  # ranks averaged by DDP
            (scale(loss) if scale is not None else loss).backward()
        loss_sum += out.loss.detach().float().cpu() * n
        tokens += b.idx.numel()
    local_total = sum(counts)
    mean = (loss_sum / max(local_total, 1)).item()
    return StepStats(loss=mean, targets=local_total, tokens=tokens)


# ----- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_dir: str | Path,
    meta: dict[str, Any],
    batch_size: int,
    block_size: int,
    device: torch.device,
    max_batches: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Validation loss (nats per token), perplexity, bits per character and per UTF-8 byte.

    Bits per character = total nats / ln 2 / characters. Over the whole split the windows predict every
    token after the first; when `max_batches` caps the pass, the mean loss is scaled by the split's
    tokens per character, which is the same thing in expectation.
    """
    from ..data import iter_eval_batches

    was_training = model.training
    model.eval()
    nats = 0.0
    count = 0
    for i, b in enumerate(iter_eval_batches(data_dir, "val", batch_size, block_size, device=device)):
        if max_batches and i >= max_batches:
            break
        n = count_targets(b)
        with autocast():
            out = model(b.idx, targets=b.targets, loss_mask=b.loss_mask)
        nats += float(out.loss) * n
        count += n
    model.train(was_training)
    split = meta["splits"]["val"]
    loss = nats / max(count, 1)
    tokens = max(split["tokens"] - 1, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpc": loss * tokens / max(split["characters"], 1) / math.log(2),
        "val_bpb": loss * tokens / max(split["bytes"], 1) / math.log(2),
        "val_targets": count,
    }


# ----- setting up a run ------------------------------------------------------------------------------


def resolve_config(
    cli: dict[str, Any], config_file: str | None = None, resume: bool = False
) -> TrainConfig:
    """Defaults < config file (or, with resume, RUN/config.toml) < flags given on the command line."""
    layers: list[dict[str, Any]] = []
    if resume:
        out = cli.get("out")
        if not out:
            raise UserError("--resume needs --out RUN_DIR (the run directory to continue)")
        saved = Path(out) / "config.toml"
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found (is {out} a gpt2kit run directory?)")
        layers.append(read_toml(saved))
    if config_file:
        layers.append(read_toml(config_file))
    layers.append(cli)
    return build_config(*layers)


def model_config_from(cfg: TrainConfig, meta: dict[str, Any]):
    """GPT2Config from the preset, the explicit model keys and the shards' vocabulary; checks the shapes."""
    from ..model import GPT2Config

    m = cfg.model
    overrides: dict[str, Any] = {
        k: getattr(m, k)
        for k in ("n_layer", "n_head", "n_embd", "n_ctx", "dropout", "attn_dropout")
        if getattr(m, k) is not None
    }
    if m.n_ctx is None and not m.init_from:
        # as nanoGPT: a model trained from scratch learns positions up to the block size only, so that is
        # its context; a preset's 1024-row position table with untrained rows past the block size would
        # make eval and generation past it quietly wrong
        overrides["n_ctx"] = cfg.data.block_size
    overrides.update(_variant_overrides(m))
    vocab = m.vocab_size if m.vocab_size is not None else meta["vocab_size"]
    if vocab < meta["vocab_size"]:
        raise UserError(
            f"--vocab-size {vocab} is smaller than the shards' vocabulary ({meta['vocab_size']} in meta.json)"
        )
    overrides["vocab_size"] = vocab
    overrides["eos_token_id"] = meta["eos_id"]
    try:
        mc = GPT2Config.from_preset(m.preset, **overrides)
    except UserError as e:
        raise UserError(f"model shape: {e}") from None
    if cfg.data.block_size > mc.n_ctx:
        raise UserError(
            f"--block-size {cfg.data.block_size} is larger than the model's context n_ctx={mc.n_ctx} "
            f"(raise --n-ctx or lower --block-size)"
        )
    return mc


def _variant_overrides(m) -> dict[str, Any]:
    """GPT2Config variant fields from the [model] keys that are set (model/config.py validates them)."""
    out: dict[str, Any] = {}
    if m.attention != "dense":
        out["attention"] = m.attention
    if m.attention_layers:
        out["attention_layers"] = tuple(a.strip() for a in m.attention_layers.split(",") if a.strip())
    if m.window is not None:
        out["window"] = m.window
    if m.block is not None:
        out["attention_block"] = m.block
    if m.moe_experts:
        out["moe_experts"] = m.moe_experts
    for k in ("moe_top_k", "moe_every", "moe_first_layer", "moe_capacity_factor", "moe_eval_capacity_factor", "moe_aux_loss_coef",
              "moe_z_loss_coef", "moe_expert_hidden"):
        if getattr(m, k) is not None:
            out[k] = getattr(m, k)
    if m.moe_dropless:
        out["moe_dropless"] = True
    if m.share_layers != "none":
        out["share_layers"] = m.share_layers
    return out


SHAPE_KEYS = ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd")


def _check_same_shape(want, have, source: str) -> None:
    for k in SHAPE_KEYS:
        if getattr(want, k) != getattr(have, k):
            raise UserError(
                f"{flag_name(k)} is {getattr(want, k)} but the checkpoint {source} has {k}={getattr(have, k)}"
            )


def _load_tokenizer(cfg: TrainConfig, meta: dict[str, Any], log: Callable[[str], None] = _say):
    """The shards' tokenizer (saved into every checkpoint), or None with a warning when it is gone."""
    from ..data import check_fingerprint

    where = meta.get("tokenizer")
    if not where or not Path(where).is_dir():
        log(
            f"warning: the shards' tokenizer directory {where!r} is not there; checkpoints will hold no tokenizer files"
        )
        return None
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(where)
    check_fingerprint(meta, tok)
    return tok


def _autocast_factory(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "fp32":
        return contextlib.nullcontext
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device (use bf16 on CPU)")
    amp = torch.bfloat16 if dtype == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=amp)


@contextlib.contextmanager
def _quiet_single_process_dcp() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it 'assumes a single process' when there is no process
    group; that is exactly what we mean, so to users the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----- the trainer ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    best_dir: Path | None
    val: dict[str, float] | None
    train_loss: float | None
    skipped_steps: int
    stopped_by: str | None  # signal name when interrupted
    wall_s: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # rank 0 (or the only process): the one that reports


class Trainer:
    """Set up by `__init__` (model, optimizer, loader; resume state), run by `fit()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] = _say,
    ):
        self.cfg = cfg
        self.log = log
        r = cfg.run
        if not cfg.data.data:
            raise UserError("--data SHARDS_DIR is required (a directory written by `gpt2kit data prepare`)")
        if not r.out:
            raise UserError("--out RUN_DIR is required (where checkpoints and metrics go)")
        if r.threads:
            torch.set_num_threads(r.threads)
        self.env = dist_api.init_distributed(r.device)
        self.device = self.env.device
        if self.device.type == "cpu":
            retain_freed_memory()  # reuse the step's big blocks instead of page-faulting them in again
        self.run_dir = Path(r.out)
        self._check_run_dir(resume, overwrite)

        from ..data import ShardLoader, parse_seq_len_sampler, read_meta

        self.meta = read_meta(cfg.data.data)
        mc = model_config_from(cfg, self.meta)
        self.tokenizer = _load_tokenizer(cfg, self.meta, self.log if self.env.is_main else (lambda m: None))
        r.dtype = cpu_dtype(r.dtype, self.device.type, self.log if self.env.is_main else (lambda m: None))
        self.autocast = _autocast_factory(r.dtype, self.device)
        sampler = parse_seq_len_sampler(cfg.data.seq_len) if cfg.data.seq_len else None
        if sampler is not None and getattr(sampler, "max_len", 0) > cfg.data.block_size:
            raise UserError(f"--seq-len {cfg.data.seq_len!r} goes above --block-size {cfg.data.block_size}")

        state: dict[str, Any] | None = None
        resume_dir: Path | None = None
        if resume:
            resume_dir, state = self._find_resume()
        torch.manual_seed(r.seed)  # identical initial weights on every rank (FSDP shards what each holds)
        sharded = None
        if self.env.world_size > 1 and r.strategy == "fsdp" and not r.expert_parallel:
            # no whole model on every rank: built on meta, sharded, rank 0's weights broadcast shard by shard
            from ..model import GPT2

            def full_state() -> dict[str, torch.Tensor]:
                torch.manual_seed(r.seed)
                return self._build_model(mc, resume_dir).state_dict()

            sharded = dist_api.shard_from_meta(lambda: GPT2(mc), full_state, self.env, r.reshard_after_forward, r.dtype)
        model = self._build_model(mc, resume_dir) if sharded is None else dist_api.unwrap(sharded)
        self.model_config = model.config
        self.bare = model
        model.gradient_checkpointing = cfg.model.grad_checkpointing
        model.train()
        self.experts = None  # expert parallel: this rank's share of the experts (ExpertShards)
        if r.expert_parallel:
            from .expert_parallel import shard_experts

            self.experts = shard_experts(model, self.env.rank, self.env.world_size,
                                         r.strategy if self.env.world_size > 1 else "ddp")
        self.model = sharded if sharded is not None else dist_api.wrap_model(
            model, r.strategy if self.env.world_size > 1 else "none", self.env,
            reshard_after_forward=r.reshard_after_forward,
            mixed_precision=r.dtype if r.strategy == "fsdp" else None,
            # FSDP under expert parallel shards the dense part only: the experts stay with the all-to-all
            ignored_params=self.experts.ignored_params if self.experts is not None else None,
        )
        o = cfg.optim
        strategy = r.strategy if self.env.world_size > 1 else "none"
        if o.optimizer == "muon":
            self.optimizer = _build_muon(self.model, o, strategy)
        else:
            groups = param_groups(dist_api.unwrap(self.model), o.weight_decay)
            adamw: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps}
            fused = self.device.type in ("cpu", "cuda")
            adamw.update({"fused": True} if fused else {"foreach": True})
            self.optimizer = dist_api.build_optimizer(self.model, groups, strategy, self.env, **adamw)
        self.scaler = torch.amp.GradScaler("cuda") if r.dtype == "fp16" else None
        self.step_model = torch.compile(self.model) if r.compile else self.model

        self.loader = ShardLoader(
            cfg.data.data, "train", cfg.data.batch_size, cfg.data.block_size, cfg.data.mode,
            seed=r.seed, rank=self.env.rank, world_size=self.env.world_size, seq_len_sampler=sampler,
            device=self.device,
        )
        torch.manual_seed(r.seed + 7919 * (self.env.rank + 1))  # dropout streams differ per rank
        self.step = 0
        self.skipped = 0
        self.bad_in_a_row = 0
        self.best_val: float | None = None
        self.tokens_seen = 0
        if state is not None:
            self._restore(state, resume_dir)
        if overwrite and not resume:
            self._clear_old_run()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
        self.metrics = MetricsLog(self.run_dir, self.env.is_main, r.tensorboard, self.step if resume else None)
        self.resumed_from = resume_dir

    # --- setup helpers ------------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        existing = ckpt.list_step_dirs(self.run_dir)
        if resume or not existing:
            return
        if not overwrite:
            raise UserError(
                f"run directory {self.run_dir} already holds checkpoints ({existing[-1].name}); "
                "pass --resume to continue it or --overwrite to start over"
            )

    def _clear_old_run(self) -> None:
        """--overwrite: remove the previous run's outputs, only once everything else has been checked."""
        existing = ckpt.list_step_dirs(self.run_dir)
        if self.env.is_main and existing:
            import shutil

            for p in [*existing, self.run_dir / "best", self.run_dir / "latest", self.run_dir / "metrics.jsonl"]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        dist_api.barrier(self.env)

    def _find_resume(self) -> tuple[Path, dict[str, Any]]:
        found: list[Any] = [None, None]
        if self.env.is_main:
            try:
                found = list(ckpt.find_resume_checkpoint(self.run_dir))
            except UserError as e:
                found = [None, str(e)]
        if self.env.distributed and self.env.world_size > 1:
            torch.distributed.broadcast_object_list(found, src=0)
        if found[0] is None:
            raise UserError(found[1] if isinstance(found[1], str) else "--resume: no usable checkpoint")
        path = Path(found[0])
        state = found[1] if self.env.is_main else ckpt.load_trainer_state(path)
        return path, state

    def _build_model(self, mc, resume_dir: Path | None):
        from ..model import GPT2

        init = resume_dir or (Path(self.cfg.model.init_from) if self.cfg.model.init_from else None)
        if init is None:
            return GPT2(mc).to(self.device)
        model = GPT2.from_pretrained(init, device=self.device, dtype=torch.float32)
        if mc.n_ctx > model.config.n_ctx:  # context extension (finetune --n-ctx): grow the position table
            from ..model.context import extend_positions

            extend_positions(model, mc.n_ctx)
        _check_same_shape(mc, model.config, str(init))
        # dropout comes from this run's config, not from the checkpoint's config.json
        model.config = model.config.replace(dropout=mc.dropout, attn_dropout=mc.attn_dropout)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = mc.dropout
            if hasattr(mod, "attn_dropout") and isinstance(mod.attn_dropout, float):
                mod.attn_dropout = mc.attn_dropout
        return model

    def _restore(self, state: dict[str, Any], resume_dir: Path) -> None:
        with _quiet_single_process_dcp():
            optim = self.experts if self.experts is not None else dist_api
            optim.load_optimizer_state(self.model, self.optimizer, resume_dir / "optimizer")
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.best_val = state.get("best_val_loss")
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        ranks = state["ranks"]
        if len(ranks) == self.env.world_size:
            mine = ckpt.from_safe(ranks[self.env.rank])
            self.loader.load_state_dict(mine["loader"])
            ckpt.restore_rng_state(mine["rng"])
        else:
            # a different world size cannot replay the same data order; start a fresh, distinct one
            self.log(
                f"note: checkpoint was written by {len(ranks)} process(es), resuming on {self.env.world_size}: "
                "the data order continues from a new seed (not bitwise the uninterrupted run)"
            )
            self.loader.seed = self.cfg.run.seed + self.step
            self.loader._order_cache = None
            torch.manual_seed(self.cfg.run.seed + self.step + 7919 * (self.env.rank + 1))

    # --- checkpoints ----------------------------------------------------------------------------------

    def _save_model_files(self, directory: Path, full_state: dict[str, torch.Tensor] | None) -> None:
        model = self.bare
        if full_state is not None:  # FSDP / expert parallel: the gathered weights go into a plain CPU copy
            from ..model import GPT2

            with on_meta():
                model = GPT2(self.model_config)
            model.load_state_dict(full_state, assign=True)
            model.lm_head.weight = model.transformer.wte.weight
        extra = {"training": {"step": self.step, "config": self.cfg.to_dict(),
                              "data_fingerprint": self.meta.get("tokenizer_fingerprint")}}
        model.save_pretrained(directory, tokenizer=self.tokenizer, extra=extra)

    def _full_state_if_sharded(self) -> dict[str, torch.Tensor] | None:
        if self.experts is not None:  # expert parallel: rank 0 collects the other ranks' experts
            return self.experts.gather_state_dict(self.model)
        if not dist_api.is_sharded(self.model):
            return None
        return dist_api.gather_full_state_dict(self.model)  # a collective: every rank calls it

    def save(self) -> Path:
        """Every rank calls this (the optimizer state and FSDP gathering are collectives)."""
        env = self.env
        staging = self.run_dir / f".{ckpt.step_dir_name(self.step)}.staging"
        if env.is_main:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist_api.barrier(env)
        full_state = self._full_state_if_sharded()
        with _quiet_single_process_dcp():
            optim = self.experts if self.experts is not None else dist_api
            optim.save_optimizer_state(self.model, self.optimizer, staging / "optimizer")
        per_rank = ckpt.to_safe({"loader": self.loader.state_dict(), "rng": ckpt.capture_rng_state()})
        ranks = [per_rank]
        if env.distributed and env.world_size > 1:
            ranks = [None] * env.world_size
            torch.distributed.all_gather_object(ranks, per_rank)
        target = self.run_dir / ckpt.step_dir_name(self.step)
        if env.is_main:
            self._save_model_files(staging, full_state)
            state = {
                "skipped_steps": self.skipped,
                "bad_in_a_row": self.bad_in_a_row,
                "best_val_loss": self.best_val,
                "tokens_seen": self.tokens_seen,
                "world_size": env.world_size,
                "ranks": ranks,
            }
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
            target = ckpt.commit_checkpoint(self.run_dir, self.step, staging, state, self.cfg.run.keep_last)
        dist_api.barrier(env)
        return target

    def _save_best(self, val: dict[str, float]) -> Path | None:
        full_state = self._full_state_if_sharded()
        if not self.env.is_main:
            return None
        return ckpt.save_best(
            self.run_dir, lambda d: self._save_model_files(d, full_state), {"step": self.step, **val}
        )

    # --- the loop -------------------------------------------------------------------------------------

    def _lr(self) -> float:
        o = self.cfg.optim
        return lr_at(self.step, o.schedule, o.lr, o.warmup_steps, self.cfg.run.max_steps, o.min_lr)

    def train_step(self, micro_batches: list) -> tuple[StepStats, float, bool]:
        """One optimizer step (or a skip). Returns (stats, grad norm, applied)."""
        lr = self._lr()
        set_lr(self.optimizer, lr)
        sync = (lambda skip: dist_api.no_grad_sync(self.model, skip)) if self.env.world_size > 1 else None
        scale = self.scaler.scale if self.scaler is not None else None
        stats = forward_backward(self.step_model, micro_batches, self.autocast, sync, scale, self.env)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.experts is not None:  # expert parallel: the ranks' expert gradients are summed in the norm
            norm = float(self.experts.clip_grad_norm_(clip))
        else:
            norm = float(dist_api.clip_grad_norm_(self.model, clip))
        bad = not (math.isfinite(stats.loss) and (math.isfinite(norm) or self.scaler is not None))
        bad = dist_api.any_rank(bad, self.env)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return stats, norm, False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, norm, True

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to max_steps. `stop_after=k` behaves like a SIGTERM arriving during step k (tests, demos)."""
        cfg, r = self.cfg, self.cfg.run
        env = self.env
        if env.is_main and self.step == 0:
            n = self.bare.num_params()
            if self.experts is not None:
                n = self.experts.num_params(n)
            self.log(
                f"model: {n / 1e6:.2f}M parameters (L{self.model_config.n_layer} H{self.model_config.n_head} "
                f"d{self.model_config.n_embd}, vocab {self.model_config.vocab_size}); "
                f"{self.meta['splits']['train']['tokens']:,} training tokens; device {self.device}"
                + (f", {env.world_size} processes ({r.strategy})" if env.world_size > 1 else "")
            )
        elif env.is_main:
            self.log(f"resuming {self.run_dir} from {self.resumed_from.name} (step {self.step})")
        from tqdm.auto import tqdm

        bar = tqdm(
            total=r.max_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=0.5,
            disable=not (r.progress and env.is_main), file=sys.stderr,
        )
        val: dict[str, float] | None = None
        last_ckpt: Path | None = None
        last_saved_step = self.step if self.resumed_from is not None else -1
        last_eval_step = -1
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        window_t0 = time.perf_counter()
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        train_loss: float | None = None
        history: list[dict[str, Any]] = []
        stopped_by: str | None = None
        time_check = {"first_step": self.step, "t_after_first": None, "fitted": False, "limit": r.time_limit}
        try:
            with StopRequest(self.log if env.is_main else (lambda m: None)) as stop:
                while self.step < r.max_steps:
                    batches = [self.loader.next_batch() for _ in range(cfg.optim.grad_accum)]
                    stats, norm, applied = self.train_step(batches)
                    step_tokens = stats.tokens * env.world_size
                    self.tokens_seen += step_tokens
                    window_tokens += step_tokens
                    if not applied:
                        self.skipped += 1
                        self.bad_in_a_row += 1
                        if env.is_main:
                            self.log(
                                f"warning: step {self.step + 1}: non-finite loss/gradient (loss {stats.loss}, "
                                f"grad norm {norm}); step skipped ({self.bad_in_a_row} in a row)"
                            )
                        if self.bad_in_a_row >= r.max_bad_steps:
                            last = ckpt.list_step_dirs(self.run_dir)
                            raise UserError(
                                f"training stopped: the loss was non-finite for {self.bad_in_a_row} steps in a row "
                                f"at step {self.step + 1}; last good checkpoint: "
                                f"{last[-1] if last else 'none'} (lower --lr, raise --warmup-steps, or use fp32)"
                            )
                    else:
                        self.bad_in_a_row = 0
                        self.step += 1
                        train_loss = stats.loss
                        window_loss += stats.loss
                        window_steps += 1
                        bar.update(1)
                    if applied and time_check["limit"]:
                        self._fit_time_limit(time.perf_counter() - t_start, time_check)
                        bar.total = r.max_steps
                    if stop_after is not None and self.step >= stop_after and stop.requested is None:
                        stop.requested = "stop_after"
                    stop_now = dist_api.any_rank(stop.requested is not None, env)
                    if applied and (self.step % r.log_every == 0 or self.step == r.max_steps or stop_now):
                        now = time.perf_counter()
                        tps = window_tokens / max(now - window_t0, 1e-9)
                        row = {
                            "step": self.step,
                            "loss": window_loss / max(window_steps, 1),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "grad_norm": norm,
                            "tokens_per_s": tps,
                            "tokens": self.tokens_seen,
                            "elapsed_s": now - t_start,
                            "skipped_steps": self.skipped,
                        }
                        if env.world_size > 1:
                            row["loss"] = dist_api.all_reduce_mean(row["loss"], env)
                        row.update(read_moe_metrics(self.bare))  # per-expert load, dropped share (this rank)
                        self.metrics.write(row)
                        history.append(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tps:,.0f}")
                        window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, now
                    if applied:
                        at_end = self.step == r.max_steps  # a stop saves (below) but does not evaluate: be quick
                        if (r.eval_every and self.step % r.eval_every == 0) or at_end:
                            val = self._eval_and_keep_best(history)
                            last_eval_step = self.step
                        if (r.save_every and self.step % r.save_every == 0) or at_end:
                            last_ckpt = self.save()
                            last_saved_step = self.step
                    if stop_now:
                        stopped_by = stop.requested or "signal"
                        if last_saved_step != self.step or not applied:
                            last_ckpt = self.save()  # the data cursor moved even if the step was skipped
                            last_saved_step = self.step
                        break
                if self.step != last_saved_step:  # e.g. max_steps reached by a resumed run with no new step
                    if last_eval_step != self.step:
                        val = self._eval_and_keep_best(history)
                    last_ckpt = self.save()
        finally:
            bar.close()
            self.metrics.close()
        wall = time.perf_counter() - t_start
        if last_ckpt is None:
            existing = ckpt.list_step_dirs(self.run_dir)
            last_ckpt = existing[-1] if existing else None
        if stopped_by and env.is_main:
            self.log(
                f"stopped by {stopped_by} at step {self.step}: saved {last_ckpt}; "
                f"continue with: gpt2kit train --out {self.run_dir} --resume"
            )
        best = self.run_dir / "best"
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            last_checkpoint=last_ckpt,
            best_dir=best if best.is_dir() else None,
            val=val,
            train_loss=train_loss,
            skipped_steps=self.skipped,
            stopped_by=stopped_by,
            wall_s=wall,
            tokens_per_s=(self.tokens_seen - tokens_at_start) / max(wall, 1e-9),
            history=history,
            is_main=self.env.is_main,
        )

    def _fit_time_limit(self, elapsed: float, check: dict[str, Any]) -> None:
        """`time_limit`: from the measured seconds per step, lower max_steps so training ends in time.

        The first step (allocations, compilation) is left out of the rate. The first fit comes after 5
        timed steps (inside the warm-up, so the cosine decays smoothly to the new end), then the
        projection is checked every 50 steps and max_steps only ever goes down (a busy machine). The
        new max_steps is written to config.toml, so a resume uses it.
        """
        r = self.cfg.run
        limit = check["limit"]
        done = self.step - check["first_step"]
        if done == 1:
            check["t_after_first"] = elapsed
            check["next_fit"] = self.step + 5
        if check["t_after_first"] is None or self.step < check.get("next_fit", 0):
            return
        check["next_fit"] = self.step + 50
        rate = (elapsed - check["t_after_first"]) / max(done - 1, 1)  # seconds per step
        fit = self.step + int(max(0.0, limit - elapsed) / max(rate, 1e-9))
        if self.env.world_size > 1:  # every rank must end at the same step: the slowest decides
            t = torch.tensor(float(fit), device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            fit = int(t.item())
        if fit >= r.max_steps or (check["fitted"] and fit >= 0.97 * r.max_steps):
            return
        check["fitted"] = True
        r.max_steps = max(fit, self.step)
        if self.env.is_main:
            self.log(f"note: --time-limit {limit:.0f}s: training ends at step {r.max_steps}")
            # saved without the limit: a resume continues this schedule instead of fitting a new one
            saved = dataclasses.replace(self.cfg, run=dataclasses.replace(r, time_limit=0.0))
            atomic_write_text(self.run_dir / "config.toml", to_toml(saved))

    def _eval_and_keep_best(self, history: list[dict[str, Any]]) -> dict[str, float] | None:
        if self.meta["splits"]["val"]["tokens"] < 2:
            return None
        d = self.cfg.data
        val = evaluate(
            dist_api.unwrap(self.model), d.data, self.meta, d.eval_batch_size or d.batch_size, d.block_size,
            self.device, d.eval_batches, self.autocast,
        )
        row = {"step": self.step, **val}
        self.metrics.write(row)
        history.append(row)
        if self.env.is_main:
            self.log(
                f"step {self.step}: val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f}, "
                f"bpc {val['val_bpc']:.4f}"
            )
        improved = self.best_val is None or val["val_loss"] < self.best_val
        # rank 0 decides, so every rank joins the (collective) gathering of an FSDP model or none does
        if dist_api.any_rank(improved and self.env.is_main, self.env):
            self.best_val = val["val_loss"]
            self._save_best(val)
        return val

    def close(self) -> None:
        dist_api.cleanup()


def _build_muon(model: torch.nn.Module, o, strategy: str) -> torch.optim.Optimizer:
    """Muon + AdamW (train/muon.py). It needs whole matrices: DDP and one process, not FSDP's or ZeRO's shards."""
    if strategy in ("fsdp", "zero1"):
        raise UserError(f"--optimizer muon works with one process or --strategy ddp, not --strategy {strategy} "
                        "(it orthogonalises whole matrices, which those strategies shard)")
    return optimizer_for(dist_api.unwrap(model), o)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Build a Trainer and run it (the Python entry point behind `gpt2kit train`)."""
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = [
    "MetricsLog",
    "StepStats",
    "StopRequest",
    "TrainResult",
    "Trainer",
    "count_targets",
    "evaluate",
    "forward_backward",
    "model_config_from",
    "resolve_config",
    "train",
]
