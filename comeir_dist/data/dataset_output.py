"""What `comeir prepare` owns in a dataset dir, and when re-preparing it would make later stages stale.

``prepare`` writes PREPARED_FILES (and the marker); ``embed`` and ``quantize`` later add artefacts (:func:`derived_artefacts`)
computed from them (minutes of work). Re-running ``prepare`` keeps those artefacts when the prepared tables
do not change, and refuses (unless ``--overwrite``) when they would.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.pipeline import PrepareConfig

TABLES = ("items", "users", "sequences", "train", "valid", "test")
PREPARED_FILES = tuple(f"{t}.parquet" for t in TABLES) + ("stats.json",)
# the tables every later stage is computed from: same items + sequences = same splits, embeddings, SIDs
KEY_TABLES = ("items", "sequences")
FORMAT = 1  # bump when prepare writes other tables for the same input


def input_files(cfg: PrepareConfig) -> list[Path]:
    """The files `read_raw` reads for ``cfg`` (the bundled data when ``input`` is None)."""
    from comeir_dist.data.readers import BUNDLED_DIR

    p = Path(cfg.input) if cfg.input else BUNDLED_DIR
    if p.is_dir():
        from comeir_dist.data.movielens import is_movielens_dir, movielens_files

        if is_movielens_dir(p):
            return movielens_files(p)
        found = sorted(p.glob("*.inter.json")) + sorted(p.glob("*.item.json"))
        return found or sorted(f for f in p.iterdir() if f.is_file())  # another layout: every file counts
    return [p] + ([Path(cfg.items)] if cfg.items else [])


def input_fingerprint(cfg: PrepareConfig) -> str:
    """sha256 of the input files' bytes and the prepare parameters (not of the paths: a moved copy matches)."""
    params = {"format": FORMAT, "k_core": cfg.k_core, "max_history": cfg.max_history}
    if cfg.valid_targets != 1:  # absent at the default: datasets prepared before the option keep their fingerprint
        params["valid_targets"] = cfg.valid_targets
    if cfg.test_targets != 1:
        params["test_targets"] = cfg.test_targets
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for f in input_files(cfg):
        h.update(f"\0{f.name}\0".encode())
        try:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(b"<unreadable>")  # read_raw reports it
    return h.hexdigest()


def derived_artefacts(dataset: Path) -> list[str]:
    """Later stages' outputs present in ``dataset`` (relative names), e.g. item_emb.parquet, sids/rqkmeans."""
    found = [f for f in ("item_emb.parquet", "item_emb.json") if (dataset / f).is_file()]
    sids = dataset / "sids"
    if sids.is_dir():
        found += [f"sids/{d.name}" for d in sorted(sids.iterdir())
                  if d.is_dir() and ((d / "codes.parquet").is_file() or (d / "report.json").is_file())]
    return found


def remove_artefacts(dataset: Path, names: list[str]) -> None:
    """Delete stale later-stage outputs (comeir wrote them); an emptied ``sids/`` goes too."""
    for name in names:
        p = dataset / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    sids = dataset / "sids"
    if sids.is_dir() and not any(sids.iterdir()):
        sids.rmdir()


def same_key_tables(dataset: Path, tables: dict[str, pa.Table]) -> bool:
    """True when ``dataset`` already holds exactly these items and sequences (later stages stay valid)."""
    for name in KEY_TABLES:
        try:
            old = pq.read_table(dataset / f"{name}.parquet")
        except Exception:  # noqa: BLE001 -- missing or unreadable: not the same
            return False
        if not old.equals(tables[name]):
            return False
    return True
