"""Report numbers on hand-checkable cases and the best-restart rule."""
import hashlib

import numpy as np
import pytest

from comeir_dist.quant.report import codes_fingerprint, recon_errors, select_best, sid_stats, summarize


def test_collision_counting_by_hand():
    codes = np.array([
        [0, 1, 2],   # A
        [0, 1, 2],   # A
        [0, 1, 2],   # A
        [1, 1, 2],   # B
        [1, 1, 3],   # C
        [1, 1, 3],   # C
        [3, 0, 0],   # D
    ])
    s = sid_stats(codes, codebook_size=4)
    assert s["items"] == 7
    assert s["distinct_sids"] == 4
    assert s["distinct_fraction"] == pytest.approx(4 / 7, abs=1e-6)
    assert s["items_in_collisions"] == 5      # 3 (A) + 2 (C)
    assert s["max_items_per_sid"] == 3
    assert s["used_codes"] == [3, 2, 3]       # {0,1,3}, {0,1}, {0,2,3}
    assert s["utilisation"] == [0.75, 0.5, 0.75]


def test_no_collisions():
    codes = np.arange(12).reshape(4, 3)
    s = sid_stats(codes, 12)
    assert s["distinct_sids"] == 4 and s["items_in_collisions"] == 0 and s["max_items_per_sid"] == 1


def test_recon_errors():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    xh = np.array([[1.0, 1.0], [0.0, 0.0]])
    e = recon_errors(x, xh)
    assert e["recon_mse"] == pytest.approx((1 + 4) / 4)
    assert e["recon_rel_err"] == pytest.approx(5 / 5)


def test_fingerprint_is_sha256_of_int32_codes():
    codes = np.array([[1, 2], [3, 4]], dtype=np.int64)
    assert codes_fingerprint(codes) == hashlib.sha256(codes.astype(np.int32).tobytes()).hexdigest()
    assert codes_fingerprint(codes) != codes_fingerprint(codes[::-1])


def test_select_best_rule():
    runs = [
        {"seed": 42, "distinct_sids": 90, "recon_mse": 0.1},
        {"seed": 43, "distinct_sids": 95, "recon_mse": 0.5},   # most distinct ...
        {"seed": 44, "distinct_sids": 95, "recon_mse": 0.3},   # ... tie -> lower error wins
        {"seed": 45, "distinct_sids": 94, "recon_mse": 0.01},
    ]
    assert select_best(runs) == 2
    tie = [{"seed": 8, "distinct_sids": 5, "recon_mse": 0.2}, {"seed": 7, "distinct_sids": 5, "recon_mse": 0.2}]
    assert select_best(tie) == 1
    with pytest.raises(ValueError):
        select_best([])


def test_summarize_has_all_fields():
    x = np.random.default_rng(0).normal(size=(5, 3))
    s = summarize(np.zeros((5, 2), int), 4, x, x, wall_time_s=1.23456, seed=9)
    assert s["seed"] == 9 and s["recon_mse"] == 0 and s["wall_time_s"] == 1.235
    assert s["items_in_collisions"] == 5 and s["distinct_sids"] == 1
