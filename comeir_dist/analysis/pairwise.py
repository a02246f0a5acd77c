"""Every pair of an experiment's variants, paired over the same test users with each variant's seeds averaged per
row (``comeir analyze pairwise``).

A table of means over seeds does not say which differences are real: the test users are shared, so two variants'
means move together and their separate standard errors overstate the noise. This compares every pair the way
``comeir analyze paired`` compares one: each variant's per-user values averaged over its seeds
(:func:`~comeir_dist.analysis.paired.seed_average`), then the paired difference with its standard error over users
(clustered by user when users have several rows).

The seeds are those whose result file and per-user results are both there: in a `comeir experiment` output dir
(``results/<label>-seed<S>.json``, ``<label>-seed<S>/<split>.users.parquet``) or in a committed archive of one
(``<label>-seed<S>.json``, ``users/<label>-seed<S>/``, with ``rerun.json`` there when a rerun wrote the per-user
file). A run retrained after its result file was written is not mixed in (test metric checked).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from comeir_dist.analysis.paired import (METRIC, POPULAR, align, paired_difference, seed_average,
                                         users_file_values)
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One label's per-row values with its seeds averaged."""

    label: str
    seeds: list[int]
    users: np.ndarray
    values: np.ndarray


# a per-user file's mean within this of its result file's test metric is the evaluation that file reports
# (older evaluations summed in float32: 4e-7 seen); a retrained run differs by far more
SAME_EVALUATION = 1e-5
RERUN = "rerun.json"


def _layout(root: Path) -> tuple[list[Path], Callable[[str, str], Path], bool]:
    """The result files of ``root``, where a run's per-user results live, and whether ``root`` is an archive: a
    `comeir experiment` output dir (``results/<key>.json``, ``<key>/<split>.users.parquet``) or a committed archive
    of one (``<key>.json``, ``users/<key>/<split>.users.parquet``, as under docs/results/)."""
    if (root / "results").is_dir():
        return (sorted((root / "results").glob("*.json")),
                lambda key, split: root / key / f"{split}.users.parquet", False)
    if (root / "users").is_dir():
        return sorted(root.glob("*.json")), lambda key, split: root / "users" / key / f"{split}.users.parquet", True
    raise UserError(f"{root}: no results/*.json and no users/ dir (not a `comeir experiment` output dir or an "
                    "archive of one)")


def _read_json(f: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{f}: unreadable result file ({exc}); move it away to rerun that run") from None


def read_result_files(files: list[Path]) -> list[dict]:
    """The runs among ``files`` (result files of `comeir experiment`; other JSON beside them is skipped)."""
    return [row for row in map(_read_json, files) if isinstance(row, dict) and row.get("label") and "seed" in row]


def experiment_variants(root: Path, labels: list[str] | None = None, split: str = "test",
                        metric: str = METRIC) -> list[Variant]:
    """The variants of experiment dir ``root`` (``labels``, or every label but popular) with per-user results of
    ``split``, each seed-averaged; one line naming a requested label that has none. On the test split a seed whose
    per-user file does not average to its result file's metric (retrained since) is left out."""
    files, users_path, archive = _layout(root)
    by_label: dict[str, list[dict]] = {}
    for r in read_result_files(files):
        if r["label"] != POPULAR:
            by_label.setdefault(r["label"], []).append(r)
    if not by_label:
        raise UserError(f"{root}: no result files of trained runs")
    wanted = labels or sorted(by_label)
    unknown = [lab for lab in wanted if lab not in by_label]
    if unknown:
        raise UserError(f"--labels {','.join(unknown)}: no result files in {root} (labels there: "
                        f"{', '.join(sorted(by_label))})")
    out = []
    for label in wanted:
        rows = sorted(by_label[label], key=lambda r: r["seed"])
        sides, seeds = [], []
        for r in rows:
            path = users_path(f"{label}-seed{r['seed']}", split)
            if not path.is_file():
                continue
            users, values = users_file_values(path, metric)
            rerun = path.parent / RERUN  # an archive's users/<key>/rerun.json: the rerun that wrote the file
            reported = (_read_json(rerun) if archive and rerun.is_file() else r).get("metrics", {}).get(metric)
            if split == "test" and (reported is None or abs(float(values.mean()) - reported) > SAME_EVALUATION):
                log.warning("%s: mean %s %.6f, its result file reports %s: left out", path, metric,
                            values.mean(), reported)
                continue
            sides.append((path.parent.name, users, values))
            seeds.append(r["seed"])
        if not sides:
            if labels:
                raise UserError(f"{label}: none of its runs in {root} holds the {split} per-user results its result "
                                f"files report ({split}.users.parquet)")
            log.info("%s: no per-user %s results, left out", label, split)
            continue
        if len(sides) < len(rows):
            log.info("%s: %d of %d seeds have per-user %s results", label, len(sides), len(rows), split)
        out.append(Variant(label, seeds, *seed_average(sides)))
    return out


def popular_variant(dataset: str, split: str = "test", metric: str = METRIC) -> Variant:
    from comeir_dist.data.dataset import check_dataset_dir
    from comeir_dist.eval.popular import popular_per_user

    check_dataset_dir(dataset)
    users, values = popular_per_user(dataset, split, metric)
    order = np.argsort(users, kind="stable")
    return Variant(POPULAR, [], np.asarray(users)[order], np.asarray(values)[order])


def versus(a: Variant, b: Variant, metric: str = METRIC) -> dict:
    """``a - b`` paired over their rows (:class:`~comeir_dist.analysis.paired.PairedDifference` as a dict)."""
    users, x, y = align(a.users, a.values, b.users, b.values, a.label, b.label)
    return paired_difference(x, y, metric, users).as_dict()


def pairwise(variants: list[Variant], metric: str = METRIC) -> list[dict]:
    """Every pair ``a - b`` with ``a`` the variant of the higher mean (ties: the first given)."""
    ranked = sorted(variants, key=lambda v: -float(v.values.mean()))
    return [{"a": a.label, "b": b.label, "seeds_a": len(a.seeds), "seeds_b": len(b.seeds), **versus(a, b, metric)}
            for i, a in enumerate(ranked) for b in ranked[i + 1:]]


def format_pairwise(pairs: list[dict], split: str) -> str:
    if not pairs:
        return "(fewer than two variants with per-user results)"
    metric = pairs[0]["metric"]
    clustered = any(p["rows"] for p in pairs)
    unit = "rows" if clustered else "users"
    lines = [f"{split} {metric}, each variant's seeds averaged per row; paired s.e. over users"
             + (" (clustered by user)" if clustered else ""),
             "",
             f"| A | B | seeds A / B | A | B | A - B | s.e. | z | {unit} better A / B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        seeds = f"{p['seeds_a'] or '-'} / {p['seeds_b'] or '-'}"
        lines.append(f"| {p['a']} | {p['b']} | {seeds} | {p['mean_a']:.4f} | {p['mean_b']:.4f} | {p['diff']:+.4f} | "
                     f"{p['se']:.4f} | {p['z']:+.1f} | {p['a_better']} / {p['b_better']} |")
    return "\n".join(lines)
