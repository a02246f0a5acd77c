import math

import numpy as np
import pytest
import torch

from comeir_dist.eval.metrics import (
    MetricSums,
    compute_metrics,
    item_hit_at_k,
    item_ndcg_at_k,
    metric_keys,
    per_user_metrics,
    sid_hit_at_k,
    sid_ndcg_at_k,
)


def test_collision_case_from_spec():
    # P=3 items ahead, tie group of G=4, K=5 -> positions 4..7, two of them inside the top 5
    assert item_hit_at_k([3], [4], [True], 5)[0] == pytest.approx(2 / 4)
    assert item_ndcg_at_k([3], [4], [True], 5)[0] == pytest.approx(0.25 * (1 / math.log2(5) + 1 / math.log2(6)))


def test_no_collision_cases():
    P, G, F = [0, 2, 4, 5, 9], [1, 1, 1, 1, 1], [True] * 5
    assert item_hit_at_k(P, G, F, 5).tolist() == [1, 1, 1, 0, 0]
    assert item_ndcg_at_k(P, G, F, 5).tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(6), 0.0, 0.0])
    assert item_hit_at_k(P, G, F, 10).tolist() == [1, 1, 1, 1, 1]
    assert item_ndcg_at_k(P, G, F, 10)[4] == pytest.approx(1 / math.log2(11))


def test_group_larger_than_k_and_k_le_p_and_not_found():
    assert item_hit_at_k([0], [10], [True], 5)[0] == pytest.approx(0.5)
    assert item_ndcg_at_k([0], [10], [True], 5)[0] == pytest.approx(sum(1 / math.log2(i + 1) for i in range(1, 6)) / 10)
    # K <= P
    assert item_hit_at_k([5, 7], [3, 1], [True, True], 5).tolist() == [0.0, 0.0]
    assert item_ndcg_at_k([5, 7], [3, 1], [True, True], 5).tolist() == [0.0, 0.0]
    # not found (P is then the number of returned items, could be < K) -> 0
    assert item_hit_at_k([2], [1], [False], 5)[0] == 0.0
    assert item_ndcg_at_k([2], [1], [False], 5)[0] == 0.0
    # K = P + 1 with a group: one position inside
    assert item_hit_at_k([4], [2], [True], 5)[0] == pytest.approx(0.5)
    assert item_ndcg_at_k([4], [2], [True], 5)[0] == pytest.approx(0.5 / math.log2(6))


def test_sid_level():
    found = [True, True, True, False]
    rank = [1, 3, 7, 0]
    assert sid_hit_at_k(found, rank, 5).tolist() == [1, 1, 0, 0]
    assert sid_hit_at_k(found, rank, 10).tolist() == [1, 1, 1, 0]
    assert sid_ndcg_at_k(found, rank, 5).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert sid_ndcg_at_k(found, rank, 10).tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])


def test_compute_metrics_keys_and_means_torch_inputs():
    P = torch.tensor([3, 0, 0, 6])
    G = torch.tensor([4, 1, 2, 1])
    found = torch.tensor([True, True, True, False])
    rank = torch.tensor([2, 1, 1, 0])
    m = compute_metrics(P, G, found, rank, ks=(5, 10))
    assert set(m) == set(metric_keys((5, 10))) | {"users"} | {f"se/{k}" for k in metric_keys((5, 10))}
    assert m["users"] == 4
    assert m["item/hit@5"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert m["item/hit@10"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    nd5 = 0.25 * (1 / math.log2(5) + 1 / math.log2(6)) + 1 + 0.5 * (1 + 1 / math.log2(3))
    assert m["item/ndcg@5"] == pytest.approx(nd5 / 4)
    assert m["sid/hit@5"] == pytest.approx(3 / 4)
    assert m["sid/ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 + 1) / 4)
    # item-level never exceeds SID-level hit here (collisions only push items down)
    assert m["item/hit@5"] <= m["sid/hit@5"]


def test_metric_sums_merge_exact_and_state_roundtrip():
    rng = np.random.default_rng(0)
    n = 101
    G = rng.integers(1, 5, n)
    P = rng.integers(0, 15, n)
    found = rng.random(n) < 0.8
    rank = np.where(found, rng.integers(1, 21, n), 0)
    full = compute_metrics(P, G, found, rank)
    parts = [MetricSums.from_arrays(P[a:b], G[a:b], found[a:b], rank[a:b]) for a, b in [(0, 10), (10, 10), (10, 64), (64, 101)]]
    merged = MetricSums.merge_all(parts)
    assert merged.count == n
    got = merged.means()
    assert got["users"] == full["users"] == n
    for k in metric_keys((5, 10)):
        assert got[k] == pytest.approx(full[k], rel=1e-12, abs=1e-15)
    assert (parts[0] + parts[2]).count == parts[0].count + parts[2].count
    again = MetricSums.from_state(merged.state_dict())
    assert again.means() == got
    # per-user values averaged directly give the same numbers
    per = per_user_metrics(P, G, found, rank)
    for k, v in per.items():
        assert v.mean() == pytest.approx(full[k])


def test_empty_and_errors():
    empty = MetricSums()
    assert empty.means() == {"users": 0}
    z = compute_metrics([], [], [], [])
    assert z["users"] == 0 and z["item/hit@5"] == 0.0
    with pytest.raises(ValueError):
        compute_metrics([1, 2], [1], [True], [1])
    with pytest.raises(ValueError):
        item_hit_at_k([0], [1], [True], 0)
    a = MetricSums.from_arrays([0], [1], [True], [1], ks=(5,))
    b = MetricSums.from_arrays([0], [1], [True], [1], ks=(10,))
    with pytest.raises(ValueError):
        a.merge(b)


def test_clustered_standard_errors():
    """One row per group: the usual standard error; correlated rows of one group widen it (the sandwich formula,
    checked by hand); with_clustered_se leaves one-row-per-user means untouched."""
    from comeir_dist.eval.metrics import clustered_standard_errors, with_clustered_se

    rng = np.random.default_rng(0)
    x = rng.random(50)
    usual = MetricSums(sums={"m": float(x.sum())}, count=50, sumsq={"m": float((x * x).sum())}).standard_errors()
    assert clustered_standard_errors({"m": x}, np.arange(50))["se/m"] == pytest.approx(usual["se/m"], rel=1e-12)
    y, groups = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), np.array([7, 7, 3, 3, 5, 9])
    d = y - y.mean()
    by_hand = np.sqrt(4 / 3 * ((d[0] + d[1]) ** 2 + (d[2] + d[3]) ** 2 + d[4] ** 2 + d[5] ** 2) / 36)
    assert clustered_standard_errors({"m": y}, groups)["se/m"] == pytest.approx(by_hand, rel=1e-12)
    assert by_hand > clustered_standard_errors({"m": y}, np.arange(6))["se/m"]  # identical pairs: wider
    ranked = (np.array([0, 20, 1]), np.ones(3, int), np.array([True, False, True]), np.array([1, 0, 2]))
    means = compute_metrics(*ranked)
    assert with_clustered_se(means, np.array([1, 2, 3]), ranked) is means
    clustered = with_clustered_se(means, np.array([1, 1, 3]), ranked)
    assert clustered["clusters"] == 2 and clustered["item/ndcg@10"] == means["item/ndcg@10"]
    assert clustered["se/item/ndcg@10"] != means["se/item/ndcg@10"]
