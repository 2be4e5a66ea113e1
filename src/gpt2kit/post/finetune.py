"""Fine-tuning: continue training a checkpoint on new data, with a smaller learning rate.

Two kinds of data:
- token shards (`gpt2kit data prepare`): gpt2kit's own trainer, started from the checkpoint
  (`init_from`), with fine-tuning defaults (lr 1e-4, 20 warm-up steps, context min(n_ctx, 256));
- prompt/completion JSONL (instruction tuning): each record becomes one padded row
  prompt + completion + EOS, and only the completion and its EOS are targets (the prompt and the padding
  are masked out of the loss). A held-out share of the records measures the completion loss.
A pruned checkpoint (masks.safetensors) keeps its zeros: the masks are re-applied after every optimizer
step and saved into every checkpoint the fine-tune writes.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, require_file
from ..fileio import iter_jsonl
from ..train.trainer import Trainer
from .finetune_defaults import DEFAULTS
from .prune import MASKS_FILE, apply_masks, check_masks_fit, load_masks, save_masks


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MaskedTrainer(Trainer):
    """gpt2kit's Trainer that keeps pruned weights at zero: masks applied at the start, after every
    optimizer step, and saved with every checkpoint."""

    def __init__(self, cfg, masks: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(cfg, **kwargs)
        self.masks = masks
        if masks:
            check_masks_fit(self.bare, masks, cfg.model.init_from)
            self.masks = {n: m.to(self.device) for n, m in masks.items()}
            apply_masks(self.bare, self.masks)

    def train_step(self, micro_batches: list):
        stats, norm, applied = super().train_step(micro_batches)
        if applied and self.masks:
            apply_masks(self.bare, self.masks)
        return stats, norm, applied

    def _save_model_files(self, directory: Path, full_state):
        super()._save_model_files(directory, full_state)
        if self.masks:
            from ..fileio import update_json

            save_masks(self.masks, directory)
            update_json(Path(directory) / "gpt2kit.json", {"pruning": {"masks": MASKS_FILE, "tensors": sorted(self.masks),
                                                                       "kept_through": "finetune"}})


def _init_model_info(init: str | Path):
    """(config, tokenizer, masks) of the starting checkpoint, refusing quantized ones."""
    from ..model.config import GPT2Config
    from .common import checkpoint_meta, load_tokenizer

    meta = checkpoint_meta(init)
    if "quantization" in meta:
        raise UserError(f"--init {init} is quantized (inference only); fine-tune the float checkpoint instead")
    from ..fileio import read_json

    config = GPT2Config.from_hf_dict(read_json(Path(init) / "config.json", "model config"))
    return config, load_tokenizer(init), load_masks(init)


@dataclass
class FinetuneResult:
    out: Path
    checkpoint: Path
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    tokens_per_s: float
    wall_s: float
    stopped_by: str | None = None  # JSONL runs: the signal (or "stop_after") that interrupted the run

    def report(self) -> dict[str, Any]:
        if self.stopped_by is not None:
            return {"out": str(self.out), "stopped_by": self.stopped_by, "step": self.steps,
                    "checkpoint": str(self.checkpoint), "resume": "run the same command with --resume to continue"}
        return {"out": str(self.out), "checkpoint": str(self.checkpoint), "steps": self.steps,
                **{f"{k}_before": v for k, v in self.before.items()},
                **{f"{k}_after": v for k, v in self.after.items()},
                "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s}


# ----- token shards: the trainer -----------------------------------------------------------------------


def finetune_shards(init: str | Path, data: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                    eval_text: str | None = None, overwrite: bool = False, lora=None, lora_merge: bool = False,
                    resume: bool = False, n_ctx: int | None = None) -> FinetuneResult:
    """Fine-tune `init` on token shards with gpt2kit's trainer; `overrides` are trainer config keys.
    lora (post.lora.LoraSettings): train adapters only, checkpoints are peft adapter directories;
    lora_merge also writes OUT/merged, a plain checkpoint. resume continues the run in `out`.
    n_ctx: context extension -- the position table grows to n_ctx rows (model/context.py) and the
    default block_size becomes n_ctx."""
    from ..data import check_fingerprint, read_meta
    from ..model import GPT2
    from ..train.config import build_config
    from ..train.trainer import evaluate
    from .common import perplexity

    config, tokenizer, masks = _init_model_info(init)
    meta = read_meta(data)
    check_fingerprint(meta, tokenizer)
    flat: dict[str, Any] = dict(DEFAULTS)
    flat["block_size"] = min(config.n_ctx, DEFAULTS["block_size"])
    if n_ctx is not None and n_ctx != config.n_ctx:
        if n_ctx < config.n_ctx:
            raise UserError(f"--n-ctx {n_ctx} is shorter than the checkpoint's context n_ctx={config.n_ctx}; "
                            "context extension only grows it")
        config = config.replace(n_ctx=n_ctx)
        flat["block_size"] = n_ctx
    flat.update(overrides or {})
    flat.update(
        init_from=str(init), data=str(data), out=str(out), preset="gpt2", n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, n_ctx=config.n_ctx, vocab_size=config.vocab_size,
    )
    # an MoE / shared-layer checkpoint fine-tunes as itself (those [model] keys have the config's names)
    flat.update({k: v for k, v in config.variant().items() if k.startswith("moe_") or k == "share_layers"})
    # an attention variant fine-tunes as itself (train flags --attention/--attention-layers/--window/--block)
    attn = config.variant()
    for key, flag in (("attention", "attention"), ("window", "window"), ("attention_block", "block")):
        if key in attn:
            flat[flag] = attn[key]
    if "attention_layers" in attn:
        flat["attention_layers"] = ",".join(attn["attention_layers"])
    flat.setdefault("dropout", config.dropout)
    flat.setdefault("attn_dropout", config.attn_dropout)
    cfg = build_config(flat)

    if lora is not None:
        from .lora import LoraTrainer

        if masks:
            raise UserError(f"--lora-r: {init} is pruned; LoRA's update would fill the pruned zeros back in")
        lora.base = str(init)
        trainer = LoraTrainer(cfg, lora, overwrite=overwrite, resume=resume)
    else:
        trainer = MaskedTrainer(cfg, masks=masks, overwrite=overwrite, resume=resume)
    try:
        d = cfg.data
        val_args = (d.data, trainer.meta, d.eval_batch_size or d.batch_size, d.block_size, trainer.device,
                    d.eval_batches)
        has_val = trainer.meta["splits"]["val"]["tokens"] >= 2
        before = {"val_loss": evaluate(trainer.bare, *val_args)["val_loss"]} if has_val else {}
        if eval_text is not None:
            before["ppl"] = perplexity(trainer.bare, tokenizer, eval_text)["ppl"]
        trainer.bare.train()
        result = trainer.fit()
    finally:
        trainer.close()
    after: dict[str, float] = {}
    if result.val is not None:
        after["val_loss"] = result.val["val_loss"]
    if eval_text is not None:
        if lora is not None:
            from .lora import load_lora_model

            tuned = load_lora_model(result.last_checkpoint, base=init)[0]
        else:
            tuned = GPT2.from_pretrained(result.last_checkpoint)
        after["ppl"] = perplexity(tuned, tokenizer, eval_text)["ppl"]
    if lora is not None and lora_merge:
        from .lora import merge_checkpoint

        merge_checkpoint(result.last_checkpoint, Path(out) / "merged", base=init, overwrite=True)
    return FinetuneResult(Path(out), Path(result.last_checkpoint), result.step, before, after,
                          result.tokens_per_s, result.wall_s)


# ----- prompt/completion JSONL ----------------------------------------------------------------------------


def read_jsonl(path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion") -> list[tuple[str, str]]:
    p = require_file(path, "--jsonl file")
    records = []
    for lineno, obj in iter_jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get(prompt_key), str) or not isinstance(
            obj.get(completion_key), str
        ):
            raise UserError(f"{p}:{lineno}: expected an object with string fields {prompt_key!r} and {completion_key!r}")
        if not obj[completion_key]:
            raise UserError(f"{p}:{lineno}: {completion_key!r} is empty (nothing to learn)")
        records.append((obj[prompt_key], obj[completion_key]))
    if not records:
        raise UserError(f"{p}: no records")
    return records


def completion_rows(records: list[tuple[str, str]], tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """Each record -> (ids = prompt + completion + EOS, number of prompt tokens), cut to block_size + 1
    tokens by dropping the oldest prompt tokens first (the completion is what is learned)."""
    rows = []
    for prompt, completion in records:
        p = tokenizer.encode(prompt, allowed_special="all") if prompt else []
        c = list(tokenizer.encode(completion, allowed_special="all")) + [tokenizer.eos_id]
        c = c[: block_size + 1]
        p = list(p)[max(0, len(p) - (block_size + 1 - len(c))) :] if len(c) < block_size + 1 else []
        rows.append((p + c, len(p)))
    return rows


def completion_batch(rows: list[tuple[list[int], int]], pad_id: int):
    """Right-padded Batch: targets are ids shifted by one; loss_mask is True only on completion targets."""
    from ..data import Batch

    T = max(len(ids) for ids, _ in rows) - 1
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (ids, learn) in enumerate(rows):
        t = torch.tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        idx[i, :n] = t[:-1]
        targets[i, :n] = t[1:]
        if isinstance(learn, int):
            # target j predicts ids[j + 1]; it belongs to the completion when j + 1 >= n_prompt (= learn)
            mask[i, max(learn - 1, 0) : n] = True
        else:  # chat rows (align.sft.chat_rows): a learn flag per token
            mask[i, :n] = torch.tensor(learn[1:], dtype=torch.bool)
    return Batch(idx, targets, mask)


@torch.no_grad()
def completion_loss(model, rows, pad_id: int, batch_size: int = 16) -> float:
    """Mean NLL per completion token."""
    was = model.training
    model.eval()
    nats, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = completion_batch(rows[i : i + batch_size], pad_id)
        n = int(b.loss_mask.sum())
        nats += float(model(b.idx, targets=b.targets, loss_mask=b.loss_mask).loss) * n
        count += n
    model.train(was)
    return nats / max(count, 1)


def finetune_jsonl(init: str | Path, jsonl: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                   val_fraction: float = 0.1, eval_text: str | None = None, overwrite: bool = False,
                   log=_log, chat: bool = False, chat_tokens: bool = False, lora=None,
                   lora_merge: bool = False, resume: bool = False,
                   stop_after: int | None = None) -> FinetuneResult:
    """Instruction-tune `init` on prompt/completion records; writes OUT/final (a checkpoint) and
    OUT/metrics.jsonl. chat=True: chat/Alpaca records (gpt2kit.align.sft), loss on the assistant turns,
    the chat template saved into the checkpoint; chat_tokens adds <|im_start|>/<|im_end|> as tokens.
    Ctrl-C / SIGTERM (or `save_every` steps; `stop_after` steps, for tests) saves OUT/step-XXXXXX (the
    align trainers' format, gpt2kit.align.resume); `resume` continues it exactly (the same final bytes as
    an uninterrupted run). An interrupted run returns a FinetuneResult with `stopped_by` set."""
    from ..align.parallel import average_gradients, check_batch, join, main_only, shard, token_weighted
    from ..align.resume import Progress, prepare_out, restore_rng, rng_state
    from ..model import GPT2
    from ..train.optim import lr_at, param_groups, set_lr
    from .common import copy_model_files, perplexity

    o = dict(DEFAULTS, schedule="cosine", min_lr=0.0, weight_decay=0.0, grad_clip=1.0, seed=1337, threads=0)
    o.update(overrides or {})
    # torchrun: each rank a share of every batch, gradients averaged, rank 0 writes (gpt2kit.align.parallel)
    env = join()
    if not env.is_main:
        log = lambda m: None  # noqa: E731 (rank 0 speaks for the job)
    check_batch(int(o["batch_size"]), env)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    config, tokenizer, masks = _init_model_info(init)
    out, state, step_dir = prepare_out(out, "finetune-jsonl", overwrite, resume)
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    block = min(int(o["block_size"]), config.n_ctx)

    template = None
    if chat:
        from ..align.sft import chat_rows, chat_setup, read_chat_jsonl

        template, tokenizer = chat_setup(init, tokenizer, chat_tokens)
        records = read_chat_jsonl(jsonl, template)
    elif chat_tokens:
        raise UserError("--chat-tokens goes with --chat")
    else:
        records = read_jsonl(jsonl)
    random.Random(o["seed"]).shuffle(records)
    n_val = int(round(len(records) * val_fraction))
    rows = chat_rows(records, tokenizer, block) if chat else completion_rows(records, tokenizer, block)
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    if not train_rows:
        raise UserError(f"{jsonl}: no training records left after holding out {n_val} for validation")

    torch.manual_seed(o["seed"])
    model = GPT2.from_pretrained(init, dtype=torch.float32)
    if chat:
        from ..align.sft import grow_embedding

        grow_embedding(model, tokenizer.vocab_size)
    if masks:
        check_masks_fit(model, masks, str(init))
        apply_masks(model, masks)
    if lora is not None:  # adapters only: OUT/final is a peft adapter directory
        from .lora import inject_lora

        if masks or chat_tokens:
            raise UserError("--lora-r goes with neither a pruned checkpoint nor --chat-tokens (both change the base)")
        lora.base = str(init)
        inject_lora(model, lora)
    pad = tokenizer.eos_id
    if state is None:
        before = {"val_loss": completion_loss(model, val_rows, pad)} if val_rows else {}
        if eval_text is not None:
            before["ppl"] = perplexity(model, tokenizer, eval_text)["ppl"]
    else:  # the weights of the interrupted run (all of them: a LoRA model's base and adapters alike)
        model.load_state_dict(state["model"])
        before = dict(state["before"])

    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, o["weight_decay"]), lr=o["lr"], betas=(0.9, 0.95))
    rng = random.Random(o["seed"] + 1)
    order: list[int] = []
    metrics: list[dict[str, Any]] = []
    tokens, t0, start = 0, time.perf_counter(), 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], rng)  # torch's global RNG too: dropout continues where it stopped
        order, metrics, start = [int(i) for i in state["order"]], list(state["metrics"]), int(state["step"])
    B, max_steps = int(o["batch_size"]), int(o["max_steps"])

    def save_model(d: Path) -> None:
        # a loadable checkpoint where it can be one; a LoRA run's step directory holds its adapter
        if lora is not None:
            from .lora import save_adapter

            save_adapter(model, lora, d)
        else:
            copy_model_files(init, d)
            model.save_pretrained(d, tokenizer=tokenizer if chat else None)

    def trainer_state() -> dict[str, Any]:
        # the full state dict (not only the step directory's files) so that LoRA and grown-vocabulary
        # runs restore every tensor exactly; the order and both RNGs make the next batches the same
        return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "rng": rng_state(rng), "order": list(order),
                "metrics": metrics, "before": before}

    with Progress(out, "finetune-jsonl", int(o.get("save_every") or 0), stop_after, log, env) as progress:
        for step in range(start, max_steps):
            if len(order) < B:
                fresh = list(range(len(train_rows)))
                rng.shuffle(fresh)
                order += fresh
            batch = completion_batch(shard([train_rows[i] for i in order[:B]], env), pad)
            order = order[B:]
            set_lr(optimizer, lr_at(step, o["schedule"], o["lr"], o["warmup_steps"], o["max_steps"], o["min_lr"]))
            loss = model(batch.idx, targets=batch.targets, loss_mask=batch.loss_mask).loss
            # the loss is a mean over target tokens, and the ranks' shares hold different numbers of them
            loss, loss_value = token_weighted(loss, batch.loss_mask.sum(), env)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model, env)
            if o["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
            optimizer.step()
            if masks:
                apply_masks(model, masks)
            tokens += batch.idx.numel()
            metrics.append({"step": step + 1, "loss": loss_value})
            if progress.after_step(step + 1, max_steps, save_model, trainer_state):
                wall = time.perf_counter() - t0
                return FinetuneResult(out, Path(progress.saved), step + 1, before, {}, tokens / max(wall, 1e-9),
                                      wall, stopped_by=progress.stopped_by)
    wall = time.perf_counter() - t0
    model.eval()
    after = {"val_loss": completion_loss(model, val_rows, pad)} if val_rows else {}
    if eval_text is not None:
        after["ppl"] = perplexity(model, tokenizer, eval_text)["ppl"]

    def write_out() -> None:
        write_finetune_result(out, init, jsonl, o, chat, model, tokenizer, template, masks, lora, lora_merge,
                              metrics, overwrite or out.exists(), env.world_size)

    main_only(env, write_out)
    log(f"fine-tuned {int(o['max_steps'])} steps in {wall:.1f} s"
        + (f"; completion loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}" if val_rows else ""))
    return FinetuneResult(out, out / "final", int(o["max_steps"]), before, after, tokens / max(wall, 1e-9), wall)


def write_finetune_result(out: Path, init, jsonl, o: dict[str, Any], chat: bool, model, tokenizer, template,
                          masks, lora, lora_merge: bool, metrics: list[dict[str, Any]], overwrite: bool,
                          processes: int) -> None:
    """OUT/final (checkpoint, or adapter) + OUT/metrics.jsonl, written at once; OUT/merged for --lora-merge."""
    from ..fileio import atomic_dir, atomic_write_text
    from .common import copy_model_files

    with atomic_dir(out, overwrite=overwrite) as tmp:  # replaces an interrupted run's steps
        final = tmp / "final"
        final.mkdir()
        extra = {"finetune": {"init": str(init), "jsonl": str(jsonl), "steps": int(o["max_steps"]),
                              "lr": o["lr"], "loss": "assistant turns only" if chat else "completion only",
                              **({"processes": processes} if processes > 1 else {})}}
        if lora is not None:
            from .lora import save_adapter

            save_adapter(model, lora, final)
        else:
            copy_model_files(init, final)
            model.save_pretrained(final, tokenizer=tokenizer if chat else None, extra=extra)
        if template is not None:
            from ..align.chat import save_chat_template

            save_chat_template(final, template)
        if masks:
            save_masks(masks, final)
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    if lora is not None and lora_merge:
        from .lora import merge_checkpoint

        merge_checkpoint(out / "final", out / "merged", base=init, overwrite=True)
