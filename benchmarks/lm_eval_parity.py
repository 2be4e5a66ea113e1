"""lm-evaluation-harness vs `gpt2kit eval --task lambada` on the same checkpoint and local LAMBADA jsonl.

  python benchmarks/lm_eval_parity.py CKPT FILE.jsonl [--limit N]

lm-eval runs its `hf` model (transformers' GPT2LMHeadModel on CKPT, pretrained=CKPT) on a local task whose
YAML is lambada_openai's (context = the passage up to its last space, target = " " + last word, acc = every
target token greedy, perplexity = exp(-mean per-example target log-likelihood)) with dataset_path json and
data_files pointing at FILE: no network. Prints JSON with both results and whether they agree (acc exactly,
ppl to 1e-4 relative). Needs `pip install lm_eval` (the `lm-eval` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

TASK = "gpt2kit_lambada_local"

# lambada_openai's own template and metrics; only the data source differs (a local jsonl)
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_lambada(ckpt: str | Path, file: str | Path, limit: int | None = None) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, file=Path(file).resolve()))
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={Path(ckpt).resolve()},dtype=float32", tasks=[TASK],
            task_manager=TaskManager(include_path=d), batch_size=1, device="cpu", limit=limit,
            bootstrap_iters=0,
        )
    r = out["results"][TASK]
    return {"acc": r["acc,none"], "ppl": r["perplexity,none"], "examples": out["n-samples"][TASK]["effective"]}


def gpt2kit_lambada(ckpt: str | Path, file: str | Path, limit: int | None = None) -> dict:
    from gpt2kit.eval.tasks.lambada import evaluate_lambada
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    model = GPT2.from_pretrained(ckpt).eval()
    r = evaluate_lambada(model, Tokenizer.from_pretrained(ckpt), file, limit=limit)
    return {"acc": r["acc"], "ppl": r["ppl"], "examples": r["examples"]}


def compare(ckpt: str | Path, file: str | Path, limit: int | None = None) -> dict:
    ours, theirs = gpt2kit_lambada(ckpt, file, limit), lm_eval_lambada(ckpt, file, limit)
    rel = abs(ours["ppl"] - theirs["ppl"]) / theirs["ppl"]
    return {"gpt2kit": ours, "lm_eval": theirs, "ppl_rel_diff": rel,
            "agree": ours["acc"] == theirs["acc"] and ours["examples"] == theirs["examples"] and rel <= 1e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("file")
    ap.add_argument("--limit", type=int)
    a = ap.parse_args()
    print(json.dumps(compare(a.checkpoint, a.file, a.limit), indent=2))


if __name__ == "__main__":
    main()
