"""Scaling sweep end to end on a tiny dataset, in this process: two points train (save_best off, final test
on), are recorded with P_T, test metrics, wall time and peak RSS, a rerun trains nothing, the report exists."""
import json

import pytest

from comeir_dist.engram.sizing import inter_params
from comeir_dist.scaling.grid import ScalingSettings
from comeir_dist.scaling.runner import InlineExecutor, run_point
from comeir_dist.scaling.sweep import run_sweep
from tests.fixtures import make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tinyscaling"))


def test_two_points_end_to_end_then_resume(tiny, tmp_path):
    base = tiny_run_config(tiny, tmp_path / "sweep", max_steps=6, eval_every=3, num_threads=1)
    settings = ScalingSettings(s_t=[0.125, 0.5], s_s=[0.5])
    calls = []

    def runner(cfg_json):
        calls.append(cfg_json)
        return run_point(cfg_json)

    res = run_sweep(base, settings, executor=InlineExecutor(), runner=runner, device_memory_gib=64.0)
    assert len(calls) == 2 and res.failed == []
    for rec in res.records:
        assert rec["status"] == "ok" and rec["metric_source"] == "test"
        assert rec["P_T"] == inter_params(base.engram.model_copy(update={"s_t": rec["s_t"]}))
        assert 0 <= rec["metrics"]["item/hit@5"] <= 1 and rec["metrics"]["users"] > 0
        assert rec["steps"] == 6 and rec["wall_time_s"] > 0 and rec["peak_rss_bytes"] > 2**20
        run = tmp_path / "sweep" / "runs" / rec["key"]
        assert (run / "summary.json").is_file() and not (run / "best").exists()  # save_best: false
        assert json.loads((tmp_path / "sweep" / "points" / f"{rec['key']}.json").read_text())["status"] == "ok"
    assert res.records[0]["P_T"] < res.records[1]["P_T"]
    summary = json.loads((tmp_path / "sweep" / "scaling.json").read_text())
    assert summary["x_axis"] == "inter" and summary["counts"] == {"ok": 2}
    assert (tmp_path / "sweep" / "scaling.md").is_file() and (tmp_path / "sweep" / "scaling.png").stat().st_size > 0

    res2 = run_sweep(base, settings, executor=InlineExecutor(), runner=runner, device_memory_gib=64.0)
    assert len(calls) == 2 and res2.ran == [] and [r["status"] for r in res2.records] == ["ok", "ok"]


def test_ray_executor_runs_each_point_in_a_fresh_worker(tiny, tmp_path):
    import os

    from comeir_dist.scaling.runner import RayExecutor

    base = tiny_run_config(tiny, tmp_path / "sweep", max_steps=3, eval_every=3)
    settings = ScalingSettings(s_t=[0.125, 0.5], s_s=[0.5], cpus_per_point=1)
    res = run_sweep(base, settings, executor=RayExecutor(num_cpus=2, cpus_per_point=1), device_memory_gib=64.0)
    assert res.failed == [] and [r["status"] for r in res.records] == ["ok", "ok"]
    pids = {r["pid"] for r in res.records}
    assert len(pids) == 2 and os.getpid() not in pids  # max_calls=1: one worker process per point
    assert all(r["num_threads"] == 1 and r["peak_rss_bytes"] > 2**20 for r in res.records)
    assert all(r["peak_rss_scope"].startswith("worker process") for r in res.records)
