"""Write outputs to a temporary path and rename at the end, so a failure leaves nothing half-written.

Every target is checked before a temporary file is created (a directory where a file goes, a file where a
directory goes: one-line UserError, nothing left behind). Nothing here deletes what comeir did not write:
:func:`atomic_dir` replaces an existing directory only when the caller says it owns it (``overwrite=True``),
:func:`atomic_update` replaces only the files it writes and leaves the rest of the directory alone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from comeir_dist.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{final}: a parent path is a file, not a directory") from None


def _check_dir_target(final: Path) -> Path:
    """Absolute ``final`` for a directory that will be renamed into place."""
    final = Path(os.path.abspath(final))
    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: is an existing file, not a directory")
    cwd = Path.cwd()
    if final == cwd or final in cwd.parents:  # a directory cannot be renamed away from under this process
        raise UserError(f"{final}: is the current directory or contains it; name a subdirectory")
    return final


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it becomes ``final``, on error it is removed.

    An existing ``final`` is refused (UserError) unless ``overwrite``: pass it only for a directory comeir
    wrote entirely (``best/``, ``sids/<method>/``), whose old copy is deleted after the swap."""
    final = _check_dir_target(Path(final))
    if final.exists() and not overwrite:
        raise UserError(f"{final}: already exists")
    _make_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; results are meant to be shared
    try:
        yield tmp
        if not final.exists():
            os.rename(tmp, final)
            return
        if not overwrite or not final.is_dir():  # appeared while we were writing
            raise UserError(f"{final}: already exists")
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_update(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success each file in it replaces the same-named file of ``final`` (one
    rename each) and every other entry of ``final`` is kept. A missing ``final`` is created whole, as
    :func:`atomic_dir`. Only plain files may be written into the temp directory."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: is an existing file, not a directory")
    if not final.exists():
        with atomic_dir(final) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-update-", dir=final))  # inside: same filesystem, works for "."
    try:
        yield tmp
        for entry in sorted(tmp.iterdir()):
            if not entry.is_file():
                raise ValueError(f"atomic_update writes files only, got directory {entry.name}")
            os.chmod(entry, 0o666 & ~_umask())
            os.replace(entry, final / entry.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rmdir()


def _check_file_target(final: Path) -> None:
    if final.name in ("", ".", "..") or final.is_dir():
        raise UserError(f"{final}: is a directory; name a file")


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside ``final``; renamed onto ``final`` on success, deleted on error."""
    final = Path(final)
    _check_file_target(final)
    _make_parent(final)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600
        yield tmp
        os.replace(tmp, final)  # fails (and the temp file goes) if a directory appeared at ``final``
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    import json

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_json_and_markdown(path: str | os.PathLike, report: dict, markdown: str) -> None:
    """A benchmark's report: ``path`` (JSON) and ``path`` with suffix ``.md`` (its table), each atomically."""
    path = Path(path)
    _check_file_target(path)
    _check_file_target(path.with_suffix(".md"))  # both checked before either is written
    write_json(path, report)
    with atomic_file(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown)
