"""Where a command may write: never over content comeir did not write.

Every output directory comeir writes carries a marker file ``.comeir-output.json``::

    {"format": "comeir-output/1", "kind": "dataset" | "run" | "experiment" | "scaling",
     "fingerprint": "<sha256 of the inputs / config>", "command": "comeir prepare", "time": "...", ...}

Directories written before the marker existed are recognised by their layout (:func:`layout_kind`), so they
keep working. An existing directory that is neither empty nor ours (or is ours but of another kind, e.g. a
dataset given as a run dir) is refused with one line unless ``overwrite``; even then nothing is deleted:
comeir writes its files beside the foreign ones (same-named files are replaced) and logs what it found.
Single-file outputs (:func:`check_out_file`) must not name an existing directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".comeir-output.json"
MARKER_FORMAT = "comeir-output/1"
KINDS = {"dataset": "a prepared dataset (comeir prepare)", "run": "a training run (comeir train)",
         "experiment": "an experiment dir (comeir experiment)", "scaling": "a scaling sweep dir (comeir scaling)",
         "analysis": "an analysis dir (comeir analyze)", "converted-input": "converted input data (tools/convert_dataset.py)",
         "hf-export": "a Hugging Face export (tools/export_hf.py)",
         "memory": "stored preference memories (comeir memory build)"}
# files a run dir holds; ray_workers.jsonl is appended by Ray Train workers before train() starts
RUN_FILES = ("train_log.jsonl", "summary.json", "ray_workers.jsonl")
DATASET_FILES = ("stats.json", "items.parquet", "sequences.parquet")


def fingerprint(obj) -> str:
    """sha256 of a JSON-able value (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_marker(path: Path) -> Optional[dict]:
    """The marker of ``path`` or None (missing or unreadable: the layout decides then)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and (any((p / f).is_file() for f in RUN_FILES) or (p / "checkpoints").is_dir()
                           or (p / "best" / "meta.json").is_file())


def layout_kind(path: Path) -> Optional[str]:
    """What comeir wrote at ``path`` judged by today's layout (outputs from before the marker), or None."""
    path = Path(path)
    if all((path / f).is_file() for f in DATASET_FILES):
        return "dataset"
    if (path / "points").is_dir() or (path / "scaling.json").is_file():
        return "scaling"
    if (path / "results.json").is_file() or (path / "results").is_dir() or any(
            "-seed" in p.name and _is_run_dir(p) for p in path.iterdir() if p.is_dir()):
        return "experiment"
    if _is_run_dir(path):
        return "run"
    return None


@dataclass
class OutState:
    """An output path as found before writing."""

    path: Path
    exists: bool
    entries: list[str]  # top-level names inside (sorted)
    kind: Optional[str]  # what comeir wrote there (marker, else layout); None = nothing recognised
    marker: Optional[dict]

    @property
    def foreign(self) -> bool:
        return bool(self.entries) and self.kind is None


def inspect_out(path: str | os.PathLike) -> OutState:
    p = Path(path)
    if not p.is_dir():  # missing, or a file (refused by check_out_dir)
        return OutState(p, p.exists(), [], None, None)
    entries = sorted(e.name for e in p.iterdir())
    marker = read_marker(p)
    kind = marker["kind"] if marker else (layout_kind(p) if entries else None)
    return OutState(p, True, entries, kind, marker)


def _sample(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def check_out_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False, flag: str = "--out") -> OutState:
    """Refuse (one line) an output dir comeir may not write; returns what is there. Nothing is written here."""
    state = inspect_out(path)
    p = state.path
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: is an existing file, not a directory; choose a directory path")
    if not p.exists():
        for parent in p.parents:  # a file in the way of the directory to create
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
                break
    other = state.kind is not None and state.kind != kind
    if (state.foreign or other) and not overwrite:
        what = f"holds {KINDS[state.kind]}, not {KINDS[kind]}" if other else \
            f"is not empty and was not written by comeir ({_sample(state.entries)})"
        raise UserError(f"{flag} {path}: {what}; choose another directory or pass --overwrite")
    if state.foreign or other:
        theirs = f"{KINDS[state.kind]}" if other else f"{len(state.entries)} entries comeir did not write"
        log.warning("--overwrite: %s holds %s (%s); none of it is deleted, comeir writes its files beside it and "
                    "replaces same-named ones", p, theirs, _sample(state.entries))
    return state


def write_marker(path: str | os.PathLike, kind: str, fp: Optional[str], command: str, **extra) -> None:
    """Claim ``path`` as comeir's output of ``kind`` (atomically)."""
    from comeir_dist.utils.atomic import write_json

    write_json(Path(path) / MARKER, {"format": MARKER_FORMAT, "kind": kind, "fingerprint": fp, "command": command,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})


def claim_out_dir(path: str | os.PathLike, kind: str, fp: Optional[str], command: str, *, overwrite: bool = False,
                  flag: str = "--out") -> OutState:
    """Check ``path`` (see :func:`check_out_dir`), create it and write its marker; a previous output of the
    same kind with another fingerprint is reported (its files are replaced as the command writes).
    ``fp`` None: the kind keeps its own per-run fingerprints (experiment results, scaling points)."""
    state = check_out_dir(path, kind, overwrite=overwrite, flag=flag)
    if fp is not None and state.marker and state.kind == kind and state.marker.get("fingerprint") != fp:
        log.info("%s was written with another config; its outputs are replaced as this %s writes", path, command)
    Path(path).mkdir(parents=True, exist_ok=True)
    if not state.marker or state.marker.get("fingerprint") != fp or state.kind != kind:
        write_marker(path, kind, fp, command)
    return state


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A single-file output: replacing a file is fine, a directory (``.``, ``..``) or a file standing in for
    a parent directory is a one-line UserError. Call it before any work; it creates nothing."""
    p = Path(path)
    if p.name in ("", ".", "..") or p.is_dir():
        raise UserError(f"{flag} {path}: is a directory; name a file such as {Path(path) / 'out.json'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return p


def guard_run_dir(cfg, env, overwrite: bool = False) -> None:
    """Train start: rank 0 checks and claims the run dir ``cfg.out``; every rank raises the same UserError
    (the others would otherwise wait in the next collective)."""
    from comeir_dist.parallel.dist_env import broadcast_object

    problem = None
    if env.is_main:
        try:
            claim_out_dir(cfg.out, "run", run_fingerprint(cfg), "comeir train", overwrite=overwrite)
        except UserError as exc:
            problem = str(exc)
    problem = broadcast_object(problem, env)
    if problem:
        raise UserError(problem)


def run_fingerprint(cfg) -> str:
    """A run config's fingerprint without its output path and resume switch (they do not change the model)."""
    data = cfg.model_dump(mode="json")
    data.pop("out", None)
    data.get("parallel", {}).pop("resume", None)
    return fingerprint(data)
