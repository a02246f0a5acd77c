"""Regression tests for issue 10 (items 2 and 3, input side): ids keep their identity exactly as written,
and malformed inputs give one-line UserErrors (exit 2) instead of tracebacks or silently wrong data."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.cli import main
from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data.prepare import _numeric_key, run_prepare
from comeir_dist.data.readers import read_raw
from comeir_dist.errors import UserError


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def items_csv(path: Path, ids) -> Path:
    return write_csv(path, "item_id,title", [f"{i},Item {i}" for i in ids])


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg.splitlines()) == 1
    return msg


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def assert_exit2_one_line(tmp_path, capsys, inter: Path, items: Path | None, *needles: str) -> str:
    out = tmp_path / "ds"
    argv = ["prepare", "--input", str(inter), "--out", str(out)] + (["--items", str(items)] if items else [])
    rc, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err and err.startswith("comeir prepare: error: ")
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    return err


# ------------------------------------------------------------------ item 2: ids change identity


def test_csv_item_ids_007_and_7_stay_two_items(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u1,007,1", "u1,7,2", "u2,7,1"])
    items = write_csv(tmp_path / "items.csv", "item_id,title", ["007,Bond", "7,Seven"])
    raw = read_raw(str(inter), str(items))
    assert raw.sequences == {"u1": ["007", "7"], "u2": ["7"]}
    assert raw.items["007"]["title"] == "Bond" and raw.items["7"]["title"] == "Seven"


def test_csv_user_ids_above_int64_stay_distinct(tmp_path):
    big = 2**64  # above int64 and uint64: type inference made these floats and merged the two users
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp",
                      [f"{big},1,1", f"{big + 1},1,1", f"{big},2,2"])
    items = items_csv(tmp_path / "items.csv", [1, 2])
    raw = read_raw(str(inter), str(items))
    assert raw.sequences == {str(big): ["1", "2"], str(big + 1): ["1"]}


def test_csv_ids_and_titles_verbatim_na_is_an_id(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["NA,null,1", " 7,1.50,2"])
    items = write_csv(tmp_path / "items.csv", "item_id,title,description", ["null,NA,1.50", "1.50,007,x"])
    raw = read_raw(str(inter), str(items))
    assert raw.sequences == {"NA": ["null"], " 7": ["1.50"]}
    assert raw.items["null"]["title"] == "NA" and raw.items["null"]["description"] == "1.50"
    assert raw.items["1.50"]["title"] == "007"


def test_parquet_nan_timestamp_is_an_error_naming_row(tmp_path):
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u", "u"], "item_id": ["1", "2", "3"],
                             "timestamp": [1.0, float("nan"), 3.0]}), inter)
    items = items_csv(tmp_path / "items.csv", [1, 2, 3])
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    msg = one_line_error(ei)
    assert str(inter) in msg and "row 2" in msg and "'timestamp'" in msg and "nan" in msg


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_parquet_infinite_timestamp_is_an_error(tmp_path, bad):
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["1", "2"], "timestamp": [bad, 3.0]}), inter)
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items_csv(tmp_path / "items.csv", [1, 2])))
    assert "row 1" in one_line_error(ei)


def test_null_timestamp_is_an_error_naming_row(tmp_path):
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["1", "2"], "timestamp": [1, None]}), inter)
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items_csv(tmp_path / "items.csv", [1, 2])))
    msg = one_line_error(ei)
    assert "row 2" in msg and "'timestamp'" in msg


def test_null_item_id_in_item_table_is_an_error_not_key_none(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    items = write_csv(tmp_path / "items.csv", "item_id,title", ["1,One", ",Orphan title"])
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    msg = one_line_error(ei)
    assert str(items) in msg and "row 2" in msg and "'item_id'" in msg


def test_null_item_id_in_parquet_item_table(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["1", None], "title": ["One", "Orphan"]}), items)
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    assert "row 2" in one_line_error(ei)


def test_null_item_id_in_json_item_list(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"item_id": "1", "title": "One"}, {"item_id": None, "title": "Orphan"}]))
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    msg = one_line_error(ei)
    assert "row 2" in msg and "'item_id'" in msg and "null" in msg


def test_parquet_integer_ids_become_exact_decimal_strings(tmp_path):
    inter = tmp_path / "inter.parquet"
    big = 2**64 - 1
    pq.write_table(pa.table({"user_id": pa.array([big, big - 1], pa.uint64()), "item_id": pa.array([7, 9], pa.int32()),
                             "timestamp": [2, 1]}), inter)
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": pa.array([7, 9], pa.int64()), "title": ["seven", "nine"]}), items)
    raw = read_raw(str(inter), str(items))
    assert raw.sequences == {str(big - 1): ["9"], str(big): ["7"]}
    assert raw.items == {"7": {"title": "seven", "description": None, "brand": None, "categories": None},
                         "9": {"title": "nine", "description": None, "brand": None, "categories": None}}


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_parquet_float_id_column_is_refused(tmp_path, column):
    cols = {"user_id": ["u", "v"], "item_id": ["7", "8"], "timestamp": [1, 2]}
    cols[column] = [7.0, 8.0]
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table(cols), inter)
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items_csv(tmp_path / "items.csv", [7, 8])))
    msg = one_line_error(ei)
    assert f"'{column}'" in msg and "double" in msg and "7.0" in msg and "strings or integers" in msg


def test_parquet_float_item_id_in_item_table_is_refused(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,7,1"])
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [7.0], "title": ["x"]}), items)
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    assert "'item_id'" in one_line_error(ei)


def test_conflicting_duplicate_item_rows_are_refused_identical_ones_kept(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    same = write_csv(tmp_path / "same.csv", "item_id,title", ["1,One", "1,One"])
    assert read_raw(str(inter), str(same)).items["1"]["title"] == "One"
    diff = write_csv(tmp_path / "diff.csv", "item_id,title", ["1,One", "1,Uno"])
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(diff))
    msg = one_line_error(ei)
    assert "row 2" in msg and "row 1" in msg


def test_json_dir_duplicate_user_key_is_refused(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "T.inter.json").write_text('{"u": ["1"], "u": ["2"]}')
    (d / "T.item.json").write_text(json.dumps({"1": {"title": "a"}, "2": {"title": "b"}}))
    with pytest.raises(UserError) as ei:
        read_raw(str(d), None)
    assert "'u'" in one_line_error(ei) and "twice" in str(ei.value)


@pytest.mark.parametrize("bad, needle", [(7.0, "float"), (True, "boolean"), (None, "null"), ("", "empty"),
                                         ([1], "list")])
def test_json_dir_bad_item_id_names_user_and_position(tmp_path, bad, needle):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "T.inter.json").write_text(json.dumps({"u1": ["1", bad]}))
    (d / "T.item.json").write_text(json.dumps({"1": {"title": "a"}}))
    with pytest.raises(UserError) as ei:
        read_raw(str(d), None)
    msg = one_line_error(ei)
    assert "T.inter.json" in msg and "'u1'" in msg and "position 2" in msg and needle in msg


def test_json_dir_integer_item_ids_exact(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    big = 10**30
    (d / "T.inter.json").write_text(json.dumps({"u1": [big, "007", 7]}))
    (d / "T.item.json").write_text(json.dumps({str(big): {"title": "a"}, "007": {"title": "b"}, "7": {"title": "c"}}))
    raw = read_raw(str(d), None)
    assert raw.sequences == {"u1": [str(big), "007", "7"]}


def test_json_items_dict_and_jsonl_forms(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,007,1", "u,7,2"])
    as_dict = tmp_path / "items.json"
    as_dict.write_text(json.dumps({"007": {"title": "Bond"}, "7": {"title": "Seven"}}))
    assert read_raw(str(inter), str(as_dict)).items["007"]["title"] == "Bond"
    as_lines = tmp_path / "items.jsonl"
    as_lines.write_text('{"item_id": "007", "title": "Bond \u2028 line sep"}\n\n{"item_id": 7, "title": "Seven"}\n')
    got = read_raw(str(inter), str(as_lines)).items
    assert got["007"]["title"] == "Bond \u2028 line sep" and got["7"]["title"] == "Seven"


def test_json_items_key_and_item_id_field_must_agree(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,7,1"])
    items = tmp_path / "items.json"
    items.write_text(json.dumps({"7": {"item_id": "8", "title": "x"}}))
    with pytest.raises(UserError) as ei:
        read_raw(str(inter), str(items))
    assert "'7'" in one_line_error(ei)


# ------------------------------------------------------------------ item 3: tracebacks -> one line


def test_numeric_key_never_calls_int_on_odd_ids():
    ids = ["10", "9", "7", "007", "a", "--5", "-5", "\u00b2", "\u0665", "1" * 5000]
    got = sorted(ids, key=_numeric_key)  # int('--5') / int('\u00b2') raised ValueError before
    assert got[:4] == ["007", "7", "9", "10"] and got[4] == "1" * 5000
    assert got[5:] == sorted(["a", "--5", "-5", "\u00b2", "\u0665"])


def test_prepare_with_odd_ids_succeeds(tmp_path, capsys):
    odd = ["--5", "\u00b2", "007", "7", "x y"]
    inter = {u: [odd[(k + j) % 5] for j in range(5)] for k, u in enumerate(["--5", "\u00b2", "-1", "1", "\u0665"])}
    d = tmp_path / "raw"
    d.mkdir()
    (d / "T.inter.json").write_text(json.dumps(inter))
    (d / "T.item.json").write_text(json.dumps({i: {"title": f"t{i}"} for i in odd}))
    rc, err = run_cli(["prepare", "--input", str(d), "--out", str(tmp_path / "ds"), "--k-core", "2"], capsys)
    assert rc == 0, err
    raw_ids = pq.read_table(tmp_path / "ds" / "items.parquet").column("raw_id").to_pylist()
    assert raw_ids == ["007", "7", "--5", "x y", "\u00b2"]
    users = pq.read_table(tmp_path / "ds" / "users.parquet").column("raw_id").to_pylist()
    assert users == ["1", "--5", "-1", "\u00b2", "\u0665"]


@pytest.mark.parametrize("payload", [[1, 2, 3], ["a"], [None], [[{"item_id": "1"}]], 5, "text", []])
def test_items_json_non_objects_one_line(tmp_path, capsys, payload):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    items = tmp_path / "items.json"
    items.write_text(json.dumps(payload))
    assert_exit2_one_line(tmp_path, capsys, inter, items, str(items))


def test_mixed_type_item_fields_become_text(tmp_path):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1", "u,2,2", "u,3,3"])
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"item_id": "1", "title": 5, "categories": ["a", ["b", "c"]]},
                                 {"item_id": 2, "title": "two", "brand": 1.5},
                                 {"item_id": "3", "title": True, "description": None}]))
    got = read_raw(str(inter), str(items)).items
    assert got["1"]["title"] == "5" and got["1"]["categories"] == "a, b, c"
    assert got["2"] == {"title": "two", "description": None, "brand": "1.5", "categories": None}
    assert got["3"]["title"] == "True"


def test_object_item_field_is_a_one_line_error(tmp_path, capsys):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1"])
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"item_id": "1", "title": "ok"}, {"item_id": "2", "title": {"en": "x"}}]))
    assert_exit2_one_line(tmp_path, capsys, inter, items, "row 2", "'title'")


def test_list_typed_user_id_column_one_line(tmp_path, capsys):
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user_id": [["u"], ["v"]], "item_id": ["1", "1"], "timestamp": [1, 2]}), inter)
    err = assert_exit2_one_line(tmp_path, capsys, inter, items_csv(tmp_path / "items.csv", [1]),
                                str(inter), "'user_id'", "list")
    assert "strings or integers" in err


def test_string_timestamp_names_the_row(tmp_path, capsys):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1", "u,1,2", "u,1,soon"])
    assert_exit2_one_line(tmp_path, capsys, inter, items_csv(tmp_path / "items.csv", [1]),
                          "row 3", "'timestamp'", "'soon'")


def test_csv_nan_timestamp_via_cli(tmp_path, capsys):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,timestamp", ["u,1,1.5", "u,2,nan", "u,3,2.5"])
    assert_exit2_one_line(tmp_path, capsys, inter, items_csv(tmp_path / "items.csv", [1, 2, 3]),
                          str(inter), "row 2", "'timestamp'", "nan")


def test_duplicate_id_columns_one_line(tmp_path, capsys):
    inter = write_csv(tmp_path / "inter.csv", "user_id,item_id,user_id,timestamp", ["u,1,v,1"])
    assert_exit2_one_line(tmp_path, capsys, inter, items_csv(tmp_path / "items.csv", [1]), "'user_id'")


def test_json_interactions_table(tmp_path, capsys):
    inter = tmp_path / "inter.json"
    inter.write_text(json.dumps([{"user_id": 1, "item_id": "007", "timestamp": 2},
                                 {"user_id": "1", "item_id": 7, "timestamp": 1.5}]))
    raw = read_raw(str(inter), str(items_csv(tmp_path / "items.csv", ["007", 7])))
    assert raw.sequences == {"1": ["7", "007"]}
    inter.write_text('[{"user_id": 1, "item_id": "7", "timestamp": NaN}]')
    assert_exit2_one_line(tmp_path, capsys, inter, tmp_path / "items.csv", "row 1", "'timestamp'")
    inter.write_text(json.dumps([{"user_id": ["u"], "item_id": "7", "timestamp": 1}]))
    assert_exit2_one_line(tmp_path, capsys, inter, tmp_path / "items.csv", "row 1", "'user_id'", "list")


def test_missing_item_message_escapes_newlines(tmp_path, capsys):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "T.inter.json").write_text(json.dumps({"u": ["a\nb"]}))
    (d / "T.item.json").write_text(json.dumps({"c": {"title": "c"}}))
    assert_exit2_one_line(tmp_path, capsys, d, None, "'a\\nb'")


def test_bundled_ids_order_unchanged(tmp_path):
    out = run_prepare(PrepareConfig(out=str(tmp_path / "ds")))
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (8317, 4344, 58492)
    for name in ("items", "users"):
        raw = pq.read_table(out / f"{name}.parquet").column("raw_id").to_pylist()
        assert raw == sorted(raw, key=int)  # bundled integer ids keep their numeric order
