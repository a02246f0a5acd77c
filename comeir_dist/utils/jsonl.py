"""Append-only JSON-lines files that survive a writer killed mid-append.

:func:`append` writes one record per ``write`` call (a whole line, flushed on close). A writer killed in the
middle leaves a torn last line; :func:`read` skips it (and any other malformed line) with a warning instead of
failing every later reader.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read(path: Path, warn: bool = True) -> list[dict]:
    """The JSON-object records of ``path`` in order ([] when missing); malformed lines are skipped with a warning
    (a torn final line is the normal trace of an interrupted append)."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    out, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append(i)
    if bad and warn:
        last = len(lines) if lines[-1].strip() else len(lines) - 1
        what = "a torn final line (interrupted write)" if bad == [last] else f"malformed line(s) {bad[:5]}"
        log.warning("%s: skipped %s", path, what)
    return out


def append(path: Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
