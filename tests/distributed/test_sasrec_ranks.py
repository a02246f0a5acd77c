"""SASRec (model.variant: sasrec, no Engram tables) trained with `train(cfg)` on 1 and 2 gloo ranks (CPU): the same
losses and validation metrics; a 1-rank step checkpoint resumed on 2 ranks continues the same run; ZeRO-3 (the
tied item table partitioned, gathered for both its uses) trains the same model; the 2-rank best/ evaluates
identically in one process.

Two launches of the existing ``workers.recovery_jobs`` (per-job "model" overrides select the variant), table_wise
shape of ``workers.SHAPES`` (global batch 13 split unevenly over 2 ranks, 11 validation users in batches of 5 ->
padded validation slices), 2K steps each, a step checkpoint every K.
"""
from __future__ import annotations

import json

import pytest

from tests.distributed.run_compare import assert_same_training, evaluate_best_in_one_process, losses
from tests.distributed.harness import run_ranks
from tests.distributed.workers import K, SHAPES, recovery_jobs
from tests.fixtures import make_tiny_dataset

TW = "table_wise"
SASREC = {"variant": "sasrec"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sasrec_ranks")
    ds = str(make_tiny_dataset(root / "data"))

    def job(name, **kw):
        return {"ds": ds, "out": str(root / name), "sharding": TW, "model": SASREC, **kw}

    # 3 validation targets per user (`prepare --valid-targets 3`): standard errors clustered by user
    ds3 = str(make_tiny_dataset(root / "data3", valid_targets=3))
    run_ranks(1, recovery_jobs, [job("w1"), {**job("w1_k3"), "ds": ds3}])
    run_ranks(2, recovery_jobs, [job("w2"), job("w2_zero3", parallel={"zero_stage": 3}),
                                 job("resumed_on_w2", copy={"src": str(root / "w1"), "step": K}),
                                 {**job("w2_k3"), "ds": ds3}])
    return root


def test_one_and_two_ranks_train_the_same_sasrec(runs):
    s1, s2 = assert_same_training(runs / "w1", runs / "w2", 2 * K, SHAPES[TW][1],
                                  keys=("item/ndcg@10", "item/hit@10", "item/hit@5", "sid/ndcg@10"))
    assert s1["variant"] == s2["variant"] == "sasrec"
    state = json.loads((runs / "w2" / "checkpoints" / f"step-{2 * K}" / "state.json").read_text())
    assert state["config"]["model"]["variant"] == "sasrec" and state["table_layout"] == {}
    assert not (runs / "w2" / "checkpoints" / f"step-{2 * K}" / "tables").exists()


def test_clustered_validation_errors_are_the_same_on_two_ranks(runs):
    """Several validation rows per user: 2 ranks gather the per-row results and give the single-process
    user-clustered standard errors (and the count of users) exactly."""
    import numpy as np

    from comeir_dist.eval.evaluate import evaluate_arrays
    from comeir_dist.eval.metrics import clustered_standard_errors, per_user_metrics
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.loop import validation_rows

    keys = ("item/ndcg@10", "se/item/ndcg@10", "se/item/hit@10", "clusters")
    s1, _ = assert_same_training(runs / "w1_k3", runs / "w2_k3", 2 * K, SHAPES[TW][1], keys=keys)
    v = s1["validation"][-1]
    model, cfg, _, _ = load_model_from_checkpoint(runs / "w2_k3" / "best", device="cpu")
    users, hist, target = validation_rows(cfg)
    assert len(np.unique(users)) == v["clusters"] < len(users) == SHAPES[TW][1]  # some user has several rows
    pu = evaluate_arrays(model, hist, target, beam_size=cfg.eval.beam_size, batch_size=3)["per_user"]
    se = clustered_standard_errors(per_user_metrics(pu["P"], pu["G"], pu["found"], pu["sid_rank"]), users)
    assert v["se/item/hit@10"] == pytest.approx(se["se/item/hit@10"], abs=1e-12)


def test_zero3_partitions_the_tied_item_table(runs):
    ref, z3 = losses(runs / "w2"), losses(runs / "w2_zero3")
    assert sorted(z3) == list(range(1, 2 * K + 1))
    for s in ref:
        assert z3[s] == pytest.approx(ref[s], rel=1e-4), (s, ref[s], z3[s])
    assert json.loads((runs / "w2_zero3" / "summary.json").read_text())["zero_stage"] == 3


def test_one_rank_checkpoint_resumes_on_two_ranks(runs):
    ck = runs / "resumed_on_w2" / "checkpoints"
    worlds = [json.loads((ck / f"step-{s}" / "state.json").read_text())["world_size"] for s in (K, 2 * K)]
    assert worlds == [1, 2]  # step K is the copied 1-rank checkpoint (resumed, not retrained), 2K written by 2 ranks
    full, resumed = losses(runs / "w1"), losses(runs / "resumed_on_w2")
    assert sorted(resumed) == list(range(1, 2 * K + 1))  # the log is kept up to the resumed step
    for s in range(K + 1, 2 * K + 1):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4), (s, full[s], resumed[s])


def test_sasrec_best_from_two_ranks_evaluates_in_one_process(runs):
    best = runs / "w2" / "best"
    assert not (best / "tables.pt").exists()
    _, cfg, _ = evaluate_best_in_one_process(best)
    assert cfg.model.variant == "sasrec"