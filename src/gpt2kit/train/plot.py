"""Loss and learning-rate curves of one or more runs (from their metrics.jsonl), as one PNG.

Three panels: training loss (and validation loss as markers) against the step, the learning rate, and
validation bits per character, one colour per run, so runs with different settings compare at a glance.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_bytes, iter_jsonl


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, evaluation rows) of a run directory's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a gpt2kit run directory?")
    train, evals = [], []
    for _, row in iter_jsonl(path):
        if "val_loss" in row:
            evals.append(row)
        elif "loss" in row:
            train.append(row)
    if not train and not evals:
        raise UserError(f"{path} holds no metrics yet")
    return train, evals


def plot_runs(runs: list[str | Path], out: str | Path, smooth: int = 1) -> Path:
    """Write the curves of `runs` to the PNG `out` (atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(Path(r), *read_metrics(r)) for r in runs]
    fig, (ax_loss, ax_lr, ax_bpc) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (run, train, evals) in enumerate(data):
        color = f"C{i % 10}"
        label = run.name or str(run)
        if train:
            steps = [r["step"] for r in train]
            ax_loss.plot(steps, _moving_average([r["loss"] for r in train], smooth), color=color, lw=1.2,
                         label=f"{label} train")
            ax_lr.plot(steps, [r["lr"] for r in train], color=color, lw=1.2, label=label)
        if evals:
            steps = [r["step"] for r in evals]
            ax_loss.plot(steps, [r["val_loss"] for r in evals], "o--", color=color, ms=4, label=f"{label} val")
            if all("val_bpc" in r for r in evals):
                ax_bpc.plot(steps, [r["val_bpc"] for r in evals], "o-", color=color, ms=4, label=label)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_bpc.set(xlabel="step", ylabel="bits per character", title="validation bits per character")
    for ax in (ax_loss, ax_lr, ax_bpc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)


def _moving_average(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
