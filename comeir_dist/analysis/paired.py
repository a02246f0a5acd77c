"""Paired comparison of two rankers on the same users: the mean per-user difference of a metric and its
standard error.

Both rankers answer every user, so the user-to-user spread (most of each mean's own standard error: some users
are easy for every model) cancels in the per-user differences. Judging a difference against the two means'
separate standard errors treats the samples as independent and overstates the noise; the paired standard error
``sd(a_u - b_u) / sqrt(n)`` is the one that decides whether A beats B on these users.

A split prepared with ``--valid-targets K`` / ``--test-targets K`` has several rows per user: rows pair by user and
order within the user, and the standard error of the mean row difference is clustered by user (the rows of one user
are correlated), as the metrics' own standard errors are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from comeir_dist.errors import UserError

METRIC = "item/ndcg@10"
POPULAR = "popular"  # the most-popular baseline, as a variant, run or label


@dataclass
class PairedDifference:
    """``a - b`` of one metric over the users both rankers answered."""

    metric: str
    users: int       # distinct users (rows when ``groups`` was not given)
    mean_a: float
    mean_b: float
    diff: float      # mean of a_u - b_u
    se: float        # standard error of that mean
    z: float         # diff / se (0 when se = 0 and diff = 0)
    a_better: int    # rows with a_u > b_u
    b_better: int
    rows: int = 0    # rows, when users have several (0: one row per user)

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: np.ndarray, b: np.ndarray, metric: str = METRIC, groups=None) -> PairedDifference:
    """Paired statistics of per-row values ``a`` and ``b`` (same rows, same order). ``groups`` (the rows' users,
    as :func:`align` orders them) makes the standard error clustered by user when a user has several rows."""
    from comeir_dist.eval.metrics import clustered_standard_errors, repeated

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired values need two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    d = a - b
    several = groups is not None and repeated(groups)
    if several:
        se = clustered_standard_errors({"d": d}, groups).get("se/d", 0.0)
    else:
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    diff = float(d.mean())
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    users = len(np.unique(np.asarray(groups))) if several else len(d)
    return PairedDifference(metric, users, float(a.mean()), float(b.mean()), diff, se, z,
                            int((d > 0).sum()), int((d < 0).sum()), len(d) if several else 0)


def align(users_a: np.ndarray, a: np.ndarray, users_b: np.ndarray, b: np.ndarray,
          name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, a, b)``: ``a`` and ``b`` in one row order (by user; a user's rows keep their order, so the n-th
    row of a user pairs with that user's n-th row), with the rows' users. Both must hold exactly the same users
    with the same number of rows each (else one line naming them)."""
    ua, ub = np.asarray(users_a), np.asarray(users_b)
    oa, ob = np.argsort(ua, kind="stable"), np.argsort(ub, kind="stable")
    if len(ua) != len(ub) or not np.array_equal(ua[oa], ub[ob]):
        only_a = np.setdiff1d(ua, ub)[:3].tolist()
        only_b = np.setdiff1d(ub, ua)[:3].tolist()
        if not only_a and not only_b:
            users, ca = np.unique(ua, return_counts=True)
            cb = np.unique(ub, return_counts=True)[1]
            u = int(users[np.argmax(ca != cb)])
            raise UserError(f"{name_a} and {name_b} hold the same users with different rows per user (user_idx {u}: "
                            f"{int(ca[users == u][0])} vs {int(cb[users == u][0])}); compare runs of one dataset "
                            "(the same --valid-targets / --test-targets) and split")
        raise UserError(f"{name_a} ({len(ua)} rows) and {name_b} ({len(ub)} rows) were not evaluated on the same "
                        f"users and rows (only in the first: {only_a}, only in the second: {only_b}); compare runs of "
                        "one dataset and split")
    return ua[oa], np.asarray(a)[oa], np.asarray(b)[ob]


def seed_average(sides: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """``(user_idx, values)``: each user's value averaged over several runs ``[(name, user_idx, values), ...]``
    of the same users (the seeds of one variant). The paired difference of such averages judges the variant on
    these users with its seed-to-seed training noise averaged out; its standard error is over the users (the
    evaluated models are taken as given), so it does not say how a fourth seed would land."""
    name0, u0, _ = sides[0]
    order = np.argsort(np.asarray(u0), kind="stable")
    vals = [align(u0, np.zeros(len(u0)), u, v, name0, name)[2] for name, u, v in sides]
    return np.asarray(u0)[order], np.mean(vals, axis=0)


def users_file_values(path: Path, metric: str = METRIC) -> tuple[np.ndarray, np.ndarray]:
    """``(user_idx, values)`` of ``metric`` from a run's ``*.users.parquet``."""
    import pyarrow.parquet as pq

    from comeir_dist.analysis.runs import METRICS, per_user_values

    if metric not in METRICS:
        raise UserError(f"--metric {metric}: allowed values: {', '.join(METRICS)}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is one line
        raise UserError(f"{path}: cannot read Parquet ({exc})") from None
    if "user_idx" not in table.column_names:
        raise UserError(f"{path}: no user_idx column (has {', '.join(table.column_names)})")
    users = table.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64)
    return users, per_user_values(table, path)[:, METRICS.index(metric)]


def vs_popular(dataset: str, users_file: Path, split: str = "test", metric: str = METRIC) -> dict:
    """A run's per-user ``metric`` minus the most-popular baseline's on the same users (paired)."""
    from comeir_dist.eval.popular import popular_per_user

    ur, vr = users_file_values(users_file, metric)
    up, vp = popular_per_user(dataset, split, metric)
    users, a, b = align(ur, vr, up, vp, str(users_file), f"popular on {dataset} ({split})")
    return paired_difference(a, b, metric, users).as_dict()
