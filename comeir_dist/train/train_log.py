"""``RUN/train_log.jsonl``: one record per logged step ({"step", "loss", ...}) or validation ({"step", "valid"}).

Rank 0 appends records while training. On (re)start the log is cut back to the resumed step -- records of steps
after the checkpoint are trained again -- and rewritten atomically (temp file + rename), so an interruption
leaves either the old or the new log. A torn last line (a writer killed mid-append) is dropped with a warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from comeir_dist.utils import jsonl
from comeir_dist.utils.atomic import atomic_file

NAME = "train_log.jsonl"


def path_of(run_dir: Path) -> Path:
    return Path(run_dir) / NAME


def read(path: Path) -> list[dict]:
    return jsonl.read(path)


def keep_until(path: Path, step: Optional[int]) -> int:
    """Rewrite ``path`` atomically with the records of steps <= ``step`` (None: empty, a fresh start);
    returns the number of records kept."""
    import json

    kept = [] if step is None else [r for r in read(path)
                                    if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


def append(path: Path, record: dict) -> None:
    jsonl.append(path, record)
