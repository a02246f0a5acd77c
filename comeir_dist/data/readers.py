"""Readers for raw inputs: the LC-Rec/LETTER JSON layout and CSV/Parquet/JSON interaction tables.

Both return ``RawData``: per-user time-ordered raw item-id lists plus an item text table.

Rules every reader follows:

* IDs are strings exactly as written: CSV/TSV id columns are read as text (``007`` and ``7`` stay two
  items, an id above int64 stays exact), Parquet integer id columns become their exact decimal text, JSON
  integers likewise; float, boolean, nested or empty ids are refused (a float has lost the id's identity).
* Timestamps must be present and finite (integers, floats, Arrow timestamps or dates); ties keep file order.
* Every problem is a one-line ``UserError`` naming the file, the row (data rows count from 1, the CSV
  header excluded; JSONL counts lines), the column or field, and the offending value.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from comeir_dist.data.schema import ITEM_TEXT_FIELDS
from comeir_dist.errors import UserError

BUNDLED_DIR = Path(__file__).parent / "bundled" / "scientific"
INTER_COLUMNS = ("user_id", "item_id", "timestamp")


@dataclass
class RawData:
    """Raw interactions (user -> time-ordered raw item ids) and item texts (raw item id -> fields)."""

    sequences: dict[str, list[str]]
    items: dict[str, dict[str, str | None]]
    source: str


# ---------------------------------------------------------------------------------------------- helpers


def _show(value, limit: int = 60) -> str:
    """A user value for a one-line message: repr (newlines and control characters escaped), cut short."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value we cannot even print must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    """JSON-ish name of a Python value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _valid_text(s: str) -> bool:
    """False for strings Arrow cannot store (lone surrogates, e.g. from a JSON '\\ud800' escape)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _py_id(path: Path, where: str, value) -> str:
    """A JSON/Python id -> its string, exactly as written; ``where`` names the row and field."""
    if value is None:
        raise UserError(f"{path}: {where}: id is missing (null)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        hint = (" (a float loses the id's identity; write it as a string or an integer)"
                if isinstance(value, float) else "")
        raise UserError(f"{path}: {where}: id must be a string or an integer, got {_kind(value)} {_show(value)}{hint}")
    text = value if isinstance(value, str) else str(value)
    if text == "":
        raise UserError(f"{path}: {where}: id is empty")
    if not _valid_text(text):
        raise UserError(f"{path}: {where}: id {_show(text)} is not valid Unicode text")
    return text


def _text_value(path: Path, where: str, field: str, v) -> str | None:
    """One item text field as a string: text kept, scalars as their text, lists joined with ', '."""
    if v is None or isinstance(v, str):
        out = v
    elif isinstance(v, (bool, int, float, decimal.Decimal, _dt.date, _dt.time)):
        out = str(v)
    elif isinstance(v, (list, tuple)):
        parts = []
        stack = list(reversed(v))
        while stack:  # flatten nested lists (e.g. Amazon's [[category path]]) without recursion
            x = stack.pop()
            if isinstance(x, (list, tuple)):
                stack.extend(reversed(x))
            elif x is None:
                continue
            elif isinstance(x, dict) or isinstance(x, (bytes, bytearray)):
                raise UserError(f"{path}: {where}, field '{field}': list elements must be text, got {_kind(x)} "
                                f"{_show(x)}")
            else:
                parts.append(x if isinstance(x, str) else str(x))
        out = ", ".join(parts)
    else:
        raise UserError(f"{path}: {where}, field '{field}': must be text, a number or a list, got {_kind(v)} "
                        f"{_show(v)}")
    if out is not None and not _valid_text(out):
        raise UserError(f"{path}: {where}, field '{field}': value {_show(out)} is not valid Unicode text")
    return out


def _item_fields(path: Path, where: str, rec) -> dict[str, str | None]:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where} must be an object with text fields, got {_kind(rec)} {_show(rec)}")
    out = {f: _text_value(path, where, f, rec.get(f)) for f in ITEM_TEXT_FIELDS}
    if not out["title"] and not out["description"]:
        raise UserError(f"{path}: {where} has neither 'title' nor 'description'")
    return out


def _add_item(path: Path, items: dict, first_where: dict, key: str, where: str, fields: dict) -> None:
    """Add one item; a second record for the same id is fine only when it is identical."""
    if key in items:
        if items[key] != fields:
            raise UserError(f"{path}: {where}: item_id {_show(key)} already defined differently at "
                            f"{first_where[key]}")
        return
    items[key] = fields
    first_where[key] = where


# ------------------------------------------------------------------------------------------------- JSON


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_json(path: Path, text: str, where: str = ""):
    at = f" ({where})" if where else ""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise UserError(f"{path}{at}: key {_show(exc.key)} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        pos = f"line {exc.lineno} column {exc.colno}" if not where else f"column {exc.colno}"
        raise UserError(f"{path}: malformed JSON at {where + ' ' if where else ''}{pos}: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{path}{at}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal too long to convert
        raise UserError(f"{path}{at}: cannot parse JSON: {_first_line(exc)}") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def _load_json(path: Path):
    return _parse_json(path, _read_text(path))


def _load_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs from a JSON list / object {id: record} file or a JSON Lines file."""
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
            if line.strip():
                out.append((f"line {n}", _parse_json(path, line, f"line {n}")))
        if not out:
            raise UserError(f"{path}: no records")
        return out
    data = _parse_json(path, text)
    if isinstance(data, list):
        if not data:
            raise UserError(f"{path}: no records")
        return [(f"row {n}", rec) for n, rec in enumerate(data, start=1)]
    return [("", data)]  # caller decides whether an object is acceptable


def _find_one(directory: Path, suffix: str) -> Path:
    found = sorted(directory.glob(f"*{suffix}"))
    if not found:
        raise UserError(f"{directory}: no '*{suffix}' file")
    if len(found) > 1:
        raise UserError(f"{directory}: several '*{suffix}' files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def read_json_dir(directory: Path) -> RawData:
    """Read ``<name>.inter.json`` ({user: [item, ...]} in time order) and ``<name>.item.json``."""
    inter_path = _find_one(directory, ".inter.json")
    item_path = _find_one(directory, ".item.json")
    inter = _load_json(inter_path)
    if not isinstance(inter, dict) or not inter:
        raise UserError(f"{inter_path}: expected a non-empty object {{user: [item, ...]}}, got {_kind(inter)}")
    sequences: dict[str, list[str]] = {}
    for user, seq in inter.items():
        u = _py_id(inter_path, f"user {_show(user)}", user)
        if not isinstance(seq, list):
            raise UserError(f"{inter_path}: user {_show(user)} must map to a list of item ids, got {_kind(seq)} "
                            f"{_show(seq)}")
        sequences[u] = [_py_id(inter_path, f"user {_show(user)}, position {n}", i) for n, i in enumerate(seq, 1)]
    raw_items = _load_json(item_path)
    if not isinstance(raw_items, dict) or not raw_items:
        raise UserError(f"{item_path}: expected a non-empty object {{item: {{title, description, ...}}}}, got "
                        f"{_kind(raw_items)}")
    items = {}
    for k, v in raw_items.items():
        key = _py_id(item_path, f"item {_show(k)}", k)
        items[key] = _item_fields(item_path, f"item {_show(k)}", v)
    return RawData(sequences, items, source=str(directory))


# ------------------------------------------------------------------------------------------ Arrow tables


def _read_table(path: Path, string_columns: tuple[str, ...]) -> pa.Table:
    """A CSV/TSV/Parquet file as an Arrow table; in CSV/TSV ``string_columns`` are read as text, verbatim
    (only an empty field is null; 'NA' or 'null' are ids like any other)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                        strings_can_be_null=True, null_values=[""])
            table = pacsv.read_csv(path, parse_options=opts, convert_options=conv)
        else:
            raise UserError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv, .parquet, .json or .jsonl)")
        table.column_names  # Arrow does not check that CSV header names are UTF-8; this decodes them
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read as {suffix[1:]}: {_first_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: column names are not UTF-8 text (bad byte at offset {exc.start})") from None
    return table


def _require_columns(path: Path, table: pa.Table, columns: tuple[str, ...]) -> None:
    names = table.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(_show, names))})")
    twice = [c for c in columns if names.count(c) > 1]
    if twice:
        raise UserError(f"{path}: column '{twice[0]}' appears {names.count(twice[0])} times; keep one")
    if table.num_rows == 0:
        raise UserError(f"{path}: no rows")


def _first_true(mask: pa.ChunkedArray) -> int:
    return pc.index(mask, True).as_py()


def _check_no_nulls(path: Path, arr: pa.ChunkedArray, col: str) -> None:
    if arr.null_count:
        row = 0 if pa.types.is_null(arr.type) else _first_true(pc.is_null(arr))
        raise UserError(f"{path}: row {row + 1}, column '{col}': empty value "
                        f"({arr.null_count} empty value(s) in this column)")


def _first_value(arr: pa.ChunkedArray) -> str:
    try:
        return _show(arr[0].as_py())
    except Exception:  # noqa: BLE001 - only decorates a message
        return "?"


def _id_column(path: Path, table: pa.Table, col: str) -> list[str]:
    """An id column as exact strings: text kept, integers as their decimal text; anything else refused."""
    arr = table.column(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    t = arr.type
    if not (pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_string_view(t) or pa.types.is_integer(t)):
        hint = ("; floats lose the ids' identity (7.0 vs 7, large values rounded): write them as text or integers"
                if pa.types.is_floating(t) or pa.types.is_decimal(t) else "")
        raise UserError(f"{path}: row 1, column '{col}': ids must be strings or integers, got column type {t} "
                        f"(value {_first_value(arr)}){hint}")
    _check_no_nulls(path, arr, col)
    values = (arr if pa.types.is_string(t) else arr.cast(pa.string())).to_pylist()
    if pa.types.is_integer(t):
        return values
    for n, v in enumerate(values):
        if v == "":
            raise UserError(f"{path}: row {n + 1}, column '{col}': id is empty")
    return values


def _first_non_number(arr: pa.ChunkedArray) -> tuple[int, str]:
    """(row, shown value) of the first value that is not a number (row 0 if every value looks numeric)."""
    try:
        values = arr.to_pylist()
    except Exception:  # noqa: BLE001 - only decorates a message
        return 0, "?"
    for n, v in enumerate(values):
        if v is None or isinstance(v, (bytes, bool, list, dict)):
            return n, _show(v)
        try:
            float(v)
        except (TypeError, ValueError):
            return n, _show(v)
    return 0, _show(values[0]) if values else "?"


def _timestamp_column(path: Path, table: pa.Table) -> pa.ChunkedArray:
    """The timestamp column, checked: numeric/timestamp/date, no empty and no NaN/inf values."""
    ts = table.column("timestamp")
    t = ts.type
    if not (pa.types.is_null(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            or pa.types.is_timestamp(t) or pa.types.is_date(t)):
        row, value = _first_non_number(ts)
        raise UserError(f"{path}: row {row + 1}, column 'timestamp': must be numeric or a timestamp, got column "
                        f"type {t} (value {value})")
    if pa.types.is_floating(t):  # report the first bad row, empty or NaN/inf alike
        ts = ts.cast(pa.float64())
        bad = pc.invert(pc.fill_null(pc.is_finite(ts), False))
        if pc.any(bad).as_py():
            row = _first_true(bad)
            if ts[row].is_valid:
                raise UserError(f"{path}: row {row + 1}, column 'timestamp': value {ts[row].as_py()} is not a "
                                f"finite number")
    _check_no_nulls(path, ts, "timestamp")
    return ts


def _time_order(ts) -> list[int]:
    """Row indices in ascending time; ties keep file order."""
    if isinstance(ts, list):
        return sorted(range(len(ts)), key=lambda r: (ts[r], r))
    return pc.sort_indices(pa.table({"t": ts, "r": pa.array(range(len(ts)), pa.int64())}),
                           sort_keys=[("t", "ascending"), ("r", "ascending")]).to_pylist()


def _json_interactions(path: Path) -> tuple[list[str], list[str], list]:
    records = _load_records(path)
    if records[0][0] == "":
        raise UserError(f"{path}: expected a list of {{user_id, item_id, timestamp}} records, got "
                        f"{_kind(records[0][1])}")
    users, items, ts = [], [], []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{path}: {where}: expected an object {{user_id, item_id, timestamp}}, got "
                            f"{_kind(rec)} {_show(rec)}")
        missing = [c for c in INTER_COLUMNS if c not in rec]
        if missing:
            raise UserError(f"{path}: {where}: missing field(s) {', '.join(missing)}")
        users.append(_py_id(path, f"{where}, field 'user_id'", rec["user_id"]))
        items.append(_py_id(path, f"{where}, field 'item_id'", rec["item_id"]))
        t = rec["timestamp"]
        if t is None:
            raise UserError(f"{path}: {where}, field 'timestamp': empty value")
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise UserError(f"{path}: {where}, field 'timestamp': must be a number, got {_kind(t)} {_show(t)}")
        if isinstance(t, float) and not math.isfinite(t):
            raise UserError(f"{path}: {where}, field 'timestamp': value {t} is not a finite number")
        ts.append(t)
    return users, items, ts


def _json_item_records(path: Path) -> dict[str, dict[str, str | None]]:
    records = _load_records(path)
    items: dict[str, dict[str, str | None]] = {}
    first: dict[str, str] = {}
    if records[0][0] == "":  # an object {item_id: {title, ...}}
        data = records[0][1]
        if not isinstance(data, dict) or not data:
            raise UserError(f"{path}: expected an object {{item_id: {{...}}}} or a list of records, got {_kind(data)}")
        for k, rec in data.items():
            where = f"item {_show(k)}"
            key = _py_id(path, where, k)
            if isinstance(rec, dict) and "item_id" in rec and (isinstance(rec["item_id"], bool) or not isinstance(
                    rec["item_id"], (str, int)) or str(rec["item_id"]) != key):
                raise UserError(f"{path}: {where}, field 'item_id': {_show(rec['item_id'])} differs from its key")
            _add_item(path, items, first, key, where, _item_fields(path, where, rec))
        return items
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{path}: {where}: expected an object {{item_id, title, ...}}, got {_kind(rec)} "
                            f"{_show(rec)}")
        if "item_id" not in rec:
            raise UserError(f"{path}: {where}: missing field 'item_id'")
        key = _py_id(path, f"{where}, field 'item_id'", rec["item_id"])
        _add_item(path, items, first, key, where, _item_fields(path, f"{where} (item_id {_show(key)})", rec))
    return items


def _table_item_records(path: Path) -> dict[str, dict[str, str | None]]:
    table = _read_table(path, ("item_id", *ITEM_TEXT_FIELDS))
    _require_columns(path, table, ("item_id",))
    if not any(f in table.column_names for f in ("title", "description")):
        raise UserError(f"{path}: needs a 'title' or 'description' column (found: "
                        f"{', '.join(map(_show, table.column_names))})")
    twice = [f for f in ITEM_TEXT_FIELDS if table.column_names.count(f) > 1]
    if twice:
        raise UserError(f"{path}: column '{twice[0]}' appears more than once; keep one")
    ids = _id_column(path, table, "item_id")
    cols = {}
    for f in ITEM_TEXT_FIELDS:
        if f in table.column_names:
            try:
                cols[f] = table.column(f).to_pylist()
            except (pa.ArrowException, ValueError, OverflowError) as exc:
                raise UserError(f"{path}: column '{f}': cannot read values: {_first_line(exc)}") from None
    items: dict[str, dict[str, str | None]] = {}
    first: dict[str, str] = {}
    for n, key in enumerate(ids):
        where = f"row {n + 1} (item_id {_show(key)})"
        rec = {f: vals[n] for f, vals in cols.items()}
        _add_item(path, items, first, key, f"row {n + 1}", _item_fields(path, where, rec))
    return items


def _is_json(path: Path) -> bool:
    return path.suffix.lower() in (".json", ".jsonl")


def read_interaction_table(path: Path, items_path: Path | None) -> RawData:
    """Read a CSV/TSV/Parquet/JSON(L) table of (user_id, item_id, timestamp) and an item table with text."""
    if items_path is None:
        raise UserError(f"{path}: an interactions table needs --items FILE with item_id and text fields")
    if _is_json(path):
        users, items, ts = _json_interactions(path)
    else:
        table = _read_table(path, ("user_id", "item_id"))
        _require_columns(path, table, INTER_COLUMNS)
        users = _id_column(path, table, "user_id")
        items = _id_column(path, table, "item_id")
        ts = _timestamp_column(path, table)
    sequences: dict[str, list[str]] = {}
    for i in _time_order(ts):  # stable time order; ties keep file order
        sequences.setdefault(users[i], []).append(items[i])
    item_texts = _json_item_records(items_path) if _is_json(items_path) else _table_item_records(items_path)
    return RawData(sequences, item_texts, source=str(path))


def read_raw(input_path: str | None, items_path: str | None) -> RawData:
    """Dispatch on the input layout; None means the bundled Scientific dataset."""
    p = Path(input_path) if input_path else BUNDLED_DIR
    if not p.exists():
        raise UserError(f"{p}: input not found")
    if p.is_dir():
        from comeir_dist.data.movielens import is_movielens_dir, read_movielens_dir  # it imports this module

        return read_movielens_dir(p) if is_movielens_dir(p) else read_json_dir(p)
    return read_interaction_table(p, Path(items_path) if items_path else None)
