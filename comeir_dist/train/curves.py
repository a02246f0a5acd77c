"""``RUN/train_curves.png``: training loss and validation metrics against the step, from ``train_log.jsonl``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

VALID_KEYS = ("item/ndcg@10", "item/hit@10")


def read_train_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(loss records, validation records) of a run's ``train_log.jsonl``."""
    losses, valid = [], []
    from comeir_dist.utils import jsonl

    for rec in jsonl.read(path):  # a torn last line (interrupted append) is skipped with a warning
        if "loss" in rec:
            losses.append(rec)
        elif "valid" in rec:
            valid.append({"step": rec["step"], **rec["valid"]})
    return losses, valid


def plot_training_curves(run_dir: str | Path, title: Optional[str] = None) -> Optional[Path]:
    """Write ``run_dir/train_curves.png``; returns its path, or None when the log has no records yet."""
    from comeir_dist.utils.plotting import pyplot, save_figure

    run_dir = Path(run_dir)
    losses, valid = read_train_log(run_dir / "train_log.jsonl")
    if not losses and not valid:
        return None
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    if losses:
        ax_loss.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (Eq. 12)")
    ax_loss.grid(True, alpha=0.3)
    for key in VALID_KEYS:
        pts = [(r["step"], r[key]) for r in valid if key in r]
        if pts:
            ax_val.plot(*zip(*pts), "o-", label=f"valid {key}")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation metric")
    ax_val.grid(True, alpha=0.3)
    if valid:
        ax_val.legend(fontsize=8)
    fig.suptitle(title or run_dir.name, fontsize=10)
    out = run_dir / "train_curves.png"
    save_figure(fig, out)
    return out
