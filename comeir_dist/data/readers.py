"""Readers for raw inputs: the LC-Rec/LETTER JSON layout and CSV/Parquet interaction tables.

Both return ``RawData``: per-user time-ordered raw item-id lists plus an item text table.
Every problem is a one-line ``UserError`` naming the file and field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from comeir_dist.data.schema import ITEM_TEXT_FIELDS
from comeir_dist.errors import UserError

BUNDLED_DIR = Path(__file__).parent / "bundled" / "scientific"


@dataclass
class RawData:
    """Raw interactions (user -> time-ordered raw item ids) and item texts (raw item id -> fields)."""

    sequences: dict[str, list[str]]
    items: dict[str, dict[str, str | None]]
    source: str


def _load_json(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _find_one(directory: Path, suffix: str) -> Path:
    found = sorted(directory.glob(f"*{suffix}"))
    if not found:
        raise UserError(f"{directory}: no '*{suffix}' file")
    if len(found) > 1:
        raise UserError(f"{directory}: several '*{suffix}' files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _item_fields(path: Path, key: str, rec) -> dict[str, str | None]:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: item '{key}' must be an object with text fields, got {type(rec).__name__}")
    out = {}
    for f in ITEM_TEXT_FIELDS:
        v = rec.get(f)
        if v is not None and not isinstance(v, str):
            v = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
        out[f] = v
    if not out["title"] and not out["description"]:
        raise UserError(f"{path}: item '{key}' has neither 'title' nor 'description'")
    return out


def read_json_dir(directory: Path) -> RawData:
    """Read ``<name>.inter.json`` ({user: [item, ...]} in time order) and ``<name>.item.json``."""
    inter_path = _find_one(directory, ".inter.json")
    item_path = _find_one(directory, ".item.json")
    inter = _load_json(inter_path)
    if not isinstance(inter, dict) or not inter:
        raise UserError(f"{inter_path}: expected a non-empty object {{user: [item, ...]}}")
    sequences: dict[str, list[str]] = {}
    for user, seq in inter.items():
        if not isinstance(seq, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in seq):
            raise UserError(f"{inter_path}: user '{user}' must map to a list of item ids, got {str(seq)[:60]}")
        sequences[str(user)] = [str(i) for i in seq]
    raw_items = _load_json(item_path)
    if not isinstance(raw_items, dict) or not raw_items:
        raise UserError(f"{item_path}: expected a non-empty object {{item: {{title, description, ...}}}}")
    items = {str(k): _item_fields(item_path, str(k), v) for k, v in raw_items.items()}
    return RawData(sequences, items, source=str(directory))


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            conv = pacsv.ConvertOptions(strings_can_be_null=True)
            return pacsv.read_csv(path, parse_options=opts, convert_options=conv)
        if suffix in (".json", ".jsonl"):
            return _json_items_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: cannot read as {suffix[1:]}: {first}") from None
    raise UserError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv, .parquet or .json)")


def _json_items_table(path: Path) -> pa.Table:
    data = _load_json(path)
    if isinstance(data, dict):
        rows = [{"item_id": k, **(v if isinstance(v, dict) else {})} for k, v in data.items()]
    elif isinstance(data, list):
        rows = data
    else:
        raise UserError(f"{path}: expected an object {{item_id: {{...}}}} or a list of records")
    return pa.Table.from_pylist(rows)


def _require_columns(path: Path, table: pa.Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise UserError(f"{path}: no rows")


def read_interaction_table(path: Path, items_path: Path | None) -> RawData:
    """Read a CSV/Parquet table of (user_id, item_id, timestamp) and an item table with text fields."""
    if items_path is None:
        raise UserError(f"{path}: an interactions table needs --items FILE with item_id and text fields")
    table = _read_table(path)
    _require_columns(path, table, ("user_id", "item_id", "timestamp"))
    ts = table.column("timestamp")
    if not (pa.types.is_integer(ts.type) or pa.types.is_floating(ts.type) or pa.types.is_timestamp(ts.type)
            or pa.types.is_date(ts.type)):
        raise UserError(f"{path}: column 'timestamp' must be numeric or a timestamp, got {ts.type}")
    for col in ("user_id", "item_id", "timestamp"):
        nulls = table.column(col).null_count
        if nulls:
            raise UserError(f"{path}: column '{col}' has {nulls} empty value(s)")
    users = pc.cast(table.column("user_id"), pa.string()).to_pylist()
    items = pc.cast(table.column("item_id"), pa.string()).to_pylist()
    order = pc.sort_indices(pa.table({"t": ts, "r": pa.array(range(table.num_rows))}),
                            sort_keys=[("t", "ascending"), ("r", "ascending")]).to_pylist()
    sequences: dict[str, list[str]] = {}
    for i in order:  # stable time order; ties keep file order
        sequences.setdefault(users[i], []).append(items[i])
    item_table = _read_table(items_path)
    _require_columns(items_path, item_table, ("item_id",))
    if not any(f in item_table.column_names for f in ("title", "description")):
        raise UserError(f"{items_path}: needs a 'title' or 'description' column (found: {', '.join(item_table.column_names)})")
    records = item_table.to_pylist()
    item_texts = {str(r["item_id"]): _item_fields(items_path, str(r["item_id"]), r) for r in records}
    return RawData(sequences, item_texts, source=str(path))


def read_raw(input_path: str | None, items_path: str | None) -> RawData:
    """Dispatch on the input layout; None means the bundled Scientific dataset."""
    p = Path(input_path) if input_path else BUNDLED_DIR
    if not p.exists():
        raise UserError(f"{p}: input not found")
    if p.is_dir():
        return read_json_dir(p)
    return read_interaction_table(p, Path(items_path) if items_path else None)
