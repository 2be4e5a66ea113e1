"""The alignment path end to end on a tiny model, with data built from a rule: SFT -> RM -> DPO -> RLHF.

  python benchmarks/alignment.py [--out DIR] [--plot docs/align_curves.png] [--algo rloo|ppo]
                                 [--rl-reward rule|rm] [--stages sft,rm,dpo,rl] [--memory | --memory-only]

The language: sentences "the <animal> <verb> on the <place>." The prompt asks for an animal in one of
four wordings ("write about the cat:", "tell me of the cat:", ...). SFT teaches the form only (its
completion names a random animal), so the SFT model is indifferent to the request: preference accuracy
~0.5. The rule: a completion that is a sentence of the language about the requested animal. Pairs: the
chosen completion uses the requested animal; the rejected one is the same sentence with another animal
(same length, so the per-token log-prob comparison is fair).
Reported (JSON): reward model held-out pair accuracy; DPO held-out preference accuracy of the policy
(chosen gets the higher per-token log-prob) before/after; RLHF (RLOO by default, or PPO) on the rule
itself (`--rl-reward rule`, a module:function reward; default) or on the reward model: the KL to the
reference of every step against its target, and the rule's reward (and the RM's score) of 128 fresh
samples of the SFT and the RL policy on 8 held-out prompts (animal + wording pairs never sampled in RL
training, which uses the other 24) and on the training prompts.
--stages: the stages to run; the others reuse what an earlier run left in --out.
--memory: peak RSS of DPO (precomputed reference log-probs) next to a plain fine-tune of the same model
(one model in memory each) on a 50257-token vocabulary model, in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANIMALS = ["cat", "dog", "bird", "fish", "cow", "fox", "owl", "pig"]
VERBS = ["sat", "ran", "slept", "sang", "hid", "stood"]
PLACES = ["mat", "hill", "log", "box", "road", "roof"]


def sentence(rng: random.Random, animal: str) -> str:
    return f" the {animal} {rng.choice(VERBS)} on the {rng.choice(PLACES)}."


# how a request is worded. RLHF trains on 24 of the 32 (animal, wording) prompts and is measured on the
# other 8 (each animal once, each wording twice): prompts it never sampled in training
PHRASINGS = ["write about the {}:", "tell me of the {}:", "a line on the {}:", "now the {}:"]


def prompt_for(animal: str, phrasing: str = PHRASINGS[0]) -> str:
    return phrasing.format(animal)


HELD_OUT_PROMPTS = [prompt_for(a, PHRASINGS[i % len(PHRASINGS)]) for i, a in enumerate(ANIMALS)]
RL_PROMPTS = [prompt_for(a, f) for f in PHRASINGS for a in ANIMALS if prompt_for(a, f) not in HELD_OUT_PROMPTS]


def build_data(d: Path, seed: int) -> dict[str, Path]:
    rng = random.Random(seed)
    sft, pairs = [], []
    for _ in range(800):
        a = rng.choice(ANIMALS)
        sft.append({"prompt": prompt_for(a, rng.choice(PHRASINGS)), "completion": sentence(rng, rng.choice(ANIMALS))})
    for _ in range(600):
        a = rng.choice(ANIMALS)
        other = rng.choice([x for x in ANIMALS if x != a])
        s = sentence(rng, a)
        pairs.append({"prompt": prompt_for(a, rng.choice(PHRASINGS)), "chosen": s,
                      "rejected": s.replace(f" {a} ", f" {other} ", 1)})
    # for the reward model only (--rm-negatives): the chosen sentence against its own words shuffled,
    # against a word repeated and against a prefix of it, so word salad and cut-off sentences, which the
    # animal rule alone never shows, are ranked low
    extra = []
    for r in pairs[:300]:
        words = r["chosen"].split()
        salad = words[:]
        rng.shuffle(salad)
        extra.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": " " + " ".join(salad)})
        i = rng.randrange(len(words))
        extra.append({"prompt": r["prompt"], "chosen": r["chosen"],
                      "rejected": " " + " ".join(words[:i + 1] + [words[i]] * 3 + words[i + 1:])})
        # a sentence cut short (RL against an RM without these finds "the." / "." first)
        extra.append({"prompt": r["prompt"], "chosen": r["chosen"],
                      "rejected": " " + " ".join(words[:rng.randrange(1, len(words))]) + rng.choice([".", ""])})
    files = {"sft": d / "sft.jsonl", "pairs": d / "pairs.jsonl", "rm_pairs": d / "rm_pairs.jsonl",
             "rl_prompts": d / "rl_prompts.jsonl"}
    files["rl_prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in RL_PROMPTS))
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    files["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    files["rm_pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs + extra))
    return files


SENTENCE = re.compile(rf" the ({'|'.join(ANIMALS)}) ({'|'.join(VERBS)}) on the ({'|'.join(PLACES)})\.")


def rule_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion is one sentence of the language, word for word, about the requested animal;
    else 0 (so word salad that merely contains the animal scores 0 too)."""
    out = []
    for p, c in zip(prompts, completions):
        want = p.rsplit(" ", 1)[-1].rstrip(":")
        m = SENTENCE.fullmatch(c)
        out.append(1.0 if m is not None and m.group(1) == want else 0.0)
    return out


def base_checkpoint(d: Path, seed: int) -> Path:
    import torch

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    rng = random.Random(seed)
    texts = [prompt_for(a, f) + sentence(rng, a) for a in ANIMALS for f in PHRASINGS for _ in range(5)]
    tok = Tokenizer.train(texts, vocab_size=320)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_ctx=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                     attn_dropout=0.0, eos_token_id=tok.eos_id)
    GPT2(cfg).save_pretrained(d / "base", tokenizer=tok)
    return d / "base"


def fresh_samples(work: Path, sft: Path, rl_dir: Path, algo: str, n: int = 128) -> dict:
    """The rule's reward (and the reward model's score, when there is one) of n fresh samples of the SFT
    and RL policies, on the held-out prompts (never sampled in RL training) and on the training prompts."""
    from gpt2kit.align.reward import load_reward_model, score_texts
    from gpt2kit.align.rlhf import sample
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(sft)
    rm = load_reward_model(work / "rm")[0] if (work / "rm" / "config.json").is_file() else None
    out: dict = {}
    for split, pool in (("held_out", HELD_OUT_PROMPTS), ("train", RL_PROMPTS)):
        prompts = [pool[i % len(pool)] for i in range(n)]
        for name, ck in (("sft", sft), (algo, rl_dir)):
            _, comps = sample(GPT2.from_pretrained(ck), tok, prompts, 16, seed=123)
            texts = [tok.decode([t for t in c if t != tok.eos_id]) for c in comps]
            out[f"rule_reward_{split}_{name}"] = sum(rule_reward(prompts, texts)) / n
            if rm is not None:
                out[f"rm_score_{split}_{name}"] = float(score_texts(rm, tok, prompts, texts).mean())
            if split == "held_out":
                out[f"examples_{name}"] = [prompts[i] + texts[i] for i in range(3)]
    return out


def metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot(out_png: Path, rm_rows, dpo_rows, rl_rows, kl_target: float, algo: str, reward_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    rows = [r for r in rm_rows if "loss" in r]
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax[0].plot([r["step"] for r in rows], [r["accuracy"] for r in rows], label="batch pair accuracy")
    ax[0].set_title("reward model (Bradley-Terry)")
    rows = [r for r in dpo_rows if "loss" in r]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        ax[1].plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
    ax[1].set_title("DPO (sigmoid, beta 0.1)")
    rows = [r for r in rl_rows if "kl" in r]
    x, y = [r["step"] for r in rows], [r["reward"] for r in rows]
    ax[2].plot(x, y, color="tab:blue", alpha=0.25, lw=0.6, label=f"reward ({reward_name}) of the step's samples")
    w = max(1, len(y) // 50)  # a running mean: one step's 0/1 rewards are noisy
    ax[2].plot(x[w - 1:], [sum(y[i - w + 1:i + 1]) / w for i in range(w - 1, len(y))], color="tab:blue",
               label=f"running mean of {w} steps")
    ax2 = ax[2].twinx()
    ax2.plot([r["step"] for r in rows], [r["kl"] for r in rows], color="tab:red", label="KL to reference")
    ax2.axhline(kl_target, color="tab:red", ls="--", lw=0.8, label="KL target")
    ax2.plot([r["step"] for r in rows], [10 * r["kl_coef"] for r in rows], color="tab:purple", ls=":",
             label="10 x kl_coef")
    ax2.set_ylabel("KL (nats per sample)")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="lower right", fontsize=8)
    ax[2].set_title(f"{algo.upper()} vs the {reward_name}")
    for a in ax:
        a.set_xlabel("step")
        a.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)


MEMORY_CHILD = """
import resource, sys, torch
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.tokenizer import Tokenizer
kind, d, data = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
o = {"max_steps": 3, "batch_size": 4, "block_size": 32, "warmup_steps": 1}
if kind == "dpo":
    from gpt2kit.align.dpo import train_dpo
    train_dpo(d + "/big", data, d + "/out-dpo", overrides=o, val_fraction=0.0, log=lambda m: None)
else:
    from gpt2kit.post.finetune import finetune_jsonl
    finetune_jsonl(d + "/big", data, d + "/out-ft", overrides=o, val_fraction=0.0, log=lambda m: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def memory(d: Path, pairs: Path) -> dict:
    """Peak RSS (MiB) of DPO and of a plain fine-tune (one model + AdamW each) of the same model."""
    import torch

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(d / "base")
    cfg = GPT2Config(vocab_size=50257, n_ctx=64, n_layer=4, n_head=8, n_embd=512, dropout=0.0, attn_dropout=0.0,
                     eos_token_id=tok.eos_id)
    big = GPT2(cfg)
    big.save_pretrained(d / "big", tokenizer=tok)
    n = big.num_params()
    sft = d / "pairs-as-sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                           for r in metrics(pairs)))
    del big
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out = {"params": n, "weights_mib": n * 4 / 2**20}
    for kind, data in (("finetune", sft), ("dpo", pairs)):
        r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(d), str(data)], capture_output=True,
                           text=True, check=True)
        out[f"{kind}_peak_rss_mib"] = float(r.stdout.strip().splitlines()[-1])
    out["dpo_minus_finetune_mib"] = out["dpo_peak_rss_mib"] - out["finetune_peak_rss_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--plot", type=Path, default=Path("docs/align_curves.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default="sft,rm,dpo,rl", help="comma list; the others reuse --out's results")
    ap.add_argument("--algo", choices=("ppo", "rloo"), default="rloo")
    ap.add_argument("--rl-reward", choices=("rule", "rm"), default="rule",
                    help="what RLHF maximises: the rule itself (a module:function reward), or the reward model")
    ap.add_argument("--rl-steps", type=int, default=1000)
    ap.add_argument("--rl-batch", type=int, default=16, help="prompts per RLHF step (x --k samples each)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--rl-lr", type=float, default=2e-3)
    ap.add_argument("--rl-warmup", type=int, default=50,
                    help="linear warm-up steps of the RL learning rate (5: a KL spike in AdamW's first steps)")
    ap.add_argument("--rl-seed", type=int, default=1337, help="the RL stage's seed (prompt draws, sampling)")
    ap.add_argument("--kl-coef", type=float, default=0.1, help="the KL coefficient (the adaptive controller's start)")
    ap.add_argument("--kl-target", type=float, default=6.0, help="KL per sample (nats) the run must stay under")
    ap.add_argument("--adaptive-kl", action="store_true",
                    help="adapt the coefficient toward --kl-target (Ziegler et al.); default: fixed --kl-coef")
    ap.add_argument("--kl-horizon", type=int, default=10000)
    ap.add_argument("--rm-steps", type=int, default=300)
    ap.add_argument("--rm-negatives", action="store_true",
                    help="train the reward model also on word-salad / repetition rejections of chosen sentences")
    ap.add_argument("--memory", action="store_true", help="also measure DPO's peak RSS (fresh processes)")
    ap.add_argument("--memory-only", action="store_true", help="only the DPO peak RSS measurement")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from gpt2kit.align.dpo import train_dpo
    from gpt2kit.align.reward import train_reward
    from gpt2kit.align.rlhf import train_rlhf
    from gpt2kit.post.finetune import finetune_jsonl

    stages = set(args.stages.split(","))
    work = args.out or Path(tempfile.mkdtemp(prefix="gpt2kit-align-"))
    work.mkdir(parents=True, exist_ok=True)
    quiet = lambda m: None  # noqa: E731
    t_all = time.perf_counter()
    files = build_data(work, args.seed)
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stages": sorted(stages)}
    if args.memory_only:
        base_checkpoint(work, args.seed)
        print(json.dumps(report | {"dpo_memory": memory(work, files["pairs"])}, indent=2))
        return
    sft = work / "sft" / "final"
    if "sft" in stages:
        base = base_checkpoint(work, args.seed)
        t0 = time.perf_counter()
        ft = finetune_jsonl(base, files["sft"], work / "sft", {"max_steps": 300, "lr": 3e-3, "warmup_steps": 20,
                                                               "batch_size": 32, "block_size": 64}, log=quiet,
                            overwrite=True)
        report["sft"] = {"completion_loss_before": ft.before["val_loss"],
                         "completion_loss_after": ft.after["val_loss"], "wall_s": time.perf_counter() - t0}
    if "rm" in stages:
        t0 = time.perf_counter()
        rm = train_reward(sft, files["rm_pairs" if args.rm_negatives else "pairs"], work / "rm",
                          {"max_steps": args.rm_steps, "lr": 1e-3, "warmup_steps": 20, "batch_size": 32},
                          val_fraction=0.2, overwrite=True, log=quiet)
        report["reward_model"] = {"data": "pairs + word salad, repeats, cut-offs" if args.rm_negatives else "pairs",
                                  "steps": args.rm_steps,
                                  "val_accuracy_before": rm["val_accuracy_before"],
                                  "val_accuracy_after": rm["val_accuracy_after"], "wall_s": time.perf_counter() - t0}
    if "dpo" in stages:
        t0 = time.perf_counter()
        dpo = train_dpo(sft, files["pairs"], work / "dpo", beta=0.1, overrides={"max_steps": 300, "lr": 1e-3,
                                                                                "warmup_steps": 10, "batch_size": 16},
                        val_fraction=0.2, overwrite=True, log=quiet)
        report["dpo"] = {"val_pref_accuracy_before": dpo["pref_accuracy_before"],
                         "val_pref_accuracy_after": dpo["pref_accuracy_after"],
                         "val_rewards/accuracies_after": dpo["rewards/accuracies_after"],
                         "wall_s": time.perf_counter() - t0}
    rl_dir = work / f"rl-{args.algo}-{args.rl_reward}"
    if "rl" in stages:
        t0 = time.perf_counter()
        reward = str(work / "rm") if args.rl_reward == "rm" else rule_reward
        rl = train_rlhf(sft, reward, rl_dir, algo=args.algo, prompts_file=files["rl_prompts"], k=args.k,
                        kl_coef=args.kl_coef, kl_target=args.kl_target, adaptive_kl=args.adaptive_kl,
                        kl_horizon=args.kl_horizon, max_new_tokens=16, eval_samples=128, overwrite=True, log=quiet,
                        overrides={"max_steps": args.rl_steps, "lr": args.rl_lr, "warmup_steps": args.rl_warmup,
                                   "batch_size": args.rl_batch, "schedule": "constant", "seed": args.rl_seed})
        steps = [r for r in metrics(rl_dir / "metrics.jsonl") if "kl" in r]
        report["rlhf"] = {"algo": args.algo, "reward": args.rl_reward, "train_prompts": len(RL_PROMPTS),
                          "reward_before": rl["reward_before"], "reward_after": rl["reward_after"],
                          "kl_target": args.kl_target, "kl_max_over_steps": max(r["kl"] for r in steps),
                          "kl_last10": rl["kl_last"], "steps_over_target": sum(r["kl"] > args.kl_target for r in steps),
                          "adaptive_kl": args.adaptive_kl, "kl_coef_start": args.kl_coef,
                          "kl_coef_final": rl["kl_coef_final"], "samples_per_step": args.rl_batch * args.k,
                          "steps": args.rl_steps, "lr": args.rl_lr, "warmup": args.rl_warmup, "seed": args.rl_seed,
                          "wall_s": time.perf_counter() - t0}
        report["rlhf"]["fresh_samples"] = fresh_samples(work, sft, rl_dir, args.algo)
    report["total_wall_s"] = time.perf_counter() - t_all
    report["total_wall_s"] = time.perf_counter() - t_all
    if args.plot and (work / "rm" / "metrics.jsonl").is_file() and (work / "dpo" / "metrics.jsonl").is_file() \
            and (rl_dir / "metrics.jsonl").is_file():
        plot(args.plot, metrics(work / "rm" / "metrics.jsonl"), metrics(work / "dpo" / "metrics.jsonl"),
             metrics(rl_dir / "metrics.jsonl"), args.kl_target, args.algo,
             "reward model" if args.rl_reward == "rm" else "rule")
        report["plot"] = str(args.plot)
    if args.memory:
        report["dpo_memory"] = memory(work, files["pairs"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
