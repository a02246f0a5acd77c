"""Ray-sharded evaluation equals the single-process evaluation (metrics exactly, per-user top items)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from comeir_dist.errors import UserError
from comeir_dist.eval.ray_eval import batch_aligned_slices, evaluate_with_ray
from comeir_dist.eval.run_eval import run_evaluate
from tests.fixtures import make_tiny_dataset, tiny_run_config


def test_batch_aligned_slices():
    assert batch_aligned_slices(24, 16, 2) == [(0, 16), (16, 24)]
    assert batch_aligned_slices(10, 16, 3) == [(0, 10)]
    assert batch_aligned_slices(0, 16, 2) == []
    s = batch_aligned_slices(1000, 64, 3)
    assert s[0][0] == 0 and s[-1][1] == 1000 and all(a % 64 == 0 for a, _ in s)
    assert all(s[i][1] == s[i + 1][0] for i in range(len(s) - 1))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comeir_dist.train.loop import train

    root = tmp_path_factory.mktemp("rayeval")
    ds = make_tiny_dataset(root, n_users=40, n_items=40)
    out = train(tiny_run_config(ds, root / "run", max_steps=8, eval_every=8))
    return out / "best"


def _per_user(path):
    return pq.read_table(path.with_suffix(".users.parquet")).to_pydict()


def test_ray_workers_equal_single_process(checkpoint, ray_local, tmp_path):
    batch_size = 8  # 40 users = 5 batches: worker slices of 3 and 2 batches
    single = run_evaluate(str(checkpoint), "test", str(tmp_path / "single.json"), batch_size=batch_size)
    sharded = evaluate_with_ray(str(checkpoint), "test", str(tmp_path / "ray.json"), num_workers=2,
                                batch_size=batch_size)
    assert len(sharded["workers"]) == 2
    assert sharded["metrics"]["users"] == single["metrics"]["users"] == 40
    # per-batch sums merged in the single-process order: bit-identical, not just close
    assert sharded["metrics"] == single["metrics"]
    a, b = _per_user(tmp_path / "single.json"), _per_user(tmp_path / "ray.json")
    assert a == b  # user_idx, target, top_items, P, G all identical
    on_disk = json.loads((tmp_path / "ray.json").read_text())
    assert set(json.loads((tmp_path / "single.json").read_text())) <= set(on_disk)


def test_ray_workers_equal_single_process_with_preference_memory(ray_local, tmp_path):
    """A Rec2PM run: the workers get each user's archive (not the last max_history items) and compress it."""
    from comeir_dist.model.pref_memory_config import PrefMemoryConfig
    from comeir_dist.train.loop import train

    ds = make_tiny_dataset(tmp_path, n_users=12, n_items=40, seq_len=26)
    cfg = tiny_run_config(ds, tmp_path / "run", variant="tm", max_steps=4, eval_every=4, batch_size=16,
                          eval_users=8)
    cfg.model.pref_memory = PrefMemoryConfig(enabled=True, tokens=2, segment_items=4, archive_items=20)
    best = train(cfg) / "best"
    single = run_evaluate(str(best), "test", str(tmp_path / "single.json"), batch_size=4, beam_size=5)
    sharded = evaluate_with_ray(str(best), "test", str(tmp_path / "ray.json"), num_workers=2, batch_size=4,
                                beam_size=5)
    assert sharded["metrics"] == single["metrics"] and sharded["metrics"]["users"] == 12
    assert _per_user(tmp_path / "single.json") == _per_user(tmp_path / "ray.json")


def test_ray_eval_bad_inputs(checkpoint, ray_local, tmp_path):
    with pytest.raises(UserError, match="split"):
        evaluate_with_ray(str(checkpoint), "train")
    with pytest.raises(UserError, match="not a committed checkpoint"):
        evaluate_with_ray(str(tmp_path), "test")
    with pytest.raises(UserError, match="exceed"):
        evaluate_with_ray(str(checkpoint), "test", num_workers=2, cpus_per_worker=2, batch_size=8)


def test_max_users(checkpoint, ray_local):
    rep = evaluate_with_ray(str(checkpoint), "valid", num_workers=2, batch_size=4, max_users=10)
    assert rep["metrics"]["users"] == 10
    assert [w["users"] for w in rep["workers"]] == [[0, 8], [8, 10]]
    assert np.isfinite(rep["ms_per_user"])


def test_ray_workers_cluster_errors_of_several_validation_targets(checkpoint, ray_local, tmp_path):
    """A valid split with 3 targets per user (`prepare --valid-targets 3`, same items and SIDs): Ray workers give
    the single process's metrics, standard errors clustered by user included."""
    ds3 = make_tiny_dataset(tmp_path / "k3", n_users=40, n_items=40, valid_targets=3)
    single = run_evaluate(str(checkpoint), "valid", dataset=str(ds3), batch_size=8)
    sharded = evaluate_with_ray(str(checkpoint), "valid", dataset=str(ds3), num_workers=2, batch_size=8)
    assert (single["metrics"]["users"], single["metrics"]["clusters"]) == (120, 40)
    assert sharded["metrics"] == single["metrics"]
