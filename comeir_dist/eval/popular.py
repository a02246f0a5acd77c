"""Most-popular-unseen-items baseline: every user gets the items most frequent in the training sequences
(all but each user's last two items), skipping items already in the user's full history. A floor every
trained model must clear by a clear margin; ranked with the same item-level metrics (``G = 1``)."""
from __future__ import annotations

import numpy as np

from comeir_dist.config.run import RunConfig
from comeir_dist.data.dataset import read_split
from comeir_dist.eval.metrics import MetricSums


def item_popularity(dataset: str) -> np.ndarray:
    """Occurrences of each item in the training sequences, ``[num_items]``."""
    n_items = read_split(dataset, "items").num_rows
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in read_split(dataset, "train").column("items").to_pylist():
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    return counts


def popular_metrics(cfg: RunConfig, split: str, depth: int | None = None) -> dict:
    """Metric means (+ standard errors) of the baseline on ``split`` (valid / test), over all its users."""
    ks = cfg.eval.ks
    depth = depth or max(max(ks), cfg.eval.beam_size)
    counts = item_popularity(cfg.dataset)
    order = np.argsort(-counts, kind="stable")  # ties: lower item index first (deterministic)
    table = read_split(cfg.dataset, split)
    hists, targets = table.column("history").to_pylist(), np.asarray(table.column("target").to_pylist())
    rank = np.zeros(len(targets), dtype=np.int64)  # 1-based rank of the target among the recommendations, 0 = miss
    # only the first len(history) + depth popular items can matter for a user
    for u, (hist, tgt) in enumerate(zip(hists, targets)):
        seen = set(hist)
        cand = [i for i in order[:len(seen) + depth].tolist() if i not in seen][:depth]
        if tgt in cand:
            rank[u] = cand.index(tgt) + 1
    found = rank > 0
    P = np.where(found, rank - 1, depth)
    sums = MetricSums.from_arrays(P, np.ones_like(P), found, rank, ks)
    return sums.means()
