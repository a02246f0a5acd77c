"""`comeir scaling` / jobs/scaling_sweep.py: train + evaluate every grid point, resumably, then report.

Layout of a sweep dir::

    points/<key>.json         finished point (written atomically after it ran) -- the ONLY resume marker
    points/<key>.failed.json  last failure of a point (informational; the point is retried on rerun)
    runs/<key>/               the point's run dir (train_log.jsonl, summary.json)
    scaling.{json,md,png}     summary, table, plot + power-law fit

A point is finished when ``points/<key>.json`` parses, says ``status: ok`` and carries the fingerprint of
the point's current run config (a changed budget/model reruns it); anything else (missing, partial,
crashed, other config) runs again. A point whose memory plan does not fit is refused before it starts
(status ``refused`` with the plan's one-line message) and is re-planned on every invocation.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from comeir_dist.config.run import RunConfig
from comeir_dist.scaling.grid import GridPoint, ScalingSettings, build_grid, plan_points
from comeir_dist.scaling.report import write_report
from comeir_dist.scaling.runner import PointJob, RayExecutor, run_point
from comeir_dist.utils.atomic import write_json
from comeir_dist.utils.output_guard import claim_out_dir

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    sweep_dir: Path
    records: list[dict]
    summary: dict = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # keys trained in this invocation

    @property
    def failed(self) -> list[str]:
        return [r["key"] for r in self.records if r["status"] == "failed"]


def points_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "points"


def load_finished(sweep_dir: Path, point: GridPoint) -> Optional[dict]:
    """The stored record of a finished point, or None when it has to (re)run."""
    path = points_dir(sweep_dir) / f"{point.key}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is unreadable or partial: point %s runs again", path, point.key)
        return None
    if not isinstance(rec, dict) or rec.get("status") != "ok" or not isinstance(rec.get("metrics"), dict):
        log.warning("%s is not a finished point record: point %s runs again", path, point.key)
        return None
    if rec.get("fingerprint") != point.fingerprint:
        log.warning("%s was trained with another config (fingerprint %s, now %s): point %s runs again", path,
                    rec.get("fingerprint"), point.fingerprint, point.key)
        return None
    return rec


def format_grid(points: Sequence[GridPoint], sweep_dir: Path, settings: ScalingSettings) -> str:
    """The dry-run listing: table sizes and memory plan per point, and whether it would run."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    elt = 2 if settings.table_dtype == "fp16" else 4
    st = sorted({p.s_t for p in points})
    ss = sorted({p.s_s for p in points})
    dev = points[0].plan.device if points and points[0].plan else "?"
    mem = gib(points[0].plan.device_memory_bytes) if points and points[0].plan else "?"
    lines = [f"scaling grid: {len(points)} point(s) = s_T {[float(f'{x:g}') for x in st]} x s_S "
             f"{[float(f'{x:g}') for x in ss]}, {settings.table_dtype} tables, 1 {dev} rank of {mem} per point, "
             f"sweep dir {sweep_dir}",
             f"{'point':<18} {'s_T':>5} {'s_S':>6} {'P_S (intra)':>15} {'P_T (inter)':>15} "
             f"{'tables ' + settings.table_dtype:>13} {'plan/rank':>10} {'usable':>10}  {'fits':<4}  state"]
    for p in points:
        rec = load_finished(sweep_dir, p)
        state = "finished (skipped)" if rec else ("refused" if not p.fits else "would run")
        plan = p.plan
        lines.append(f"{p.key:<18} {p.s_t:>5g} {p.s_s:>6g} {p.p_s:>15,} {p.p_t:>15,} {gib(p.p_total * elt):>13} "
                     f"{gib(plan.worst.total) if plan else '-':>10} {gib(plan.usable_bytes) if plan else '-':>10}  "
                     f"{('yes' if p.fits else 'NO'):<4}  {state}")
    lines.append("")
    for p in points:
        if p.plan is not None:
            lines.append(f"{p.key}: {p.plan.message()}")
    return "\n".join(lines)


def prepare_grid(base: RunConfig, settings: ScalingSettings, sweep_dir: Optional[Path] = None,
                 device_memory_gib: Optional[float] = None) -> tuple[Path, list[GridPoint]]:
    """Sweep dir, and every grid point with its config, table sizes and memory plan."""
    sweep = Path(sweep_dir or settings.out or base.out)
    threads = int(max(1, settings.cpus_per_point)) if settings.cpus_per_point else None
    points = build_grid(base, settings, sweep, num_threads=threads, device_memory_gib=device_memory_gib)
    plan_points(points)
    return sweep, points


def run_sweep(base: RunConfig, settings: ScalingSettings, *, sweep_dir: Optional[Path] = None,
              device_memory_gib: Optional[float] = None, executor: Optional[Callable] = None,
              runner: Callable[[str], dict] = run_point, ray_address: Optional[str] = None,
              ray_num_cpus: Optional[int] = None, points: Optional[list[GridPoint]] = None,
              overwrite: bool = False) -> SweepResult:
    """Run every unfinished point that fits (``executor``: default :class:`RayExecutor`), record each as it
    finishes, then write the report over all points (finished earlier, new, refused, failed)."""
    if points is None:
        sweep, points = prepare_grid(base, settings, sweep_dir, device_memory_gib)
    else:
        sweep = Path(sweep_dir or settings.out or base.out)
    if executor is None:
        executor = RayExecutor(ray_address, ray_num_cpus, settings.cpus_per_point)
    # a dir holding other content (or another kind of output) is refused unless overwrite; nothing is deleted
    claim_out_dir(sweep, "scaling", None, "comeir scaling", overwrite=overwrite)
    pdir = points_dir(sweep)
    pdir.mkdir(parents=True, exist_ok=True)

    records: dict[str, dict] = {}
    todo: list[GridPoint] = []
    for p in points:
        rec = load_finished(sweep, p)
        if rec is not None:
            log.info("point %s already finished: skipped", p.key)
            records[p.key] = {**p.base_record(), **rec, "resumed": True}
        elif not p.fits:
            msg = p.plan.message()
            log.warning("point %s refused before starting: %s", p.key, msg)
            records[p.key] = {**p.base_record(), "status": "refused", "message": msg}
        else:
            todo.append(p)

    by_key = {p.key: p for p in todo}
    jobs = [PointJob(p.key, p.cfg.model_dump_json(), p.plan.worst.total if p.plan else 0) for p in todo]
    ran = []
    if jobs:
        log.info("%d point(s) to run: %s", len(jobs), ", ".join(j.key for j in jobs))
        bar = tqdm(total=len(jobs), desc="scaling points", unit="point")
        for job, outcome in executor(jobs, runner):
            p = by_key[job.key]
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if isinstance(outcome, BaseException):
                cause = getattr(outcome, "cause", None)  # RayTaskError wraps the exception raised in the task
                exc = cause if isinstance(cause, BaseException) else outcome
                first = (str(exc).strip().splitlines() or [""])[0]
                err = f"{type(exc).__name__}: {first}"
                rec = {**p.base_record(), "status": "failed", "error": err, "failed_at": now}
                write_json(pdir / f"{p.key}.failed.json", rec)
            else:
                rec = {**p.base_record(), "status": "ok", **outcome, "finished_at": now,
                       "peak_rss_scope": getattr(executor, "peak_rss_scope", "worker process")}
                write_json(pdir / f"{p.key}.json", rec)
                (pdir / f"{p.key}.failed.json").unlink(missing_ok=True)
                ran.append(p.key)
                m = rec.get("metrics", {})
                log.info("point %s: P_T %s, %s %.4f, %.1f min, peak RSS %.2f GiB", p.key, f"{p.p_t:,}",
                         settings.metric, m.get(settings.metric, float("nan")), rec["wall_time_s"] / 60,
                         rec["peak_rss_bytes"] / 2**30)
            records[p.key] = rec
            bar.update(1)
        bar.close()

    ordered = [records[p.key] for p in points]
    extra = {"config": base.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
             "driver_host": socket.gethostname()}
    summary = write_report(sweep, ordered, x_axis=settings.x_axis, metric=settings.metric, extra=extra)
    return SweepResult(sweep, ordered, summary, ran)
