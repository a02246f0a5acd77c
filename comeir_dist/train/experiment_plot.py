"""`OUT/results.png`: validation NDCG@10 against epochs for every run of an experiment (one colour per
label, one line per seed), with each label's test NDCG@10 in the legend and the popular baseline as a line."""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

log = logging.getLogger(__name__)


def plot_results(rows: list[dict], path: Path) -> None:
    from comeir_dist.utils.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = sorted({r["label"] for r in rows})
    # distinct colours and line styles: a table quickly holds more settings than a 10-colour map
    n_colours = 10 if len(labels) <= 10 else 20
    colours = plt.get_cmap("tab10" if n_colours == 10 else "tab20")
    styles = ["-", "--", ":"]
    for i, label in enumerate(labels):
        rs = [r for r in rows if r["label"] == label]
        test = statistics.fmean(r["metrics"]["item/ndcg@10"] for r in rs)
        name = f"{label} (test {test:.4f}, {len(rs)} seed{'s' if len(rs) > 1 else ''})"
        if not rs[0]["validation"]:  # no training: a horizontal reference line
            ax.axhline(rs[0]["valid_best"], color="grey", ls=":", label=name)
            continue
        for j, r in enumerate(rs):
            per_step = r["train"]["batch_size"] / max(1, r.get("train_samples") or _samples(r))
            xs = [v["step"] * per_step for v in r["validation"]]
            ax.plot(xs, [v["item/ndcg@10"] for v in r["validation"]], color=colours(i % n_colours), marker=".",
                    ls=styles[(i // n_colours) % len(styles)], alpha=1.0 if j == 0 else 0.5,
                    label=name if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation item NDCG@10 (all users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _samples(r: dict) -> int:
    """Training samples from the best step and epoch recorded in a result row."""
    return round(r["best_step"] * r["train"]["batch_size"] / r["best_epoch"]) if r.get("best_epoch") else 1
