"""Zero/few-shot tasks from local files; each `evaluate_<task>(model, tokenizer, path, ...)` returns a dict."""

from .choice import evaluate_choice
from .classify import evaluate_classify
from .lambada import evaluate_lambada
from .summarize import evaluate_summarize
from .winograd import evaluate_winograd

TASKS = {
    "lambada": evaluate_lambada,
    "winograd": evaluate_winograd,
    "choice": evaluate_choice,
    "classify": evaluate_classify,
    "summarize": evaluate_summarize,
}

__all__ = ["TASKS", "evaluate_choice", "evaluate_classify", "evaluate_lambada", "evaluate_summarize",
           "evaluate_winograd"]
