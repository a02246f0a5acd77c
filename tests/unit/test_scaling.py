"""Scaling sweep driver: grid parsing, resume (finished points skipped, partial/crashed ones rerun), refusal of
points whose memory plan does not fit, the power-law fit, the report files. No Ray, no training: the per-point
runner is a fake that counts its calls."""
import json
import math

import numpy as np
import pytest
import yaml

from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError
from comeir_dist.parallel.memory_plan import GIB
from comeir_dist.scaling.fit import fit_power_law
from comeir_dist.scaling.grid import ScalingSettings, parse_scales, point_key
from comeir_dist.scaling.report import resolve_axis, write_report
from comeir_dist.scaling.runner import InlineExecutor, metrics_from_summary
from comeir_dist.scaling.sweep import prepare_grid, run_sweep
from tests.fixtures import tiny_run_config


# ---- grid parsing -----------------------------------------------------------------------------------------
def test_parse_scales_lists_ranges_and_yaml_lists():
    assert parse_scales("0.5,1,2", "--s-t") == [0.5, 1.0, 2.0]
    assert parse_scales(" 4, 0.5 ,1", "--s-t") == [0.5, 1.0, 4.0]  # sorted
    assert parse_scales("0.5:2:0.5", "--s-t") == [0.5, 1.0, 1.5, 2.0]  # inclusive
    assert parse_scales("0.25,0.5:1.5:0.5,8", "--s-t") == [0.25, 0.5, 1.0, 1.5, 8.0]
    assert parse_scales([0.125, 1], "scaling.s_s") == [0.125, 1.0]
    assert parse_scales(1.0, "--s-s") == [1.0]


@pytest.mark.parametrize("text, needle", [
    ("", "empty value"), ("1,,2", "empty value"), ("a", "not a number"), ("0", "> 0"), ("-1", "> 0"),
    ("inf", "finite"), ("nan", "finite"), ("1,1.0", "given twice"), ("1:2", "start:stop:step"),
    ("2:1:0.5", "stop < start"), ("1:2:0", "> 0"), ("0.001:100:0.001", "more than 1000")])
def test_parse_scales_bad_values_name_the_flag(text, needle):
    with pytest.raises(UserError) as e:
        parse_scales(text, "--s-t")
    assert str(e.value).startswith("--s-t:") and needle in str(e.value) and "\n" not in str(e.value)


def test_point_key():
    assert point_key(0.25, 1.0, "fp16") == "st0.25_ss1_fp16"
    assert point_key(4.0, 0.125, "fp32") == "st4_ss0.125_fp32"


# ---- a tiny sweep with a fake runner ----------------------------------------------------------------------
class FakeRunner:
    """Stands in for run_point: records calls; Hit@5 grows with P_T like a power law."""

    def __init__(self, fail_keys=()):
        self.calls = []
        self.fail_keys = set(fail_keys)

    def __call__(self, cfg_json: str) -> dict:
        cfg = RunConfig.model_validate_json(cfg_json)
        key = point_key(cfg.engram.s_t, cfg.engram.s_s, cfg.engram.table_dtype)
        self.calls.append(key)
        assert cfg.train.save_best is False and cfg.train.final_test is True
        assert cfg.out.endswith(f"runs/{key}")
        if key in self.fail_keys:
            raise RuntimeError(f"boom in {key}\nsecond line")
        return {"metrics": {"item/hit@5": 0.01 * (1 + cfg.engram.s_t), "item/ndcg@10": 0.02}, "metric_source": "test",
                "steps": 5, "wall_time_s": 1.5, "peak_rss_bytes": 123 * 2**20, "train_minutes": 0.01}


@pytest.fixture
def base(tmp_path):
    return tiny_run_config(tmp_path / "no-dataset", tmp_path / "sweep")


def _settings(**kw):
    return ScalingSettings(**{"s_t": [0.125, 0.25, 0.5], "s_s": [0.5], **kw})


def _sweep(base, settings, runner, **kw):
    return run_sweep(base, settings, executor=InlineExecutor(), runner=runner, **kw)


def test_resume_skips_finished_points_and_reruns_missing_or_partial(base, tmp_path):
    settings = _settings()
    r1 = FakeRunner()
    res = _sweep(base, settings, r1)
    keys = ["st0.125_ss0.5_fp16", "st0.25_ss0.5_fp16", "st0.5_ss0.5_fp16"]
    assert r1.calls == keys and res.ran == keys
    assert [r["status"] for r in res.records] == ["ok"] * 3
    pdir = tmp_path / "sweep" / "points"
    assert sorted(p.name for p in pdir.iterdir()) == sorted(f"{k}.json" for k in keys)

    r2 = FakeRunner()  # everything finished: nothing runs, the report still lists every point
    res2 = _sweep(base, settings, r2)
    assert r2.calls == [] and res2.ran == [] and all(r.get("resumed") for r in res2.records)
    assert [r["metrics"]["item/hit@5"] for r in res2.records] == [r["metrics"]["item/hit@5"] for r in res.records]

    (pdir / f"{keys[0]}.json").unlink()  # missing
    text = (pdir / f"{keys[1]}.json").read_text()
    (pdir / f"{keys[1]}.json").write_text(text[: len(text) // 2])  # partial (e.g. a copy cut short)
    (pdir / f"{keys[2]}.json").write_text(json.dumps({"key": keys[2], "status": "running"}))  # not a result
    r3 = FakeRunner()
    _sweep(base, settings, r3)
    assert r3.calls == keys
    r4 = FakeRunner()
    _sweep(base, settings, r4)
    assert r4.calls == []


def test_crashed_point_is_recorded_and_retried(base, tmp_path):
    settings = _settings()
    bad = "st0.25_ss0.5_fp16"
    r1 = FakeRunner(fail_keys=[bad])
    res = _sweep(base, settings, r1)
    assert len(r1.calls) == 3 and res.failed == [bad]
    rec = {r["key"]: r for r in res.records}[bad]
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: boom in st0.25_ss0.5_fp16"
    pdir = tmp_path / "sweep" / "points"
    assert not (pdir / f"{bad}.json").exists() and (pdir / f"{bad}.failed.json").is_file()

    r2 = FakeRunner()  # only the crashed point runs again; its failure record is cleared
    res2 = _sweep(base, settings, r2)
    assert r2.calls == [bad] and res2.failed == []
    assert (pdir / f"{bad}.json").is_file() and not (pdir / f"{bad}.failed.json").exists()


def test_executor_is_injectable_and_ray_task_errors_show_their_cause(base, tmp_path):
    class TaskError(Exception):  # like ray.exceptions.RayTaskError: the task's exception in .cause
        def __init__(self):
            super().__init__("ray::scaling-x() (pid=1, ip=127.0.0.1)\nTraceback ...")
            self.cause = MemoryError("cannot allocate 9 GiB")

    seen = []

    def executor(jobs, runner):
        for job in jobs:
            seen.append((job.key, job.memory_bytes))
            yield job, TaskError()

    res = run_sweep(base, _settings(s_t=[0.5]), executor=executor, runner=FakeRunner())
    assert seen[0][0] == "st0.5_ss0.5_fp16" and seen[0][1] == res.records[0]["plan"]["worst_rank_bytes"] > 0
    assert res.records[0]["error"] == "MemoryError: cannot allocate 9 GiB"


def test_changed_config_reruns_but_placement_settings_do_not(base):
    settings = _settings(s_t=[0.5])
    _sweep(base, settings, FakeRunner())
    r = FakeRunner()
    _sweep(base, settings, r, device_memory_gib=64.0)  # only the plan check changes
    assert r.calls == []
    changed = base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 7})})
    r = FakeRunner()
    _sweep(changed, settings, r)
    assert r.calls == ["st0.5_ss0.5_fp16"]


def test_point_whose_plan_does_not_fit_is_refused_and_never_trained(base, tmp_path):
    settings = _settings(s_t=[0.125, 0.5])
    _, points = prepare_grid(base, settings, device_memory_gib=1024.0)
    small, big = (p.plan.worst.total for p in points)
    assert small < big
    # a device that holds the small point but not the big one (no reserve, headroom 0.9)
    tight = base.model_copy(update={"parallel": base.parallel.model_copy(update={"reserve_gib": 0.0})})
    _, points = prepare_grid(tight, settings, device_memory_gib=1024.0)
    small, big = (p.plan.worst.total for p in points)
    gib = (small + big) / 2 / 0.9 / GIB
    r = FakeRunner()
    res = _sweep(tight, settings, r, device_memory_gib=gib)
    assert r.calls == ["st0.125_ss0.5_fp16"]
    rec = {x["key"]: x for x in res.records}["st0.5_ss0.5_fp16"]
    assert rec["status"] == "refused" and rec["message"].startswith("memory plan does not fit: rank 0 needs")
    assert "\n" not in rec["message"] and rec["plan"]["fits"] is False
    assert not (tmp_path / "sweep" / "points" / "st0.5_ss0.5_fp16.json").exists()
    assert not (tmp_path / "sweep" / "runs" / "st0.5_ss0.5_fp16").exists()
    md = (tmp_path / "sweep" / "scaling.md").read_text()
    assert "st0.5_ss0.5_fp16 refused: memory plan does not fit" in md

    r = FakeRunner()  # nothing fits on a tiny device: every point refused, none trained
    res = _sweep(base, settings, r, device_memory_gib=1e-3)
    assert r.calls == []
    assert {x["status"] for x in res.records} == {"ok", "refused"}  # the finished point stays finished
    assert [x["key"] for x in res.records if x["status"] == "refused"] == ["st0.5_ss0.5_fp16"]


def test_grid_records_sizing_formulas(base):
    from comeir_dist.engram.sizing import intra_params, inter_params

    _, points = prepare_grid(base, _settings(s_t=[0.5], s_s=[0.25, 0.5]), device_memory_gib=64.0)
    assert [(p.s_t, p.s_s) for p in points] == [(0.5, 0.25), (0.5, 0.5)]
    for p in points:
        assert p.cfg.engram.table_dtype == "fp16" and p.cfg.engram.s_s == p.s_s
        assert p.p_s == intra_params(p.cfg.engram) and p.p_t == inter_params(p.cfg.engram)
        assert p.base_record()["P_total"] == p.p_s + p.p_t


def test_grid_refuses_non_comeir_and_multi_rank_configs(base):
    with pytest.raises(UserError, match="model.variant"):
        prepare_grid(base.model_copy(update={"model": base.model.model_copy(update={"variant": "tm"})}), _settings())
    with pytest.raises(UserError, match="parallel.world_size"):
        prepare_grid(base.model_copy(update={"parallel": base.parallel.model_copy(update={"world_size": 2})}),
                     _settings())


# ---- fit and report ---------------------------------------------------------------------------------------
def test_power_law_fit_recovers_known_exponent():
    p = np.array([1.4e6, 1.9e7, 2.9e8, 4.4e9])
    fit = fit_power_law(p, 0.031 * p**0.0625)
    assert fit.b == pytest.approx(0.0625, abs=1e-9) and fit.a == pytest.approx(0.031, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 4
    noisy = 0.031 * p**0.0625 * np.exp(np.array([0.01, -0.01, 0.01, -0.01]))
    assert fit_power_law(p, noisy).b == pytest.approx(0.0625, abs=0.01)
    for bad in (([1.0], [0.1]), ([1.0, 2.0], [0.1, 0.0]), ([3.0, 3.0], [0.1, 0.2]), ([0.0, 2.0], [0.1, 0.2])):
        with pytest.raises(ValueError):
            fit_power_law(*bad)


def _rec(key, s_t, s_s, p_t, hit, status="ok"):
    r = {"key": key, "s_t": s_t, "s_s": s_s, "P_S": 1000, "P_T": p_t, "P_total": 1000 + p_t, "status": status,
         "plan": {"worst_rank_bytes": 2**30, "message": "memory plan does not fit: rank 0 needs ..."}}
    if status == "ok":
        r.update(metrics={"item/hit@5": hit, "item/ndcg@5": hit / 2}, steps=10, wall_time_s=60.0,
                 peak_rss_bytes=3 * 2**30)
    return r


def test_report_writes_json_markdown_png(tmp_path):
    recs = [_rec(f"st{s}", s, 1.0, int(1e6 * 16**s), 0.02 * (1e6 * 16**s) ** 0.05) for s in (0.5, 1, 2)]
    recs.append(_rec("st8", 8.0, 1.0, int(6.2e9), None, status="refused"))
    summary = write_report(tmp_path, recs, extra={"config": {"x": 1}})
    assert summary["x_axis"] == "inter" and summary["fit"]["b"] == pytest.approx(0.05, abs=1e-3)
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["counts"] == {"ok": 3, "refused": 1} and len(data["points"]) == 4 and data["config"] == {"x": 1}
    md = (tmp_path / "scaling.md").read_text()
    assert md.count("\n| st") == 4 and "Power law over P_T: item/hit@5 = " in md and "st8 refused: memory plan" in md
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # too few finished points: no fit, files still written
    summary = write_report(tmp_path / "one", recs[:1])
    assert summary["fit"] is None and "at least 2 points" in summary["fit_note"]
    assert (tmp_path / "one" / "scaling.png").is_file()


def test_axis_follows_the_varied_memory():
    a = [_rec("a", 1, 1.0, 10, 0.1), _rec("b", 2, 1.0, 20, 0.1)]
    b = [_rec("a", 2, 0.5, 10, 0.1), _rec("b", 2, 1.0, 10, 0.1)]
    assert resolve_axis(a) == "inter" and resolve_axis(b) == "intra" and resolve_axis(a + b) == "total"
    assert resolve_axis(a, "total") == "total"


def test_metrics_from_summary_prefers_final_test():
    s = {"best_step": 2, "validation": [{"step": 1, "elapsed_s": 3, "item/hit@5": 0.1},
                                         {"step": 2, "elapsed_s": 6, "item/hit@5": 0.2}]}
    assert metrics_from_summary(s) == ({"item/hit@5": 0.2}, "valid")
    s["test"] = {"step": 3, "item/hit@5": 0.3, "users": 10}
    assert metrics_from_summary(s) == ({"item/hit@5": 0.3, "users": 10}, "test")


# ---- CLI --------------------------------------------------------------------------------------------------
def test_cli_dry_run_and_bad_flags(base, tmp_path, capsys):
    from comeir_dist.cli import main

    data = base.model_dump(mode="json")
    data["scaling"] = {"s_t": [0.125, 0.5], "s_s": [0.5], "out": str(tmp_path / "sw")}
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["scaling", "--config", str(cfg), "--dry-run", "--device-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "2 point(s)" in out and "st0.125_ss0.5_fp16" in out and "memory plan fits" in out
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    assert main(["scaling", "--config", str(cfg), "--dry-run", "--device-memory", "1e-4", "--s-t", "4"]) == 0
    assert "refused" in capsys.readouterr().out
    assert main(["scaling", "--config", str(cfg), "--dry-run", "--s-t", "1,x"]) == 2
    assert capsys.readouterr().err.strip() == "comeir scaling: error: --s-t: 'x' is not a number (expected e.g. " \
                                              "0.5,1,2 or 0.5:4:0.5)"
    data["scaling"]["s_s"] = [0]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["scaling", "--config", str(cfg), "--dry-run"]) == 2
    assert "scaling.s_s" in capsys.readouterr().err
    data["scaling"] = {"s_t": [1], "bogus": 1}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["scaling", "--config", str(cfg), "--dry-run"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_shipped_config_grid_matches_paper_sizes():
    from comeir_dist.cli_scaling import add_scaling_flags, load_scaling_configs
    import argparse

    ap = argparse.ArgumentParser()
    add_scaling_flags(ap)
    cfg, settings = load_scaling_configs(ap.parse_args(["--config", "configs/scaling_cpu.yaml"]))
    assert settings.table_dtype == "fp16" and 4.0 in settings.s_t and settings.s_s == [1.0]
    from comeir_dist.engram.sizing import inter_params

    assert inter_params(cfg.engram.model_copy(update={"s_t": 4.0})) == 4_431_361_536
    assert inter_params(cfg.engram.model_copy(update={"s_t": 0.5})) == 1_380_992
    assert cfg.train.max_steps == 100 and math.isclose(cfg.train.max_minutes, 30)
