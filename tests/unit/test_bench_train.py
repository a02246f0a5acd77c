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
    assert set(rep["runs"]) == {"fused_w1", "nn_embedding_w1"}
    for key in ("method", "config", "tables", "runs", "fused_vs_nn", "checks", "machine"):
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
    md = out.with_suffix(".md").read_text()
    assert "| fused_w1 |" in md and "| nn_embedding_w1 |" in md and "fused_over_nn_embedding" in md


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
    f, n = rep["runs"]["fused_w1"], rep["runs"]["nn_embedding_w1"]
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


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COMEIR_SLOW_TESTS") != "1",
                    reason="2 spawned ranks take 25-50 s: set COMEIR_SLOW_TESTS=1 to run")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 workers need 2 cores")
def test_two_workers(tmp_path, one_worker):
    """Two spawned gloo ranks, 1 timed step: the global lookups per step equal the 1-worker run's."""
    from comeir_dist.bench.train import load_bench_config, run_train_bench

    cfg, settings = load_bench_config(str(_write_config(tmp_path)[0]))
    settings = settings.model_copy(update={"workers": [2], "compare_nn": False, "threads": 1})
    rep = run_train_bench(cfg, settings, str(tmp_path / "w2.json"))
    r = rep["runs"]["fused_w2"]
    assert set(rep["runs"]) == {"fused_w2"} and r["workers"] == 2 and "fused_vs_nn" in rep
    assert r["per_step_lookups_all"] == one_worker[0]["runs"]["fused_w1"]["per_step_lookups_all"]
    prof = r["profile"]
    assert len(prof["shares_per_rank"]) == 2
    for sh in prof["shares_per_rank"]:
        assert sum(sh.values()) == pytest.approx(1.0, abs=1e-6)
    assert prof["rank0"]["seconds_per_step"]["comm"] > 0  # the all-to-alls and reductions are real collectives
    assert np.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
