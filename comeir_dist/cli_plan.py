"""`comeir plan`: per-rank memory plan (Engram shards + row-wise Adagrad, dense ZeRO share, reserve).

Exit status: 0 when every rank fits, 1 when the plan does not fit (the table is still printed, the last
line says why), 2 on a bad flag or config value (one line).

No weights are needed: the dense part is counted on the meta device from the backbone's config -- the
``config.json`` of ``model.backbone.path`` when that checkpoint is on this machine, else
``model.backbone.config_file`` (e.g. configs/backbones/qwen3-0.6b.json) -- or given with ``--dense-params``.
"""
from __future__ import annotations

import argparse

from pydantic import Field

from comeir_dist.config.base import Section
from comeir_dist.config.parallel import ParallelConfig
from comeir_dist.errors import UserError

# flag -> key of the `parallel:` section
PARALLEL_FLAGS = {"world_size": "world_size", "device_memory": "device_memory_gib", "sharding": "sharding",
                  "column_shards": "column_shards",
                  "zero_stage": "zero_stage", "reserve": "reserve_gib", "headroom": "headroom",
                  "deepspeed_config": "deepspeed_config"}
ENGRAM_FLAGS = {"s_t": "engram.s_t", "s_s": "engram.s_s", "dtype": "engram.table_dtype"}
SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise")
DENSE_DTYPES = ("bf16", "fp32")  # the dense engine runs bf16 (train.bf16) or fp32
DEVICES = ("auto", "cpu", "cuda")


class _Sections(Section):
    """Wrapper so validation errors name the key as `parallel.<field>`."""

    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (configs/*.yaml); its `parallel:` section is used if present; "
                   "the backbone is counted from model.backbone.path's config.json, else model.backbone.config_file")
    p.add_argument("--s-t", dest="s_t", type=float, help="inter scale s_T (overrides engram.s_t)")
    p.add_argument("--s-s", dest="s_s", type=float, help="intra scale s_S (overrides engram.s_s)")
    p.add_argument("--dtype", help="Engram table dtype: fp16 | fp32 (overrides engram.table_dtype)")
    p.add_argument("--world-size", dest="world_size", type=int, help="number of ranks (default 1)")
    p.add_argument("--device-memory", dest="device_memory", type=float,
                   help="GiB per device (default: detected; on CPU host memory / LOCAL_WORLD_SIZE)")
    p.add_argument("--device", help="auto | cpu | cuda (default: the run config's device); 'auto' sharding splits "
                   "big tables row-wise on cuda, while the CPU planner has no row-wise")
    p.add_argument("--sharding", help="auto | table_wise | row_wise | column_wise (default auto)")
    p.add_argument("--column-shards", dest="column_shards", type=int,
                   help="column shards per column-wise table (default: world size)")
    p.add_argument("--zero-stage", dest="zero_stage", type=int, help="DeepSpeed ZeRO stage 0-3 for the dense part")
    p.add_argument("--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON (its ZeRO stage and offload settings win; a path or configs/deepspeed/<name>)")
    p.add_argument("--dense-dtype", dest="dense_dtype", help="bf16 | fp32 (default: bf16 if train.bf16 else fp32)")
    p.add_argument("--reserve", type=float, help="activation/runtime reserve per rank in GiB (default 2)")
    p.add_argument("--headroom", type=float, help="fraction of device memory the plan may use (default 0.9)")
    p.add_argument("--balance", default="group", help="table-wise greedy load: group (as the sharder: one "
                   "(memory, level) collection after another, load carried over) | global (all tables sorted together)")
    p.add_argument("--dense-params", dest="dense_params", type=int,
                   help="dense parameter count (skips building the model on the meta device, and any backbone "
                   "path / config_file)")
    p.add_argument("--item-emb-dim", dest="item_emb_dim", type=int, default=384,
                   help="item embedding / codebook vector width (default 384, all-MiniLM-L6-v2)")
    p.add_argument("--num-items", dest="num_items", type=int, default=0,
                   help="catalog size: its item embeddings are a replicated buffer on every rank")
    p.add_argument("--tables", action="store_true", help="also list every table's sharding and ranks")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _choice(flag: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise UserError(f"{flag}: {value!r}; allowed values: {', '.join(allowed)}")


def load_plan_configs(args: argparse.Namespace):
    """(RunConfig, ParallelConfig) from --config plus flag overrides, each bad value one line."""
    from comeir_dist.cli import _overrides, _set_path
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    _choice("--sharding", args.sharding, SHARDINGS)
    _choice("--dense-dtype", args.dense_dtype, DENSE_DTYPES)
    _choice("--device", args.device, DEVICES)
    _choice("--balance", args.balance, ("group", "global"))
    for flag, v in (("--dense-params", args.dense_params), ("--num-items", args.num_items)):
        if v is not None and v < 0:
            raise UserError(f"{flag}: {v}; must be >= 0")
    if args.item_emb_dim < 1:
        raise UserError(f"--item-emb-dim: {args.item_emb_dim}; must be >= 1")
    source = args.config or "flags"
    data = load_yaml(args.config) if args.config else {}
    for key, value in _overrides(args, ENGRAM_FLAGS).items():
        _set_path(data, key, value)
    for key, value in _overrides(args, PARALLEL_FLAGS).items():
        _set_path(data, f"parallel.{key}", value)
    pdata = data.get("parallel") or {}
    if "parallel" not in RunConfig.model_fields:
        data.pop("parallel", None)

    pcfg = parse_section(_Sections, {"parallel": pdata}, source=source).parallel
    cfg = parse_section(RunConfig, data, source=source)
    return cfg, pcfg


def run_plan(args: argparse.Namespace):
    from comeir_dist.parallel.activation_plan import run_activations
    from comeir_dist.parallel.memory_plan import DenseCount, count_dense_params, plan_memory

    cfg, pcfg = load_plan_configs(args)
    device = args.device or getattr(pcfg, "device", None) or cfg.device
    dense_dtype = args.dense_dtype or ("bf16" if cfg.train.bf16 else "fp32")
    if args.dense_params is not None:
        L, C = cfg.engram.levels, cfg.engram.codebook_size
        buffers = args.num_items * (args.item_emb_dim * 4 + L * 8) + L * C * args.item_emb_dim * 4
        dense = DenseCount(args.dense_params, None, buffers, source="--dense-params")
    else:
        dense = count_dense_params(cfg, item_emb_dim=args.item_emb_dim, num_items=args.num_items)
    engram = cfg.engram if cfg.model.variant == "comeir" else None
    acts = run_activations(cfg, int(getattr(pcfg, "world_size", 1)), args.num_items or 0)
    return plan_memory(engram, dense, pcfg, device=device, dense_dtype=dense_dtype, balance=args.balance,
                       activations=acts)


def add_plan_command(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import command

    p = sub.add_parser("plan", help="per-rank memory plan: Engram shards + Adagrad, dense ZeRO share, fit check")
    _add_flags(p)

    @command("plan")
    def _plan(args) -> int:
        from comeir_dist.parallel.memory_plan import format_plan

        plan = run_plan(args)
        print(plan.to_json() if args.json else format_plan(plan, show_tables=args.tables))
        return 0 if plan.fits else 1
