"""Durable, verifiable checkpoint directories: per-file sha256 in ``checksums.json`` and fsync before ``COMMITTED``.

Writing (:func:`describe`, :func:`write_checksums`, :func:`durable_write_text`): every file is fsynced by the
process that wrote it (on a shared filesystem only the writer can flush its own cache), hashed, and listed with
its size in ``checksums.json``; that file and the directories are fsynced before the commit marker is written.

Reading (:func:`verify`): before anything in a directory is deserialised, every listed file is re-hashed; the
first missing, truncated or altered file is returned as a one-line problem (``None`` = intact). Checksums catch
corruption (torn writes, bit flips, truncation); they are not a signature -- whoever can write the directory can
rewrite ``checksums.json`` too. Code execution is prevented separately: nothing in a run directory is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (created / renamed files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def durable_write_text(path: Path, text: str) -> None:
    """Write ``path`` via a temp file: fsync the data, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def describe(root: Path, files: Iterable[str]) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of files this process wrote under ``root``, each fsynced first
    (together with its directory)."""
    root = Path(root)
    out: dict[str, dict] = {}
    dirs = set()
    for rel in sorted(set(files)):
        p = root / rel
        fsync_file(p)
        dirs.add(p.parent)
        out[rel] = {ALGORITHM: sha256_file(p), "bytes": p.stat().st_size}
    for d in sorted(dirs):
        fsync_dir(d)
    return out


def write_checksums(root: Path, files: dict[str, dict]) -> None:
    """Durably write ``root/checksums.json`` (call after every listed file is on disk, before the commit marker)."""
    durable_write_text(Path(root) / CHECKSUMS, json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1,
                                                          sort_keys=True))


def _safe_relative(rel) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def read_checksums(root: Path) -> Optional[dict[str, dict]]:
    """The listed files, or None when ``checksums.json`` is missing (a checkpoint from before checksums).
    Raises ValueError (one line) when it is unreadable or malformed."""
    p = Path(root) / CHECKSUMS
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{CHECKSUMS}: unreadable ({exc.__class__.__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
        raise ValueError(f"{CHECKSUMS}: malformed")
    for rel, info in files.items():
        ok = (_safe_relative(rel) and isinstance(info, dict) and isinstance(info.get(ALGORITHM), str)
              and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool))
        if not ok:
            raise ValueError(f"{CHECKSUMS}: malformed entry {str(rel)[:80]!r}")
    return files


def verify(root: Path, required: Iterable[str] = (), only: Optional[Iterable[str]] = None) -> Optional[str]:
    """None when every file listed in ``checksums.json`` (and every ``required`` one) is present with its recorded
    size and sha256; otherwise a one-line description naming the first bad file. Sizes are checked for all files
    before any is hashed, so a truncated file is reported without reading gigabytes. ``only``: check just these
    (listed) files."""
    root = Path(root)
    try:
        files = read_checksums(root)
    except ValueError as exc:
        return str(exc)
    if files is None:
        return f"{CHECKSUMS}: missing"
    for rel in [*required, *(only or ())]:
        if rel not in files:
            return f"{rel}: not listed in {CHECKSUMS}"
    if only is not None:
        files = {rel: files[rel] for rel in only}
    for rel, info in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            return f"{rel}: missing"
        size = p.stat().st_size
        if size != info["bytes"]:
            return f"{rel}: {size} bytes, expected {info['bytes']} (truncated or overwritten)"
    for rel, info in sorted(files.items()):
        if sha256_file(root / rel) != info[ALGORITHM]:
            return f"{rel}: sha256 mismatch (corrupted or modified)"
    return None
