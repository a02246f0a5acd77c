"""Shared code of the maintenance tools in ``tools/`` (run as ``python tools/NAME.py`` from anywhere).

* :func:`run_tool`: the product's entry wrapper (offline env defaults, logging, a ``UserError`` becomes one
  line ``PROG: error: ...`` on stderr and exit code 2, never a traceback); an ``OSError`` (permission denied,
  disk full, ...) is reported the same way.
* :func:`output_dir`: where a tool writes a directory. It follows the product's rules
  (``comeir_dist.utils.output_guard`` / ``comeir_dist.utils.atomic``): everything is written into a temporary
  sibling and renamed into place at the end (a failure leaves nothing half-written); a non-empty directory is
  refused unless ``--overwrite``; a directory this tool wrote before (its ``.comeir-output.json`` marker has the
  tool's kind) is then replaced whole; any other directory keeps its files (nothing is deleted, same-named
  files are replaced), as ``comeir`` does with ``--overwrite``.

Only standard-library imports at module level: ``--help`` stays fast.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/x.py` without an installed package
    sys.path.insert(0, str(REPO))

log = logging.getLogger("comeir_dist.tools")


def run_tool(prog: str, body: Callable[[], int], verbose: bool = False) -> int:
    """Run ``body`` like a ``comeir`` command: returns its exit code; user errors -> one line, code 2."""
    from comeir_dist.entrypoint import run_entry

    def guarded() -> int:
        try:
            return body()
        except BrokenPipeError:  # `tool | head`: the reader left, nothing to report
            return 1
        except OSError as exc:  # an environment problem, not a bug: one line as well
            from comeir_dist.errors import UserError

            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise UserError(f"{where}{exc.strerror or exc}") from None

    return run_entry(prog, guarded, verbose=verbose)


def read_any_marker(path: Path) -> Optional[dict]:
    """``path``'s ``.comeir-output.json`` marker whatever its kind (also the tools' own kinds), or None."""
    from comeir_dist.utils.output_guard import MARKER

    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sample(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def check_output_dir(out: Path, kind: str, overwrite: bool, flag: str) -> str:
    """Refuse (UserError) what may not be written; returns how it will be written: 'new' (a temporary sibling
    renamed into place; a previous output of this tool holding nothing else is replaced whole) or 'update'
    (``--overwrite`` of a directory holding other files: they are kept, same-named files replaced)."""
    from comeir_dist.errors import UserError
    from comeir_dist.utils.output_guard import MARKER

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is an existing file, not a directory; choose a directory path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out}: {parent} is a file, not a directory")
            break
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    marker = read_any_marker(out) if entries else None
    ours = marker is not None and marker.get("kind") == kind
    if entries and not overwrite:
        what = "holds an earlier output of this tool" if ours else f"is not empty ({_sample(entries)})"
        raise UserError(f"{flag} {out}: {what}; choose another directory or pass --overwrite")
    if not entries:
        return "new"
    written = {str(f).split("/")[0] for f in (marker or {}).get("files", [])} | {MARKER}
    others = [e for e in entries if e not in written] if ours else entries
    if others:
        log.warning("--overwrite: %s holds %d entries this tool did not write (%s); none of them is deleted, the "
                    "new files are written beside them (same-named ones are replaced)", out, len(others),
                    _sample(others))
        return "update"
    return "new"


@contextlib.contextmanager
def output_dir(out: str | Path, kind: str, command: str, *, overwrite: bool = False, flag: str = "OUT",
               fingerprint: Optional[str] = None, **marker_extra) -> Iterator[Path]:
    """Yield a temporary directory to write the output into (plain files, subdirectories only when ``out`` is new
    or this tool's own); on success it becomes ``out`` with the product's output marker of ``kind`` (listing the
    files written), on error it is removed and ``out`` is left as it was."""
    from comeir_dist.utils.atomic import atomic_dir, atomic_update
    from comeir_dist.utils.output_guard import write_marker

    out = Path(out)
    how = check_output_dir(out, kind, overwrite, flag)
    ctx = atomic_update(out) if how == "update" else atomic_dir(out, overwrite=out.exists())
    with ctx as tmp:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        mask = os.umask(0)
        os.umask(mask)
        for f in files:  # some writers create 0600 files; outputs are meant to be shared like comeir's
            os.chmod(tmp / f, 0o666 & ~mask)
        write_marker(tmp, kind, fingerprint, command, files=files, **marker_extra)


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def sha256_of(path: Path) -> str:
    """sha256 of a file (the product's chunked hasher)."""
    from comeir_dist.train.checkpoint_integrity import sha256_file

    return sha256_file(Path(path))
