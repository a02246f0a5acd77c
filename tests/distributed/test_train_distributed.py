"""`train(cfg)` on 1 and 2 gloo ranks (CPU): same model, exact resume, N -> M resume, single-process best/.

Three launches of spawned processes (imports dominate the cost) produce every run; the tests compare them:

  launch 1 (1 rank):  ref1/<sharding>  -- 2K steps, step checkpoints at K and 2K
  launch 2 (2 ranks): ref2/<sharding>; resume_1to2 (ref1/table_wise cut at K); resume_2to2 (ref2/table_wise
                      cut at K, plus a half-written step-(K+1) dir)
                      zero3_bf16 (ZeRO-3 + bf16, table_wise)
  launch 3 (1 rank):  resume_2to1 (ref2/table_wise cut at K); zero3_bf16_to_zero1 (zero3_bf16 cut at K, resumed
                      with ZeRO-1 on 1 rank); column-shard state conversion of ref2/column_wise

Gradient accumulation (table_wise shape, global batch 13 -> micro-batches of 7 and 6, uneven over 2 ranks):
  launch 1: acc_frozen_k1 / acc_frozen_k2 (tables frozen by sparse_lr 1e-12: dense accumulation must be exact),
            acc_k2 (k=2, training tables); launch 2: acc_k2_w2 (k=2 on 2 ranks), acc_k2_resume (acc_k2_w2 cut at K)

Groups called one at a time (``parallel.pipeline_lookups: false``): launch 2 sequential_w2 (table_wise).

Cross-fitted memories (``engram.cross_fit``, table_wise): launch 1 xfit_w1, launch 2 xfit_w2.

Tolerances: losses rtol 1e-4 across world sizes (float summation order differs; measured <= 1e-6),
exact-to-1e-6 on the same world size; tables atol 1e-5; dense weights and moments atol 1e-4 (except
parameters with numerically zero gradients, see ``_assert_close_dense``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workers import K, SHAPES, check_column_conversion, record_table_placement, train_jobs
from tests.fixtures import make_tiny_dataset

SHARDINGS = tuple(SHAPES)
LOSS_RTOL = 1e-4
LR = 3e-3  # tiny_run_config's train.lr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ds = str(make_tiny_dataset(root / "data"))
    r = {s: {1: root / "ref1" / s, 2: root / "ref2" / s} for s in SHARDINGS}
    tw = "table_wise"
    frozen = {"sparse_lr": 1e-12}
    k2 = {"grad_accum_steps": 2}
    acc = [{"ds": ds, "out": str(root / "acc_frozen_k1"), "sharding": tw, "engram": frozen},
           {"ds": ds, "out": str(root / "acc_frozen_k2"), "sharding": tw, "engram": frozen, "train": k2},
           {"ds": ds, "out": str(root / "acc_k2"), "sharding": tw, "train": k2}]
    xfit = {"cross_fit": True}
    acc.append({"ds": ds, "out": str(root / "xfit_w1"), "sharding": tw, "engram": xfit})
    run_ranks(1, train_jobs, [{"ds": ds, "out": str(r[s][1]), "sharding": s} for s in SHARDINGS] + acc)
    jobs2 = [{"ds": ds, "out": str(r[s][2]), "sharding": s} for s in SHARDINGS]
    jobs2 += [{"ds": ds, "out": str(root / "resume_1to2"), "sharding": tw, "copy": {"src": str(r[tw][1]), "step": K}},
              {"ds": ds, "out": str(root / "resume_2to2"), "sharding": tw,
               "copy": {"src": str(r[tw][2]), "step": K, "partial": K + 1}},
              {"ds": ds, "out": str(root / "zero3_bf16"), "sharding": tw, "parallel": {"zero_stage": 3},
               "train": {"bf16": True}},
              {"ds": ds, "out": str(root / "acc_k2_w2"), "sharding": tw, "train": k2},
              {"ds": ds, "out": str(root / "acc_k2_resume"), "sharding": tw, "train": k2,
               "copy": {"src": str(root / "acc_k2_w2"), "step": K}},
              {"ds": ds, "out": str(root / "sequential_w2"), "sharding": tw, "parallel": {"pipeline_lookups": False}},
              {"ds": ds, "out": str(root / "xfit_w2"), "sharding": tw, "engram": xfit}]
    run_ranks(2, train_jobs, jobs2, (record_table_placement, (ds, str(root / "placement.json"))))
    jobs3 = [{"ds": ds, "out": str(root / "resume_2to1"), "sharding": tw, "copy": {"src": str(r[tw][2]), "step": K}},
             {"ds": ds, "out": str(root / "zero3_bf16_to_zero1"), "sharding": tw, "parallel": {"zero_stage": 1},
              "train": {"bf16": True}, "copy": {"src": str(root / "zero3_bf16"), "step": K}}]
    conversion = (check_column_conversion, (ds, str(r["column_wise"][2] / "checkpoints" / f"step-{K}"),
                                            str(root / "conversion.json")))
    run_ranks(1, train_jobs, jobs3, conversion)
    return root, ds, r


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in recs if "loss" in x}


def _full_checkpoint(d: Path) -> tuple[dict, dict]:
    """(tables + fused optimizer state, dense weights + AdamW moments) of a step checkpoint, loaded in full."""
    import torch.distributed.checkpoint as dcp

    from comeir_dist.train.safe_dcp import JsonMetadataReader

    meta = JsonMetadataReader(str(d / "tables")).read_metadata().state_dict_metadata
    tables = {k: torch.zeros(tuple(v.size), dtype=v.properties.dtype) for k, v in meta.items()}
    dcp.load(tables, storage_reader=JsonMetadataReader(str(d / "tables")), no_dist=True)
    dense = {}
    for p in sorted((d / "dense").glob("part-*.pt")):
        for kind, values in torch.load(p, weights_only=True).items():
            dense.update({f"{kind}/{n}": t for n, t in values.items()})
    return tables, dense


def _assert_close_dense(got: dict, ref: dict, lr: float, steps: int) -> None:
    """fp32 weights and AdamW moments. Parameters whose gradient is numerically zero (second moment < 1e-16,
    e.g. LayerNorm biases feeding shift-invariant logits) take Adam steps of size ~lr driven by float noise,
    so they are only held to ``lr * steps``; everything else to 1e-4."""
    for k in ref:
        name = k.split("/", 1)[1]
        noise_only = float(ref[f"exp_avg_sq/{name}"].max()) < 1e-16 if f"exp_avg_sq/{name}" in ref else False
        atol = lr * steps if noise_only and k.startswith("params/") else 1e-4
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=1e-3, msg=k)


def _assert_close_losses(a: dict, b: dict, steps, rtol=LOSS_RTOL):
    for s in steps:
        assert b[s] == pytest.approx(a[s], rel=rtol), (s, a[s], b[s])


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_one_and_two_ranks_train_the_same_model(runs, sharding):
    _, _, r = runs
    one, two = r[sharding][1], r[sharding][2]
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 2 * K + 1))
    _assert_close_losses(l1, l2, l1)
    t1, d1 = _full_checkpoint(one / "checkpoints" / f"step-{2 * K}")
    t2, d2 = _full_checkpoint(two / "checkpoints" / f"step-{2 * K}")
    assert t1.keys() == t2.keys() and d1.keys() == d2.keys()
    assert any("momentum" in k for k in t1) and any(k.startswith("exp_avg_sq/") for k in d1)
    for k in t1:  # table rows and their row-wise Adagrad state
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=1e-4, msg=k)
    _assert_close_dense(d2, d1, LR, 2 * K)  # dense fp32 weights and AdamW moments
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    v1, v2 = s1["validation"][-1], s2["validation"][-1]
    assert v1["users"] == v2["users"] == SHAPES[sharding][1]
    for key in ("item/ndcg@10", "item/hit@10", "sid/ndcg@10"):
        assert v2[key] == pytest.approx(v1[key], abs=1e-9), key


def test_resume_same_world_size_continues_exactly(runs):
    root, _, r = runs
    ref, res = _losses(r["table_wise"][2]), _losses(root / "resume_2to2")
    assert sorted(res) == list(range(1, 2 * K + 1))
    _assert_close_losses(ref, res, range(K + 1, 2 * K + 1), rtol=1e-6)
    steps = sorted(p.name for p in (root / "resume_2to2" / "checkpoints").iterdir())
    assert steps == [f"step-{K}", f"step-{2 * K}"]  # half-written step-(K+1) ignored, then cleaned up
    assert all((root / "resume_2to2" / "checkpoints" / s / "COMMITTED").is_file() for s in steps)
    assert json.loads((root / "resume_2to2" / "summary.json").read_text())["steps"] == 2 * K


@pytest.mark.parametrize("name,ref_world", [("resume_2to1", 2), ("resume_1to2", 1)])
def test_resume_on_another_world_size(runs, name, ref_world):
    root, _, r = runs
    ref, res = _losses(r["table_wise"][ref_world]), _losses(root / name)
    _assert_close_losses(ref, res, range(K + 1, 2 * K + 1))
    t_ref, d_ref = _full_checkpoint(r["table_wise"][ref_world] / "checkpoints" / f"step-{2 * K}")
    t_res, d_res = _full_checkpoint(root / name / "checkpoints" / f"step-{2 * K}")
    for k in t_ref:
        torch.testing.assert_close(t_res[k], t_ref[k], atol=1e-5, rtol=1e-4, msg=k)
    _assert_close_dense(d_res, d_ref, LR, K)


def test_column_shard_state_is_converted(runs):
    root, _, _ = runs
    res = json.loads((root / "conversion.json").read_text())
    assert res["states"] > 0 and res["notes"] and all("merged exactly" in n for n in res["notes"])
    assert res["weight_err"] == 0.0
    assert res["momentum_err"] < 1e-7


def test_best_checkpoint_from_two_ranks_loads_in_one_process(runs):
    from tests.distributed.run_compare import evaluate_best_in_one_process

    _, _, r = runs
    # sharded validation == single-process evaluation of item/ndcg@10, item/hit@5, sid/ndcg@10
    _, _, meta = evaluate_best_in_one_process(r["table_wise"][2] / "best")
    assert meta["step"] == 2 * K
    assert np.isfinite(meta["metrics"]["item/ndcg@10"])


def test_zero3_bf16_resumes_under_zero1_on_one_rank(runs):
    root, _, r = runs
    z3, z1 = _losses(root / "zero3_bf16"), _losses(root / "zero3_bf16_to_zero1")
    fp32 = _losses(r["table_wise"][2])
    assert sorted(z3) == sorted(z1) == list(range(1, 2 * K + 1))
    _assert_close_losses(fp32, z3, z3, rtol=2e-2)  # bf16 weights/activations vs fp32
    _assert_close_losses(z3, z1, range(K + 1, 2 * K + 1), rtol=5e-3)  # bf16 reductions differ across layouts
    summary = json.loads((root / "zero3_bf16" / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2
    assert json.loads((root / "zero3_bf16_to_zero1" / "summary.json").read_text())["zero_stage"] == 1


def test_memory_plan_predicts_the_sharders_placement(runs):
    """`comeir plan` (balance "group": collections one after another, load carried over) == the real DMP plans."""
    from comeir_dist.config.run import RunConfig
    from comeir_dist.parallel.memory_plan import plan_memory
    from tests.distributed.workers import run_config

    root, ds, _ = runs
    placed = json.loads((root / "placement.json").read_text())
    cfg: RunConfig = run_config(ds, str(root / "unused"), "table_wise", 2)
    plan = plan_memory(cfg.engram, 0, cfg.parallel, device="cpu")
    assert plan.assignment == placed
    per_group = {}
    for t in plan.tables:
        per_group.setdefault(t.group, []).append(t.ranks[0])
    assert len(per_group) > 1 and set(sum(per_group.values(), [])) == {0, 1}


def _optimizer_steps(run: Path) -> int:
    from comeir_dist.train import checkpoint as ckpt

    return int(ckpt.read_state(run / "checkpoints" / f"step-{2 * K}")["optimizer_step"])


def test_gradient_accumulation_equals_the_full_batch_for_the_dense_part(runs):
    """k=2 micro-batches (7 + 6 samples) with frozen tables: the same losses and dense weights/moments as one
    batch of 13, and AdamW stepped once per global batch (2K steps, not 4K)."""
    root, _, _ = runs
    k1, k2 = root / "acc_frozen_k1", root / "acc_frozen_k2"
    l1, l2 = _losses(k1), _losses(k2)
    assert sorted(l2) == list(range(1, 2 * K + 1))
    _assert_close_losses(l1, l2, l1, rtol=1e-5)
    assert _optimizer_steps(k1) == _optimizer_steps(k2) == 2 * K
    _, d1 = _full_checkpoint(k1 / "checkpoints" / f"step-{2 * K}")
    _, d2 = _full_checkpoint(k2 / "checkpoints" / f"step-{2 * K}")
    _assert_close_dense(d2, d1, LR, 2 * K)
    assert json.loads((k2 / "summary.json").read_text())["grad_accum_steps"] == 2


def test_gradient_accumulation_updates_tables_per_micro_batch(runs):
    """With training tables, k=2 is not the k=1 run: the fused tables took a step after each micro-batch
    (the documented semantics), while the dense optimizer still stepped once per global batch."""
    root, _, r = runs
    ref, acc = _losses(r["table_wise"][1]), _losses(root / "acc_k2")
    # already at step 1: the second micro-batch sees the rows the first one updated
    assert min(abs(ref[s] - acc[s]) for s in range(1, 2 * K + 1)) > 1e-4
    assert _optimizer_steps(root / "acc_k2") == 2 * K


def test_gradient_accumulation_on_two_ranks_and_resumed(runs):
    root, _, _ = runs
    one, two, res = (_losses(root / n) for n in ("acc_k2", "acc_k2_w2", "acc_k2_resume"))
    _assert_close_losses(one, two, one)
    t1, _ = _full_checkpoint(root / "acc_k2" / "checkpoints" / f"step-{2 * K}")
    t2, _ = _full_checkpoint(root / "acc_k2_w2" / "checkpoints" / f"step-{2 * K}")
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=1e-4, msg=k)
    assert sorted(res) == list(range(1, 2 * K + 1))
    _assert_close_losses(two, res, range(K + 1, 2 * K + 1), rtol=1e-6)


def test_pipelined_group_lookups_equal_one_group_at_a_time(runs):
    """The one-schedule lookup of all groups (default) trains exactly the model of calling the DMP groups one
    after another on 2 ranks: same losses and the same tables."""
    root, _, r = runs
    seq, pip = root / "sequential_w2", r["table_wise"][2]
    ls, lp = _losses(seq), _losses(pip)
    assert sorted(ls) == sorted(lp) == list(range(1, 2 * K + 1))
    _assert_close_losses(lp, ls, lp, rtol=1e-6)
    ts, _ = _full_checkpoint(seq / "checkpoints" / f"step-{2 * K}")
    tp, _ = _full_checkpoint(pip / "checkpoints" / f"step-{2 * K}")
    for k in tp:
        torch.testing.assert_close(ts[k], tp[k], atol=1e-6, rtol=1e-6, msg=k)


def test_cross_fitted_memories_train_the_same_on_one_and_two_ranks(runs):
    """engram.cross_fit (reads of the other fold's rows, gradients into the own fold's) through the sharded fused
    tables on 2 ranks trains the model of 1 rank, and it is a different model from the plain memories'."""
    root, _, r = runs
    one, two = root / "xfit_w1", root / "xfit_w2"
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 2 * K + 1))
    _assert_close_losses(l1, l2, l1)
    plain = _losses(r["table_wise"][1])
    assert any(abs(l1[s] - plain[s]) > 1e-4 for s in range(2, 2 * K + 1))
    t1, d1 = _full_checkpoint(one / "checkpoints" / f"step-{2 * K}")
    t2, d2 = _full_checkpoint(two / "checkpoints" / f"step-{2 * K}")
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=1e-4, msg=k)
    _assert_close_dense(d2, d1, LR, 2 * K)
