"""Pure helpers of the distributed training path (no process group): batch slicing, DeepSpeed config,
checkpoint discovery, column-shard state conversion, deterministic table initialisation blocks."""
import json

import numpy as np
import pytest
import torch

from comeir_dist.errors import UserError
from comeir_dist.parallel.dense import DS_CONFIG_DIR, deepspeed_config, lr_factor
from comeir_dist.parallel.engram_tables import INIT_BLOCK_ROWS, table_block
from comeir_dist.train.checkpoint import COMMIT, _convert_rowwise, latest_committed, step_dirs
from comeir_dist.train.loop import rank_slice
from tests.fixtures import tiny_run_config


def test_rank_slices_cover_the_global_batch_with_mean_preserving_weights():
    for n, world in [(32, 2), (7, 2), (13, 4), (1, 2), (3, 4)]:
        idx = np.arange(100, 100 + n)
        parts = [rank_slice(idx, r, world) for r in range(world)]
        real = [p for p, w in parts if w > 0]
        assert np.array_equal(np.concatenate(real), idx)  # disjoint, in order, complete
        assert all(len(p) <= -(-n // world) for p, _ in parts)
        # sum_r weight_r * mean_r == global mean for any per-sample values (DeepSpeed then divides by world)
        vals = np.random.default_rng(n).standard_normal(200)
        got = sum(w * vals[p].mean() for p, w in parts if w > 0) / world
        assert got == pytest.approx(vals[idx].mean())
        assert all(len(p) == 1 for p, w in parts if w == 0)  # a rank without samples runs one, weight 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_configs(tmp_path, stage):
    cfg = tiny_run_config(tmp_path, tmp_path / "run", bf16=True, grad_clip=0.5)
    cfg.parallel.deepspeed_config = f"zero{stage}.json"
    ds = deepspeed_config(cfg, per_rank_batch=16, world=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert "optimizer" not in json.loads((DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    cfg.parallel.deepspeed_config = None
    cfg.parallel.zero_stage = stage
    assert deepspeed_config(cfg, 8, 1)["zero_optimization"]["stage"] == stage
    cfg.train.grad_accum_steps = 2  # micro-batch 8 per rank, 2 micro-batches, 2 ranks
    ds = deepspeed_config(cfg, 8, 2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 32


def test_deepspeed_config_rejects_an_optimizer_section(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    cfg = tiny_run_config(tmp_path, tmp_path / "run")
    cfg.parallel.deepspeed_config = str(bad)
    with pytest.raises(UserError, match="optimizer"):
        deepspeed_config(cfg, 8, 1)
    cfg.parallel.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="not found"):
        deepspeed_config(cfg, 8, 1)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    assert lr_factor(0, 4, 100) == 0.25 and lr_factor(3, 4, 100) == 1.0
    assert lr_factor(4, 4, 100) == pytest.approx(1.0) and lr_factor(100, 4, 100) == pytest.approx(0.1)


def test_latest_committed_ignores_partial_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step, done in [(5, True), (10, True), (15, False), (7, False)]:
        (root / f"step-{step}").mkdir(parents=True)
        if done:
            (root / f"step-{step}" / COMMIT).write_text(str(step))
    (root / "step-x").mkdir()
    assert latest_committed(tmp_path) == root / "step-10"
    assert [(s, ok) for s, _, ok in step_dirs(tmp_path)] == [(5, True), (7, False), (10, True), (15, False)]
    assert latest_committed(tmp_path / "nothing") is None


def test_column_shard_rowwise_state_conversion():
    rows = 3
    saved = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0])  # 2 shards of 4 columns: [0,4) then [4,8)
    merged = _convert_rowwise(saved, rows, [[0, 4], [4, 4]], [[0, 8]], 0)
    assert torch.allclose(merged, torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64))  # exact mean
    halves = [_convert_rowwise(torch.tensor([2.0, 4.0, 6.0]), rows, [[0, 8]], [[0, 4], [4, 4]], j) for j in (0, 1)]
    assert all(torch.allclose(h, torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)) for h in halves)


def test_table_init_blocks_are_deterministic_and_bounded():
    a = table_block(42, "inter_l1_o1_h0", 3, 100, 8, 0.01)
    b = table_block(42, "inter_l1_o1_h0", 3, 100, 8, 0.01)
    c = table_block(42, "inter_l1_o1_h1", 3, 100, 8, 0.01)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 0.01 and INIT_BLOCK_ROWS >= 1024


@pytest.mark.parametrize("n,accum,world", [(13, 2, 2), (7, 3, 2), (2, 3, 2), (64, 4, 1), (5, 2, 3)])
def test_micro_slices_weights_give_the_global_batch_mean(n, accum, world):
    """After DeepSpeed's 1/accum and the all-reduce mean over ranks, the weighted micro losses sum to the mean
    loss of the global batch, whatever the split; every rank gets accum micro-batches with >= 1 sample."""
    from comeir_dist.train.loop import micro_slices

    rng = np.random.default_rng(n * 31 + accum)
    idx = rng.permutation(100)[:n]
    per_sample = rng.normal(size=100)
    total, covered = 0.0, []
    for rank in range(world):
        parts = micro_slices(idx, accum, rank, world)
        assert len(parts) == accum and all(len(m) >= 1 for m, _ in parts)
        for mine, weight in parts:
            total += weight * per_sample[mine].mean() / accum / world
            if weight:
                covered += mine.tolist()
    assert sorted(covered) == sorted(idx.tolist())
    assert total == pytest.approx(per_sample[idx].mean(), rel=1e-12)
