"""Paired comparison of two rankers over the same users (analysis.paired, `comeir analyze paired`)."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.analysis.paired import align, paired_difference, users_file_values, vs_popular
from comeir_dist.errors import UserError
from tests.fixtures import make_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def test_paired_standard_error_is_that_of_the_differences():
    rng = np.random.default_rng(0)
    easy = rng.random(400)  # per-user difficulty shared by both rankers
    a, b = easy + 0.02 + 0.01 * rng.standard_normal(400), easy + 0.01 * rng.standard_normal(400)
    p = paired_difference(a, b)
    d = a - b
    assert p.diff == pytest.approx(d.mean()) and p.se == pytest.approx(d.std(ddof=1) / math.sqrt(400))
    assert (p.mean_a, p.mean_b, p.users) == (pytest.approx(a.mean()), pytest.approx(b.mean()), 400)
    assert p.a_better + p.b_better == 400 and p.z == pytest.approx(p.diff / p.se)
    unpaired = math.sqrt(a.var(ddof=1) / 400 + b.var(ddof=1) / 400)
    assert p.se < unpaired / 5  # the shared difficulty cancels


def test_align_orders_users_and_refuses_different_users():
    u, a, b = align(np.array([3, 1, 2]), np.array([0.3, 0.1, 0.2]), np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]),
                    "A", "B")
    assert a.tolist() == [0.1, 0.2, 0.3] and b.tolist() == [1.0, 2.0, 3.0] and u.tolist() == [1, 2, 3]
    with pytest.raises(UserError, match="same users"):
        align(np.array([1, 2]), np.zeros(2), np.array([1, 4]), np.zeros(2), "A", "B")
    with pytest.raises(UserError, match=r"different rows per user \(user_idx 1: 2 vs 1\)"):
        align(np.array([1, 1, 2]), np.zeros(3), np.array([1, 2, 2]), np.zeros(3), "A", "B")


def test_several_rows_per_user_pair_in_order_with_a_clustered_standard_error():
    """--test-targets K: a user's n-th row pairs with its n-th row on the other side; the standard error is the
    cluster-robust one over users (not the rows' plain one), and one row per user gives the plain one."""
    from comeir_dist.eval.metrics import clustered_standard_errors

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(200), 4)
    shared = np.repeat(rng.standard_normal(200), 4)  # a user effect in the difference: rows are correlated
    d = 0.05 + shared + 0.5 * rng.standard_normal(800)
    b = rng.random(800)
    idx = np.concatenate([np.arange(4 * k, 4 * k + 4) for k in rng.permutation(200)])  # users shuffled, rows in order
    u, a_al, b_al = align(users[idx], (b + d)[idx], users, b, "A", "B")
    assert np.allclose(a_al - b_al, d) and (u == users).all()
    p = paired_difference(a_al, b_al, groups=u)
    assert (p.users, p.rows) == (200, 800) and p.diff == pytest.approx(d.mean())
    assert p.se == pytest.approx(clustered_standard_errors({"d": d}, users)["se/d"])
    assert p.se > 1.5 * d.std(ddof=1) / math.sqrt(800)  # correlated rows: the plain s.e. would overstate the evidence
    one = paired_difference(d[:200], np.zeros(200), groups=np.arange(200))
    assert one.rows == 0 and one.se == pytest.approx(d[:200].std(ddof=1) / math.sqrt(200))


def _users_file(path, users, targets, P):
    """A per-user result file with every target's SID group of size 1 at position P (P >= 10: missed)."""
    top = [[int(t)] * 10 for t in targets]
    pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(targets, pa.int32()),
                             "top_items": top, "P": pa.array(P, pa.int64()), "G": pa.array([1] * len(P), pa.int64())}),
                   path)
    return path


def test_vs_popular_pairs_a_run_with_the_baseline_on_its_users(tiny, tmp_path):
    from comeir_dist.data.dataset import read_split
    from comeir_dist.eval.popular import popular_per_user

    test = read_split(tiny, "test")
    users = test.column("user_idx").to_pylist()
    P = [0 if i % 2 == 0 else 10 for i in range(len(users))]  # every other user hit at rank 1
    f = _users_file(tmp_path / "test.users.parquet", users[::-1], test.column("target").to_pylist()[::-1], P[::-1])
    ur, run = users_file_values(f)
    assert run[np.argsort(ur)].tolist() == [1.0 if p == 0 else 0.0 for p in P]
    up, pop = popular_per_user(str(tiny), "test", "item/ndcg@10")
    res = vs_popular(str(tiny), f)
    want = np.array([1.0 if p == 0 else 0.0 for p in P]) - pop[np.argsort(up)]
    assert res["users"] == len(users) and res["diff"] == pytest.approx(want.mean())
    assert res["se"] == pytest.approx(want.std(ddof=1) / math.sqrt(len(users)))
    with pytest.raises(UserError, match="--metric"):
        users_file_values(f, "item/ndcg@20")


def test_analyze_paired_cli(tiny, tmp_path, capsys):
    from comeir_dist.cli import main
    from comeir_dist.data.dataset import read_split

    test = read_split(tiny, "test")
    users, targets = test.column("user_idx").to_pylist(), test.column("target").to_pylist()
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    _users_file(a / "test.users.parquet", users, targets, [0] * len(users))
    _users_file(b / "test.users.parquet", users, targets, [10] * len(users))
    assert main(["analyze", "paired", "--runs", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["diff"] == pytest.approx(1.0) and out["a_better"] == len(users)
    assert main(["analyze", "paired", "--runs", str(a), "popular", "--dataset", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b_better"] == 0
    assert main(["analyze", "paired", "--runs", str(a), "popular"]) == 2
    assert "--dataset" in capsys.readouterr().err
    # NAME=P1,P2: each user's value averaged over the runs (seeds) first, users aligned across them
    c = tmp_path / "c"
    c.mkdir()
    _users_file(c / "test.users.parquet", users[::-1], targets[::-1], [0 if u % 2 else 10 for u in users[::-1]])
    assert main(["analyze", "paired", "--runs", f"ac={a},{c}", str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = np.array([1.0 if u % 2 else 0.5 for u in sorted(users)])
    assert out["a"] == "ac" and out["mean_a"] == pytest.approx(want.mean()) and out["users"] == len(users)
    assert out["se"] == pytest.approx(want.std(ddof=1) / math.sqrt(len(users)))
    assert main(["analyze", "paired", "--runs", f"{a},{tmp_path / 'nope'}", str(b)]) == 2
    assert "not found" in capsys.readouterr().err
