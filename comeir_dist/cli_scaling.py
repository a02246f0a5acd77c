"""`comeir scaling`: Engram scaling sweep (paper Section 4.4 / App. C.2); also used by jobs/scaling_sweep.py.

The config is a run config (configs/*.yaml) with an optional ``scaling:`` section (``s_t``, ``s_s``,
``table_dtype``, ``out``, ``cpus_per_point``, ``x_axis``, ``metric``); flags override both.
Exit status: 0 when every point finished or was refused by its memory plan, 1 when a point failed (it is
retried on the next run), 2 on a bad flag or config value (one line).
"""
from __future__ import annotations

import argparse
import json

from comeir_dist.entrypoint import set_env_defaults
from comeir_dist.errors import UserError

TRAIN_FLAGS = {"dataset": "dataset", "max_steps": "train.max_steps", "max_minutes": "train.max_minutes",
               "seed": "seed", "device": "device"}
SCALING_FLAGS = {"dtype": "table_dtype", "out": "out", "cpus_per_point": "cpus_per_point", "x_axis": "x_axis",
                 "metric": "metric"}
EXECUTORS = ("ray", "inline")


def add_scaling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML with an optional `scaling:` section (configs/scaling_cpu.yaml)")
    p.add_argument("--s-t", dest="s_t", help="inter scales s_T, e.g. 0.5,1,2,4,8 or 0.5:4:0.5 (overrides scaling.s_t)")
    p.add_argument("--s-s", dest="s_s", help="intra scales s_S, e.g. 1.0 or 0.125,0.25,0.5,0.75,1 (scaling.s_s)")
    p.add_argument("--dtype", help="Engram table dtype of every point: fp16 | fp32 (default fp16)")
    p.add_argument("--out", help="sweep dir (default: scaling.out, else the run config's out)")
    p.add_argument("--overwrite", action="store_true",
                   help="accept a sweep dir holding content comeir did not write (or another kind of output): "
                        "nothing there is deleted, same-named files are replaced")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the grid with table sizes and the memory plan per point; train nothing")
    p.add_argument("--device-memory", dest="device_memory", type=float,
                   help="GiB per device for the plan check (default: parallel.device_memory_gib, else detected)")
    p.add_argument("--cpus-per-point", dest="cpus_per_point", type=float,
                   help="Ray CPUs per point (default: all CPUs, one point at a time)")
    p.add_argument("--executor", default="ray", help="ray (one Ray task per point, default) | inline (this process)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="train.max_steps of every point")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, help="train.max_minutes of every point")
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--x-axis", dest="x_axis", help="auto | inter | intra | total (plot/fit axis)")
    p.add_argument("--metric", help="metric to plot and fit (default item/hit@5)")
    p.add_argument("--json", action="store_true", help="print the summary (or with --dry-run the plans) as JSON")
    p.add_argument("--ray-address", dest="ray_address", default=None,
                   help="Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--ray-num-cpus", dest="ray_num_cpus", type=int, default=None, help="CPUs for a local Ray instance")


def load_scaling_configs(args: argparse.Namespace):
    """(RunConfig, ScalingSettings) from --config plus flags; each bad value is one line naming it."""
    from comeir_dist.cli import _overrides, _set_path
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.scaling.grid import X_AXES, ScalingSettings, parse_scales

    source = args.config or "flags"
    data = load_yaml(args.config) if args.config else {}
    sdata = data.pop("scaling", None) or {}
    if not isinstance(sdata, dict):
        raise UserError(f"{source}: key 'scaling' must be a mapping")
    if args.dtype is not None and args.dtype not in ("fp16", "fp32"):
        raise UserError(f"--dtype: {args.dtype!r}; allowed values: fp16, fp32")
    if args.x_axis is not None and args.x_axis not in X_AXES:
        raise UserError(f"--x-axis: {args.x_axis!r}; allowed values: {', '.join(X_AXES)}")
    if args.executor not in EXECUTORS:
        raise UserError(f"--executor: {args.executor!r}; allowed values: {', '.join(EXECUTORS)}")
    if args.cpus_per_point is not None and args.cpus_per_point <= 0:
        raise UserError(f"--cpus-per-point: {args.cpus_per_point:g}; must be > 0")
    if args.device_memory is not None and args.device_memory <= 0:
        raise UserError(f"--device-memory: {args.device_memory:g}; must be > 0")
    for key, value in _overrides(args, TRAIN_FLAGS).items():
        _set_path(data, key, value)
    cfg = parse_section(RunConfig, data, source=source)
    for name in ("s_t", "s_s"):
        flag = getattr(args, name, None)
        if flag is not None:
            sdata[name] = parse_scales(flag, f"--{name.replace('_', '-')}")
        elif name in sdata:
            sdata[name] = parse_scales(sdata[name], f"{source}: scaling.{name}")
    sdata.update(_overrides(args, SCALING_FLAGS))
    settings = parse_section(ScalingSettings, sdata, source=f"{source}: scaling")
    return cfg, settings


def run_scaling(args: argparse.Namespace) -> int:
    """The body of `comeir scaling` and jobs/scaling_sweep.py."""
    from comeir_dist.scaling.runner import InlineExecutor, RayExecutor
    from comeir_dist.scaling.sweep import format_grid, prepare_grid, run_sweep

    set_env_defaults()
    cfg, settings = load_scaling_configs(args)
    sweep, points = prepare_grid(cfg, settings, device_memory_gib=args.device_memory)
    if args.dry_run:
        if args.json:
            print(json.dumps({"sweep_dir": str(sweep), "points": [p.base_record() for p in points]}, indent=2))
        else:
            print(format_grid(points, sweep, settings))
        return 0
    if any(p.fits for p in points):  # fail fast (one line) on a missing dataset / SIDs / embeddings
        from comeir_dist.train.setup import load_inputs

        load_inputs(points[0].cfg)
    executor = InlineExecutor() if args.executor == "inline" else \
        RayExecutor(args.ray_address, args.ray_num_cpus, settings.cpus_per_point)
    res = run_sweep(cfg, settings, sweep_dir=sweep, points=points, executor=executor, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({k: v for k, v in res.summary.items() if k != "markdown"}, indent=2))
    else:
        print(res.summary["markdown"])
        print(json.dumps({"summary": str(sweep / "scaling.json"), "table": str(sweep / "scaling.md"),
                          "plot": str(sweep / "scaling.png"), "ran": res.ran, "failed": res.failed}))
    return 1 if res.failed else 0


def add_scaling_command(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import command

    p = sub.add_parser("scaling", help="Engram scaling sweep over s_T / s_S: train + evaluate each point "
                       "(Ray tasks), resumable; JSON + markdown + power-law plot")
    add_scaling_flags(p)

    @command("scaling")
    def _scaling(args) -> int:
        return run_scaling(args)
