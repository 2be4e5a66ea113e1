"""GPT-2 124M on the CPU: training step and prefill, gpt2kit vs nanoGPT's model vs transformers (sdpa).

    python benchmarks/model.py                 # full run (several minutes on 2 cores)
    python benchmarks/model.py --rounds 1 --steps 1 --cases prefill   # quick look

Every (implementation, case) runs in its own subprocess, so peak RSS is that implementation's alone;
rounds interleave the implementations so background load hits them alike. Prints one JSON object:
medians per implementation and case, and ratios vs the faster peer measured in the same run.

Cases (float32, dropout 0, 2 threads unless --threads):
  train-4x256, train-1x1024: one forward + backward + AdamW step (tokens/s, peak RSS)
  prefill-1024: forward of 1024 tokens without grad, logits for the last position only (seconds)

gpt2kit's training steps run as its trainer runs them: fused AdamW and gpt2kit.runtime's glibc malloc
settings (big freed blocks kept for reuse instead of unmapped and page-faulted in again every step);
prefill runs with glibc's defaults, as gpt2kit's inference commands do. The controls
nanogpt-fused (fused AdamW) and nanogpt-tuned (fused AdamW + the same malloc settings) show how much of
the difference is the model itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CASES = {"train-4x256": (4, 256), "train-1x1024": (1, 1024), "prefill-1024": (1, 1024)}
IMPLS = ["gpt2kit", "nanogpt", "nanogpt-fused", "nanogpt-tuned", "transformers"]
PEERS = ("nanogpt", "transformers")  # as their authors ship them; nanogpt-fused/-tuned are controls (see --help)


# ------------------------------------------------------------------------------------------------------
# Peer: nanoGPT's model.py (https://github.com/karpathy/nanoGPT, MIT License, (c) 2022 Andrej Karpathy),
# the network part reproduced as written there (GPT-2 settings: bias=True, vocab 50257), minus from_pretrained,
# estimate_mfu and generate, which the benchmark does not use.
# ------------------------------------------------------------------------------------------------------

def nanogpt_module():
    import inspect
    from dataclasses import dataclass

    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    class LayerNorm(nn.Module):
        """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

        def __init__(self, ndim, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, input):
            return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):

        def __init__(self, config):
            super().__init__()
            assert config.n_embd % config.n_head == 0
            # key, query, value projections for all heads, but in a batch
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
            # output projection
            self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            # regularization
            self.attn_dropout = nn.Dropout(config.dropout)
            self.resid_dropout = nn.Dropout(config.dropout)
            self.n_head = config.n_head
            self.n_embd = config.n_embd
            self.dropout = config.dropout
            # flash attention make GPU go brrrrr but support is only in PyTorch >= 2.0
            self.flash = hasattr(torch.nn.functional, 'scaled_dot_product_attention')
            if not self.flash:
                print("WARNING: using slow attention. Flash Attention requires PyTorch >= 2.0")
                # causal mask to ensure that attention is only applied to the left in the input sequence
                self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                     .view(1, 1, config.block_size, config.block_size))

        def forward(self, x):
            B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

            # calculate query, key, values for all heads in batch and move head forward to be the batch dim
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

            # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
            if self.flash:
                # efficient attention using Flash Attention CUDA kernels
                y = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
            else:
                # manual implementation of attention
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
                att = F.softmax(att, dim=-1)
                att = self.attn_dropout(att)
                y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

            # output projection
            y = self.resid_dropout(self.c_proj(y))
            return y

    class MLP(nn.Module):

        def __init__(self, config):
            super().__init__()
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            x = self.c_fc(x)
            x = self.gelu(x)
            x = self.c_proj(x)
            x = self.dropout(x)
            return x

    class Block(nn.Module):

        def __init__(self, config):
            super().__init__()
            self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
            self.attn = CausalSelfAttention(config)
            self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
            self.mlp = MLP(config)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            x = x + self.mlp(self.ln_2(x))
            return x

    @dataclass
    class GPTConfig:
        block_size: int = 1024
        vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
        n_layer: int = 12
        n_head: int = 12
        n_embd: int = 768
        dropout: float = 0.0
        bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster

    class GPT(nn.Module):

        def __init__(self, config):
            super().__init__()
            assert config.vocab_size is not None
            assert config.block_size is not None
            self.config = config

            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            # with weight tying when using torch.compile() some warnings get generated:
            # "UserWarning: functional_call was passed multiple values for tied weights.
            # This behavior is deprecated and will be an error in future versions"
            # not 100% sure what this is, so far seems to be harmless. TODO investigate
            self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

            # init all weights
            self.apply(self._init_weights)
            # apply special scaled init to the residual projections, per GPT-2 paper
            for pn, p in self.named_parameters():
                if pn.endswith('c_proj.weight'):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        def get_num_params(self, non_embedding=True):
            n_params = sum(p.numel() for p in self.parameters())
            if non_embedding:
                n_params -= self.transformer.wpe.weight.numel()
            return n_params

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets=None):
            device = idx.device
            b, t = idx.size()
            assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
            pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

            # forward the GPT model itself
            tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
            pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
            x = self.transformer.drop(tok_emb + pos_emb)
            for block in self.transformer.h:
                x = block(x)
            x = self.transformer.ln_f(x)

            if targets is not None:
                # if we are given some desired targets also calculate the loss
                logits = self.lm_head(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            else:
                # inference-time mini-optimization: only forward the lm_head on the very last position
                logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
                loss = None

            return logits, loss

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            # start with all of the candidate parameters
            param_dict = {pn: p for pn, p in self.named_parameters()}
            # filter out those that do not require grad
            param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
            # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
            # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
            decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
            nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
            optim_groups = [
                {'params': decay_params, 'weight_decay': weight_decay},
                {'params': nodecay_params, 'weight_decay': 0.0}
            ]
            # Create AdamW optimizer and use the fused version if it is available
            fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
            use_fused = fused_available and device_type == 'cuda'
            extra_args = dict(fused=True) if use_fused else dict()
            optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
            return optimizer

    return GPT, GPTConfig


# ------------------------------------------------------------------------------------------------------
# One measurement, in this (fresh) process
# ------------------------------------------------------------------------------------------------------

def param_groups(model, weight_decay=0.1):
    """nanoGPT's grouping (decay 2-D weights only), shared by every implementation for a fair step."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build(impl: str, optimizer: str):
    """(forward_loss(idx, targets), forward_last(idx), model, optimizer) for one implementation."""
    import torch

    torch.manual_seed(0)
    if impl == "gpt2kit":
        from gpt2kit import GPT2, GPT2Config

        model = GPT2(GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0))
        loss_fn = lambda idx, tgt: model(idx, targets=tgt).loss  # noqa: E731
        last_fn = lambda idx: model(idx, last_only=True).logits  # noqa: E731
    elif impl == "nanogpt":
        GPT, GPTConfig = nanogpt_module()
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, bias=True, dropout=0.0))
        loss_fn = lambda idx, tgt: model(idx, tgt)[1]  # noqa: E731
        last_fn = lambda idx: model(idx)[0]  # noqa: E731
    elif impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.config._attn_implementation == "sdpa"
        loss_fn = lambda idx, tgt: model(idx, labels=tgt).loss  # noqa: E731
        last_fn = lambda idx: model(idx, logits_to_keep=1, use_cache=False).logits  # noqa: E731
    else:
        raise SystemExit(f"unknown implementation {impl!r}")
    if impl == "nanogpt" and optimizer == "default":
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    else:
        fused = {"fused": True} if optimizer == "fused" else {}
        opt = torch.optim.AdamW(param_groups(model), lr=6e-4, betas=(0.9, 0.95), **fused)
    return loss_fn, last_fn, model, opt


def worker(impl: str, case: str, steps: int, threads: int, optimizer: str, malloc: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    if malloc:  # what gpt2kit's trainer does in its process (gpt2kit.runtime)
        from gpt2kit.runtime import retain_freed_memory

        assert retain_freed_memory(), "malloc tuning did not apply on this system"
    B, T = CASES[case]
    loss_fn, last_fn, model, opt = build(impl, optimizer)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (B, T), generator=g)
    times, cpu_times = [], []
    if case.startswith("train"):
        model.train()
        # transformers shifts labels inside; give the others the same next-token targets
        targets = idx if impl == "transformers" else torch.cat([idx[:, 1:], idx[:, :1]], dim=1)
        for step in range(steps + 1):  # the first step warms up (allocations, optimizer state)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = loss_fn(idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        result = {"tokens_per_s": B * T / statistics.median(times), "loss": float(loss)}
    else:
        model.eval()
        with torch.no_grad():
            for step in range(steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                logits = last_fn(idx)
                if step:
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
        assert logits.shape[-1] == 50257 and logits.shape[1] == 1
        result = {"seconds": statistics.median(times)}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result | {"impl": impl, "case": case, "times": times, "cpu_times": cpu_times,
                     "peak_rss_gib": peak_rss / 2**30, "malloc_tuning": malloc}


# ------------------------------------------------------------------------------------------------------
# Driver: interleaved rounds of subprocesses
# ------------------------------------------------------------------------------------------------------

def run_one(impl, case, args, optimizer, malloc) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, case, "--steps", str(args.steps),
           "--threads", str(args.threads), "--optimizer", optimizer] + (["--malloc-tuning"] if malloc else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + ["gpt2kit-plain-adamw"],
                    help="gpt2kit steps with fused AdamW and the glibc malloc settings of gpt2kit.runtime "
                         "(as gpt2kit's trainer does); nanogpt with its own configure_optimizers (on CPU: "
                         "torch's default AdamW); controls that separate model gains from the rest: "
                         "nanogpt-fused = nanoGPT's model with fused AdamW, nanogpt-tuned = that plus "
                         "gpt2kit's malloc settings, gpt2kit-plain-adamw = gpt2kit with torch's default "
                         "AdamW (and malloc settings)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one subprocess per impl each)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--malloc-tuning", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads, args.optimizer, args.malloc_tuning)))
        return

    runs: dict[tuple[str, str], list[dict]] = {}
    for case in args.cases:
        impls = [i for i in args.impls
                 if not (case.startswith("prefill") and i in ("nanogpt-fused", "nanogpt-tuned", "gpt2kit-plain-adamw"))]
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[: r % len(impls)]  # rotate who goes first
            for impl in order:
                base, optimizer = impl, "default"
                if impl in ("gpt2kit", "nanogpt-fused", "nanogpt-tuned"):
                    base, optimizer = impl.removesuffix("-fused").removesuffix("-tuned"), "fused"
                elif impl == "gpt2kit-plain-adamw":
                    base = "gpt2kit"
                # gpt2kit's trainer sets glibc's malloc for training; inference leaves it alone
                malloc = case.startswith("train") and (base == "gpt2kit" or impl == "nanogpt-tuned")
                res = run_one(base, case, args, optimizer, malloc)
                runs.setdefault((impl, case), []).append(res)
                print(f"{case:13s} {impl:16s} " + (f"{res['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in res
                      else f"{res['seconds']:.3f} s") + f"  peak RSS {res['peak_rss_gib']:.2f} GiB", file=sys.stderr)

    summary: dict[str, dict] = {}
    for (impl, case), rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        cpu = [t for r in rs for t in r["cpu_times"]]
        entry = {"median_step_s": statistics.median(times), "all_step_s": [round(t, 3) for t in times],
                 "median_cpu_s": statistics.median(cpu), "all_cpu_s": [round(t, 3) for t in cpu],
                 "peak_rss_gib": round(max(r["peak_rss_gib"] for r in rs), 3)}
        if case.startswith("train"):
            B, T = CASES[case]
            entry["tokens_per_s"] = round(B * T / entry["median_step_s"], 1)
            # process CPU time / threads: what the step costs with the cores to itself (shared machine)
            entry["tokens_per_s_cpu_time"] = round(B * T * args.threads / entry["median_cpu_s"], 1)
        summary.setdefault(case, {})[impl] = entry
    for entries in summary.values():
        peers = {k: v for k, v in entries.items() if k in PEERS}
        if not peers or "gpt2kit" not in entries:
            continue
        ours = entries["gpt2kit"]
        ratios = {}
        for clock in ("median_step_s", "median_cpu_s"):
            fastest = min(peers, key=lambda k: peers[k][clock])  # noqa: B023
            ratios[clock] = {
                "faster_peer": fastest,
                "speed_vs_faster_peer": round(peers[fastest][clock] / ours[clock], 3),
                **{f"speed_vs_{k}": round(v[clock] / ours[clock], 3) for k, v in entries.items() if k != "gpt2kit"},
            }
        ratios["peak_rss_vs_nanogpt"] = (round(ours["peak_rss_gib"] / entries["nanogpt"]["peak_rss_gib"], 3)
                                         if "nanogpt" in entries else None)
        entries["ratios"] = ratios
    import torch

    print(json.dumps({
        "benchmark": "model",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "loadavg_at_end": os.getloadavg()},
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "rounds": args.rounds, "steps_per_process": args.steps,
        "results": summary,
    }, indent=2))


if __name__ == "__main__":
    main()
