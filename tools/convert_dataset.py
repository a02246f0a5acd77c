#!/usr/bin/env python
"""Convert public recommendation data layouts into the input layout ``comeir prepare`` reads.

    python tools/convert_dataset.py --format amazon Industrial_and_Scientific_5.json.gz \\
        meta_Industrial_and_Scientific.json.gz --out raw/scientific
    python tools/convert_dataset.py --format recbole ml-100k/ --out raw/ml100k       # ml-100k.inter + .item
    python tools/convert_dataset.py --format movielens ml-latest-small/ --out raw/ml
    comeir prepare --input raw/scientific --out runs/data/scientific

Output: ``OUT/<name>.inter.json`` (``{user: [item, ...]}``, each user's items in time order, ties in file order)
and ``OUT/<name>.item.json`` (``{item: {title, description, brand, categories}}``, the items the interactions
reference), the layout of the bundled data (README "Input formats"), plus the product's output marker. IDs stay
strings exactly as written. Timestamps only order the items (prepare keeps no timestamp).

* ``amazon``: review JSON Lines (``reviewerID``/``user_id``, ``asin``/``parent_asin``, ``unixReviewTime``/
  ``timestamp``; 2014/2018/2023 releases) and metadata JSON Lines (``asin``/``parent_asin``, ``title``,
  ``description``, ``categories``/``category``, ``brand``/``store``); ``.gz`` files are read directly. A file whose
  name starts with ``meta`` is metadata, every other one holds reviews. Items are keyed by ``parent_asin`` when a
  record has one, else ``asin`` (``--item-key``). Duplicate metadata records: the first one is kept.
* ``recbole``: atomic files ``NAME.inter`` (``user_id:token``, ``item_id:token``, ``timestamp:float``) and
  ``NAME.item`` (``item_id:token`` and text fields such as ``title:token_seq``, ``categories:token_seq``), given as
  the two files or their directory.
* ``movielens``: a GroupLens directory (``ratings.csv`` + ``movies.csv``), read by the product's MovieLens reader.

Items referenced by interactions but without metadata text are an error naming them, or with
``--drop-items-without-text`` their interactions are dropped (counted in the report).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_output_dir, output_dir, run_tool  # noqa: E402

PROG = "convert_dataset"
KIND = "converted-input"
FORMATS = ("amazon", "recbole", "movielens")
AMAZON_PATTERNS = ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# RecBole item field names (before ':type') read into each comeir text field, first match wins
RECBOLE_TEXT = {"title": ("title", "movie_title", "name", "item_name"),
                "description": ("description", "desc", "summary", "abstract"),
                "brand": ("brand", "store", "publisher"),
                "categories": ("categories", "category", "genre", "genres", "class")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert Amazon reviews, RecBole atomic files or MovieLens "
                                "into the <name>.inter.json + <name>.item.json layout `comeir prepare --input` reads.")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout of the inputs")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="amazon: review and meta_* JSON Lines files (.gz ok) or their directory; recbole: NAME.inter "
                        "and NAME.item or their directory; movielens: the directory with ratings.csv and movies.csv")
    p.add_argument("--out", required=True, help="output directory (new or empty; else needs --overwrite)")
    p.add_argument("--name", help="file name stem of the output (default: from the inputs)")
    p.add_argument("--item-key", choices=("auto", "asin", "parent_asin"), default="auto",
                   help="amazon: item id field (auto: parent_asin when a record has one, else asin)")
    p.add_argument("--drop-items-without-text", action="store_true",
                   help="drop interactions with items that have no metadata title/description (default: error)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


# ---- shared helpers ---------------------------------------------------------------------------------------------
def _fail(msg: str):
    from comeir_dist.errors import UserError

    return UserError(msg)


def _lines(path: Path):
    """(line number, text) of a text file, gzip when it ends in .gz; one-line errors for unreadable input."""
    if not path.is_file():
        raise _fail(f"{path}: file not found")
    try:
        raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as exc:
        raise _fail(f"{path}: cannot open ({exc.strerror or exc})") from None
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        n = 0
        try:
            for n, line in enumerate(text, start=1):
                yield n, line.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise _fail(f"{path}: line {n + 1}: not UTF-8 text (bad byte {exc.object[exc.start:exc.start + 1]!r})") \
                from None
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise _fail(f"{path}: cannot read after line {n}: {exc}") from None
        if n == 0:
            raise _fail(f"{path}: file is empty")


def _timestamp(path: Path, where: str, field: str, value) -> float:
    from comeir_dist.data.readers import _kind, _show

    if isinstance(value, str):
        try:
            value = float(value) if value.strip() else None
        except ValueError:
            raise _fail(f"{path}: {where}, field '{field}': not a number: {_show(value)}") from None
    if value is None:
        raise _fail(f"{path}: {where}, field '{field}': empty value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{path}: {where}, field '{field}': must be a number, got {_kind(value)} {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"{path}: {where}, field '{field}': value {value} is not a finite number")
    return value


def _sequences(rows: list[tuple[str, str, float]]) -> dict[str, list[str]]:
    """{user: [item, ...]} in time order; ties keep the input order (the product's stable rule)."""
    from comeir_dist.data.readers import _time_order

    sequences: dict[str, list[str]] = {}
    for i in _time_order([r[2] for r in rows]):
        sequences.setdefault(rows[i][0], []).append(rows[i][1])
    return sequences


def _text(path: Path, where: str, field: str, value) -> str | None:
    """A metadata field as text (the product's rules: lists joined with ', '), blank -> None."""
    from comeir_dist.data.readers import _text_value

    out = _text_value(path, where, field, value)
    out = out.strip() if isinstance(out, str) else out
    return out or None


def _expand(inputs: list[str], patterns: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if not p.exists():
            raise _fail(f"{p}: not found")
        if p.is_dir():
            found = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
            if not found:
                raise _fail(f"{p}: no {' / '.join(patterns)} file inside")
            files += found
        else:
            files.append(p)
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".gz", ".jsonl", ".json", ".inter", ".item"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name


# ---- Amazon -----------------------------------------------------------------------------------------------------
def _amazon_records(path: Path):
    from comeir_dist.data.readers import _kind, _parse_json, _show

    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = _parse_json(path, line, f"line {n}")
        except Exception as exc:
            if line.lstrip().startswith("{'"):  # the 2014 metadata release: Python literals, not JSON
                raise _fail(f"{exc} (this looks like Python-literal metadata of the 2014 release; convert it to "
                            f"JSON Lines first)") from None
            raise
        if not isinstance(rec, dict):
            raise _fail(f"{path}: line {n}: expected a JSON object, got {_kind(rec)} {_show(rec)}")
        yield f"line {n}", rec


def _amazon_item(path: Path, where: str, rec: dict, item_key: str) -> str:
    from comeir_dist.data.readers import _py_id

    if item_key == "auto":
        key = "parent_asin" if rec.get("parent_asin") not in (None, "") else "asin"
    else:
        key = item_key
    if key not in rec:
        want = "'parent_asin' or 'asin'" if item_key == "auto" else f"'{item_key}'"
        raise _fail(f"{path}: {where}: no {want} field")
    return _py_id(path, f"{where}, field '{key}'", rec[key])


def _first_field(rec: dict, names: tuple[str, ...]):
    for name in names:
        if name in rec:
            return name
    return None


def read_amazon(inputs: list[str], item_key: str = "auto"):
    """(sequences, items or None-for-no-text, source, notes) from Amazon review + metadata JSON Lines files."""
    from comeir_dist.data.readers import _py_id

    files = _expand(inputs, AMAZON_PATTERNS)
    meta_files = [f for f in files if f.name.lower().startswith("meta")]
    review_files = [f for f in files if f not in meta_files]
    if not review_files:
        raise _fail("amazon: no review file among the inputs (every file named meta* is metadata)")
    if not meta_files:
        raise _fail("amazon: no metadata file among the inputs (its name must start with 'meta', e.g. "
                    "meta_Industrial_and_Scientific.json.gz); item text comes from it")
    rows: list[tuple[str, str, float]] = []
    for path in review_files:
        for where, rec in _amazon_records(path):
            ufield = _first_field(rec, ("reviewerID", "user_id"))
            tfield = _first_field(rec, ("unixReviewTime", "timestamp"))
            if ufield is None:
                raise _fail(f"{path}: {where}: no 'reviewerID' or 'user_id' field (is this a metadata file? name "
                            f"it meta_*)")
            if tfield is None:
                raise _fail(f"{path}: {where}: no 'unixReviewTime' or 'timestamp' field")
            user = _py_id(path, f"{where}, field '{ufield}'", rec[ufield])
            item = _amazon_item(path, where, rec, item_key)
            rows.append((user, item, _timestamp(path, where, tfield, rec[tfield])))
    items: dict[str, dict | None] = {}
    duplicates = 0
    for path in meta_files:
        for where, rec in _amazon_records(path):
            key = _amazon_item(path, where, rec, item_key)
            if key in items:
                duplicates += 1
                continue
            desc = rec.get("description")
            if isinstance(desc, list):  # paragraphs
                desc = " ".join(d.strip() for d in desc if isinstance(d, str) and d.strip())
            cat = _first_field(rec, ("categories", "category"))
            brand = _first_field(rec, ("brand", "store"))
            fields = {"title": _text(path, where, "title", rec.get("title")),
                      "description": _text(path, where, "description", desc),
                      "brand": _text(path, where, brand, rec.get(brand)) if brand else None,
                      "categories": _text(path, where, cat, rec.get(cat)) if cat else None}
            items[key] = fields if (fields["title"] or fields["description"]) else None
    notes = {"duplicate_metadata_records": duplicates}
    return _sequences(rows), items, ", ".join(str(f) for f in files), notes


# ---- RecBole ----------------------------------------------------------------------------------------------------
def _recbole_rows(path: Path):
    """(header names, [(where, values)]) of a tab-separated atomic file; every row must have the header's width."""
    from comeir_dist.data.readers import _show

    lines = _lines(path)
    header = None
    for n, line in lines:
        if line.strip():
            header = (n, line)
            break
    if header is None:
        raise _fail(f"{path}: no header line")
    cols = header[1].split("\t")
    names = [c.split(":", 1)[0].strip() for c in cols]
    bad = [c for c in cols if ":" not in c]
    if bad:
        raise _fail(f"{path}: line {header[0]}: header field {_show(bad[0])} is not NAME:TYPE (RecBole atomic file "
                    f"headers look like user_id:token<TAB>item_id:token<TAB>timestamp:float)")
    twice = [c for c in names if names.count(c) > 1]
    if twice:
        raise _fail(f"{path}: header field '{twice[0]}' appears twice")
    rows = []
    for n, line in lines:
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(cols):
            raise _fail(f"{path}: line {n}: {len(values)} tab-separated fields, the header has {len(cols)}")
        rows.append((f"line {n}", values))
    if not rows:
        raise _fail(f"{path}: no data rows")
    return names, rows


def _recbole_files(inputs: list[str]) -> tuple[Path, Path]:
    files = _expand(inputs, ("*.inter", "*.item"))
    inter = [f for f in files if f.name.endswith(".inter")]
    item = [f for f in files if f.name.endswith(".item")]
    for kind, found in (("inter", inter), ("item", item)):
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(f.name for f in found)})"
            raise _fail(f"recbole: {what} *.{kind} file among the inputs; give exactly one NAME.inter and one "
                        f"NAME.item (item text comes from it)")
    return inter[0], item[0]


def read_recbole(inputs: list[str]):
    from comeir_dist.data.readers import _add_item, _py_id

    inter_path, item_path = _recbole_files(inputs)
    names, data = _recbole_rows(inter_path)
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in names]
    if missing:
        raise _fail(f"{inter_path}: header lacks {', '.join(missing)} (found: {', '.join(names)}); prepare needs "
                    f"user_id, item_id and a timestamp to order each user's items")
    u, i, t = names.index("user_id"), names.index("item_id"), names.index("timestamp")
    rows = [(_py_id(inter_path, f"{w}, field 'user_id'", v[u]), _py_id(inter_path, f"{w}, field 'item_id'", v[i]),
             _timestamp(inter_path, w, "timestamp", v[t])) for w, v in data]
    names, data = _recbole_rows(item_path)
    if "item_id" not in names:
        raise _fail(f"{item_path}: header lacks item_id (found: {', '.join(names)})")
    cols = {f: next((names.index(a) for a in aliases if a in names), None) for f, aliases in RECBOLE_TEXT.items()}
    if cols["title"] is None and cols["description"] is None:
        raise _fail(f"{item_path}: no title or description field (found: {', '.join(names)}; looked for "
                    f"{', '.join(RECBOLE_TEXT['title'] + RECBOLE_TEXT['description'])})")
    k = names.index("item_id")
    items: dict[str, dict | None] = {}
    first: dict[str, str] = {}
    for w, v in data:
        key = _py_id(item_path, f"{w}, field 'item_id'", v[k])
        fields = {f: (_text(item_path, w, names[c], v[c]) if c is not None else None) for f, c in cols.items()}
        if fields["title"] or fields["description"]:
            _add_item(item_path, items, first, key, w, fields)
        elif key not in items:
            items[key] = None
    return _sequences(rows), items, f"{inter_path}, {item_path}", {}


# ---- MovieLens --------------------------------------------------------------------------------------------------
def read_movielens(inputs: list[str]):
    from comeir_dist.data.movielens import read_movielens_dir

    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        raise _fail("movielens: give exactly one directory holding ratings.csv and movies.csv")
    raw = read_movielens_dir(Path(inputs[0]))
    return raw.sequences, raw.items, raw.source, {}


READERS = {"amazon": read_amazon, "recbole": read_recbole, "movielens": read_movielens}


# ---- output -----------------------------------------------------------------------------------------------------
def _default_name(fmt: str, inputs: list[str]) -> str:
    if fmt == "amazon":
        files = _expand(inputs, AMAZON_PATTERNS)
        stem = _stem(next((f for f in files if not f.name.lower().startswith("meta")), files[0]))
    elif fmt == "recbole":
        stem = _stem(_recbole_files(inputs)[0])
    else:
        stem = Path(inputs[0]).resolve().name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "converted"


def convert(fmt: str, inputs: list[str], out: str | Path, name: str | None = None, item_key: str = "auto",
            drop_items_without_text: bool = False, overwrite: bool = False) -> dict:
    """Read, check and write; returns the report printed by the tool."""
    from comeir_dist.data.readers import _item_fields, _show

    if fmt not in READERS:
        raise _fail(f"--format {fmt}: allowed values {', '.join(FORMATS)}")
    if name is not None and not _NAME_RE.match(name):
        raise _fail(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it becomes the file name stem)")
    name = name or _default_name(fmt, inputs)
    out = Path(out)
    how = check_output_dir(out, KIND, overwrite, "--out")  # before reading gigabytes
    if how == "update":  # files kept beside ours: a second *.inter.json would make prepare refuse the directory
        other = [p.name for pat in ("*.inter.json", "*.item.json") for p in out.glob(pat)
                 if p.name not in (f"{name}.inter.json", f"{name}.item.json")]
        if other:
            raise _fail(f"--out {out}: already holds {', '.join(sorted(other))}; comeir prepare needs exactly one "
                        f"*.inter.json and one *.item.json: choose another --out or --name {_stem(Path(other[0]))}")
    reader = READERS[fmt]
    sequences, items, source, notes = reader(inputs, item_key) if fmt == "amazon" else reader(inputs)
    if not sequences:
        raise _fail(f"{source}: no interactions")
    seen: dict[str, None] = {}
    for seq in sequences.values():
        for i in seq:
            seen.setdefault(i)
    no_text = [i for i in seen if items.get(i) is None]
    dropped = 0
    if no_text:
        absent = sum(1 for i in no_text if i not in items)
        if not drop_items_without_text:
            raise _fail(f"{source}: {len(no_text)} item(s) in the interactions have no metadata text ({absent} absent "
                        f"from the metadata, {len(no_text) - absent} without title/description), e.g. item "
                        f"{_show(no_text[0])}; pass --drop-items-without-text to drop their interactions")
        bad = set(no_text)
        kept = {}
        for u, seq in sequences.items():
            s = [i for i in seq if i not in bad]
            dropped += len(seq) - len(s)
            if s:
                kept[u] = s
        sequences = kept
        if not sequences:
            raise _fail(f"{source}: no interaction left after dropping the items without text")
        seen = {i: None for i in seen if i not in bad}
    item_out = {i: _item_fields(Path(source), f"item {_show(i)}", items[i]) for i in seen}  # the reader's own check
    inter_text = json.dumps(sequences, ensure_ascii=False)
    item_text = json.dumps(item_out, ensure_ascii=False, indent=0)
    fp = hashlib.sha256(inter_text.encode() + b"\0" + item_text.encode()).hexdigest()
    report = {"out": str(out), "format": fmt, "name": name, "users": len(sequences), "items": len(item_out),
              "interactions": sum(len(s) for s in sequences.values()),
              "dropped_interactions": dropped, "dropped_items": len(no_text) if drop_items_without_text else 0,
              "unused_metadata_items": sum(1 for i, v in items.items() if v is not None and i not in seen),
              **notes, "source": source}
    with output_dir(out, KIND, f"tools/convert_dataset.py --format {fmt}", overwrite=overwrite, flag="--out",
                    fingerprint=fp, report={k: v for k, v in report.items() if k != "out"}) as tmp:
        (tmp / f"{name}.inter.json").write_text(inter_text + "\n", encoding="utf-8")
        (tmp / f"{name}.item.json").write_text(item_text + "\n", encoding="utf-8")
    report["next"] = f"comeir prepare --input {out} --out DATASET_DIR"
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        rep = convert(args.format, args.inputs, args.out, args.name, args.item_key, args.drop_items_without_text,
                      args.overwrite)
        print(json.dumps(rep, indent=1))
        return 0

    return run_tool(PROG, body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
