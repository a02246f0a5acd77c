"""Worker-group attempts of one Ray Train run, and when to stop restarting them.

Ray Train restarts the whole worker group after any worker error, up to ``ray.max_failures`` times (-1 = without
limit), each time from the last reported checkpoint. A deterministic error would then restart forever. So every
worker records its attempts in ``out/ray_workers.jsonl`` (one JSON line per append)::

  {"event": "start", "run_id", "rank", "pid", "resume_from", "resume_step", "time"}
  {"event": "error", "run_id", "rank", "pid", "resume_step", "error", "time"}

A worker whose training raises records the error; when its own rank has now started ``FAILS_IN_A_ROW`` attempts
in a row from the same step (:func:`repeated_failure`), or the error is a UserError (bad input, refused
checkpoint: deterministic), it writes ``out/ray_stopped.json`` for this run before re-raising. Ray Train restarts
the group once more; every worker of that attempt finds the record and returns without training, so the run
ends; the driver reads the record after ``fit`` (:func:`stopped`) and reports it. The record is the one decision
every rank reads, so the ranks never disagree. At start a worker also checks its own rank's previous attempts (a
hard crash -- SIGKILL, segfault -- records no error) and, when they show the same repeated failure, writes the
record and raises, which tears the group down for that last, empty attempt.

``run_id`` is made by the driver for each ``fit`` and scopes the records: earlier runs in the same ``out`` never
count. A rank reads only records of its own rank written by earlier attempts or by itself.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from comeir_dist.utils import jsonl

WORKERS_LOG = "ray_workers.jsonl"
STOPPED = "ray_stopped.json"
FAILS_IN_A_ROW = 2


def records(out: Path, run_id: Optional[str] = None, rank: Optional[int] = None, event: str = "start") -> list[dict]:
    """Records of ``event`` (lines without an event are starts: the format before run ids), optionally of one run
    and rank, in file order."""
    out_recs = []
    for r in jsonl.read(Path(out) / WORKERS_LOG):
        if r.get("event", "start") != event:
            continue
        if run_id is not None and r.get("run_id") != run_id:
            continue
        if rank is not None and r.get("rank") != rank:
            continue
        out_recs.append(r)
    return out_recs


def consecutive(starts: list[dict], resume_step: int) -> int:
    """How many of the last start records (of one run and rank) resumed from ``resume_step``."""
    n = 0
    for r in reversed(starts):
        if int(r.get("resume_step") or 0) != resume_step:
            break
        n += 1
    return n


def repeated_failure(starts: list[dict], resume_step: int, limit: int = FAILS_IN_A_ROW) -> bool:
    """True when ``limit`` attempts in a row (the last start records of this run and rank) resumed from
    ``resume_step`` and failed: a restart always follows a failure, and an attempt that reported a newer checkpoint
    would have moved the resume step on."""
    return consecutive(starts, resume_step) >= limit


def record_start(out: Path, run_id: str, rank: int, resume_from: Optional[Path], resume_step: int) -> None:
    jsonl.append(Path(out) / WORKERS_LOG, {"event": "start", "run_id": run_id, "rank": rank, "pid": os.getpid(),
                                           "resume_from": None if resume_from is None else str(resume_from),
                                           "resume_step": resume_step, "time": time.time()})


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def record_error(out: Path, run_id: str, rank: int, resume_step: int, exc: BaseException) -> None:
    jsonl.append(Path(out) / WORKERS_LOG, {"event": "error", "run_id": run_id, "rank": rank, "pid": os.getpid(),
                                           "resume_step": resume_step, "error": one_line(exc), "time": time.time()})


def last_error(out: Path, run_id: str) -> Optional[str]:
    errs = records(out, run_id, event="error")
    return errs[-1]["error"] if errs else None


def write_stopped(out: Path, run_id: str, reason: str, step: int, message: str) -> None:
    """``reason``: "user_error" (``message`` is the UserError) or "repeated_failure"."""
    from comeir_dist.utils.atomic import write_json

    write_json(Path(out) / STOPPED, {"run_id": run_id, "reason": reason, "step": step, "message": message,
                                     "time": time.time()})


def stopped(out: Path, run_id: str) -> Optional[dict]:
    """The stop record of this run, or None."""
    import json

    try:
        data = json.loads((Path(out) / STOPPED).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") == run_id else None
