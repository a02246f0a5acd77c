"""Memory plan (`comeir plan`): placement, byte arithmetic, ZeRO shares, refusal text, CLI errors."""
import argparse
import contextlib
import io
import json
import sys

import pytest

from comeir_dist.config.parallel import ParallelConfig
from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.sizing import TableSpec, table_specs
from comeir_dist.errors import UserError
from comeir_dist.parallel.memory_plan import (
    GIB,
    DenseCount,
    check_plan_fits,
    dense_share,
    format_plan,
    plan_memory,
    planner_cw_block,
    read_deepspeed_config,
    row_wise_rows,
)


def spec(name, rows, dim=4, memory="inter", level=1):
    return TableSpec(name, memory, level, 1, 0, rows, dim, rows)


def pc(**kw):
    base = {"world_size": 1, "device_memory_gib": 80.0, "zero_stage": 0, "reserve_gib": 0.0, "headroom": 1.0}
    return ParallelConfig(**{**base, **kw})


# ---- placement ------------------------------------------------------------------------------------
def test_greedy_table_wise_largest_first_least_loaded():
    specs = [spec("d", 40), spec("a", 100), spec("c", 50), spec("b", 60)]
    plan = plan_memory(specs, 0, pc(world_size=2, sharding="table_wise"), device="cuda", table_dtype="fp32")
    # a(1600)->0, b(960)->1, c(800)->1 (960 < 1600), d(640)->0 (1600 < 1760)
    assert plan.assignment == {"d": [0], "a": [0], "c": [1], "b": [1]}
    assert [r.table_bytes for r in plan.ranks] == [(100 + 40) * 16, (60 + 50) * 16]
    assert [t.name for t in plan.tables] == ["d", "a", "c", "b"]  # reported in spec order


def test_greedy_ties_go_to_lowest_rank_and_row_wise_adds_even_load():
    specs = [spec("big", 400), spec("x", 10), spec("y", 10), spec("z", 10)]
    plan = plan_memory(specs, 0, pc(world_size=4, sharding={"big": "row_wise"}), device="cuda", table_dtype="fp32")
    assert plan.assignment == {"big": [0, 1, 2, 3], "x": [0], "y": [1], "z": [2]}


def test_balance_group_carries_load_across_collections_like_the_sharder():
    specs = [spec("i1", 100, memory="inter", level=1), spec("j1", 10, memory="inter", level=1),
             spec("i2", 100, memory="inter", level=2), spec("j2", 30, memory="inter", level=2)]
    grouped = plan_memory(specs, 0, pc(world_size=2, sharding="table_wise"), device="cuda")
    glob = plan_memory(specs, 0, pc(world_size=2, sharding="table_wise"), device="cuda", balance="global")
    # group by group, largest first, least-loaded rank: i1 -> 0, j1 -> 1; then i2 -> 1 (10 < 100), j2 -> 0
    assert grouped.assignment == {"i1": [0], "j1": [1], "i2": [1], "j2": [0]}
    assert glob.assignment == {"i1": [0], "i2": [1], "j2": [0], "j1": [1]}


def test_row_wise_blocks_follow_torchrec():
    assert row_wise_rows(10, 4) == [3, 3, 3, 1]
    assert row_wise_rows(5, 4) == [2, 2, 1, 0]
    assert row_wise_rows(16, 4) == [4, 4, 4, 4]
    assert row_wise_rows(7, 1) == [7]


@pytest.mark.parametrize("world", [1, 3, 7, 16])
def test_row_wise_split_sums(world):
    specs = [spec("t", 1_000_003, dim=64), spec("u", 17, dim=64)]
    plan = plan_memory(specs, 0, pc(world_size=world, sharding="row_wise"), device="cuda", table_dtype="fp16")
    assert sum(r.table_bytes for r in plan.ranks) == (1_000_003 + 17) * 64 * 2
    assert sum(r.optimizer_bytes for r in plan.ranks) == (1_000_003 + 17) * 4
    per_rank_rows = [a + b for a, b in zip(row_wise_rows(1_000_003, world), row_wise_rows(17, world))]
    assert [r.table_bytes for r in plan.ranks] == [n * 64 * 2 for n in per_rank_rows]
    assert max(per_rank_rows) - min(per_rank_rows) <= 2 * world  # ceil blocks: at most W rows apart per table


def test_column_wise_splits_width_and_replicates_adagrad_rows():
    plan = plan_memory([spec("t", 1000, dim=64)], 0, pc(world_size=4, sharding="column_wise"), device="cuda",
                       table_dtype="fp32")
    assert [r.table_bytes for r in plan.ranks] == [1000 * 16 * 4] * 4
    assert [r.optimizer_bytes for r in plan.ranks] == [1000 * 4] * 4  # one accumulator per column shard
    bad = plan_memory([spec("t", 1000, dim=64)], 0, pc(world_size=32, sharding="column_wise"), device="cuda")
    assert not bad.fits and "cannot be split into 32 column shards" in bad.message()
    # parallel.column_shards: fixed shard count placed round-robin (engram_tables), one accumulator per shard
    rr = plan_memory([spec("t", 1000, dim=64)], 0, pc(world_size=3, sharding="column_wise", column_shards=4),
                     device="cpu", table_dtype="fp32")
    assert rr.assignment == {"t": [0, 1, 2, 0]}
    assert [r.table_bytes for r in rr.ranks] == [2 * 1000 * 16 * 4, 1000 * 16 * 4, 1000 * 16 * 4]
    assert [r.optimizer_bytes for r in rr.ranks] == [2 * 1000 * 4, 1000 * 4, 1000 * 4]


def test_auto_splits_big_tables_row_wise_on_cuda_and_keeps_planner_blocks_on_cpu():
    cfg = EngramConfig(s_t=8.0, table_dtype="fp16")
    gpu = plan_memory(cfg, 0, pc(world_size=16), device="cuda")
    split = sorted(t.name for t in gpu.tables if t.sharding == "row_wise")
    assert split == [f"inter_l2_o2_h{k}" for k in range(4)]  # the four 20M-row tables
    assert all(t.sharding == "table_wise" for t in gpu.tables if t.name not in split)
    cpu = plan_memory(cfg, 0, pc(world_size=16), device="cpu")
    assert planner_cw_block(64) == 64 and planner_cw_block(512) == 128
    assert all(t.sharding == "table_wise" and len(t.ranks) == 1 for t in cpu.tables)  # dims <= 128: whole tables


# ---- byte arithmetic --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,elt", [("fp32", 4), ("fp16", 2)])
def test_table_and_adagrad_bytes_per_dtype(dtype, elt):
    plan = plan_memory([spec("t", 1000, dim=64)], 0, pc(), device="cpu", table_dtype=dtype)
    r = plan.ranks[0]
    assert (r.table_bytes, r.optimizer_bytes) == (1000 * 64 * elt, 1000 * 4)
    assert r.total == r.table_bytes + r.optimizer_bytes + r.dense_bytes + r.reserve


def test_real_config_totals_match_params_report():
    cfg = EngramConfig(s_t=8.0, table_dtype="fp16")
    plan = plan_memory(cfg, 0, pc(world_size=16), device="cuda")
    params = sum(s.params for s in table_specs(cfg))
    assert plan.totals["table_params"] == params
    assert plan.totals["table_bytes"] == params * 2
    assert plan.totals["optimizer_bytes"] == sum(s.rows for s in table_specs(cfg)) * 4
    assert sum(s.params for s in table_specs(cfg, "inter")) == 6_202_227_840


def test_reserve_headroom_and_fit_boundary():
    specs = [spec("t", GIB // 16, dim=4)]  # 1 GiB fp32 weights + 1/4 GiB accumulator
    need = GIB + GIB // 4 + 2 * GIB
    ok = plan_memory(specs, 0, pc(device_memory_gib=need / GIB, reserve_gib=2.0), device="cuda", table_dtype="fp32")
    assert ok.fits and ok.ranks[0].total == need == ok.usable_bytes
    tight = plan_memory(specs, 0, pc(device_memory_gib=need / GIB, reserve_gib=2.0, headroom=0.9), device="cuda",
                        table_dtype="fp32")
    assert not tight.fits


# ---- dense ZeRO shares ------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,expect", [(0, (2000, 2000, 12000)), (1, (2000, 2000, 3000)),
                                          (2, (2000, 500, 3000)), (3, (500, 500, 3000))])
def test_zero_stage_shares_bf16(stage, expect):
    d = dense_share(1000, "bf16", stage, 4)
    assert (d.param_bytes, d.grad_bytes, d.optimizer_bytes) == expect


def test_zero_fp32_frozen_params_buffers_and_offload():
    assert dense_share(1000, "fp32", 0, 4).optimizer_bytes == 8000  # plain AdamW: m + v
    assert dense_share(1000, "fp32", 1, 4).optimizer_bytes == 3000  # ZeRO keeps an fp32 partition copy too
    d = dense_share(DenseCount(1000, trainable=600, buffer_bytes=77), "fp32", 2, 2)
    assert (d.param_bytes, d.grad_bytes, d.optimizer_bytes, d.buffer_bytes) == (4000, 1200, 3600, 77)
    off = dense_share(1000, "bf16", 3, 4, offload_optimizer=True, offload_params=True)
    assert (off.param_bytes, off.optimizer_bytes, off.offload) == (0, 0, "optimizer+params")
    plan = plan_memory([], 10**6, pc(world_size=4, zero_stage=3), device="cuda", dense_dtype="bf16")
    assert all(r.dense_bytes == 10**6 * 16 // 4 for r in plan.ranks)


def test_deepspeed_config_wins(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    assert read_deepspeed_config(str(f)) == {"zero_stage": 3, "offload_optimizer": True, "offload_params": False}
    plan = plan_memory([], 4000, pc(world_size=4, zero_stage=0, deepspeed_config=str(f)), device="cuda",
                       dense_dtype="bf16")
    assert (plan.dense.zero_stage, plan.dense.dtype, plan.dense.optimizer_bytes) == (3, "bf16", 0)
    f.write_text(json.dumps({"gradient_accumulation_steps": 1}))  # no stage in the JSON: parallel.zero_stage
    plan = plan_memory([], 4000, pc(world_size=4, zero_stage=1, deepspeed_config=str(f)), device="cuda")
    assert plan.dense.zero_stage == 1
    with pytest.raises(UserError, match="not found"):
        plan_memory([], 1, pc(deepspeed_config=str(tmp_path / "nope.json")), device="cuda")


# ---- refusal --------------------------------------------------------------------------------------
def test_refusal_names_worst_rank_missing_bytes_and_fixes():
    cfg = EngramConfig(s_t=8.0, table_dtype="fp32")
    p = ParallelConfig(world_size=1, device_memory_gib=24)
    plan = plan_memory(cfg, 10**6, p, device="cpu")
    assert not plan.fits
    msg = plan.message()
    assert "\n" not in msg and "rank 0 needs" in msg and "missing" in msg
    assert "world size >= 2" in msg and "fp16 tables fit at world size 1" in msg
    with pytest.raises(UserError) as exc:
        check_plan_fits(cfg, 10**6, p, device="cpu")
    assert str(exc.value) == msg
    assert check_plan_fits(cfg, 10**6, p, device="cpu", table_dtype="fp16").fits
    assert "DOES NOT FIT" in format_plan(plan)


def test_table_wise_table_larger_than_a_device_never_fits():
    specs = [spec("huge", 20_000_000, dim=64), spec("small", 1000, dim=64)]  # 4.77 GiB fp32
    p = pc(world_size=8, device_memory_gib=4.0, sharding="table_wise")
    plan = plan_memory(specs, 0, p, device="cuda", table_dtype="fp32")
    worst = plan.worst
    assert not plan.fits and worst.rank == plan.assignment["huge"][0]
    msg = plan.message()
    assert f"rank {worst.rank} needs" in msg and "more ranks alone do not help" in msg
    assert "sharding row_wise fits at world size 8" in msg
    assert plan_memory(specs, 0, pc(world_size=8, device_memory_gib=4.0, sharding="row_wise"),
                       device="cuda", table_dtype="fp32").fits


def test_zero3_suggested_when_dense_dominates():
    plan = plan_memory([], 8 * 10**9, pc(world_size=8, zero_stage=1, device_memory_gib=40), device="cuda",
                       dense_dtype="bf16")
    assert not plan.fits and "zero_stage 3 fits at world size 8" in plan.message()


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="allowed values"):
        plan_memory([], 0, pc(), device="tpu")
    with pytest.raises(UserError, match="allowed values"):
        plan_memory([], 0, pc(), device="cuda", table_dtype="fp8")
    with pytest.raises(UserError, match="unknown tables"):
        plan_memory([spec("a", 10)], 0, pc(sharding={"zzz": "row_wise"}), device="cuda")


# ---- dense counting -------------------------------------------------------------------------------
def test_count_dense_params_matches_a_real_build(tmp_path):
    import numpy as np
    from transformers import Qwen3Config

    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.memory_plan import count_dense_params
    from comeir_dist.train.setup import dense_parameters
    from tests.fixtures import tiny_run_config

    cfg = tiny_run_config(tmp_path, tmp_path / "out")
    L, C, D = cfg.engram.levels, cfg.engram.codebook_size, 16
    codes = np.stack([np.arange(C)] * L, axis=1)
    model = build_model(cfg, codes, np.zeros((L, C, D), np.float32), np.zeros((C, D), np.float32), sparse_device="meta")
    real = dense_parameters(model)
    got = count_dense_params(cfg, item_emb_dim=D, num_items=10)
    assert got.trainable == sum(p.numel() for p in real)
    assert got.params == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tables."))
    assert got.buffer_bytes == 10 * (D * 4 + L * 8) + L * C * D * 4
    # a local HF checkpoint dir is counted from its config.json (its unused token table frozen, as in training)
    ck = tmp_path / "hf"
    hf = Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=100, head_dim=16, tie_word_embeddings=False)
    hf.save_pretrained(ck)
    with_path = cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"backbone": cfg.model.backbone.model_copy(update={"path": str(ck)})})})
    counted = count_dense_params(with_path, item_emb_dim=D)
    from transformers import AutoModel
    n_hf = sum(p.numel() for p in AutoModel.from_config(hf).parameters())
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    n_bb_train = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert counted.params == got.params - n_bb + n_hf
    n_tok = hf.vocab_size * hf.hidden_size
    assert counted.trainable == got.trainable - n_bb_train + n_hf - n_tok


# ---- CLI ------------------------------------------------------------------------------------------
def run_cli(argv):
    """`comeir plan ...` through the real `comeir` entry point (cli.main), stdout and stderr captured."""
    from comeir_dist import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["plan", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_plan_is_registered_on_the_comeir_command():
    """`comeir` (pyproject console script) is cli.main, and its parser has a `plan` subcommand bound to
    cli_plan's handler: no fallback wiring in the tests."""
    import tomllib
    from pathlib import Path

    from comeir_dist import cli

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["comeir"] == "comeir_dist.cli:main"
    sub = next(a for a in cli._build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "plan" in sub.choices
    assert cli._COMMANDS["plan"].__module__ == "comeir_dist.cli_plan"


def test_plan_command_subprocess_exit_codes(tmp_path):
    """The registered command as a user runs it (`python -m comeir_dist.cli plan`): 0 = fits (JSON on
    stdout), 1 = does not fit (reason on the last line), 2 = bad value (one line on stderr, no traceback)."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    base = [sys.executable, "-m", "comeir_dist.cli", "plan", "--dense-params", "1000", "--device", "cpu"]

    def run(*argv):
        return subprocess.run([*base, *argv], cwd=repo, capture_output=True, text=True, timeout=300)

    ok = run("--device-memory", "24", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["fits"] is True
    tight = run("--device-memory", "0.001", "--reserve", "0")
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout.strip().splitlines()[-1]
    bad = run("--device-memory", "inf")  # accepted before floats had to be finite
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("comeir plan: error:")
    assert "parallel.device_memory_gib" in bad.stderr and "inf" in bad.stderr and "> 0" in bad.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--world-size", "0"], "parallel.world_size"),
    (["--dtype", "fp8"], "engram.table_dtype"),
    (["--sharding", "diagonal"], "--sharding"),
    (["--device-memory", "-1"], "parallel.device_memory_gib"),
    (["--zero-stage", "4"], "parallel.zero_stage"),
    (["--dense-dtype", "fp16"], "--dense-dtype"),
])
def test_cli_bad_values_one_line(argv, needle):
    rc, out, err = run_cli(["--dense-params", "1000", "--device-memory", "8", *argv])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("comeir plan: error:") and needle in err


def test_cli_plan_outputs(tmp_path):
    common = ["--s-t", "8", "--dense-params", "1000000", "--device", "cpu", "--world-size", "1",
              "--device-memory", "24"]
    rc, out, _ = run_cli([*common, "--dtype", "fp16", "--json"])
    rep = json.loads(out)
    assert rc == 0 and rep["fits"] and rep["totals"]["table_bytes"] == rep["totals"]["table_params"] * 2
    rc, out, _ = run_cli([*common, "--dtype", "fp32", "--tables"])
    assert rc == 1 and "DOES NOT FIT" in out.splitlines()[-1] and "inter_l2_o2_h0" in out
    cfg = tmp_path / "run.yaml"
    cfg.write_text("engram: {s_t: 8.0, table_dtype: fp16}\nparallel: {world_size: 16, device_memory_gib: 80}\n")
    rc, out, _ = run_cli(["--config", str(cfg), "--dense-params", "10", "--device", "cuda", "--json"])
    rep = json.loads(out)
    assert rc == 0 and rep["world_size"] == 16 and rep["device_memory_bytes"] == 80 * GIB


# ---- cross-check against the real sharder's explicit plans ------------------------------------------
@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "column_wise"])
def test_placement_matches_sparse_build_plan(monkeypatch, kind):
    import torch
    import torch.distributed as dist

    from comeir_dist.engram.tables import build_engram_collection
    from comeir_dist.parallel import sparse

    assert sparse.SHARDING_TYPES == ("table_wise", "row_wise", "column_wise")
    world = 4
    specs = [spec(n, rows, dim=16) for n, rows in (("a", 1001), ("b", 700), ("c", 650), ("d", 90), ("e", 5))]
    ebc = build_engram_collection(specs, device="meta", dtype="fp16")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    splan = sparse.build_plan(ebc, kind, sparse.make_sharder(0.1, 1e-8), None, torch.device("cpu"))
    ours = plan_memory(specs, 0, pc(world_size=world, sharding=kind), device="cpu", table_dtype="fp16")
    for name, ps in splan.plan[""].items():
        shards = ps.sharding_spec.shards
        assert ps.sharding_type == kind
        assert [sh.placement.rank() for sh in shards] == ours.assignment[name]
        rows = [sh.shard_sizes[0] for sh in shards]
        if kind == "row_wise":
            full = row_wise_rows(dict((s.name, s.rows) for s in specs)[name], world)
            assert rows == full  # including TorchRec's empty trailing shards (5 rows over 4 -> 2, 2, 1, 0)
        width = sum(sh.shard_sizes[1] * sh.shard_sizes[0] for sh in shards) * 2
        assert width == next(t.weight_bytes for t in ours.tables if t.name == name)
