"""Hit@K / NDCG@K at item level (collision-corrected, primary) and SID level (DESIGN "Evaluation protocol").

Inputs per user (see :mod:`comeir_dist.eval.ranking`): ``P`` items ranked strictly ahead of the target's
tie group, ``G`` items in the group (the target's SID collision group), ``found`` (target's SID among the
beams) and ``sid_rank`` (1-based position of the target's SID among the beams, 0 if not found).

Item level - expected value when the target is placed uniformly at random inside its tie group, i.e. at
positions ``P+1 .. P+G``:

    Hit@K  = min(G, max(0, K-P)) / G
    NDCG@K = (1/G) * sum_{i=1}^{min(G, K-P)} 1 / log2(P + i + 1)          (0 if K <= P or not found)

(one relevant item, so the ideal DCG is 1). Without collisions (``G = 1``) these are the usual metrics
with rank ``P + 1``.

SID level - ``Hit@K = [sid_rank <= K]``, ``NDCG@K = 1/log2(sid_rank + 1)`` if hit (0 if not found).

All functions are vectorised over users (numpy; torch tensors are accepted). For sharded evaluation use
:class:`MetricSums`: per-shard sums of per-user values plus user counts, merged by addition and divided
only at the end, so the merged result equals the single-process result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "item_hit_at_k",
    "item_ndcg_at_k",
    "sid_hit_at_k",
    "sid_ndcg_at_k",
    "per_user_metrics",
    "compute_metrics",
    "MetricSums",
    "metric_keys",
    "clustered_standard_errors",
    "repeated",
    "with_clustered_se",
]


def _np(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(dtype, copy=False).reshape(-1)


def _check_k(k: int) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return k


def item_hit_at_k(P, G, found, k: int) -> np.ndarray:
    """Collision-corrected item Hit@K per user: ``min(G, max(0, K-P)) / G`` (0 if not found)."""
    k = _check_k(k)
    P, G, found = _np(P, np.int64), _np(G, np.int64), _np(found, bool)
    Gs = np.maximum(G, 1)
    m = np.minimum(Gs, np.maximum(0, k - P))
    return np.where(found & (G > 0), m / Gs, 0.0)


def item_ndcg_at_k(P, G, found, k: int) -> np.ndarray:
    """Collision-corrected item NDCG@K per user: ``(1/G) sum_{i=1}^{min(G,K-P)} 1/log2(P+i+1)``."""
    k = _check_k(k)
    P, G, found = _np(P, np.int64), _np(G, np.int64), _np(found, bool)
    Gs = np.maximum(G, 1)
    m = np.minimum(Gs, np.maximum(0, k - P))                      # number of group positions inside top-K
    i = np.arange(1, k + 1, dtype=np.int64)                       # m <= K
    pos = P[:, None] + i[None, :] + 1                             # log2 argument, >= 2 where used
    gains = np.where(i[None, :] <= m[:, None], 1.0 / np.log2(np.maximum(pos, 2)), 0.0)
    return np.where(found & (G > 0), gains.sum(1) / Gs, 0.0)


def sid_hit_at_k(found, sid_rank, k: int) -> np.ndarray:
    """SID-level Hit@K per user: target's SID among the top-K beams."""
    k = _check_k(k)
    found, r = _np(found, bool), _np(sid_rank, np.int64)
    return (found & (r >= 1) & (r <= k)).astype(np.float64)


def sid_ndcg_at_k(found, sid_rank, k: int) -> np.ndarray:
    """SID-level NDCG@K per user: ``1/log2(rank+1)`` if the target's SID is in the top-K beams."""
    k = _check_k(k)
    found, r = _np(found, bool), _np(sid_rank, np.int64)
    hit = found & (r >= 1) & (r <= k)
    return np.where(hit, 1.0 / np.log2(np.maximum(r, 1) + 1.0), 0.0)


def metric_keys(ks: Sequence[int] = (5, 10)) -> list:
    """Metric names produced for ``ks``: ``item/hit@K``, ``item/ndcg@K``, ``sid/hit@K``, ``sid/ndcg@K``."""
    return [f"{lvl}/{m}@{int(k)}" for lvl in ("item", "sid") for k in ks for m in ("hit", "ndcg")]


def per_user_metrics(P, G, found, sid_rank, ks: Sequence[int] = (5, 10)) -> Dict[str, np.ndarray]:
    """Per-user metric values (float64 arrays ``[U]``) for every ``K`` in ``ks``."""
    n = {len(_np(x, np.int64)) for x in (P, G, found, sid_rank)}
    if len(n) != 1:
        raise ValueError(f"P, G, found, sid_rank must have the same length, got {sorted(n)}")
    out: Dict[str, np.ndarray] = {}
    for k in ks:
        out[f"item/hit@{int(k)}"] = item_hit_at_k(P, G, found, k)
        out[f"item/ndcg@{int(k)}"] = item_ndcg_at_k(P, G, found, k)
    for k in ks:
        out[f"sid/hit@{int(k)}"] = sid_hit_at_k(found, sid_rank, k)
        out[f"sid/ndcg@{int(k)}"] = sid_ndcg_at_k(found, sid_rank, k)
    return {key: out[key] for key in metric_keys(ks)}


@dataclass
class MetricSums:
    """Mergeable metric accumulator: ``sums[name]`` = sum over users of the per-user value, ``count`` =
    number of users. ``a.merge(b)`` / ``a + b`` add both; :meth:`means` divides at the end."""

    sums: Dict[str, float] = field(default_factory=dict)
    count: int = 0
    sumsq: Dict[str, float] = field(default_factory=dict)  # sums of squares: the standard errors


    @classmethod
    def from_arrays(cls, P, G, found, sid_rank, ks: Sequence[int] = (5, 10)) -> "MetricSums":
        values = per_user_metrics(P, G, found, sid_rank, ks)
        count = len(_np(P, np.int64))
        return cls(sums={k: math.fsum(v.tolist()) for k, v in values.items()}, count=count,
                   sumsq={k: math.fsum((v * v).tolist()) for k, v in values.items()})

    @classmethod
    def from_ranks(cls, ranks, ks: Sequence[int] = (5, 10)) -> "MetricSums":
        """From a :class:`comeir_dist.eval.ranking.TargetRanks`."""
        return cls.from_arrays(ranks.P, ranks.G, ranks.found, ranks.sid_rank, ks)

    def merge(self, other: "MetricSums") -> "MetricSums":
        """New accumulator holding both (keys missing on one side count as 0 there)."""
        if self.count and other.count and set(self.sums) != set(other.sums):
            raise ValueError(f"cannot merge metric sums with different keys: {sorted(self.sums)} vs {sorted(other.sums)}")
        keys = list(self.sums) + [k for k in other.sums if k not in self.sums]
        return MetricSums(
            sums={k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in keys},
            count=self.count + other.count,
            sumsq={k: self.sumsq.get(k, 0.0) + other.sumsq.get(k, 0.0) for k in keys
                   if k in self.sumsq or k in other.sumsq},
        )

    __add__ = merge

    @classmethod
    def merge_all(cls, parts: Iterable["MetricSums"]) -> "MetricSums":
        out = cls()
        for p in parts:
            out = out.merge(p)
        return out

    def means(self) -> Dict[str, float]:
        """Average per user (0.0 for every metric when there are no users) plus ``"users"``."""
        out: Dict[str, float] = {k: (v / self.count if self.count else 0.0) for k, v in self.sums.items()}
        out["users"] = int(self.count)
        out.update(self.standard_errors())
        return out

    def standard_errors(self) -> Dict[str, float]:
        """``se/<metric>``: standard error of each mean over users, sqrt(sample variance / n)."""
        n = self.count
        if n < 2:
            return {}
        out = {}
        for k, sq in self.sumsq.items():
            mean = self.sums[k] / n
            var = max(0.0, (sq - n * mean * mean) / (n - 1))
            out[f"se/{k}"] = math.sqrt(var / n)
        return out

    to_dict = means

    def state_dict(self) -> Dict[str, object]:
        """Plain JSON-serialisable form (for Ray / all_gather_object / files)."""
        return {"sums": dict(self.sums), "count": int(self.count), "sumsq": dict(self.sumsq)}

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> "MetricSums":
        return cls(sums={str(k): float(v) for k, v in dict(state["sums"]).items()}, count=int(state["count"]),
                   sumsq={str(k): float(v) for k, v in dict(state.get("sumsq", {})).items()})


def repeated(groups) -> bool:
    """True when some group (user) owns several rows: a split prepared with ``--valid-targets K > 1``."""
    g = np.asarray(groups)
    return len(np.unique(g)) < len(g)


def clustered_standard_errors(values: Mapping[str, np.ndarray], groups) -> Dict[str, float]:
    """``se/<metric>`` of each mean over rows when rows come in correlated groups (several validation targets of
    one user): the cluster-robust (sandwich) variance G/(G-1) * sum_g (sum_{i in g} (x_i - mean))^2 / N^2 over the
    G groups. With one row per group it equals :meth:`MetricSums.standard_errors` (sample variance / N)."""
    uniques, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups, n = len(uniques), len(inverse)
    if n_groups < 2:
        return {}
    out = {}
    for k, v in values.items():
        x = np.asarray(v, dtype=np.float64)
        per_group = np.bincount(inverse, weights=x - x.mean(), minlength=n_groups)
        out[f"se/{k}"] = math.sqrt(n_groups / (n_groups - 1) * float(np.sum(per_group ** 2)) / (n * n))
    return out


def with_clustered_se(means: Dict[str, float], groups, ranked: tuple, ks: Sequence[int] = (5, 10)) -> Dict[str, float]:
    """``means`` (from :meth:`MetricSums.means`) with standard errors clustered by ``groups`` and ``clusters``
    when some group has several rows; unchanged otherwise. ``ranked`` = the rows' ``(P, G, found, sid_rank)``."""
    if not repeated(groups):
        return means
    out = dict(means)
    out.update(clustered_standard_errors(per_user_metrics(*ranked, ks), groups))
    out["clusters"] = int(len(np.unique(np.asarray(groups))))
    return out


def compute_metrics(P, G, found, sid_rank, ks: Sequence[int] = (5, 10)) -> Dict[str, float]:
    """Mean metrics over users: keys ``item/hit@K``, ``item/ndcg@K``, ``sid/hit@K``, ``sid/ndcg@K`` for
    each K in ``ks``, plus ``users`` (the count)."""
    return MetricSums.from_arrays(P, G, found, sid_rank, ks).means()
