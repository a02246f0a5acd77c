"""Open a prepared dataset directory with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.errors import UserError

REQUIRED = ("items.parquet", "sequences.parquet", "train.parquet", "valid.parquet", "test.parquet", "stats.json")


def check_dataset_dir(path: str | Path) -> Path:
    """Return the path if it is a prepared dataset, else raise a one-line UserError."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: dataset directory not found (run `comeir prepare --out {p}`)")
    missing = [f for f in REQUIRED if not (p / f).is_file()]
    if missing:
        raise UserError(f"{p}: not a prepared dataset, missing {', '.join(missing)} (run `comeir prepare`)")
    return p


def read_stats(path: str | Path) -> dict:
    return json.loads((check_dataset_dir(path) / "stats.json").read_text())


def read_split(path: str | Path, name: str) -> pa.Table:
    """Read train/valid/test/sequences/items as a pyarrow table."""
    return pq.read_table(check_dataset_dir(path) / f"{name}.parquet")
