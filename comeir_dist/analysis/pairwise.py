"""Every pair of an experiment's variants, paired over the same test users with each variant's seeds averaged per
row (``comeir analyze pairwise``).

A table of means over seeds does not say which differences are real: the test users are shared, so two variants'
means move together and their separate standard errors overstate the noise. This compares every pair the way
``comeir analyze paired`` compares one: each variant's per-user values averaged over its seeds
(:func:`~comeir_dist.analysis.paired.seed_average`), then the paired difference with its standard error over users
(clustered by user when users have several rows). The seeds are those whose result file
(``results/<label>-seed<S>.json``) and run dir (``<label>-seed<S>/<split>.users.parquet``) are both there; a
variant's run dirs that were retrained after their result file was written are not mixed in (test metric checked).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comeir_dist.analysis.paired import METRIC, align, paired_difference, seed_average, users_file_values
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

POPULAR = "popular"


@dataclass
class Variant:
    """One label's per-row values with its seeds averaged."""

    label: str
    seeds: list[int]
    users: np.ndarray
    values: np.ndarray


def _result_rows(root: Path) -> list[dict]:
    files = sorted((root / "results").glob("*.json"))
    if not files:
        raise UserError(f"{root}: no results/*.json (not a `comeir experiment` output dir?)")
    rows = []
    for f in files:
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"{f}: unreadable result file ({exc})") from None
    return rows


def run_holds_result(run_dir: Path, row: dict, split: str = "test") -> bool:
    """The run dir holds the evaluation its result file reports (for the test split: same test NDCG@10)."""
    if not (run_dir / f"{split}.users.parquet").is_file():
        return False
    if split != "test":
        return True
    try:
        test = json.loads((run_dir / "test.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(test, dict) and test.get("metrics", {}).get("item/ndcg@10") == row["metrics"].get("item/ndcg@10")


def experiment_variants(root: Path, labels: list[str] | None = None, split: str = "test",
                        metric: str = METRIC) -> list[Variant]:
    """The variants of experiment dir ``root`` (``labels``, or every label but popular) with per-user results of
    ``split``, each seed-averaged; one line naming a requested label that has none."""
    by_label: dict[str, list[dict]] = {}
    for r in _result_rows(root):
        if r.get("label") and r["label"] != POPULAR:
            by_label.setdefault(r["label"], []).append(r)
    wanted = labels or sorted(by_label)
    unknown = [lab for lab in wanted if lab not in by_label]
    if unknown:
        raise UserError(f"--labels {','.join(unknown)}: no result files in {root}/results (labels there: "
                        f"{', '.join(sorted(by_label)) or 'none'})")
    out = []
    for label in wanted:
        rows = sorted(by_label[label], key=lambda r: r["seed"])
        kept = [(r["seed"], root / f"{label}-seed{r['seed']}") for r in rows]
        kept = [(s, d) for (s, d), r in zip(kept, rows) if run_holds_result(d, r, split)]
        if not kept:
            if labels:
                raise UserError(f"{label}: no run dir in {root} holds the {split} per-user results its result files "
                                f"report ({label}-seed<S>/{split}.users.parquet)")
            log.info("%s: no per-user %s results in its run dirs, left out", label, split)
            continue
        if len(kept) < len(rows):
            log.warning("%s: %d of %d seeds have per-user %s results", label, len(kept), len(rows), split)
        sides = [(d.name, *users_file_values(d / f"{split}.users.parquet", metric)) for _, d in kept]
        users, values = seed_average(sides)
        out.append(Variant(label, [s for s, _ in kept], users, values))
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
