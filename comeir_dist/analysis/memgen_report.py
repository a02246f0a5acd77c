"""`comeir analyze memgen`: label every validation and test instance of a prepared dataset as memorization /
generalization (types with their minimum hop) / uncategorized, with token-level prefix memorization, and
break the given runs' Hit/NDCG@{5,10} down by category with bootstrap confidence intervals.

Writes into ``--out`` (an output dir of kind "analysis", see :mod:`comeir_dist.utils.output_guard`), each
file atomically:

* ``labels.parquet`` - one row per instance: user (raw id), user_idx, split, history_len, target,
  category, types (``["symmetry_1", ...]``), ``<type>_hop`` (0 = not satisfied), ``token_mem_<n>``
  (prefix-n memorization at hop 1) and ``token_hop_<n>`` (its minimum hop, 0 = none) for n = 1..L;
* ``summary.json`` - per split: n, category shares, type_hop shares, token shares per category, and per run
  Hit/NDCG@{5,10} per category and per type_hop (mean, 95% bootstrap CI, n);
* ``summary.md`` - the same as tables; ``summary.png`` - category shares and per-category NDCG@10 per run.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from comeir_dist.analysis import ANALYSIS_KIND
from comeir_dist.analysis.memgen import (CATEGORIES, MAX_HOP_LIMIT, TYPE_MIN_HOP, TYPES, Labels, Sequences,
                                         build_rules, label_instances, prefix_rules, token_hops)
from comeir_dist.analysis.runs import METRICS, SPLITS, group_metrics, join_to_instances, load_results, resolve_runs
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

COMMAND = "comeir analyze memgen"
LABELS_FILE, SUMMARY_FILE, MARKDOWN_FILE, PLOT_FILE = "labels.parquet", "summary.json", "summary.md", "summary.png"


@dataclass
class SplitData:
    split: str
    user_idx: np.ndarray
    user: np.ndarray  # raw ids (str)
    labels: Labels


@dataclass
class MemgenResult:
    out: Path
    summary: dict
    markdown: str
    splits: Dict[str, SplitData] = field(default_factory=dict)


def type_keys(max_hop: int) -> List[str]:
    return [f"{t}_{h}" for t in TYPES for h in range(TYPE_MIN_HOP[t], max_hop + 1)]


def _raw_user_ids(dataset: Path, n_users_hint: int) -> Optional[np.ndarray]:
    import pyarrow.parquet as pq

    path = dataset / "users.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["user_idx", "raw_id"])
    idx = t.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64)
    raw = np.asarray(t.column("raw_id").to_pylist(), dtype=object)
    out = np.empty(max(n_users_hint, int(idx.max()) + 1 if len(idx) else 0), dtype=object)
    out[:] = None
    out[idx] = raw
    return out


def _load_codes(dataset: Path, method: str, num_items: int) -> Optional[np.ndarray]:
    if method.lower() == "none":
        return None
    from comeir_dist.quant.sid_table import load_sids

    try:
        sids = load_sids(dataset, method)
    except UserError as exc:
        raise UserError(f"{exc} (or pass --sid-method none to skip the token-level labels)") from None
    if sids.num_items < num_items:
        raise UserError(f"{dataset}/sids/{method}: SIDs for {sids.num_items} items, the dataset has {num_items}; "
                        f"re-run `comeir quantize`")
    return sids.codes


def label_dataset(dataset: Path, max_hop: int, sid_method: str, timings: dict):
    """(per-split SplitData, rules sizes, SID levels or None) of a prepared dataset."""
    import pyarrow.parquet as pq

    from comeir_dist.data.dataset import read_split

    t0 = time.perf_counter()
    train = Sequences.from_arrow(read_split(dataset, "train").column("items"))
    tables = {s: read_split(dataset, s) for s in SPLITS}
    num_items = pq.read_metadata(dataset / "items.parquet").num_rows
    hist = {s: Sequences.from_arrow(tables[s].column("history")) for s in SPLITS}
    targets = {s: tables[s].column("target").to_numpy(zero_copy_only=False).astype(np.int64) for s in SPLITS}
    seen = [a.max() for a in [train.flat, *(h.flat for h in hist.values()), *targets.values()] if len(a)]
    n_nodes = max([num_items] + [int(x) + 1 for x in seen])
    if n_nodes > num_items:
        raise UserError(f"{dataset}: item index {n_nodes - 1} in the splits but items.parquet has {num_items} rows; "
                        f"re-run `comeir prepare`")
    timings["read_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rules = build_rules(train, n_nodes, max_hop)
    timings["rules_s"] = time.perf_counter() - t0
    sizes = {f"R_{h}": rules.size(h) for h in range(1, max_hop + 1)}

    t0 = time.perf_counter()
    codes = _load_codes(dataset, sid_method, num_items)
    by_level = prefix_rules(train, codes, max_hop) if codes is not None else None
    out = {}
    for s in SPLITS:
        lab = label_instances(rules, hist[s], targets[s])
        if by_level is not None:
            lab.token_hop = token_hops(by_level, hist[s], targets[s])
        users = tables[s].column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64)
        out[s] = SplitData(s, users, np.empty(0, object), lab)
    timings["label_s"] = time.perf_counter() - t0
    raw = _raw_user_ids(dataset, max((int(d.user_idx.max()) + 1 for d in out.values() if len(d.user_idx)), default=0))
    for d in out.values():
        ids = raw[d.user_idx] if raw is not None else np.full(len(d.user_idx), None, object)
        missing = np.array([x is None for x in ids], bool)
        if missing.any():
            ids = ids.copy()
            ids[missing] = d.user_idx[missing].astype(str)
        d.user = ids.astype(str)
    return out, sizes, (None if codes is None else int(codes.shape[1]))


def _type_lists(lab: Labels, max_hop: int):
    """``types`` column: per instance the satisfied ``<type>_<hop>`` names, in TYPES order (vectorised)."""
    import pyarrow as pa

    keys = [f"{t}_{h}" for t in TYPES for h in range(0, max_hop + 1)]  # index t * (H + 1) + h
    hop = np.stack([lab.type_hop[t].astype(np.int64) for t in TYPES], 1).reshape(len(lab), len(TYPES))
    mask = hop > 0
    idx = (np.arange(len(TYPES))[None, :] * (max_hop + 1) + hop)[mask]  # row-major: instance by instance
    offsets = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    values = pa.array(np.asarray(keys, dtype=object)[idx].tolist(), pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def labels_table(splits: Dict[str, SplitData], max_hop: int):
    import pyarrow as pa

    parts = []
    for s in SPLITS:
        d = splits[s]
        lab = d.labels
        m = len(lab)
        part = {"user": pa.array(d.user.tolist(), pa.string()), "user_idx": pa.array(d.user_idx, pa.int32()),
                "split": pa.array([s] * m, pa.string()), "history_len": pa.array(lab.history_len, pa.int32()),
                "target": pa.array(lab.target, pa.int32()),
                "category": pa.array(np.asarray(CATEGORIES, dtype=object)[lab.category].tolist(), pa.string()),
                "types": _type_lists(lab, max_hop)}
        for t in TYPES:
            part[f"{t}_hop"] = pa.array(lab.type_hop[t], pa.int8())
        if lab.token_hop is not None:
            for n in range(1, lab.token_hop.shape[1] + 1):
                part[f"token_mem_{n}"] = pa.array(lab.token_hop[:, n - 1] == 1, pa.bool_())
            for n in range(1, lab.token_hop.shape[1] + 1):
                part[f"token_hop_{n}"] = pa.array(lab.token_hop[:, n - 1], pa.int8())
        parts.append(pa.table(part))
    return pa.concat_tables(parts)


def _share(x: int, n: int) -> float:
    return x / n if n else 0.0


def split_summary(d: SplitData, max_hop: int) -> dict:
    lab = d.labels
    n = len(lab)
    counts = {c: int(np.count_nonzero(lab.category == i)) for i, c in enumerate(CATEGORIES)}
    types = {}
    for t in TYPES:
        for h in range(TYPE_MIN_HOP[t], max_hop + 1):
            types[f"{t}_{h}"] = _share(int(np.count_nonzero(lab.type_hop[t] == h)), n)
    totals = {t: _share(int(np.count_nonzero(lab.type_hop[t] > 0)), n) for t in TYPES}
    out = {"n": n, "counts": counts, "shares": {c: _share(counts[c], n) for c in CATEGORIES},
           "types": types, "type_totals": totals}
    if lab.token_hop is not None:
        groups = {"all": np.ones(n, bool), **{c: lab.category == i for i, c in enumerate(CATEGORIES)}}
        hop1, anyhop = {}, {}
        for level in range(1, lab.token_hop.shape[1] + 1):
            col = lab.token_hop[:, level - 1]
            hop1[str(level)] = {g: _share(int(np.count_nonzero(col[m] == 1)), int(m.sum())) for g, m in groups.items()}
            anyhop[str(level)] = {g: _share(int(np.count_nonzero(col[m] > 0)), int(m.sum())) for g, m in groups.items()}
        out["token"] = {"prefix_memorization_hop1": hop1, f"prefix_memorization_within_{max_hop}_hops": anyhop}
    return out


def run_groups(lab: Labels, rows: np.ndarray, max_hop: int) -> tuple[dict, dict]:
    """Boolean masks over a run's users: categories (+ "all"), and type_hops."""
    cat = lab.category[rows]
    cats = {"all": np.ones(len(rows), bool), **{c: cat == i for i, c in enumerate(CATEGORIES)}}
    types = {}
    for t in TYPES:
        hop = lab.type_hop[t][rows]
        for h in range(TYPE_MIN_HOP[t], max_hop + 1):
            types[f"{t}_{h}"] = hop == h
    return cats, types


def runs_summary(specs, splits: Dict[str, SplitData], max_hop: int, resamples: int, seed: int) -> Dict[str, dict]:
    """{split: {run: {...}}} for every (run, split) with per-user results."""
    out: Dict[str, dict] = {s: {} for s in SPLITS}
    for spec in specs:
        for split, path in sorted(spec.files.items()):
            res = load_results(spec, split)
            d = splits[split]
            rows = join_to_instances(res, d.user_idx, d.user, d.labels.target)
            cats, types = run_groups(d.labels, rows, max_hop)
            tag = f"{spec.name}|{split}"
            entry = {"source": str(path), "users": int(len(rows)),
                     "metrics": group_metrics(res.values, cats, resamples=resamples, seed=seed, tag=tag),
                     "types": group_metrics(res.values, types, resamples=resamples, seed=seed, tag=tag + "|type")}
            if len(rows) < len(d.user_idx):
                log.warning("%s: per-user results for %d of %d %s users; shares of the run's users may differ",
                            path, len(rows), len(d.user_idx), split)
            out[split][spec.name] = entry
    return out


def _fmt_ci(m: dict, digits: int = 4) -> str:
    if m["mean"] is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_markdown(summary: dict) -> str:
    H = summary["max_hop"]
    lines = [f"# Memorization vs generalization: {summary['dataset']}", "",
             f"Rules from the training sequences (all items but the last two), max hop H = {H}; "
             f"rule set sizes " + ", ".join(f"|{k}| = {v}" for k, v in summary["rules"].items()) + ".", "",
             "## Instances per category", "",
             "| split | n | memorization | generalization | uncategorized |", "|---|---|---|---|---|"]
    for s, d in summary["splits"].items():
        lines.append(f"| {s} | {d['n']} | " + " | ".join(f"{d['shares'][c]:.2%}" for c in CATEGORIES) + " |")
    lines += ["", "## Generalization types (share of all instances, at the minimum hop; an instance may have several)",
              "", "| split | type | " + " | ".join(f"h={h}" for h in range(1, H + 1)) + " | any hop |",
              "|---|---|" + "---|" * (H + 1)]
    for s, d in summary["splits"].items():
        for t in TYPES:
            cells = [f"{d['types'][f'{t}_{h}']:.2%}" if f"{t}_{h}" in d["types"] else "-" for h in range(1, H + 1)]
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + f" | {d['type_totals'][t]:.2%} |")
    if any("token" in d for d in summary["splits"].values()):
        levels = summary["sid_levels"]
        lines += ["", f"## Token level: prefix-n memorization of `{summary['sid_method']}` SIDs "
                      f"(share of each category; hop 1 / within {H} hops)", "",
                  "| split | category | " + " | ".join(f"prefix-{n}" for n in range(1, levels + 1)) + " |",
                  "|---|---|" + "---|" * levels]
        for s, d in summary["splits"].items():
            tok = d.get("token")
            if not tok:
                continue
            within = tok[f"prefix_memorization_within_{H}_hops"]
            for g in ("all", *CATEGORIES):
                cells = [f"{tok['prefix_memorization_hop1'][str(n)][g]:.1%} / {within[str(n)][g]:.1%}"
                         for n in range(1, levels + 1)]
                lines.append(f"| {s} | {g} | " + " | ".join(cells) + " |")
    for s, d in summary["splits"].items():
        if not d.get("runs"):
            continue
        lines += ["", f"## Runs on {s}: item metrics per category (mean [95% bootstrap CI, "
                      f"{summary['bootstrap']['resamples']} resamples])", "",
                  "| run | category | n | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
        for name, r in d["runs"].items():
            for g in ("all", *CATEGORIES):
                m = r["metrics"][g]
                lines.append(f"| {name} | {g} | {m['n']} | " + " | ".join(_fmt_ci(m[k]) for k in METRICS) + " |")
        lines += ["", f"### Runs on {s}: item/ndcg@10 per generalization type and hop (n in parentheses)", "",
                  "| run | " + " | ".join(type_keys(H)) + " |", "|---|" + "---|" * len(type_keys(H))]
        for name, r in d["runs"].items():
            cells = []
            for k in type_keys(H):
                m = r["types"][k]
                cells.append("-" if not m["n"] else f"{m['item/ndcg@10']['mean']:.4f} ({m['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> None:
    from comeir_dist.utils.plotting import pyplot, save_figure

    plt = pyplot()
    run_splits = [s for s, d in summary["splits"].items() if d.get("runs")]
    fig, axes = plt.subplots(1, 1 + len(run_splits), figsize=(4.5 + 6 * len(run_splits), 4.2), squeeze=False)
    ax = axes[0][0]
    names = list(summary["splits"])
    bottom = np.zeros(len(names))
    for c, colour in zip(CATEGORIES, ("tab:blue", "tab:orange", "tab:grey"), strict=True):
        vals = np.array([summary["splits"][s]["shares"][c] for s in names])
        ax.bar(names, vals, bottom=bottom, label=c, color=colour)
        bottom += vals
    ax.set_ylabel("share of instances")
    ax.set_title(f"categories (H = {summary['max_hop']})")
    ax.legend(fontsize=7)
    groups = ["all", *CATEGORIES]
    for ax, s in zip(axes[0][1:], run_splits, strict=True):
        runs = summary["splits"][s]["runs"]
        width = 0.8 / max(1, len(runs))
        x = np.arange(len(groups))
        for i, (name, r) in enumerate(runs.items()):
            means = np.array([np.nan if r["metrics"][g]["item/ndcg@10"]["mean"] is None
                              else r["metrics"][g]["item/ndcg@10"]["mean"] for g in groups], dtype=float)
            lo = np.array([np.nan if r["metrics"][g]["item/ndcg@10"]["ci95"][0] is None
                           else r["metrics"][g]["item/ndcg@10"]["ci95"][0] for g in groups], dtype=float)
            hi = np.array([np.nan if r["metrics"][g]["item/ndcg@10"]["ci95"][1] is None
                           else r["metrics"][g]["item/ndcg@10"]["ci95"][1] for g in groups], dtype=float)
            ax.bar(x + (i - (len(runs) - 1) / 2) * width, np.nan_to_num(means), width,
                   yerr=np.nan_to_num(np.stack([means - lo, hi - means])), capsize=2, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{g}\n(n={next(iter(runs.values()))['metrics'][g]['n']})" for g in groups], fontsize=8)
        ax.set_ylabel("item NDCG@10 (95% bootstrap CI)")
        ax.set_title(f"{s}: NDCG@10 per category")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def run_memgen(dataset: str, out: str, max_hop: int = 4, sid_method: str = "rqkmeans", runs: List[str] = (),
               resamples: int = 1000, seed: int = 0, overwrite: bool = False) -> MemgenResult:
    """The body of `comeir analyze memgen` (see the module docstring)."""
    import pyarrow.parquet as pq

    from comeir_dist.data.dataset import check_dataset_dir, read_stats
    from comeir_dist.utils.atomic import atomic_update, write_json
    from comeir_dist.utils.output_guard import check_out_dir, claim_out_dir, fingerprint

    t_start = time.perf_counter()
    if not 1 <= max_hop <= MAX_HOP_LIMIT:
        raise UserError(f"--max-hop: {max_hop}; must be in 1..{MAX_HOP_LIMIT}")
    if resamples < 1:
        raise UserError(f"--bootstrap: {resamples}; must be >= 1")
    ds = check_dataset_dir(dataset)
    check_out_dir(out, ANALYSIS_KIND, overwrite=overwrite)  # before any work; nothing written yet
    specs = resolve_runs(list(runs))
    timings: dict = {}
    splits, sizes, levels = label_dataset(ds, max_hop, sid_method, timings)
    t0 = time.perf_counter()
    run_rows = runs_summary(specs, splits, max_hop, resamples, seed)
    timings["runs_s"] = time.perf_counter() - t0
    summary = {"dataset": str(dataset), "max_hop": max_hop,
               "sid_method": None if levels is None else sid_method, "sid_levels": levels,
               "rules": sizes, "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
               "definitions": "Ding et al., How Well Does Generative Recommendation Generalize? (MemGen-GR release): "
                              "rules from training sequences only; memorization = x_n -> v in R_1; types at their "
                              "minimum hop; token_mem_n = prefix-n memorization at hop 1",
               "splits": {}}
    for s in ("test", "valid"):
        summary["splits"][s] = {**split_summary(splits[s], max_hop), "runs": run_rows[s]}
    markdown = format_markdown(summary)
    table = labels_table(splits, max_hop)
    stats = read_stats(ds)
    fp = fingerprint({"dataset": str(Path(dataset).resolve()), "stats": stats, "max_hop": max_hop,
                      "sid_method": summary["sid_method"], "runs": [[r.name, r.source] for r in specs],
                      "resamples": resamples, "seed": seed})
    claim_out_dir(out, ANALYSIS_KIND, fp, COMMAND, overwrite=overwrite)
    with atomic_update(out) as tmp:
        pq.write_table(table, tmp / LABELS_FILE)
        (tmp / MARKDOWN_FILE).write_text(markdown)
        try:
            plot_summary(summary, tmp / PLOT_FILE)
        except Exception as exc:  # noqa: BLE001 -- a figure must never fail the analysis
            log.warning("%s/%s not written: %s", out, PLOT_FILE, exc)
        timings["total_s"] = time.perf_counter() - t_start
        summary["wall_time_s"] = {k: round(v, 3) for k, v in timings.items()}
        write_json(tmp / SUMMARY_FILE, summary)
    return MemgenResult(Path(out), summary, markdown, splits)


def brief(result: MemgenResult) -> str:
    """One JSON line for the terminal: shares per split and the output files."""
    s = result.summary
    return json.dumps({"out": str(result.out), **{sp: {"n": d["n"], **{c: round(v, 4) for c, v in d["shares"].items()}}
                                                  for sp, d in s["splits"].items()},
                       "wall_time_s": s["wall_time_s"]["total_s"]})
