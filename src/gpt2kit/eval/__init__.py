"""Evaluation: language-modelling metrics over text files and zero/few-shot tasks from local files.

- `metrics`: cross-entropy, perplexity, bits per character/byte, word perplexity from one summed NLL.
- `perplexity`: sliding-window (Hugging Face) and document (lm-evaluation-harness) perplexity of a text.
- `scoring`: batched log-likelihood of continuations given contexts, the core every task shares.
- `tasks`: LAMBADA, Winograd, multiple choice, classification by prompting, summarization.
- `report`: results as JSON and a Markdown table.
"""

from .metrics import LMStats
from .perplexity import evaluate_text
from .scoring import Request, Score, score_requests

__all__ = ["LMStats", "Request", "Score", "evaluate_text", "score_requests"]
