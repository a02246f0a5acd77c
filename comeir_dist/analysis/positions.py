"""A metric by how far each validation target sits from the test item (``comeir analyze positions``).

With ``comeir prepare --valid-targets K`` each user's K items before the test item are validation targets,
oldest first. This groups a run's per-row validation results by that position -- ``before_test`` = 1 for the
item just before the test item, K for the oldest -- and adds the test item (``before_test`` = 0), for each run
and for the most-popular baseline. It answers whether validation and test measure the same thing: if trained
models score higher on early targets while the baseline does not, validation numbers overstate test numbers
(the comparison between checkpoints or variants on validation can still be sound).

With ``--test-targets K`` a user's last K items are test rows: ``before_test`` counts from the user's LAST item
(0), so test rows take 0..K-1 and the validation targets K, K+1, ... (with one test row this is the count above).

Within one position every user has at most one row, so the standard error of a position's mean is the plain
one over its rows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from comeir_dist.analysis.paired import POPULAR
from comeir_dist.errors import UserError


@dataclass
class PositionMean:
    """One metric's mean over the rows at one position."""

    before_test: int  # items between this target and the user's last (test) item, plus one; 0 = that item
    rows: int
    mean: float
    se: float
    split: str = "valid"


def _occurrence(users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... for the successive rows of each user, in row order."""
    out = np.zeros(len(users), np.int64)
    seen: dict[int, int] = {}
    for i, u in enumerate(users.tolist()):
        out[i] = seen.get(u, 0)
        seen[u] = out[i] + 1
    return out


def split_positions(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user_idx, target, before_test)`` of every row of ``split`` in the dataset's row order. A user's rows
    are oldest first: its last test row is 0, the test rows before it 1, 2, ...; its last validation row is just
    before its first test row (``before_test`` = the user's test rows)."""
    from comeir_dist.data.dataset import read_split

    def rows(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = read_split(dataset, name)
        users = table.column("user_idx").to_numpy().astype(np.int64)
        count = np.bincount(users, minlength=int(users.max(initial=-1)) + 1)
        return users, table.column("target").to_numpy().astype(np.int64), count[users] - 1 - _occurrence(users)

    users, targets, from_end = rows(split)
    if split == "test":
        return users, targets, from_end
    test_users = read_split(dataset, "test").column("user_idx").to_numpy().astype(np.int64)
    n_test = np.bincount(test_users, minlength=int(max(users.max(initial=-1), test_users.max(initial=-1))) + 1)
    return users, targets, from_end + n_test[users]


def dataset_rows(users: np.ndarray, targets: np.ndarray, ds_users: np.ndarray, ds_targets: np.ndarray,
                 source: str, split: str) -> np.ndarray:
    """Row of the dataset's ``split`` that each result row answers: the n-th row of a user in the results is the
    user's n-th row in the dataset. Users the split lacks, or another target, are a one-line error."""
    index = {(int(u), int(o)): i for i, (u, o) in enumerate(zip(ds_users.tolist(), _occurrence(ds_users).tolist()))}
    keys = list(zip(users.tolist(), _occurrence(users).tolist()))
    missing = [k for k in keys if k not in index]
    if missing:
        u, o = missing[0]
        raise UserError(f"{source}: {len(missing)} rows the dataset's {split} split does not have (e.g. user_idx {u}, "
                        f"row {o + 1} of that user); was it evaluated on another dataset?")
    rows = np.asarray([index[k] for k in keys], np.int64)
    wrong = ds_targets[rows] != targets
    if wrong.any():
        raise UserError(f"{source}: {int(wrong.sum())} of {len(rows)} rows have another {split} target than the "
                        "dataset (rows out of order, or another dataset)")
    return rows


def position_means(values: np.ndarray, before_test: np.ndarray, split: str = "valid") -> list[PositionMean]:
    """Mean and standard error of ``values`` per ``before_test`` position, farthest from the test item first."""
    out = []
    for d in sorted(set(before_test.tolist()), reverse=True):
        v = values[before_test == d]
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
        out.append(PositionMean(int(d), len(v), float(v.mean()), se, split))
    return out


def _label(d: int, split: str, several_test: bool = False) -> str:
    """Column name; with several test rows per user the distances count from the last item, and say so."""
    if split == "test":
        return "test" if d == 0 else f"test, {d} before last"
    return f"valid, {d} before last" if several_test else f"{d} before test"


def as_dicts(means: list[PositionMean]) -> list[dict]:
    return [asdict(m) for m in means]


def format_positions(table: dict[str, list[PositionMean]], metric: str) -> str:
    """A text table: one line per run, one column per position (mean ± s.e.)."""
    split_of = {m.before_test: m.split for means in table.values() for m in means}
    cols = sorted(split_of, reverse=True)
    several_test = any(s == "test" and d > 0 for d, s in split_of.items())
    head = ["run"] + [_label(d, split_of[d], several_test) for d in cols]
    lines = [f"{metric} by position (validation targets oldest first; rows per position in brackets)",
             " | ".join(head)]
    for name, means in table.items():
        by = {m.before_test: m for m in means}
        cells = [f"{by[d].mean:.4f} ± {by[d].se:.4f} [{by[d].rows}]" if d in by else "-" for d in cols]
        lines.append(" | ".join([name] + cells))
    return "\n".join(lines)


def _run_values(run, split: str, metric: str, ds: tuple) -> np.ndarray:
    """Per-row ``metric`` of one run (a resolved ``RunSpec``) on ``split``, laid out on the dataset's rows (NaN
    where not answered)."""
    from comeir_dist.analysis.runs import METRICS, load_results

    if split not in run.files:
        raise UserError(f"--runs {run.source}: no {split} per-user results (has {', '.join(sorted(run.files)) or 'none'}); "
                        f"write them with `comeir evaluate --checkpoint RUN/best --split {split} --out RUN/{split}.json`")
    res = load_results(run, split)
    if res.user_idx is None or res.target is None:
        raise UserError(f"{res.path}: positions need the user_idx and target columns (a file of `comeir evaluate`)")
    rows = dataset_rows(res.user_idx, res.target, ds[0], ds[1], str(res.path), split)
    out = np.full(len(ds[0]), np.nan)
    out[rows] = res.values[:, METRICS.index(metric)]
    return out


def run_positions(dataset: str, specs: list[str], metric: str, with_test: bool = True) -> dict[str, list[PositionMean]]:
    """``{name: [PositionMean ...]}`` for the most-popular baseline of ``dataset`` and every ``[NAME=]PATH[,PATH...]``
    of ``specs`` (several paths: each row's value averaged over them, e.g. a variant's seeds; they must answer the
    same rows). Positions come from the dataset's validation split, plus its test split when ``with_test``."""
    from comeir_dist.analysis.runs import resolve_runs, split_name
    from comeir_dist.eval.popular import popular_per_user

    splits = ("valid", "test") if with_test else ("valid",)
    ds = {s: split_positions(dataset, s) for s in splits}
    table: dict[str, list[PositionMean]] = {}
    table[POPULAR] = [m for s in splits for m in position_means(popular_per_user(dataset, s, metric)[1], ds[s][2], s)]
    for spec in specs:
        name, paths = split_name(spec)
        paths_list = paths.split(",")
        name = name or "+".join(p.rstrip("/").rsplit("/", 1)[-1] for p in paths_list)
        if name in table:
            raise UserError(f"--runs: more than one run named {name}; name them NAME=PATH")
        runs = [resolve_runs([p])[0] for p in paths_list]  # one by one: runs of two experiments may share a name
        means = []
        for s in splits:
            per_run = np.stack([_run_values(r, s, metric, ds[s]) for r in runs])
            answered = ~np.isnan(per_run)
            if (answered != answered[0]).any():
                raise UserError(f"--runs {spec}: its runs answered different {s} rows; average runs of one dataset")
            keep = answered[0]
            means += position_means(per_run[:, keep].mean(axis=0), ds[s][2][keep], s)
        table[name] = means
    return table
