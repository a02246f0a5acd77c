"""Comparisons of finished training runs (1 vs 2 ranks) shared by the distributed tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def losses(run: Path) -> dict[int, float]:
    """{step: logged loss} of a run's train_log.jsonl."""
    recs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def assert_same_training(one: Path, two: Path, steps: int, users: int,
                         keys=("item/ndcg@10", "item/hit@10", "sid/ndcg@10")) -> tuple[dict, dict]:
    """The 1-rank run ``one`` and the 2-rank run ``two`` logged the same losses (rel 1e-4) for steps 1..steps and
    the same final validation metrics on ``users`` users; returns both summaries."""
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), (s, l1[s], l2[s])
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    v1, v2 = s1["validation"][-1], s2["validation"][-1]
    assert v1["users"] == v2["users"] == users
    for key in keys:
        assert v2[key] == pytest.approx(v1[key], abs=1e-9), key
    return s1, s2


def evaluate_best_in_one_process(best: Path, keys=("item/ndcg@10", "item/hit@5", "sid/ndcg@10")):
    """Load ``best/`` (written by 2 ranks) with `comeir evaluate`'s loader in this single process, evaluate the
    validation users its run used and check the metrics it recorded (sharded validation == single process).
    Returns ``(model, cfg, meta)`` for variant-specific checks."""
    import torch.distributed as dist

    from comeir_dist.config.base import parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.eval.evaluate import evaluate_arrays
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.loop import validation_subset

    created = not dist.is_initialized()
    try:
        model, cfg, meta, _ = load_model_from_checkpoint(best, device="cpu")
        assert not dist.is_initialized() or dist.get_world_size() == 1  # sasrec needs no group
        hist, target = validation_subset(parse_section(RunConfig, meta["config"]))
        m = evaluate_arrays(model, hist, target, beam_size=cfg.eval.beam_size, batch_size=cfg.eval.batch_size,
                            ks=cfg.eval.ks)["sums"].means()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    assert m["users"] == len(target)
    for key in keys:
        assert m[key] == pytest.approx(meta["metrics"][key], abs=1e-9), key
    return model, cfg, meta
