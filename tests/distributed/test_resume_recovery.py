"""Resume on 2 gloo ranks (CPU) through the damage a crash or a bad disk leaves, with nothing unpickled.

One launch of 2 spawned ranks trains every run (table_wise shape, K = 3 steps, checkpoints at K and 2K):

  drop        dropout 0.1 in the backbone and on Engram addresses (RNG restore matters), log_every 1
  drop_res    drop cut at K, resumed: steps K+1..2K must equal drop's exactly
  win         dropout 0, log_every 2 (does not divide checkpoint_every 3): the logged loss at step 4 averages
              steps 3 and 4 -- across the resume at 3 as well (win_res)
  torn        drop cut at K with a torn last line in train_log.jsonl (worker killed mid-append)
  truncated   drop (steps K and 2K) with rank 1's table shard of step 2K truncated: resumes from K
  flipped     drop with one bit flipped in rank 1's dense part of step 2K: resumes from K
  keep1       keep_checkpoints 1, 3K steps, a Ray-like on_checkpoint: the previously reported step must still exist
              when the next one is reported
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workers import K, recovery_jobs
from tests.fixtures import make_tiny_dataset

TW = "table_wise"
DROPOUT = {"model": {"memory_dropout": 0.1}, "backbone": {"dropout": 0.1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    ds = str(make_tiny_dataset(root / "data"))

    def job(name, **kw):
        return {"ds": ds, "out": str(root / name), "sharding": TW, **kw}

    def cut(src, step=K, ops=()):
        return {"copy": {"src": str(root / src), "step": step}, "damage": list(ops)}

    jobs = [job("drop", **DROPOUT), job("drop_res", **DROPOUT, **cut("drop")),
            job("win", train={"log_every": 2}), job("win_res", train={"log_every": 2}, **cut("win")),
            job("torn", **DROPOUT, **cut("drop", ops=[{"torn_log": '{"step": 3, "lo'}])),
            job("truncated", **DROPOUT, **cut("drop", 2 * K, [{"truncate": "tables/__1_0.distcp", "step": 2 * K}])),
            job("flipped", **DROPOUT, **cut("drop", 2 * K, [{"flip": "dense/part-00001.pt", "step": 2 * K}])),
            job("keep1", train={"max_steps": 3 * K, "eval_every": 3 * K}, parallel={"keep_checkpoints": 1},
                reports=str(root / "keep1_reports.json"))]
    run_ranks(2, recovery_jobs, jobs)
    return root


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(run) if "loss" in r}


def _same_losses(ref: dict, got: dict, steps) -> None:
    assert sorted(got) == sorted(ref)
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, ref[s], got[s])


def test_resume_with_dropout_continues_exactly(runs):
    ref, res = _losses(runs / "drop"), _losses(runs / "drop_res")
    assert abs((ref[1] + ref[2]) / 2 - _losses(runs / "win")[2]) > 1e-4  # dropout is active: the RNG state matters
    assert sorted(res) == list(range(1, 2 * K + 1))
    _same_losses(ref, res, range(K + 1, 2 * K + 1))
    state = json.loads((runs / "drop_res" / "checkpoints" / f"step-{2 * K}" / "state.json").read_text())
    assert state["config"]["model"]["memory_dropout"] == 0.1 and state["config"]["model"]["backbone"]["dropout"] == 0.1


def test_logged_loss_window_survives_a_resume(runs):
    ref, res = _losses(runs / "win"), _losses(runs / "win_res")
    assert sorted(ref) == [2, 4, 6]
    _same_losses(ref, res, [2, 4, 6])  # step 4 = mean of steps 3 (before the checkpoint) and 4 (after)


def test_a_torn_log_line_does_not_stop_the_resume(runs):
    _same_losses(_losses(runs / "drop"), _losses(runs / "torn"), range(K + 1, 2 * K + 1))
    assert [r["step"] for r in _log(runs / "torn") if "loss" in r] == list(range(1, 2 * K + 1))


@pytest.mark.parametrize("name,bad", [("truncated", "tables/__1_0.distcp"), ("flipped", "dense/part-00001.pt")])
def test_a_damaged_newest_step_falls_back_to_the_older_one(runs, name, bad):
    from comeir_dist.train.checkpoint import verify_step

    _same_losses(_losses(runs / "drop"), _losses(runs / name), range(K + 1, 2 * K + 1))  # = resumed from K
    ck = runs / name / "checkpoints"
    aside = list(ck.glob(f"step-{2 * K}.damaged-*"))
    assert len(aside) == 1 and bad in verify_step(aside[0])
    assert verify_step(ck / f"step-{2 * K}") is None  # written again, intact


def test_step_checkpoints_hold_no_pickles_and_list_every_file(runs):
    from comeir_dist.train import checkpoint_integrity as integrity
    from comeir_dist.train.checkpoint import verify_step

    d = runs / "drop" / "checkpoints" / f"step-{2 * K}"
    files = integrity.read_checksums(d)
    on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - {"checksums.json", "COMMITTED"}
    assert set(files) == on_disk and verify_step(d) is None
    assert not (d / "tables" / ".metadata").exists() and (d / "tables" / ".metadata.json").is_file()
    assert sorted(p.name for p in (d / "rng").iterdir()) == ["rank-00000.json", "rank-00001.json"]
    assert (d / "dense" / "scheduler.json").is_file() and not (d / "dense" / "scheduler.pt").exists()


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_tampered_step_is_refused_before_anything_is_loaded(runs, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from comeir_dist.errors import UserError
    from comeir_dist.train import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(runs / "drop", run)
    torch.save({"params": _Boom(tmp_path / "ran")}, run / "checkpoints" / f"step-{2 * K}" / "dense" / "part-00000.pt")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(dcp, "load", lambda *a, **k: calls.append("dcp.load"))
    assert ckpt.choose_resume(run, None, None) == run / "checkpoints" / f"step-{K}"  # the intact older step
    (run / "checkpoints" / f"step-{K}" / "rng" / "rank-00001.json").write_text("{}")
    with pytest.raises(UserError, match=r"no intact committed checkpoint .*rng/rank-00001.json: .*bytes"):
        ckpt.choose_resume(run, None, None)
    assert calls == [] and not (tmp_path / "ran").exists()


def test_keep_checkpoints_1_never_deletes_a_step_ray_may_hand_back(runs):
    reports = json.loads((runs / "keep1_reports.json").read_text())
    assert [r["step"] for r in reports] == [K, 2 * K, 3 * K]
    for prev, cur in zip(reports, reports[1:]):  # registration is asynchronous: the previous step must survive
        assert prev["step"] in cur["on_disk"], reports
    final = sorted(int(p.parent.name.split("-")[1]) for p in (runs / "keep1" / "checkpoints").glob("step-*/COMMITTED"))
    assert final == [2 * K, 3 * K]
