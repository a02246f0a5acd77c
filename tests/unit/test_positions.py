"""A metric by validation-target position (analysis.positions, `comeir analyze positions`)."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.analysis.positions import run_positions, split_positions
from comeir_dist.errors import UserError
from tests.fixtures import make_tiny_dataset


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny3"), valid_targets=3)


def _users_file(path, users, targets, P):
    """Per-row results with every target's SID group of size 1 at position P (P >= 10: missed)."""
    top = [[int(t)] * 10 for t in targets]
    pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(targets, pa.int32()),
                             "top_items": top, "P": pa.array(P, pa.int64()), "G": pa.array([1] * len(P), pa.int64())}),
                   path)


def _split(ds, split):
    users, targets, before = split_positions(str(ds), split)
    return users.tolist(), targets.tolist(), before.tolist()


def test_positions_count_back_from_the_test_item(tiny3):
    users, _, before = _split(tiny3, "valid")
    assert before[:3] == [3, 2, 1] and len(users) == 3 * len(set(users))  # oldest target first
    assert set(_split(tiny3, "test")[2]) == {0}


def test_positions_count_back_from_the_last_test_item(tmp_path):
    """--test-targets 2: test rows are 1 and 0 (the last), validation rows 4, 3, 2 (just before the first test
    row); the text table labels the split of each column."""
    from comeir_dist.analysis.positions import PositionMean, format_positions

    ds = make_tiny_dataset(tmp_path / "t2", seq_len=8, valid_targets=3, test_targets=2)
    assert _split(ds, "test")[2][:2] == [1, 0] and _split(ds, "valid")[2][:3] == [4, 3, 2]
    text = format_positions({"A": [PositionMean(2, 5, 0.1, 0.01), PositionMean(1, 5, 0.2, 0.01, "test"),
                                   PositionMean(0, 5, 0.3, 0.01, "test")]}, "item/ndcg@10")
    assert "valid, 2 before last | test, 1 before last | test" in text


def test_positions_group_rows_whatever_the_file_order(tiny3, tmp_path):
    users, targets, before = _split(tiny3, "valid")
    run = tmp_path / "run"
    run.mkdir()
    # hits only on the target just before the test item (NDCG 1), at rank 2 on the oldest (NDCG 1/log2(3))
    P = [0 if b == 1 else (1 if b == 3 else 10) for b in before]
    order = sorted(range(len(users)), key=lambda i: (-users[i], i))  # users reversed, each user's rows in order
    _users_file(run / "valid.users.parquet", [users[i] for i in order], [targets[i] for i in order],
                [P[i] for i in order])
    tu, tt, _ = _split(tiny3, "test")
    _users_file(run / "test.users.parquet", tu, tt, [0 if u % 2 else 10 for u in tu])
    table = run_positions(str(tiny3), [f"A={run}"], "item/ndcg@10")
    means = {m.before_test: m for m in table["A"]}
    assert means[1].mean == pytest.approx(1.0) and means[2].mean == 0.0 and means[2].se == 0.0
    assert means[3].mean == pytest.approx(1 / math.log2(3)) and means[3].rows == len(set(users))
    want_test = np.array([1.0 if u % 2 else 0.0 for u in tu])
    assert means[0].mean == pytest.approx(want_test.mean())
    assert means[0].se == pytest.approx(want_test.std(ddof=1) / math.sqrt(len(tu)))
    assert [m.before_test for m in table["popular"]] == [3, 2, 1, 0]
    # two runs averaged per row; the same run twice is itself
    again = run_positions(str(tiny3), [f"AA={run},{run}"], "item/ndcg@10")["AA"]
    assert [m.mean for m in again] == pytest.approx([m.mean for m in table["A"]])


def test_positions_refuse_rows_out_of_order(tiny3, tmp_path):
    users, targets, _ = _split(tiny3, "valid")
    swapped = targets[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]  # one user's first two targets exchanged
    _users_file(tmp_path / "valid.users.parquet", users, swapped, [10] * len(users))
    with pytest.raises(UserError, match="another valid target"):
        run_positions(str(tiny3), [str(tmp_path / "valid.users.parquet")], "item/ndcg@10", with_test=False)


def test_analyze_positions_cli(tiny3, tmp_path, capsys):
    from comeir_dist.cli import main

    users, targets, _ = _split(tiny3, "valid")
    run = tmp_path / "r"
    run.mkdir()
    _users_file(run / "valid.users.parquet", users, targets, [0] * len(users))
    out = tmp_path / "pos.json"
    assert main(["analyze", "positions", "--dataset", str(tiny3), "--runs", str(run), "--no-test",
                 "--out", str(out)]) == 0
    assert "3 before test" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert [m["mean"] for m in rep["runs"]["r"]] == [1.0, 1.0, 1.0] and "popular" in rep["runs"]
    # the run has no test results: one line naming the command that writes them
    assert main(["analyze", "positions", "--dataset", str(tiny3), "--runs", str(run)]) == 2
    assert "--split test" in capsys.readouterr().err
