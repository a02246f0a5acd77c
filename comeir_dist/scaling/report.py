"""Scaling report: ``scaling.json`` (every point + the fit), ``scaling.md`` (table) and ``scaling.png``
(metric vs sparse parameters on a log axis with the fitted power law, as the paper's Figure 3)."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Optional, Sequence

from comeir_dist.scaling.fit import PowerLawFit, fit_power_law
from comeir_dist.utils.atomic import atomic_file, write_json

AXIS_FIELD = {"inter": "P_T", "intra": "P_S", "total": "P_total"}
AXIS_LABEL = {"inter": "inter-item Engram parameters P_T", "intra": "intra-item Engram parameters P_S",
              "total": "sparse (Engram) parameters P_S + P_T"}
MD_METRICS = ("item/hit@5", "item/ndcg@5", "item/hit@10", "item/ndcg@10")


def resolve_axis(records: Sequence[dict], x_axis: str = "auto") -> str:
    """``auto``: the memory whose scale varies over the grid (inter if only s_T varies, intra if only s_S
    varies), otherwise the total."""
    if x_axis != "auto":
        return x_axis
    st = {r["s_t"] for r in records}
    ss = {r["s_s"] for r in records}
    if len(st) > 1 and len(ss) == 1:
        return "inter"
    if len(ss) > 1 and len(st) == 1:
        return "intra"
    return "total"


def fit_records(records: Sequence[dict], axis: str, metric: str) -> tuple[Optional[PowerLawFit], str]:
    """Fit over the finished points; (fit or None, note)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("metrics", {}).get(metric) is not None]
    usable = [r for r in ok if r["metrics"][metric] > 0 and r[AXIS_FIELD[axis]] > 0]
    skipped = len(ok) - len(usable)
    try:
        fit = fit_power_law([r[AXIS_FIELD[axis]] for r in usable], [r["metrics"][metric] for r in usable])
    except ValueError as exc:
        return None, f"no fit: {exc}"
    note = f"fit over {fit.n} finished point(s)" + (f" ({skipped} with {metric} = 0 left out)" if skipped else "")
    return fit, note


def _count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3f} {suf}"
    return str(n)


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def markdown_table(records: Sequence[dict], fit: Optional[PowerLawFit], axis: str, metric: str,
                   note: str = "") -> str:
    head = ["point", "s_T", "s_S", "P_S", "P_T", "status", *MD_METRICS, "steps", "wall time", "peak RSS",
            "planned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in records:
        m = r.get("metrics") or {}
        plan = r.get("plan") or {}
        wall = r.get("wall_time_s")
        cells = [r["key"], f"{r['s_t']:g}", f"{r['s_s']:g}", _count(r["P_S"]), _count(r["P_T"]), r["status"],
                 *(_fmt(m.get(k)) for k in MD_METRICS), str(r.get("steps") or "-"),
                 "-" if wall is None else f"{wall / 60:.1f} min", _gib(r.get("peak_rss_bytes")),
                 _gib(plan.get("worst_rank_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
        if r["status"] == "refused":
            notes.append(f"* {r['key']} refused: {plan.get('message', '')}")
        elif r["status"] == "failed":
            notes.append(f"* {r['key']} failed: {r.get('error', '')}")
        elif r.get("metric_source") == "valid":
            notes.append(f"* {r['key']}: metrics from the best validation check (no final test in summary.json)")
    out = "\n".join(lines)
    out += "\n\n" + (f"Power law over {AXIS_FIELD[axis]}: {fit.formula(metric, AXIS_FIELD[axis])} "
                     f"(R^2 in log-log space {fit.r2:.3f}, {note})" if fit else f"Power law: {note}")
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out + "\n"


def plot(records: Sequence[dict], fit: Optional[PowerLawFit], axis: str, metric: str, path: Path,
         title: str = "") -> None:
    """PNG: finished points (labelled with their scale), the fitted power law, log-scaled x axis."""
    import numpy as np

    from comeir_dist.utils.plotting import pyplot, save_figure

    plt = pyplot()

    field = AXIS_FIELD[axis]
    ok = [r for r in records if r.get("status") == "ok" and r.get("metrics", {}).get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if ok:
        xs = np.array([r[field] for r in ok], dtype=float)
        ys = np.array([r["metrics"][metric] for r in ok], dtype=float)
        ax.plot(xs, ys, "o", color="tab:blue", label=f"measured {metric}")
        for r, x, y in zip(ok, xs, ys):
            lab = f"s_T={r['s_t']:g}" if axis == "inter" else f"s_S={r['s_s']:g}" if axis == "intra" else \
                f"({r['s_t']:g}, {r['s_s']:g})"
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if fit is not None:
            grid = np.logspace(math.log10(xs.min()), math.log10(xs.max()), 100)
            ax.plot(grid, fit.predict(grid), "--", color="tab:red",
                    label=f"{fit.formula(metric, field)} (R²={fit.r2:.2f})")
    refused = [r for r in records if r["status"] in ("refused", "failed")]
    if refused:
        ax.plot([], [], " ", label="not run: " + ", ".join(f"{r['key']} ({r['status']})" for r in refused))
    ax.set_xscale("log")
    ax.set_xlabel(AXIS_LABEL[axis] + " (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {field}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def write_report(sweep_dir: Path, records: Sequence[dict], *, x_axis: str = "auto", metric: str = "item/hit@5",
                 extra: Optional[dict] = None) -> dict:
    """Write ``scaling.json``, ``scaling.md``, ``scaling.png`` under ``sweep_dir``; returns the JSON summary."""
    sweep_dir = Path(sweep_dir)
    axis = resolve_axis(records, x_axis)
    fit, note = fit_records(records, axis, metric)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = {"sweep_dir": str(sweep_dir), "metric": metric, "x_axis": axis, "x_field": AXIS_FIELD[axis],
               "fit": fit.to_dict() if fit else None, "fit_note": note, "counts": counts,
               "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               **(extra or {}), "points": list(records)}
    write_json(sweep_dir / "scaling.json", summary)
    table = markdown_table(records, fit, axis, metric, note)
    with atomic_file(sweep_dir / "scaling.md") as tmp:
        tmp.write_text(table)
    plot(records, fit, axis, metric, sweep_dir / "scaling.png")
    summary["markdown"] = table
    return summary
