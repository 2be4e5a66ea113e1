"""2 CPU ranks (Gloo): FSDP built on the meta device (`shard_from_meta`) equals FSDP built from a full model.

    python meta_init.py OUT_DIR

Each rank builds the same tiny GPT-2 twice: the existing way (the full model on every rank, then
`wrap_model(..., "fsdp")`) and with `shard_from_meta` (meta device, fully_shard, to_empty, rank 0's
full state broadcast), once from a fresh seeded initialisation and once from a checkpoint; both then
train the same 5 steps. Rank 0 writes OUT_DIR/meta_init.json: the largest parameter differences, the
losses, whether the head stayed tied, and the bytes of parameter storage each rank held for the meta
model before its shards were filled. The test checks them; this script asserts nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import distributed as D

STEPS = 5
SEED = 7


def config() -> GPT2Config:  # an odd vocabulary: uneven dim-0 shards of the tied embedding
    return GPT2Config.from_preset("gpt2-tiny", vocab_size=257, eos_token_id=256, n_ctx=32, dropout=0.0,
                                  attn_dropout=0.0)


def fresh() -> GPT2:
    torch.manual_seed(SEED)
    return GPT2(config())


def train(model, env) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(99)
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, 257, (4, 17), generator=g)[env.rank * 2 : env.rank * 2 + 2]
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_mean(loss.item(), env))
    return losses


def local_bytes(model) -> int:
    return sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
               for p in model.parameters())


def worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.init_distributed("cpu", timeout_s=120)
    report: dict = {}
    for case, load in (("fresh", None), ("checkpoint", out / "ckpt")):
        ref = D.wrap_model(fresh() if load is None else GPT2.from_pretrained(load), "fsdp", env)
        built: list[str] = []

        def build(built=built):
            m = GPT2(config())  # the checkpoint's shape; its weights come from full_state
            built.append(str(next(m.parameters()).device))
            return m

        def full_state(load=load):
            return (fresh() if load is None else GPT2.from_pretrained(load)).state_dict()

        meta = D.shard_from_meta(build, full_state, env)
        a, b = D.gather_full_state_dict(ref), D.gather_full_state_dict(meta)
        bare = D.unwrap(meta)
        report[case] = {
            "built_on": built,
            "init_max_diff": max((a[k] - b[k]).abs().max().item() for k in a) if env.is_main else None,
            "same_keys": sorted(a) == sorted(b),
            "tied": bare.lm_head.weight is bare.transformer.wte.weight,
            "local_param_bytes": local_bytes(meta),
            "full_param_bytes": sum(p.numel() * 4 for p in fresh().parameters()),
        }
        la, lb = train(ref, env), train(meta, env)
        a, b = D.gather_full_state_dict(ref), D.gather_full_state_dict(meta)
        report[case].update(losses_ref=la, losses_meta=lb,
                            trained_max_diff=max((a[k] - b[k]).abs().max().item() for k in a) if env.is_main else None)
        per_rank = [None, None]
        torch.distributed.all_gather_object(per_rank, report[case]["local_param_bytes"])
        report[case]["local_param_bytes"] = per_rank
    if env.is_main:
        (out / "meta_init.json").write_text(json.dumps(report))
    D.cleanup()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(123)
    GPT2(config()).save_pretrained(out / "ckpt")  # a checkpoint unlike the fresh initialisation
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port, out), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
