"""The step checkpoints of a run dir: discovery, choosing the one to resume from, retention.

* ``run/checkpoints/step-N`` counts only with ``COMMITTED`` (written last, after ``checksums.json``).
* :func:`choose_resume` (rank 0): the newest committed step (at most the one Ray Train recorded) whose files
  all match their checksums. A damaged step is logged (step and bad file) and the next older committed step is
  tried; once an intact one is found the damaged newer ones are renamed to ``step-N.damaged-<time>`` (kept for
  inspection, never loaded again). No intact step: one-line error, nothing moved. A checkpoint written before
  checksums and pickle-free metadata (format 1) is refused with one line.
* :func:`retain`: keeps the newest ``keep`` committed steps plus every step in ``protect`` -- the loop protects the
  steps Ray Train may still hand back to a restarted worker group (registration is asynchronous: after the report
  of step N returns, Ray may still restart from the previously reported step). Deleting renames the directory
  first, so a crash mid-delete never leaves a committed-looking partial step.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)
COMMIT = "COMMITTED"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a step-N directory")
    return int(m.group(1))


def step_dirs(run_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, dir, committed) of every ``step-N`` dir, ascending by step."""
    root = checkpoints_root(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d, (d / COMMIT).is_file()))
    return sorted(out)


def latest_committed(run_dir: Path) -> Path | None:
    """Newest committed step checkpoint; partial ones (no COMMITTED) are ignored."""
    done = [d for _, d, ok in step_dirs(run_dir) if ok]
    return done[-1] if done else None


def set_aside(run_dir: Path) -> Path:
    """Rename ``run/checkpoints`` to ``run/checkpoints.stale-<time>`` (a fresh start must not mix with them)."""
    root = checkpoints_root(run_dir)
    dst = root.with_name(f"checkpoints.stale-{int(time.time())}")
    os.rename(root, dst)
    return dst


def require_step_dir(run_dir: Path, path, source: str) -> Path:
    """``path`` as ``run/checkpoints/step-N`` if it resolves to exactly such a directory of THIS run; otherwise a
    one-line UserError (a recorded path is never followed elsewhere)."""
    root = checkpoints_root(run_dir).resolve()
    if not isinstance(path, (str, Path)) or not str(path) or not Path(path).is_absolute():
        raise UserError(f"{source}: checkpoint path {str(path)[:200]!r} is not an absolute path; refusing it")
    p = Path(path).resolve()
    if p.parent != root or not _STEP_RE.match(p.name):
        raise UserError(f"{source}: checkpoint path {str(path)[:200]} is not a step-N directory under {root}; "
                        f"refusing to load it")
    return root / p.name


def retire(d: Path, suffix: str) -> Path:
    """Rename ``d`` to ``<name>.<suffix>-<time>`` (no longer a ``step-N`` dir: never discovered or loaded)."""
    dst = d.with_name(f"{d.name}.{suffix}-{int(time.time())}")
    os.rename(d, dst)
    return dst


def retain(run_dir: Path, keep: int, protect: Iterable[int] = ()) -> list[int]:
    """Delete committed steps other than the newest ``keep`` and the ``protect``ed ones, and every uncommitted
    ``step-N`` dir; returns the deleted steps. Rank 0 only, never while a step is being written."""
    dirs = step_dirs(run_dir)
    committed = [s for s, _, ok in dirs if ok]
    keep_steps = set(committed[-keep:] if keep > 0 else []) | set(protect)
    gone = []
    for s, d, ok in dirs:
        if ok and s in keep_steps:
            continue
        try:
            tmp = retire(d, "deleting")
        except OSError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        if ok:
            gone.append(s)
    root = checkpoints_root(run_dir)
    for left in root.glob("step-*.deleting-*") if root.is_dir() else []:  # a delete interrupted by a crash
        shutil.rmtree(left, ignore_errors=True)
    return gone


def _format_of(d: Path):
    try:
        return json.loads((d / "state.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def choose_resume(run_dir: Path, resume_from: Optional[Path], resume: Optional[bool], verify,
                  current_format: int) -> Optional[Path]:
    """The committed, intact step dir to resume from, or None to start from scratch (rank 0 only).

    ``resume``: ``parallel.resume`` (False = set existing checkpoints aside). ``resume_from``: the step Ray Train
    recorded; newer steps on disk are ignored, and when it is damaged or missing the newest intact older one is
    used. ``verify(dir) -> problem or None`` checks a dir's checksums."""
    run_dir = Path(run_dir)
    if resume is False:
        if checkpoints_root(run_dir).is_dir() and step_dirs(run_dir):
            stale = set_aside(run_dir)
            log.warning("parallel.resume: false -- moved the existing checkpoints to %s, starting from scratch", stale)
        return None
    committed = [(s, d) for s, d, ok in step_dirs(run_dir) if ok]
    if resume_from is not None:
        wanted = require_step_dir(run_dir, resume_from, "resume checkpoint")
        limit = step_of(wanted)
        if not (wanted / COMMIT).is_file():
            log.warning("resume: the recorded checkpoint %s is missing or not committed; using the newest intact "
                        "committed step before it", wanted)
        elif committed and committed[-1][1] != wanted:
            log.warning("resuming from %s (the recorded checkpoint), not the newest on disk %s", wanted,
                        committed[-1][1])
        committed = [(s, d) for s, d in committed if s <= limit]
        if not committed:
            raise UserError(f"resume checkpoint {resume_from} is not committed (no {COMMIT} marker) and no older "
                            f"committed step exists under {checkpoints_root(run_dir)}")
    damaged: list[tuple[int, Path, str]] = []
    for s, d in reversed(committed):
        problem = verify(d)
        if problem is None:
            for bad_step, bad_dir, why in damaged:  # newer than the step used: set aside, never loaded again
                aside = retire(bad_dir, "damaged")
                log.warning("resume: checkpoint step-%d is damaged (%s); moved to %s", bad_step, why, aside.name)
            if damaged:
                log.warning("resume: using step-%d, the newest intact committed checkpoint", s)
            return d
        fmt = _format_of(d)
        if fmt is not None and fmt != current_format and problem.endswith("checksums.json: missing"):
            raise UserError(f"{d}: checkpoint format {fmt} (written by an older comeir-dist, with pickled RNG/scheduler"
                            f"/DCP metadata) is not loaded; set parallel.resume: false to set it aside and start over")
        log.warning("resume: checkpoint step-%d is damaged (%s)", s, problem)
        damaged.append((s, d, problem))
    if damaged:  # nothing intact: leave every dir in place for inspection
        raise UserError(f"no intact committed checkpoint under {checkpoints_root(run_dir)} (damaged: "
                        f"{'; '.join(f'step-{s}: {why}' for s, _, why in damaged[:3])}); set parallel.resume: false "
                        f"to start over")
    if resume:
        log.warning("parallel.resume: no committed checkpoint under %s; starting from scratch", checkpoints_root(run_dir))
    return None
