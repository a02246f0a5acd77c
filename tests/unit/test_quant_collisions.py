"""Balanced k-means assignment and last-level collision resolution."""
import numpy as np
import pytest
import torch

from comeir_dist.quant.collisions import resolve_last_level
from comeir_dist.quant.report import sid_stats
from comeir_dist.quant.rqkmeans import balanced_assign, fit_rqkmeans, kmeans


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_balanced_assign_respects_capacity_and_is_optimal_on_small_case():
    rng = np.random.default_rng(0)
    d = torch.as_tensor(rng.random((6, 3)).astype(np.float32))
    a = balanced_assign(d, cap=2)
    assert torch.bincount(a, minlength=3).tolist() == [2, 2, 2]
    # stable matching: no point prefers a cluster that holds a farther point
    for p in range(6):
        for c in range(3):
            if d[p, c] < d[p, a[p]]:
                held = (a == c).nonzero().flatten()
                assert all(d[q, c] <= d[p, c] for q in held)


def test_balanced_assign_uncrowded_is_argmin():
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert balanced_assign(d, cap=2).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="cannot place 5 points"):
        balanced_assign(torch.zeros(5, 2), cap=2)


def test_balanced_kmeans_caps_cluster_sizes():
    x = torch.as_tensor(np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32))
    x[:30] += 20  # one dense blob that plain k-means would give few clusters
    _, a = kmeans(x, 5, 20, torch.Generator().manual_seed(0), balanced=True)
    assert torch.bincount(a, minlength=5).max() <= 10


def test_resolve_by_hand():
    # items 0,1,2 share SID (0,1); item 3 has (0,2) -> same prefix (0,), code 2 is taken
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1]])
    dists = np.array([
        [5.0, 0.1, 0.2, 0.3],   # nearest to code 1 -> keeps it
        [0.9, 0.4, 0.5, 0.6],   # next: code 2 taken by item 3 -> code 3
        [0.0, 0.8, 0.1, 0.2],   # last mover: 0 is free -> code 0
        [1.0, 1.0, 0.1, 1.0],
        [1.0, 0.1, 1.0, 1.0],
    ])
    # item 2's distance to code 1 is 0.8 > item 1's 0.4, so item 1 moves first (to 3, since 2 is used)
    out, moved = resolve_last_level(codes, dists)
    assert moved == 2
    assert out[:, 0].tolist() == [0, 0, 0, 0, 1]                     # earlier levels untouched
    assert out[:, 1].tolist() == [1, 3, 0, 2, 1]
    assert sid_stats(out, 4)["items_in_collisions"] == 0


def test_resolve_cannot_exceed_codebook():
    codes = np.zeros((3, 2), int)           # 3 items, one prefix, only 2 last-level codes
    dists = np.array([[0.0, 1.0], [0.5, 1.0], [0.7, 1.0]])
    out, moved = resolve_last_level(codes, dists)
    assert moved == 1 and sorted(out[:, 1].tolist()) == [0, 0, 1]
    assert out[0, 1] == 0                   # the nearest item keeps the shared code


def test_resolve_no_collisions_is_identity():
    codes = np.array([[0, 1], [1, 1]])
    out, moved = resolve_last_level(codes, np.zeros((2, 2)))
    assert moved == 0 and np.array_equal(out, codes)


def test_fit_rqkmeans_with_resolution_keeps_levels_and_reports():
    x = np.repeat(np.random.default_rng(0).normal(size=(10, 6)), 3, axis=0).astype(np.float32)  # triplicates
    plain = fit_rqkmeans(x, 2, 4, 10, seed=0)
    res = fit_rqkmeans(x, 2, 4, 10, seed=0, resolve_collisions=True, balanced=True)
    assert res.codes.shape == (30, 2) and res.codes.max() < 4
    assert plain.info["argmin_distinct_sids"] < 30
    assert sid_stats(res.codes, 4)["distinct_sids"] > sid_stats(plain.codes, 4)["distinct_sids"]
    assert res.info["reassigned_items"] > 0
    manual = res.codebooks[0][res.codes[:, 0]] + res.codebooks[1][res.codes[:, 1]]
    np.testing.assert_allclose(res.recon, manual, atol=1e-5)
