"""RQ-KMeans: shapes, ranges, determinism, residual logic (Eq. 29)."""
import numpy as np
import pytest
import torch

from comeir_dist.quant.rqkmeans import fit_rqkmeans, kmeans, rq_assign


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n_per=20, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 10
    x = np.concatenate([c + rng.normal(scale=0.1, size=(n_per, d)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_shapes_and_ranges():
    x = np.random.default_rng(1).normal(size=(60, 16)).astype(np.float32)
    res = fit_rqkmeans(x, levels=3, codebook_size=8, iters=10, seed=3)
    assert res.codes.shape == (60, 3) and res.codes.dtype == np.int64
    assert res.codes.min() >= 0 and res.codes.max() < 8
    assert res.codebooks.shape == (3, 8, 16) and res.codebooks.dtype == np.float32
    assert res.recon.shape == x.shape
    # reconstruction is the sum of the chosen centroids
    manual = sum(res.codebooks[l][res.codes[:, l]] for l in range(3))
    np.testing.assert_allclose(res.recon, manual, atol=1e-5)


def test_deterministic_for_seed_and_seed_matters():
    x = np.random.default_rng(2).normal(size=(80, 12)).astype(np.float32)
    a = fit_rqkmeans(x, 2, 6, 20, seed=5)
    b = fit_rqkmeans(x, 2, 6, 20, seed=5)
    c = fit_rqkmeans(x, 2, 6, 20, seed=6)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codebooks, b.codebooks)
    assert not np.array_equal(a.codebooks, c.codebooks)


def test_kmeans_recovers_separated_clusters_and_uses_all_codes():
    x, labels = _blobs()
    cent, assign = kmeans(torch.as_tensor(x), 4, 20, torch.Generator().manual_seed(0))
    # each true cluster maps to exactly one k-means cluster
    for k in range(4):
        assert len(set(assign[labels == k].tolist())) == 1
    assert len(set(assign.tolist())) == 4
    assert cent.shape == (4, 8)


def test_kmeans_no_empty_cluster_with_duplicates():
    x = np.zeros((10, 3), np.float32)
    x[5:] = 1.0
    cent, assign = kmeans(torch.as_tensor(x), 3, 5, torch.Generator().manual_seed(0))
    assert assign.shape == (10,) and int(assign.max()) < 3


def test_residual_levels_reduce_error():
    x = np.random.default_rng(3).normal(size=(100, 8)).astype(np.float32)
    one = fit_rqkmeans(x, 1, 8, 20, seed=0)
    three = fit_rqkmeans(x, 3, 8, 20, seed=0)
    err = lambda r: float(((x - r.recon) ** 2).mean())
    assert err(three) < err(one)
    codes, xhat = rq_assign(torch.as_tensor(x), torch.as_tensor(three.codebooks))
    assert np.array_equal(codes.numpy(), three.codes)
