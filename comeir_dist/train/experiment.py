"""`comeir experiment`: the same data, SIDs, backbone and budget for each variant x seed; a results table."""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from comeir_dist.config.run import RunConfig
from comeir_dist.eval.run_eval import run_evaluate
from comeir_dist.train.loop import train
from comeir_dist.utils.atomic import atomic_file, write_json

log = logging.getLogger(__name__)
COLUMNS = ("item/hit@5", "item/ndcg@5", "item/hit@10", "item/ndcg@10", "sid/hit@10", "sid/ndcg@10")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per variant, mean ± std over seeds, plus training minutes and eval ms/user."""
    head = "| variant | seeds | " + " | ".join(COLUMNS) + " | train min | eval ms/user |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    for v, rs in by_variant.items():
        cells = []
        for c in COLUMNS:
            m, s = _mean_std([r["metrics"][c] for r in rs])
            cells.append(f"{m:.4f} ± {s:.4f}")
        tm, _ = _mean_std([r["train_minutes"] for r in rs])
        ms, _ = _mean_std([r["ms_per_user"] for r in rs])
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {tm:.1f} | {ms:.2f} |")
    return "\n".join(lines)


def run_experiment(cfg: RunConfig, variants: list[str], seeds: int) -> str:
    """Train/evaluate every (variant, seed) under ``cfg.out``; finished runs (with test.json) are reused."""
    root = Path(cfg.out)
    rows = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for variant in variants:
            run_dir = root / f"{variant}-seed{seed}"
            result_path = run_dir / "test.json"
            if not result_path.is_file():
                run_cfg = cfg.model_copy(deep=True)
                run_cfg.model.variant = variant
                run_cfg.seed = seed
                run_cfg.out = str(run_dir)
                RunConfig.model_validate(run_cfg.model_dump())  # variant-specific checks (flatten positions)
                train(run_cfg)
                run_evaluate(str(run_dir / "best"), "test", str(result_path))
            res = json.loads(result_path.read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"variant": variant, "seed": seed, "metrics": res["metrics"], "ms_per_user": res["ms_per_user"],
                         "train_minutes": summary["train_minutes"], "steps": summary["steps"]})
            log.info("%s seed %d: item/ndcg@10 %.4f", variant, seed, res["metrics"]["item/ndcg@10"])
    table = format_table(rows)
    write_json(root / "results.json", {"config": cfg.model_dump(mode="json"), "runs": rows})
    with atomic_file(root / "results.md") as tmp:
        tmp.write_text(table + "\n")
    return table
