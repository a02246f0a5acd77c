"""`comeir bench train` on a tiny dataset: report schema, time shares, lookup counts, config errors.

Timings are not checked. The 1-worker run (fused + nn.EmbeddingBag baseline, one spawned process) is shared by the
schema tests; the 2-worker run (two spawned gloo ranks, 1 timed step, no baseline) is marked ``slow`` and runs only
with ``COMEIR_SLOW_TESTS=1`` (it would double the file's ~30-50 s).
"""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import yaml

from tests.fixtures import make_tiny_dataset, tiny_run_config

BENCH = {"workers": [1], "steps": 1, "warmup": 0, "profile_steps": 1, "isolated_batches": 1, "isolated_reps": 1,
         "isolated_s_t": [1.0]}
BUCKETS = {"tables", "dense", "comm", "keys", "other"}


def _parser():
    from comeir_dist.cli_bench import add_bench_commands

    ap = argparse.ArgumentParser()
    add_bench_commands(ap.add_subparsers(dest="cmd", required=True))
    return ap


def _write_config(root, **bench):
    ds = root / "ds"
    if not ds.exists():
        ds = make_tiny_dataset(root)
    data = tiny_run_config(ds, root / "run").model_dump(mode="json")
    data["bench"] = {**BENCH, **bench}
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, ds


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    from comeir_dist.cli import _COMMANDS

    root = tmp_path_factory.mktemp("bench_train")
    cfg, ds = _write_config(root)
    out = root / "train.json"
    args = _parser().parse_args(["bench", "train", "--config", str(cfg), "--out", str(out)])
    assert _COMMANDS["bench"](args) == 0
    return json.loads(out.read_text()), out, cfg, ds


def test_report_schema(one_worker):
    rep, out, _, _ = one_worker
    assert rep["complete"] is True
    assert set(rep["runs"]) == {"fused_w1", "fused_w1_paired", "nn_embedding_w1"}
    for key in ("method", "config", "tables", "runs", "fused_vs_nn", "repeats", "ratios", "checks", "machine"):
        assert key in rep
    assert rep["config"]["bench"]["workers"] == [1] and rep["config"]["run"]["train"]["batch_size"] == 32
    assert {"cpu_count", "threads_per_worker", "loadavg_start", "loadavg_end"} <= set(rep["machine"])
    for r in rep["runs"].values():
        assert r["workers"] == 1 and r["timed_steps"] == 1 and r["warmup_steps"] == 0
        assert r["global_batch"] == 32 and r["step_s"]["n"] == 1
        assert r["samples_per_s"] == pytest.approx(32 / r["timed_s"])
        assert r["lookups_per_s"] == pytest.approx(r["lookups_per_step"] / r["timed_s"])
        assert len(r["per_step_lookups_all"]) == len(r["per_step_s_all"]) == 1
    fv = rep["fused_vs_nn"]
    assert fv["fused_over_nn_embedding"] > 0 and isinstance(fv["requirement_5x_met"], bool)
    assert fv["table_state"]["nn_embedding"]["optimizer_state_bytes"] == 4 * rep["tables"]["params"]
    assert fv["table_state"]["fused"]["optimizer_state_bytes"] == 4 * rep["tables"]["rows"]
    iso = fv["isolated"]
    assert [x["s_t"] for x in iso] == [0.5, 1.0]  # the config's scale, then bench.isolated_s_t
    assert iso[0]["table_params"] == rep["tables"]["params"] <= iso[1]["table_params"]  # C=8 clips the domain
    for x in iso:
        for p in ("fused", "nn_embedding"):
            assert set(x["paths"][p]) == {"forward", "train"} and x["paths"][p]["train"]["lookups_per_s"] > 0
        assert 0 < x["unique_rows_per_batch"] <= x["lookups_per_batch"]
    assert [r["order"] for r in rep["repeats"]] == [["w1", "pair"]]
    ratios = rep["ratios"]
    assert {"fused_over_nn_in_step", "fused_over_nn_whole_step", "fused_over_nn_tables_alone_s_t0.5",
            "fused_over_nn_tables_alone_s_t1.0"} == set(ratios)
    assert ratios["fused_over_nn_in_step"]["values"] == [fv["fused_over_nn_embedding"]]
    md = out.with_suffix(".md").read_text()
    assert "| fused_w1 |" in md and "| nn_embedding_w1 |" in md and "fused_over_nn_embedding" in md
    assert "| fused_over_nn_in_step |" in md


def test_shares_sum_to_one(one_worker):
    rep = one_worker[0]
    for name, r in rep["runs"].items():
        prof = r["profile"]["rank0"]
        assert set(prof["shares"]) == BUCKETS
        assert all(0.0 <= v <= 1.0 for v in prof["shares"].values())
        assert sum(prof["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert abs(prof["unaccounted_fraction"]) < 1e-6
        assert rep["checks"][f"shares_sum_{name}"] == pytest.approx(1.0, abs=1e-6)
        d = prof["detail_seconds_per_step"]
        assert d["tables.forward"] > 0 and d["tables.backward_update"] > 0 and d["dense.backward"] > 0
        assert sum(d.values()) == pytest.approx(prof["profiled_step_s"], rel=1e-6)
    nn = rep["runs"]["nn_embedding_w1"]["profile"]["rank0"]
    assert nn["detail_seconds_per_step"]["tables.optimizer"] > 0  # the dense Adagrad step is a table cost
    assert "tables.optimizer" not in rep["runs"]["fused_w1"]["profile"]["rank0"]["detail_seconds_per_step"]
    fused_tables = [name for name, _ in rep["runs"]["fused_w1"]["profile"]["rank0"]["top_ops_ms_per_step"]["tables"]]
    assert any("split_embedding" in n for n in fused_tables)  # the fbgemm kernels land in the tables bucket


def test_lookup_counts_consistent(one_worker):
    rep, _, cfg_path, ds = one_worker
    f, n = rep["runs"]["fused_w1_paired"], rep["runs"]["nn_embedding_w1"]
    assert rep["runs"]["fused_w1"]["per_step_lookups_all"] == f["per_step_lookups_all"]  # same batches
    assert rep["checks"]["lookups_equal_fused_vs_nn"] is True
    assert f["per_step_lookups_all"] == n["per_step_lookups_all"]
    assert sum(f["lookups_by_group_per_step"].values()) == pytest.approx(f["lookups_per_step"])
    assert f["bags_per_step"] >= f["lookups_per_step"] > 0
    assert rep["checks"]["first_loss_abs_diff_fused_vs_nn"] < 1e-5  # same init, batch, dropout masks
    iso = rep["fused_vs_nn"]["isolated"][0]  # replay of the last timed step's KJTs
    assert iso["lookups_per_batch"] == f["per_step_lookups_all"][-1]
    assert f["profile"]["rank0"]["lookups_per_step"] > 0
    # independent count: the unsharded model's lookup pass on the first global batch
    from comeir_dist.bench.train import load_bench_config
    from comeir_dist.model.factory import build_model
    from comeir_dist.model.history import HistoryBatch
    from comeir_dist.train.samples import EpochSampler, training_samples
    from comeir_dist.train.setup import load_inputs

    cfg, _ = load_bench_config(str(cfg_path))
    sids, emb = load_inputs(cfg)
    hist, target = training_samples(cfg.dataset, cfg.max_history)
    idx = EpochSampler(len(target), cfg.train.batch_size, cfg.seed).next()
    model = build_model(cfg, sids.codes, sids.codebooks, emb, sparse_device="cpu")
    seen = []
    model.tables.register_forward_pre_hook(
        lambda _m, a: seen.append(sum(int(k.values().numel()) for k in a[0].values())))
    tgt = torch.as_tensor(target[idx])
    with torch.no_grad():
        model.level_logits(HistoryBatch(torch.as_tensor(hist[idx]), tgt), model.catalog.item_codes(tgt))
    assert seen == [f["per_step_lookups_all"][0]]


def test_tables_info_matches_sizing(one_worker):
    rep = one_worker[0]
    from comeir_dist.engram.config import EngramConfig
    from comeir_dist.engram.sizing import table_specs

    e = EngramConfig.model_validate(rep["config"]["run"]["engram"])
    specs = table_specs(e)
    assert rep["tables"]["num_tables"] == len(specs)
    assert rep["tables"]["params"] == sum(s.rows * s.dim for s in specs)


def test_attribution_labels():
    """Self-time attribution on a hand-made profile: table region + its backward nodes, dense, other."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from comeir_dist.bench.train_worker import _comm_kind, _is_comm, attribute

    emb = torch.nn.EmbeddingBag(1000, 16, mode="sum")
    lin = torch.nn.Linear(16, 16)
    ids = torch.randint(0, 1000, (4096,))
    off = torch.arange(0, 4096, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function("bench::step"):
                with record_function("bench::forward"):
                    with record_function("bench::tables_fwd"):
                        e = emb(ids, off)
                    y = lin(e).square().sum()
                with record_function("bench::backward"):
                    y.backward()
    att = attribute(prof.events())
    assert att["steps"] == 2
    assert sum(att["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    d = att["detail_seconds_per_step"]
    assert d["tables.forward"] > 0 and d["tables.backward_update"] > 0
    assert d["dense.forward"] > 0 and d["dense.backward"] > 0
    tables_ops = [n for n, _ in att["top_ops_ms_per_step"]["tables"]]
    assert any("embedding_bag" in n.lower() for n in tables_ops)
    assert not any("embedding_bag" in n.lower() for n, _ in att["top_ops_ms_per_step"].get("dense", []))
    assert _is_comm("c10d::allreduce_") and _is_comm("All2All_Pooled_Wait") and not _is_comm("aten::mm")
    assert _comm_kind("bench::comm::reduce_scatter_tensor") == "reduce_scatter"
    assert _comm_kind("bench::comm::wait") == "wait"


def test_config_errors(tmp_path, capsys):
    from comeir_dist.bench.train import load_bench_config, validate
    from comeir_dist.cli import main
    from comeir_dist.errors import UserError

    cfg_path, _ = _write_config(tmp_path)
    for argv, needle in ((["--workers", "1,x"], "--workers"), (["--workers", "0"], "workers"),
                         (["--steps", "0"], "bench.steps"), (["--threads", str(4 * (os.cpu_count() or 1))], "threads")):
        assert main(["bench", "train", "--config", str(cfg_path), "--out", str(tmp_path / "o.json"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    data = yaml.safe_load(cfg_path.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "bench": {"stepz": 3}}))
    with pytest.raises(UserError, match="bench.stepz"):
        load_bench_config(str(bad))
    bad.write_text(yaml.safe_dump({**data, "model": {**data["model"], "variant": "flatten"}}))
    with pytest.raises(UserError, match="variant"):
        validate(*load_bench_config(str(bad)))
    bad.write_text(yaml.safe_dump({**data, "dataset": str(tmp_path / "missing")}))
    with pytest.raises(UserError):
        validate(*load_bench_config(str(bad)))
    bad.write_text(yaml.safe_dump({**data, "train": {**data["train"], "grad_accum_steps": 2}}))
    with pytest.raises(UserError, match="grad_accum_steps"):
        validate(*load_bench_config(str(bad)))
    assert not (tmp_path / "o.json").exists()
    args = _parser().parse_args(["bench", "train", "--config", str(cfg_path), "--s-t", "2", "--s-s", "0.25"])
    from comeir_dist.cli_bench import train_bench_config

    cfg, _ = train_bench_config(args)
    assert (cfg.engram.s_t, cfg.engram.s_s) == (2.0, 0.25)
    args = _parser().parse_args(["bench", "train", "--config", str(cfg_path), "--s-t", "-1"])
    with pytest.raises(UserError, match="engram.s_t"):
        train_bench_config(args)


def _fake_ranks(world: int, paths: list[str], step_s: float, comm: float) -> list[dict]:
    """Per-rank results as ``train_worker`` returns them: 2 timed steps of ``step_s`` seconds, 64 samples each."""
    rec = {"s": step_s, "wall": [0.0, step_s], "lookups": 10, "bags": 20, "samples": 64, "timed": True, "lookups_by_group": {"g": 10},
           "loss": 1.0}
    shares = {"tables": 0.1, "dense": 0.9 - comm, "comm": comm, "keys": 0.0, "other": 0.0}
    prof = {"shares": shares, "profiled_step_s": step_s}
    return [{"paths": {p: {"records": [dict(rec), dict(rec)], "profile": prof} for p in paths}, "setup_s": 1.0}
            for _ in range(world)]


def test_repeats_alternate_and_pair_ratios(tmp_path, monkeypatch):
    """Repeats run the world sizes in alternating order in fresh groups; each N-over-1 ratio pairs the runs of
    its own repeat; ratios report median / min / max / spread over the repeats."""
    import comeir_dist.bench.train as bt

    cfg, settings = bt.load_bench_config(str(_write_config(tmp_path)[0]))
    settings = settings.model_copy(update={"workers": [1, 2], "compare_nn": False, "repeats": 3, "interleave": 0})
    calls = []
    step = {1: [1.0, 1.2, 0.9], 2: [0.5, 0.8, 0.5]}  # per repeat

    def fake_run_groups(specs, timeout, turns=None):
        assert turns is None and len(specs) == 1
        (label, (world, job)), = specs.items()
        r = sum(1 for w, _ in calls if w == world)
        calls.append((world, job["paths"]))
        return {label: _fake_ranks(world, job["paths"], step[world][r], comm=0.1 * (r + 1))}

    monkeypatch.setattr(bt, "run_groups", fake_run_groups)
    rep = bt.run_train_bench(cfg, settings, str(tmp_path / "r.json"))
    assert [w for w, _ in calls] == [1, 2, 2, 1, 1, 2] and all(p == ["fused"] for _, p in calls)
    assert [r["order"] for r in rep["repeats"]] == [["w1", "w2"], ["w2", "w1"], ["w1", "w2"]]
    st = rep["ratios"]["samples_per_s_2_over_1"]
    assert st["values"] == pytest.approx([2.0, 1.5, 1.8]) and st["n"] == 3
    assert (st["median"], st["min"], st["max"]) == pytest.approx((1.8, 1.5, 2.0))
    assert st["spread"] == pytest.approx(0.5 / 1.8)
    assert rep["ratios"]["comm_share_w2"]["values"] == pytest.approx([0.1, 0.2, 0.3])
    assert rep["ratios"]["per_step_2_over_1_median"]["values"] == pytest.approx([2.0, 1.5, 1.8])
    assert rep["scaling"]["2_over_1"]["samples_per_s_ratio"] == pytest.approx(2.0)  # the first repeat
    md = (tmp_path / "r.md").read_text()
    assert "Ratios over 3 repeat(s)" in md and "| samples_per_s_2_over_1 | **1.80x** | 1.50x | 2.00x | 28% |" in md


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COMEIR_SLOW_TESTS") != "1",
                    reason="2 spawned ranks take 25-50 s: set COMEIR_SLOW_TESTS=1 to run")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 workers need 2 cores")
def test_two_workers(tmp_path, one_worker):
    """Two spawned gloo ranks, 1 timed step: the global lookups per step equal the 1-worker run's."""
    from comeir_dist.bench.train import load_bench_config, run_train_bench

    cfg, settings = load_bench_config(str(_write_config(tmp_path)[0]))
    settings = settings.model_copy(update={"workers": [1, 2], "compare_nn": False, "threads": 1, "steps": 2,
                                           "interleave": 1})
    rep = run_train_bench(cfg, settings, str(tmp_path / "w2.json"))
    r = rep["runs"]["fused_w2"]
    assert set(rep["runs"]) == {"fused_w1", "fused_w2"} and r["workers"] == 2 and "fused_vs_nn" in rep
    assert r["per_step_lookups_all"] == rep["runs"]["fused_w1"]["per_step_lookups_all"]
    assert r["per_step_lookups_all"][:1] == one_worker[0]["runs"]["fused_w1"]["per_step_lookups_all"]
    assert rep["repeats"][0]["order"] == ["w1", "w2"] and "samples_per_s_2_over_1" in rep["ratios"]
    walls = sorted([(a, b, "w1") for a, b in rep["runs"]["fused_w1"]["per_step_wall_all"]]
                   + [(a, b, "w2") for a, b in r["per_step_wall_all"]])
    for (a0, b0, g0), (a1, b1, g1) in zip(walls, walls[1:]):
        assert b0 <= a1 or g0 == g1, "the 1- and 2-worker groups stepped at the same time"
    assert [g for _, _, g in walls] == ["w1", "w2", "w2", "w1"]  # ABBA turns of one step
    prof = r["profile"]
    assert len(prof["shares_per_rank"]) == 2
    for sh in prof["shares_per_rank"]:
        assert sum(sh.values()) == pytest.approx(1.0, abs=1e-6)
    assert prof["rank0"]["seconds_per_step"]["comm"] > 0  # the all-to-alls and reductions are real collectives
    assert np.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0


def test_turn_units():
    from comeir_dist.bench.turns import units

    assert units(2, 5, 2, 1) == [("warmup", 2), ("timed", 2), ("timed", 2), ("timed", 1), ("profile", 0)]
    assert units(0, 4, 4, 0) == [("timed", 4)]


def test_turn_taker_never_overlaps_and_alternates():
    """Groups (threads standing in for processes) only work between the parent's go and their report; the
    parent alternates the order from unit to unit (ABBA), and a dead group is reported, not waited for."""
    import queue as q
    import threading
    import time

    from comeir_dist.bench.turns import Turn, TurnTaker

    log, lock = [], threading.Lock()
    groups, threads = {}, []
    for label, world in (("w1", 1), ("w2", 2)):
        gos, back = [q.Queue() for _ in range(world)], q.Queue()
        groups[label] = (gos, back)
        for r in range(world):
            def rank_main(turn=Turn(gos[r], back, r), label=label, r=r):
                for u in range(3):
                    turn.wait()
                    with lock:
                        log.append(("start", label, r, u))
                    time.sleep(0.01)
                    with lock:
                        log.append(("end", label, r, u))
                    turn.done()
            threads.append(threading.Thread(target=rank_main, daemon=True))
    for t in threads:
        t.start()
    TurnTaker(groups, alive=lambda: True, timeout_s=30).run(["w1", "w2"], 3)
    running = set()
    for kind, label, r, _ in log:
        if kind == "start":
            assert all(lb == label for lb, _ in running), "two groups worked at the same time"
            running.add((label, r))
        else:
            running.discard((label, r))
    firsts = [label for kind, label, r, u in log if kind == "start" and r == 0]
    assert firsts == ["w1", "w2", "w2", "w1", "w1", "w2"]
    dead = {"w1": ([q.Queue()], q.Queue())}
    with pytest.raises(RuntimeError, match="w1 stopped"):
        TurnTaker(dead, alive=lambda: False, timeout_s=30).give("w1")
