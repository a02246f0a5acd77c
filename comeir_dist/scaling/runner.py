"""Run scaling points: the per-point body (train + final test in one process) and the executors.

``run_point(cfg_json)`` is what a worker executes: ``train(cfg)`` with ``save_best: false`` /
``final_test: true``, then it reads ``summary.json`` and returns metrics, wall time and the peak RSS of
its own process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Under :class:`RayExecutor` every point
is a Ray task with ``max_calls=1`` -- a fresh worker process per point, so the peak RSS is that point's --
requesting ``cpus_per_point`` CPUs and the planned bytes as Ray ``memory``: Ray runs as many points at once
as the cluster's CPUs and memory allow (one at a time by default). :class:`InlineExecutor` runs them one by
one in this process (tests; its peak RSS is the process's, not the point's).

An executor is ``executor(jobs, runner) -> iterator of (job, result dict | exception)`` in completion order,
so the driver can record each point as soon as it finishes.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from comeir_dist.entrypoint import configure_logging, set_env_defaults

log = logging.getLogger(__name__)

Runner = Callable[[str], dict]
Outcome = tuple["PointJob", Any]  # (job, result dict | BaseException)


@dataclass
class PointJob:
    key: str
    cfg_json: str  # RunConfig as JSON
    memory_bytes: int = 0  # planned peak (worst rank total) for Ray's memory resource


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def metrics_from_summary(summary: dict) -> tuple[dict, str]:
    """(metrics, source): the final model's test metrics (``train.final_test``), else -- older loops -- the
    best validation check of ``summary['validation']``."""
    test = summary.get("test")
    if isinstance(test, dict):
        m = test.get("metrics", test)
        return {k: v for k, v in m.items() if k != "step"}, "test"
    hist = summary.get("validation") or []
    best = [h for h in hist if h.get("step") == summary.get("best_step")] or hist[-1:]
    return ({k: v for k, v in best[0].items() if k not in ("step", "elapsed_s")} if best else {}), "valid"


def run_point(cfg_json: str) -> dict:
    """Train one grid point and evaluate it (this process); returns the point's measured record."""
    set_env_defaults()
    configure_logging()
    from comeir_dist.config.run import RunConfig
    from comeir_dist.train.loop import train

    cfg = RunConfig.model_validate_json(cfg_json)
    t0 = time.time()
    out = train(cfg)
    wall = time.time() - t0
    summary = json.loads((Path(out) / "summary.json").read_text())
    metrics, source = metrics_from_summary(summary)
    return {"metrics": metrics, "metric_source": source, "steps": summary.get("steps"),
            "best_step": summary.get("best_step"), "best_valid_ndcg@10": summary.get("best_valid_ndcg@10"),
            "stop_reason": summary.get("stop_reason"), "train_minutes": summary.get("train_minutes"),
            "dense_params": summary.get("dense_params"), "wall_time_s": wall, "peak_rss_bytes": peak_rss_bytes(),
            "pid": os.getpid(), "host": socket.gethostname(), "num_threads": cfg.train.num_threads}


# ---- executors --------------------------------------------------------------------------------------------
class InlineExecutor:
    """One point after the other in this process (no Ray)."""

    peak_rss_scope = "driver process (max so far)"

    def __call__(self, jobs: Iterable[PointJob], runner: Runner) -> Iterator[Outcome]:
        for job in jobs:
            try:
                yield job, runner(job.cfg_json)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed point, retried on rerun
                log.exception("scaling point %s failed", job.key)
                yield job, exc


def _ray_point(runner: Runner, cfg_json: str) -> dict:
    return runner(cfg_json)


class RayExecutor:
    """Each point is a Ray task (``max_calls=1``: a fresh worker process per point, no retries), requesting
    ``cpus_per_point`` CPUs (None = all CPUs of the cluster: one point at a time) and the planned memory
    (capped at the cluster's ``memory`` resource, so an oversized request runs alone instead of never)."""

    peak_rss_scope = "worker process (one Ray worker per point)"

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 cpus_per_point: Optional[float] = None):
        self.address, self.num_cpus, self.cpus_per_point = address, num_cpus, cpus_per_point

    def __call__(self, jobs: Iterable[PointJob], runner: Runner) -> Iterator[Outcome]:
        import ray

        from comeir_dist.orchestration.ray_session import ray_session

        jobs = list(jobs)
        if not jobs:
            return
        with ray_session(self.address, self.num_cpus):
            res = ray.cluster_resources()
            total_cpus = float(res.get("CPU", 1))
            cpus = self.cpus_per_point or total_cpus
            if cpus > total_cpus:
                from comeir_dist.errors import UserError

                raise UserError(f"--cpus-per-point: {cpus:g}; the Ray cluster has {total_cpus:g} CPUs")
            mem_cap = int(res.get("memory", 0))
            task = ray.remote(max_calls=1, max_retries=0)(_ray_point)
            pending = {}
            for job in jobs:
                mem = min(job.memory_bytes, mem_cap) if mem_cap else 0
                opts = {"num_cpus": cpus, "name": f"scaling-{job.key}"}
                if mem > 0:
                    opts["memory"] = mem
                pending[task.options(**opts).remote(runner, job.cfg_json)] = job
            log.info("submitted %d scaling point(s) as Ray tasks (%g CPU each, cluster %g CPUs)", len(jobs), cpus,
                     total_cpus)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    yield job, ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - task error, worker crash, OOM kill
                    log.error("scaling point %s failed: %s", job.key, str(exc).splitlines()[0] if str(exc) else exc)
                    yield job, exc
