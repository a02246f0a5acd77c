"""Property-based tests of the raw-input readers (issue 10): whatever the JSON/CSV/Parquet input, the
readers return a well-formed RawData or raise a one-line UserError, ids come back exactly as written, and
`comeir prepare` on a malformed input exits 2 with one line on stderr and leaves no output behind."""
import contextlib
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comeir_dist.cli import main
from comeir_dist.data.readers import RawData, read_raw
from comeir_dist.data.schema import ITEM_TEXT_FIELDS
from comeir_dist.errors import UserError

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ODD_IDS = ["7", "007", "--5", "-5", "\u00b2", "\u0665", "NA", "null", "None", "nan", "inf", "", " 7", "1e3",
           "1.0", "18446744073709551616", "a\nb", "a,b", '"q"', "\u2028", "x\ty", "\x00"]
weird_text = st.text(st.characters(codec="utf-8"), max_size=6)
id_like = st.one_of(st.sampled_from(ODD_IDS), weird_text)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
                        st.floats(), id_like)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(id_like, c, max_size=3),
                          max_leaves=8)
text_fields = st.fixed_dictionaries({}, optional={f: json_value for f in ITEM_TEXT_FIELDS})
item_record = st.one_of(text_fields, st.builds(lambda d, i: {**d, "item_id": i}, text_fields, json_scalar),
                        json_value)


def check_one_line(exc: UserError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and len(msg.splitlines()) == 1, repr(msg)
    assert "Traceback" not in msg


def check_raw(raw: RawData) -> None:
    assert isinstance(raw, RawData)
    for u, seq in raw.sequences.items():
        assert isinstance(u, str) and u != "" and isinstance(seq, list)
        assert all(isinstance(i, str) and i != "" for i in seq)
        u.encode("utf-8")
    for k, rec in raw.items.items():
        assert isinstance(k, str) and k != ""
        assert set(rec) == set(ITEM_TEXT_FIELDS)
        assert all(v is None or isinstance(v, str) for v in rec.values())
        assert rec["title"] or rec["description"]
        for v in rec.values():
            if v is not None:
                v.encode("utf-8")


def read_or_user_error(inp: Path, items: Path | None) -> RawData | None:
    try:
        raw = read_raw(str(inp), str(items) if items else None)
    except UserError as exc:
        check_one_line(exc)
        return None
    check_raw(raw)
    return raw


def file_bytes(json_strategy):
    """JSON text of a drawn value (NaN/Infinity literals included), or raw random bytes."""
    return st.one_of(json_strategy.map(lambda v: json.dumps(v).encode()), st.binary(max_size=48),
                     json_strategy.map(lambda v: json.dumps(v).encode()[:-1]))


# --------------------------------------------------------------------------------------------- JSON layout


@SETTINGS
@given(inter=file_bytes(st.one_of(st.dictionaries(id_like, st.lists(json_scalar, max_size=5) | json_value,
                                                  max_size=4), json_value)),
       items=file_bytes(st.one_of(st.dictionaries(id_like, item_record, max_size=4), json_value)))
def test_json_dir_valid_or_user_error(inter, items):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "X.inter.json").write_bytes(inter)
        (Path(d) / "X.item.json").write_bytes(items)
        read_or_user_error(Path(d), None)


@SETTINGS
@given(seqs=st.dictionaries(id_like.filter(bool), st.lists(id_like.filter(bool), max_size=4), min_size=1, max_size=4))
def test_json_dir_ids_exactly_as_written(seqs):
    items = {i: {"title": f"t{n}"} for n, i in enumerate(sorted({i for s in seqs.values() for i in s}))}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "X.inter.json").write_text(json.dumps(seqs))
        (Path(d) / "X.item.json").write_text(json.dumps(items or {"z": {"title": "z"}}))
        raw = read_or_user_error(Path(d), None)
    assert raw is not None and raw.sequences == seqs


@SETTINGS
@given(records=st.lists(st.one_of(json_scalar, st.lists(json_scalar, max_size=2),
                                  st.fixed_dictionaries({"item_id": st.sampled_from(["7", 7, None, 7.0, "", True])},
                                                        optional={f: json_scalar for f in ITEM_TEXT_FIELDS})),
                        min_size=1, max_size=4))
def test_json_items_records_any_shape_valid_or_user_error(records):
    """Lists of non-objects, objects with mixed-type fields (a title that is a number here, text there)."""
    with tempfile.TemporaryDirectory() as d:
        inter = Path(d) / "inter.csv"
        inter.write_text("user_id,item_id,timestamp\nu,7,1\n")
        (Path(d) / "items.json").write_text(json.dumps(records))
        raw = read_or_user_error(inter, Path(d) / "items.json")
    if raw is not None:
        assert set(raw.items) == {str(r["item_id"]) for r in records}


@SETTINGS
@given(items=file_bytes(st.one_of(st.lists(item_record, max_size=4), st.dictionaries(id_like, item_record, max_size=4),
                                  json_value)),
       jsonl=st.booleans())
def test_json_items_file_valid_or_user_error(items, jsonl):
    with tempfile.TemporaryDirectory() as d:
        inter = Path(d) / "inter.csv"
        inter.write_text("user_id,item_id,timestamp\nu,7,1\n")
        path = Path(d) / ("items.jsonl" if jsonl else "items.json")
        path.write_bytes(items)
        read_or_user_error(inter, path)


# ---------------------------------------------------------------------------------------------- CSV/TSV

CELLS = ["", "1", "2", "007", "7", "nan", "NaN", "inf", "-inf", "1.5", "NA", "2021-01-01", "2021-01-01 10:00:00",
         "--5", "\u00b2", '"', '"a,b"', "18446744073709551616", "true", "\u2028", " "]
cell = st.one_of(st.sampled_from(CELLS), st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=5))
header = st.one_of(st.just(["user_id", "item_id", "timestamp"]),
                   st.permutations(["user_id", "item_id", "timestamp", "title"]),
                   st.lists(st.sampled_from(["user_id", "item_id", "timestamp", "title", "description", "x", ""]),
                            min_size=1, max_size=5))


@st.composite
def csv_text(draw, sep=","):
    cols = draw(header)
    n = draw(st.integers(0, 5))
    rows = [[draw(cell) for _ in range(draw(st.sampled_from([len(cols)] * 4 + [len(cols) + 1, 1])))] for _ in range(n)]
    text = "\n".join(sep.join(r) for r in [cols] + rows) + "\n"
    if draw(st.booleans()):
        return text.encode()
    return draw(st.one_of(st.just(text.encode("utf-16")), st.binary(max_size=40), st.just(text.encode()[:-3])))


@st.composite
def mostly_valid_csv(draw):
    """A valid interactions CSV with a few cells replaced by odd values (a mix of successes and errors)."""
    rows = [[f"u{u}", f"{draw(st.sampled_from(['1', '2', '3', '4', '007']))}", str(10 * u + j)]
            for u in range(3) for j in range(4)]
    for _ in range(draw(st.integers(0, 2))):
        r, c = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, 2))
        rows[r][c] = draw(cell)
    return ("user_id,item_id,timestamp\n" + "".join(",".join(r) + "\n" for r in rows)).encode()


items_csv_text = st.one_of(csv_text(), st.just(b"item_id,title\n1,a\n2,b\n3,c\n4,d\n007,e\n"))


@SETTINGS
@given(inter=st.one_of(csv_text(), mostly_valid_csv()), items=items_csv_text, tsv=st.booleans())
def test_csv_valid_or_user_error(inter, items, tsv):
    suffix = ".tsv" if tsv else ".csv"
    if tsv:
        inter, items = inter.replace(b",", b"\t"), items.replace(b",", b"\t")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"inter{suffix}").write_bytes(inter)
        (Path(d) / f"items{suffix}").write_bytes(items)
        read_or_user_error(Path(d) / f"inter{suffix}", Path(d) / f"items{suffix}")


csv_id = st.text(st.characters(codec="utf-8", exclude_characters='\r\n,"'), min_size=1, max_size=6)


@SETTINGS
@given(rows=st.lists(st.tuples(csv_id, csv_id, st.integers(-10**12, 10**12)), min_size=1, max_size=8))
def test_csv_ids_exactly_as_written(rows):
    item_ids = sorted({i for _, i, _ in rows})
    with tempfile.TemporaryDirectory() as d:
        inter, items = Path(d) / "inter.csv", Path(d) / "items.csv"
        inter.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
        items.write_text("item_id,title\n" + "".join(f"{i},t\n" for i in item_ids))
        raw = read_or_user_error(inter, items)
    assert raw is not None
    expected: dict[str, list[str]] = {}
    for n in sorted(range(len(rows)), key=lambda n: (rows[n][2], n)):
        expected.setdefault(rows[n][0], []).append(rows[n][1])
    assert raw.sequences == expected and sorted(raw.items) == item_ids


# ---------------------------------------------------------------------------------------------- Parquet


KINDS = ["str", "int", "uint", "float", "bool", "list", "dict", "large", "binary", "null", "ts", "date", "struct"]


@st.composite
def arrow_column(draw, n: int, kind: str | None = None):
    kind = kind or draw(st.sampled_from(KINDS))
    maybe = lambda s: st.one_of(s, st.none()) if draw(st.booleans()) else s  # noqa: E731
    vals = lambda s: [draw(maybe(s)) for _ in range(n)]  # noqa: E731
    if kind == "str":
        return pa.array(vals(id_like), pa.string())
    if kind == "large":
        return pa.array(vals(id_like), pa.large_string())
    if kind == "dict":
        return pa.array(vals(id_like), pa.string()).dictionary_encode()
    if kind == "int":
        return pa.array(vals(st.integers(-2**63, 2**63 - 1)), pa.int64())
    if kind == "uint":
        return pa.array(vals(st.integers(0, 2**64 - 1)), pa.uint64())
    if kind == "float":
        return pa.array(vals(st.floats()), pa.float64())
    if kind == "bool":
        return pa.array(vals(st.booleans()), pa.bool_())
    if kind == "list":
        return pa.array(vals(st.lists(id_like, max_size=2)), pa.list_(pa.string()))
    if kind == "binary":
        return pa.array(vals(st.binary(max_size=4)), pa.binary())
    if kind == "null":
        return pa.nulls(n)
    if kind == "ts":
        return pa.array(vals(st.integers(0, 2**40)), pa.timestamp("ms"))
    if kind == "date":
        return pa.array(vals(st.integers(0, 20000)), pa.date32())
    return pa.array(vals(st.fixed_dictionaries({"a": st.integers(0, 3)})), pa.struct([("a", pa.int64())]))


@st.composite
def parquet_table(draw, required: tuple[str, ...]):
    n = draw(st.integers(0, 5))
    names = draw(st.one_of(st.just(list(required)), st.permutations(list(required) + ["title"]),
                           st.lists(st.sampled_from(list(required) + ["title", "description", "x"]), max_size=5)))
    if not names:
        names = ["x"]
    cols = [draw(arrow_column(n)) for _ in names]
    return pa.Table.from_arrays(cols, names=names)


def parquet_of(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@st.composite
def parquet_bytes(draw, required):
    data = parquet_of(draw(parquet_table(required)))
    if draw(st.integers(0, 3)):
        return data
    return draw(st.one_of(st.integers(1, len(data) - 1).map(lambda k: data[:k]), st.binary(max_size=40),
                          st.binary(max_size=40).map(lambda b: b"PAR1" + b + b"PAR1")))


@SETTINGS
@given(inter=parquet_bytes(("user_id", "item_id", "timestamp")), items=parquet_bytes(("item_id", "title")))
def test_parquet_valid_or_user_error(inter, items):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "inter.parquet").write_bytes(inter)
        (Path(d) / "items.parquet").write_bytes(items)
        read_or_user_error(Path(d) / "inter.parquet", Path(d) / "items.parquet")


@SETTINGS
@given(column=st.sampled_from(["user_id", "item_id", "timestamp", "items:item_id", "items:title"]),
       kind=st.sampled_from(KINDS), data=st.data())
def test_parquet_any_column_type_valid_or_user_error(column, kind, data):
    """Every Arrow type in every role, the rest of the input valid: a RawData or a one-line UserError."""
    n = data.draw(st.integers(1, 4))
    inter = {"user_id": pa.array(["u"] * n), "item_id": pa.array(["1"] * n), "timestamp": pa.array(range(n))}
    items = {"item_id": pa.array(["1"]), "title": pa.array(["a"])}
    if column.startswith("items:"):
        items[column[6:]] = data.draw(arrow_column(1, kind))
    else:
        inter[column] = data.draw(arrow_column(n, kind))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "inter.parquet").write_bytes(parquet_of(pa.table(inter)))
        (Path(d) / "items.parquet").write_bytes(parquet_of(pa.table(items)))
        read_or_user_error(Path(d) / "inter.parquet", Path(d) / "items.parquet")


@SETTINGS
@given(ts=st.lists(st.one_of(st.floats(), st.none()), min_size=1, max_size=6))
def test_parquet_timestamps_finite_or_error_naming_the_row(ts):
    with tempfile.TemporaryDirectory() as d:
        inter = Path(d) / "inter.parquet"
        pq.write_table(pa.table({"user_id": ["u"] * len(ts), "item_id": ["1"] * len(ts),
                                 "timestamp": pa.array(ts, pa.float64())}), inter)
        (Path(d) / "items.csv").write_text("item_id,title\n1,a\n")
        bad = [n for n, t in enumerate(ts) if t is None or t != t or t in (float("inf"), float("-inf"))]
        try:
            raw = read_raw(str(inter), str(Path(d) / "items.csv"))
        except UserError as exc:
            check_one_line(exc)
            assert bad and f"row {bad[0] + 1}," in str(exc) and "'timestamp'" in str(exc)
            return
    assert not bad and raw.sequences == {"u": ["1"] * len(ts)}


# ------------------------------------------------------------------------------ the real `comeir prepare`


@st.composite
def prepare_case(draw):
    """(files {name: bytes}, --input name, --items name or None)."""
    layout = draw(st.sampled_from(["json", "csv", "parquet"]))
    if layout == "json":
        good_items = st.sampled_from(["1", "2", "3", "007"])
        inter = draw(st.one_of(file_bytes(json_value),
                               st.dictionaries(st.sampled_from(ODD_IDS) | id_like,
                                               st.lists(good_items, min_size=4, max_size=5)
                                               | st.lists(good_items | json_scalar, min_size=3, max_size=5),
                                               min_size=1, max_size=4)
                               .map(lambda v: json.dumps(v).encode())))
        items = json.dumps({i: {"title": i} for i in ["1", "2", "3", "007"]}).encode()
        return {"raw/X.inter.json": inter, "raw/X.item.json": items}, "raw", None
    if layout == "csv":
        return ({"inter.csv": draw(st.one_of(csv_text(), mostly_valid_csv())), "items.csv": draw(items_csv_text)},
                "inter.csv", "items.csv")
    return ({"inter.parquet": draw(parquet_bytes(("user_id", "item_id", "timestamp"))),
             "items.csv": b"item_id,title\n1,a\n"}, "inter.parquet", "items.csv")


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=prepare_case())
def test_prepare_cli_exit_2_one_line_no_output(case):
    files, inp, items = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        out = root / "out" / "ds"
        argv = ["prepare", "--input", str(root / inp), "--out", str(out), "--k-core", "1"]
        if items:
            argv += ["--items", str(root / items)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        text = err.getvalue()
        assert rc in (0, 2), (rc, text)
        leftovers = list((root / "out").glob(".tmp-*")) if (root / "out").exists() else []
        assert not leftovers
        if rc == 2:
            assert text.startswith("comeir prepare: error: ") and text.count("\n") == 1, repr(text)
            assert "Traceback" not in text and not out.exists()
        else:
            assert (out / "stats.json").is_file()
