import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from comeir_dist.cli import main
from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data.kcore import k_core
from comeir_dist.data.prepare import run_prepare


def write_json_dataset(d: Path, inter: dict, items: dict, name="Toy") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.inter.json").write_text(json.dumps(inter))
    (d / f"{name}.item.json").write_text(json.dumps(items))
    return d


def toy(n_users=6, n_items=6, seq_len=5):
    inter = {str(u): [(u + j) % n_items for j in range(seq_len)] for u in range(n_users)}
    items = {str(i): {"title": f"item {i}", "description": f"desc {i}"} for i in range(n_items)}
    return inter, items


def test_bundled_counts_unchanged(tmp_path):
    out = run_prepare(PrepareConfig(out=str(tmp_path / "ds")))
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (8317, 4344, 58492)
    test = pq.read_table(out / "test.parquet").to_pylist()
    seqs = pq.read_table(out / "sequences.parquet").to_pylist()
    assert test[0]["target"] == seqs[0]["items"][-1] and test[0]["history"] == seqs[0]["items"][:-1]
    valid = pq.read_table(out / "valid.parquet").to_pylist()
    assert valid[0]["target"] == seqs[0]["items"][-2]
    train = pq.read_table(out / "train.parquet").to_pylist()
    assert train[0]["items"] == seqs[0]["items"][:-2]


def test_k_core_fixed_point():
    seqs = {"a": ["1", "2", "3"], "b": ["1", "2", "3"], "c": ["1", "4"]}
    # k=2: item 4 has 1 interaction -> dropped; then c has 1 item -> dropped; then item 1 has 2: ok
    assert k_core(seqs, 2) == {"a": ["1", "2", "3"], "b": ["1", "2", "3"]}
    assert k_core(seqs, 3) == {}


def test_remap_and_split(tmp_path):
    inter, items = toy()
    items["99"] = {"title": "unused"}
    src = write_json_dataset(tmp_path / "raw", inter, items)
    out = run_prepare(PrepareConfig(input=str(src), out=str(tmp_path / "ds"), k_core=2))
    it = pq.read_table(out / "items.parquet")
    assert it.column("item_idx").to_pylist() == list(range(6))  # unused item dropped, contiguous ids
    assert it.schema.field("item_idx").type == "int32"


def test_several_validation_targets_per_user(tmp_path):
    """--valid-targets K: the K items before the test item are validation targets (fewer for short users: one
    training transition stays); training keeps the items before them; test is leave-one-out as before; re-preparing a
    copy keeps its embeddings / SIDs (same items and sequences) and the default keeps the old fingerprint."""
    from comeir_dist.data.dataset_output import input_fingerprint
    from comeir_dist.data.prepare import split_rows

    train, valid, test = split_rows([[1, 2, 3, 4, 5, 6], [7, 8, 9]], 3)
    assert train == [[1, 2], [7]]
    assert valid == {"user_idx": [0, 0, 0, 1], "history": [[1, 2], [1, 2, 3], [1, 2, 3, 4], [7]],
                     "target": [3, 4, 5, 8]}
    assert test == {"user_idx": [0, 1], "history": [[1, 2, 3, 4, 5], [7, 8]], "target": [6, 9]}
    assert split_rows([[1, 2, 3, 4]], 1)[:2] == ([[1, 2]], {"user_idx": [0], "history": [[1, 2]], "target": [3]})
    assert split_rows([[1, 2, 3, 4]], 5)[0] == [[1, 2]]

    inter, items = toy(n_items=8, seq_len=8)
    src = write_json_dataset(tmp_path / "raw", inter, items)
    one = run_prepare(PrepareConfig(input=str(src), out=str(tmp_path / "one"), k_core=2))
    (one / "sids").mkdir()
    (one / "sids" / "kept").write_text("x")
    import shutil

    shutil.copytree(one, tmp_path / "four")
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "four"), "--k-core", "2",
                 "--valid-targets", "4"]) == 0
    four = tmp_path / "four"
    assert (four / "sids" / "kept").read_text() == "x"
    seqs = pq.read_table(four / "sequences.parquet").to_pylist()
    valid = pq.read_table(four / "valid.parquet").to_pylist()
    assert len(valid) == 4 * len(seqs)
    assert [r["target"] for r in valid[:4]] == seqs[0]["items"][-5:-1]
    assert all(r["history"] == seqs[r["user_idx"]]["items"][:len(r["history"])] for r in valid)
    assert pq.read_table(four / "train.parquet").to_pylist()[0]["items"] == seqs[0]["items"][:-5]
    assert pq.read_table(four / "test.parquet").equals(pq.read_table(one / "test.parquet"))
    stats = json.loads((four / "stats.json").read_text())
    assert (stats["valid_targets"], stats["valid_rows"], stats["train_samples"]) == (4, 4 * len(seqs), 2 * len(seqs))
    cfg = PrepareConfig(input=str(src), k_core=2)
    assert input_fingerprint(cfg) != input_fingerprint(PrepareConfig(input=str(src), k_core=2, valid_targets=4))
    assert json.loads((one / ".comeir-output.json").read_text())["fingerprint"] == input_fingerprint(cfg)


def test_several_test_targets_per_user(tmp_path):
    """--test-targets K: the last K items are test targets (fewer for short users), the validation targets come
    before them, training keeps >= 2 items when the user has 4 or more; the default keeps the old fingerprint and
    layout, and the test split's standard errors are clustered by user."""
    from comeir_dist.data.dataset_output import input_fingerprint
    from comeir_dist.data.prepare import held_out_counts, split_rows

    train, valid, test = split_rows([list(range(10)), [20, 21, 22, 23, 24], [30, 31, 32]], 2, 3)
    assert train == [[0, 1, 2, 3, 4], [20, 21], [30]]
    assert valid["target"] == [5, 6, 22, 31] and valid["user_idx"] == [0, 0, 1, 2]  # user 1: 2 test, 1 valid, 2 train
    assert test["target"] == [7, 8, 9, 23, 24, 32] and test["user_idx"] == [0, 0, 0, 1, 1, 2]
    assert test["history"][:3] == [list(range(7)), list(range(8)), list(range(9))]
    for n in range(3, 30):  # each user: >= 1 of each, >= 2 training items from 4 items on, nothing lost
        for kv in (1, 2, 4):
            for kt in (1, 3, 4):
                v, t = held_out_counts(n, kv, kt)
                assert 1 <= v <= kv and 1 <= t <= kt and n - v - t >= (2 if n >= 4 else 1)
                if kt == 1:
                    assert v == min(kv, max(1, n - 3))  # the --valid-targets rule of the first version

    inter, items = toy(n_items=8, seq_len=8)
    src = write_json_dataset(tmp_path / "raw", inter, items)
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "t3"), "--k-core", "2",
                 "--valid-targets", "2", "--test-targets", "3"]) == 0
    t3 = tmp_path / "t3"
    seqs = pq.read_table(t3 / "sequences.parquet").to_pylist()
    rows = pq.read_table(t3 / "test.parquet").to_pylist()
    assert len(rows) == 3 * len(seqs)
    assert [r["target"] for r in rows[:3]] == seqs[0]["items"][-3:]
    assert [r["target"] for r in pq.read_table(t3 / "valid.parquet").to_pylist()[:2]] == seqs[0]["items"][-5:-3]
    assert pq.read_table(t3 / "train.parquet").to_pylist()[0]["items"] == seqs[0]["items"][:-5]
    stats = json.loads((t3 / "stats.json").read_text())
    assert (stats["test_targets"], stats["test_rows"]) == (3, 3 * len(seqs))
    base = PrepareConfig(input=str(src), k_core=2)
    assert input_fingerprint(base) != input_fingerprint(PrepareConfig(input=str(src), k_core=2, test_targets=3))
    assert "test_targets" not in json.loads((Path(run_prepare(PrepareConfig(
        input=str(src), out=str(tmp_path / "one"), k_core=2))) / "stats.json").read_text())

    from comeir_dist.eval.popular import popular_metrics
    from comeir_dist.config.run import RunConfig

    m = popular_metrics(RunConfig(dataset=str(t3)), "test")
    assert m["clusters"] == len(seqs) and m["users"] == 3 * len(seqs)


def test_csv_layout(tmp_path):
    rows = ["user_id,item_id,timestamp"]
    for u in range(6):
        for j in range(5):
            rows.append(f"u{u},i{(u + j) % 6},{100 - j}")  # reversed timestamps: order must follow time
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Item {i}\n" for i in range(6)))
    out = run_prepare(PrepareConfig(input=str(tmp_path / "inter.csv"), items=str(tmp_path / "items.csv"),
                                    out=str(tmp_path / "ds"), k_core=2))
    seq = pq.read_table(out / "sequences.parquet").to_pylist()[0]["items"]
    raw = pq.read_table(out / "items.parquet").column("raw_id").to_pylist()
    assert [raw[i] for i in seq] == [f"i{(0 + j) % 6}" for j in reversed(range(5))]


BAD_CASES = {
    "missing_dir": lambda d: (d / "nope", None, "input not found"),
    "malformed_json": lambda d: (_bad_json(d), None, "malformed JSON"),
    "empty_file": lambda d: (_empty(d), None, "file is empty"),
    "missing_item": lambda d: (_missing_item(d), None, "absent from the item table"),
    "all_vanish": lambda d: (_vanish(d), None, "survives the"),
    "wrong_columns": lambda d: (_csv(d, "user,item,time\n1,2,3\n"), d / "items.csv", "missing column"),
    "bad_timestamp": lambda d: (_csv(d, "user_id,item_id,timestamp\n1,2,abc\n"), d / "items.csv", "timestamp"),
    "no_items_flag": lambda d: (_csv(d, "user_id,item_id,timestamp\n1,2,3\n"), None, "--items"),
}


def _bad_json(d):
    src = write_json_dataset(d / "raw", *toy())
    (src / "Toy.inter.json").write_text("{not json")
    return src


def _empty(d):
    src = write_json_dataset(d / "raw", *toy())
    (src / "Toy.item.json").write_text("")
    return src


def _missing_item(d):
    inter, items = toy()
    del items["3"]
    return write_json_dataset(d / "raw", inter, items)


def _vanish(d):
    return write_json_dataset(d / "raw", {"0": ["1", "2"]}, {"1": {"title": "a"}, "2": {"title": "b"}})


def _csv(d, text):
    (d / "items.csv").write_text("item_id,title\n2,x\n")
    (d / "inter.csv").write_text(text)
    return d / "inter.csv"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_error_no_output(tmp_path, case, capsys):
    src, items, needle = BAD_CASES[case](tmp_path)
    out = tmp_path / "ds"
    argv = ["prepare", "--input", str(src), "--out", str(out)]
    if items:
        argv += ["--items", str(items)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_bad_config_value_names_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quantize:\n  method: pq\n")
    assert main(["quantize", "--config", str(cfg), "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "quantize.method" in err and "rqkmeans" in err


def test_cli_subprocess_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "comeir_dist.cli", "prepare", "--input", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "input not found" in r.stderr
