"""Per-user results of finished runs, and Hit/NDCG means per group with bootstrap confidence intervals.

A run's per-user results are the ``<out>.users.parquet`` that ``comeir evaluate --out <out>.json`` (and
``comeir train`` / ``comeir experiment``: ``<run>/test.users.parquet``) write: ``user_idx``, ``target``,
``top_items`` (top 10, ``-1`` padding), ``P`` (items ranked ahead of the target's SID group, or all returned
items when the target's SID was not found) and ``G`` (the group size). The split is the ``split`` of the
sibling ``<out>.json``, else the file name (``test`` / ``valid``). Files that carry the metric columns
(``item/hit@5`` ...) directly, or a ``user`` column of raw user ids, are accepted too.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

KS = (5, 10)
METRICS = tuple(f"item/{m}@{k}" for k in KS for m in ("hit", "ndcg"))
USERS_SUFFIX = ".users.parquet"
SPLITS = ("valid", "test")


@dataclass
class RunSpec:
    """One run given to ``--runs``: its name and per-user result files by split."""

    name: str
    source: str
    files: Dict[str, Path] = field(default_factory=dict)


@dataclass
class RunResults:
    """Per-user metric values of one run on one split."""

    name: str
    split: str
    path: Path
    user_idx: Optional[np.ndarray]  # int64, or None when the file keys users by raw id
    user: Optional[np.ndarray]      # object (str), raw user ids, or None
    target: Optional[np.ndarray]    # int64 or None
    values: np.ndarray              # [m, len(METRICS)] float64
    reported: Optional[dict] = None  # the metrics of the sibling JSON, if any


def _no_results(path: Path) -> UserError:
    if (path / "best").is_dir():
        hint = f"write them with `comeir evaluate --checkpoint {path}/best --out {path}/test.json`"
    else:
        hint = "and no best/ checkpoint to evaluate (an unfinished run?)"
    return UserError(f"{path}: no per-user results (*{USERS_SUFFIX}); {hint}")


def _split_of(users_file: Path) -> str:
    stem = users_file.name[:-len(USERS_SUFFIX)] if users_file.name.endswith(USERS_SUFFIX) else users_file.stem
    meta = users_file.with_name(stem + ".json")
    if meta.is_file():
        try:
            split = json.loads(meta.read_text()).get("split")
        except (OSError, ValueError, AttributeError):
            split = None
        if split in SPLITS:
            return split
    if stem in SPLITS:
        return stem
    raise UserError(f"{users_file}: cannot tell its split (no {meta.name} with \"split\", and the name is not "
                    f"test{USERS_SUFFIX} / valid{USERS_SUFFIX})")


def _files_in(run_dir: Path) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for f in sorted(run_dir.glob("*" + USERS_SUFFIX)):
        split = _split_of(f)
        if split in files:
            raise UserError(f"{run_dir}: two per-user result files for split {split} ({files[split].name}, "
                            f"{f.name}); give the file itself to --runs")
        files[split] = f
    return files


def _is_experiment_root(p: Path) -> bool:
    return (p / "results").is_dir() or (p / "results.json").is_file()


def split_name(spec: str) -> tuple[str, str]:
    """``("NAME", "PATH")`` of ``NAME=PATH``; ``("", spec)`` when there is no name (or the '=' is in a path)."""
    name, sep, raw = spec.partition("=")
    if not sep or "/" in name or not name:
        return "", spec
    return name, raw


def resolve_runs(specs: List[str]) -> List[RunSpec]:
    """``[NAME=]PATH`` items of ``--runs``: a run dir, a ``*.users.parquet`` file, an experiment result file
    (``<exp>/results/<label>-seed<N>.json``: its run dir ``<exp>/<label>-seed<N>``) or an experiment dir
    (every run dir in it that holds per-user results). One line naming the path when there are none."""
    out: List[RunSpec] = []
    for spec in specs:
        name, raw = split_name(spec)
        p = Path(raw)
        if p.is_file() and p.name.endswith(USERS_SUFFIX):
            out.append(RunSpec(name or p.parent.name, str(p), {_split_of(p): p}))
            continue
        if p.is_file() and p.suffix == ".json" and p.parent.name == "results":
            run_dir = p.parent.parent / p.stem
            files = _files_in(run_dir) if run_dir.is_dir() else {}
            if not files:
                raise _no_results(run_dir)
            out.append(RunSpec(name or p.stem, str(run_dir), files))
            continue
        if not p.exists():
            raise UserError(f"--runs {raw}: not found")
        if not p.is_dir():
            raise UserError(f"--runs {raw}: expected a run dir, a *{USERS_SUFFIX} file or an experiment dir")
        files = _files_in(p)
        if files:
            out.append(RunSpec(name or p.name, str(p), files))
        elif _is_experiment_root(p):
            if name:
                raise UserError(f"--runs {spec}: NAME= names one run, {p} is an experiment dir")
            found = [(d, _files_in(d)) for d in sorted(x for x in p.iterdir() if x.is_dir())]
            found = [(d, f) for d, f in found if f]
            if not found:
                raise UserError(f"{p}: no run in this experiment dir holds per-user results (*{USERS_SUFFIX})")
            log.info("%s: runs with per-user results: %s", p, ", ".join(d.name for d, _ in found))
            out.extend(RunSpec(d.name, str(d), f) for d, f in found)
        else:
            raise _no_results(p)
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--runs: more than one run named {', '.join(dup)}; name them NAME=PATH")
    return out


def _found(top_items: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Whether the target's SID was among the beams, as far as metrics@K (K <= width) need it: with
    ``P < width``, found iff more than ``P`` items were returned (not found: ``P`` = all returned items);
    with ``P >= width`` every metric@K is 0 either way."""
    returned = (top_items >= 0).sum(axis=1)
    return returned > P


def per_user_values(table, path: Path) -> np.ndarray:
    """``[m, len(METRICS)]`` per-user item Hit/NDCG@{5,10} of a per-user result table."""
    from comeir_dist.eval.metrics import item_hit_at_k, item_ndcg_at_k

    cols = table.column_names
    if all(m in cols for m in METRICS):
        return np.stack([table.column(m).to_numpy(zero_copy_only=False).astype(np.float64) for m in METRICS], 1)
    missing = [c for c in ("top_items", "P", "G") if c not in cols]
    if missing:
        raise UserError(f"{path}: not per-user results (missing columns {', '.join(missing)}; has "
                        f"{', '.join(cols)})")
    import pyarrow.compute as pc

    top_col = table.column("top_items")
    lengths = pc.list_value_length(top_col).to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else max(KS)
    if len(lengths) and (lengths != width).any():
        raise UserError(f"{path}: top_items lists of different lengths")
    if width < max(KS):
        raise UserError(f"{path}: top_items holds {width} items per user; metrics@{max(KS)} need {max(KS)}")
    flat = pc.list_flatten(top_col).to_numpy(zero_copy_only=False).astype(np.int64)
    top = flat.reshape(len(lengths), width) if len(lengths) else np.zeros((0, width), np.int64)
    P = table.column("P").to_numpy(zero_copy_only=False).astype(np.int64)
    G = table.column("G").to_numpy(zero_copy_only=False).astype(np.int64)
    found = _found(top, P)
    out = []
    for m in METRICS:
        kind, k = m.split("/")[1].split("@")
        fn = item_hit_at_k if kind == "hit" else item_ndcg_at_k
        out.append(fn(P, G, found, int(k)))
    return np.stack(out, 1) if out else np.zeros((len(P), 0))


def load_results(spec: RunSpec, split: str) -> RunResults:
    import pyarrow.parquet as pq

    path = spec.files[split]
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is one line
        raise UserError(f"{path}: cannot read Parquet ({exc})") from None
    cols = table.column_names
    if "user_idx" not in cols and "user" not in cols:
        raise UserError(f"{path}: no user_idx or user column (has {', '.join(cols)})")
    values = per_user_values(table, path)
    user_idx = table.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64) if "user_idx" in cols else None
    user = np.asarray(table.column("user").to_pylist(), dtype=object) if "user" in cols else None
    target = table.column("target").to_numpy(zero_copy_only=False).astype(np.int64) if "target" in cols else None
    reported = None
    meta = path.with_name(path.name[:-len(USERS_SUFFIX)] + ".json") if path.name.endswith(USERS_SUFFIX) else None
    if meta is not None and meta.is_file():
        try:
            reported = json.loads(meta.read_text()).get("metrics")
        except (OSError, ValueError, AttributeError):
            reported = None
    res = RunResults(spec.name, split, path, user_idx, user, target, values, reported)
    _check_reported(res)
    return res


def _check_reported(res: RunResults) -> None:
    """The recomputed means must match the run's own report (same users): else the file was misread."""
    if not res.reported or not len(res.values) or res.reported.get("users") not in (None, len(res.values)):
        return
    for i, m in enumerate(METRICS):
        want = res.reported.get(m)
        if want is not None and abs(float(res.values[:, i].mean()) - float(want)) > 1e-6:
            log.warning("%s: recomputed %s %.6f differs from the reported %.6f", res.path, m,
                        float(res.values[:, i].mean()), float(want))


def join_to_instances(res: RunResults, user_idx: np.ndarray, user: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Row of each per-user result among the split's instances (``user_idx`` ascending or not); users the
    dataset does not have, or a different target for the same user, are a one-line error."""
    if res.user is not None:
        keys, ours = res.user.astype(str), np.asarray(user).astype(str)
        label = "user"
    else:
        keys, ours = res.user_idx, np.asarray(user_idx)
        label = "user_idx"
    order = np.argsort(ours, kind="stable")
    pos = np.searchsorted(ours[order], keys)
    pos = np.minimum(pos, len(ours) - 1) if len(ours) else pos
    ok = (ours[order][pos] == keys) if len(ours) else np.zeros(len(keys), bool)
    if not ok.all():
        bad = keys[~ok][:3]
        raise UserError(f"{res.path}: {int((~ok).sum())} {label}s not in the dataset's {res.split} split "
                        f"(e.g. {', '.join(map(str, bad))}); was it evaluated on another dataset?")
    rows = order[pos]
    srt = np.sort(rows)
    if (srt[1:] == srt[:-1]).any():
        raise UserError(f"{res.path}: a user appears more than once (a split prepared with --valid-targets or "
                        "--test-targets > 1; this analysis needs one row per user)")
    if res.target is not None:
        diff = res.target != target[rows]
        if diff.any():
            raise UserError(f"{res.path}: {int(diff.sum())} of {len(rows)} users have another {res.split} target "
                            f"than the dataset; was it evaluated on another dataset?")
    return rows


def unique_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, row id of each row) of a float ``[m, k]`` array; per-column ids combined into one
    integer per row (sorting rows as byte strings, as ``np.unique(axis=0)`` does, is much slower)."""
    values = np.asarray(values, np.float64)
    m, k = values.shape
    code = np.zeros(m, np.int64)
    for c in range(k):
        col_u, col_inv = np.unique(values[:, c], return_inverse=True)
        code = code * len(col_u) + col_inv.reshape(-1)
        if c + 1 < k and len(col_u) and code.max(initial=0) > 2 ** 62 // max(1, m):  # could overflow: compact
            _, code = np.unique(code, return_inverse=True)
            code = code.reshape(-1).astype(np.int64)
    order = np.argsort(code, kind="stable")
    sc = code[order]
    first = np.concatenate([[True], sc[1:] != sc[:-1]]) if m else np.zeros(0, bool)
    inv = np.empty(m, np.int64)
    inv[order] = np.cumsum(first) - 1
    return values[order[first]], inv


def bootstrap_means(values: np.ndarray, resamples: int = 1000, seed=0, level: float = 0.95):
    """Means of ``values [m, k]`` and their percentile bootstrap CIs (``resamples`` resamples of the ``m``
    rows with replacement). Exact and cheap: a resample is a multinomial draw over the distinct rows
    (metric values take few distinct values), so the cost does not grow with ``m``."""
    uniq, inv = unique_rows(values)
    return _bootstrap_counts(uniq, np.bincount(inv, minlength=len(uniq)), resamples, seed, level)


def _bootstrap_counts(uniq: np.ndarray, counts: np.ndarray, resamples: int, seed, level: float = 0.95):
    """:func:`bootstrap_means` of the rows ``uniq[i]`` repeated ``counts[i]`` times."""
    keep = counts > 0
    uniq, counts = uniq[keep], counts[keep]
    m, k = int(counts.sum()), uniq.shape[1]
    if m == 0:
        nan = np.full(k, np.nan)
        return nan, nan, nan
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(m, counts / m, size=resamples)  # [B, distinct rows]
    means = draws @ uniq / m
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return counts @ uniq / m, lo, hi


def group_seed(seed: int, *parts: str) -> list:
    """A stable per-group seed (independent of the order runs and groups are processed in)."""
    return [int(seed), zlib.crc32("|".join(parts).encode())]


def group_metrics(values: np.ndarray, groups: Dict[str, np.ndarray], *, resamples: int, seed: int,
                  tag: str) -> Dict[str, dict]:
    """``{group: {"n": m, metric: {"mean", "ci95": [lo, hi]}}}`` for boolean row masks ``groups``."""
    uniq, inv = unique_rows(values)
    out = {}
    for g, mask in groups.items():
        n = int(np.count_nonzero(mask))
        mean, lo, hi = _bootstrap_counts(uniq, np.bincount(inv[mask], minlength=len(uniq)), resamples,
                                         group_seed(seed, tag, g))
        out[g] = {"n": n, **{
            m: ({"mean": float(mean[i]), "ci95": [float(lo[i]), float(hi[i])]} if n else
                {"mean": None, "ci95": [None, None]}) for i, m in enumerate(METRICS)}}
    return out
