"""Most-popular-unseen-items baseline: every user gets the items most frequent in the training sequences
(train.parquet: each user's items before the validation target(s)), skipping items already in the user's full
history. A floor every trained model must clear by a clear margin; ranked with the same item-level metrics
(``G = 1``)."""
from __future__ import annotations

import numpy as np

from comeir_dist.config.run import RunConfig
from comeir_dist.data.dataset import read_split
from comeir_dist.eval.metrics import MetricSums, with_clustered_se


def item_popularity(dataset: str) -> np.ndarray:
    """Occurrences of each item in the training sequences, ``[num_items]``."""
    n_items = read_split(dataset, "items").num_rows
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in read_split(dataset, "train").column("items").to_pylist():
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    return counts


def popular_ranks(dataset: str, split: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(user_idx, rank)`` of the baseline on ``split``: the 1-based rank of each user's target among the
    ``depth`` recommendations, 0 = not recommended."""
    counts = item_popularity(dataset)
    order = np.argsort(-counts, kind="stable")  # ties: lower item index first (deterministic)
    table = read_split(dataset, split)
    hists, targets = table.column("history").to_pylist(), np.asarray(table.column("target").to_pylist())
    rank = np.zeros(len(targets), dtype=np.int64)
    # only the first len(history) + depth popular items can matter for a user
    for u, (hist, tgt) in enumerate(zip(hists, targets)):
        seen = set(hist)
        cand = [i for i in order[:len(seen) + depth].tolist() if i not in seen][:depth]
        if tgt in cand:
            rank[u] = cand.index(tgt) + 1
    return table.column("user_idx").to_numpy().astype(np.int64), rank


def _ranked(rank: np.ndarray, depth: int) -> tuple:
    """``(P, G, found, sid_rank)`` of the metrics: one item per recommendation (``G = 1``)."""
    found = rank > 0
    P = np.where(found, rank - 1, depth)
    return P, np.ones_like(P), found, rank


def popular_metrics(cfg: RunConfig, split: str, depth: int | None = None) -> dict:
    """Metric means (+ standard errors) of the baseline on ``split`` (valid / test), over all its users."""
    depth = depth or max(max(cfg.eval.ks), cfg.eval.beam_size)
    users, rank = popular_ranks(cfg.dataset, split, depth)
    ranked = _ranked(rank, depth)
    return with_clustered_se(MetricSums.from_arrays(*ranked, cfg.eval.ks).means(), users, ranked, cfg.eval.ks)


def popular_per_user(dataset: str, split: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(user_idx, values)``: the baseline's per-user ``metric`` (``item/ndcg@10`` ...) on ``split``."""
    from comeir_dist.eval.metrics import per_user_metrics

    depth = int(metric.rsplit("@", 1)[1])  # metrics@K only see the top K
    users, rank = popular_ranks(dataset, split, depth)
    return users, per_user_metrics(*_ranked(rank, depth), (depth,))[metric]
