"""`comeir recipe --dataset DIR --out FILE.yaml [--base CONFIG] [--history-cap N] [--set KEY=VALUE ...]`.

Writes an experiment config whose sizes and rates derive from the dataset's statistics
(:mod:`comeir_dist.config.recipe`: one rule per setting, each stated in the file's header), validated as a run
config before anything is written. Exit status 0, or 2 with one line on a bad flag, a dataset without SIDs, or an
``--out`` file the command did not write.
"""
from __future__ import annotations

import argparse

DEFAULT_BASE = "configs/experiment_cpu.yaml"


def add_recipe_command(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import add_overwrite_flag, command

    p = sub.add_parser("recipe", help="an experiment config derived from a prepared dataset's statistics "
                       "(history length, batch, learning rate, warm-up, validation schedule)")
    p.add_argument("--dataset", required=True, help="prepared dataset dir with SIDs (comeir prepare/embed/quantize)")
    p.add_argument("--out", required=True, help="the config file to write (YAML)")
    p.add_argument("--base", default=None, help=f"config whose other settings are kept (default: {DEFAULT_BASE} "
                   "when it exists, else the built-in defaults of the fair protocol)")
    p.add_argument("--history-cap", dest="history_cap", type=int, default=None,
                   help="largest max_history the recipe may choose (default 50)")
    p.add_argument("--experiment-out", dest="experiment_out", default=None,
                   help="the config's `out` (default runs/experiment/<dataset dir name>_recipe)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key after the derivation, e.g. --set model.variant=tm; repeatable")
    add_overwrite_flag(p, " (here: replace an --out file comeir recipe did not write)")

    @command("recipe")
    def _recipe(args) -> int:
        return run_recipe_cli(args)


def _base_config(path: str | None) -> tuple[dict, str]:
    from pathlib import Path

    from comeir_dist.config.base import load_yaml

    if path is not None:
        return load_yaml(path), path
    if Path(DEFAULT_BASE).is_file():
        return load_yaml(DEFAULT_BASE), DEFAULT_BASE
    return {}, "built-in defaults"


def run_recipe_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from comeir_dist.cli import _set_path
    from comeir_dist.cli_model import parse_sets
    from comeir_dist.config.base import parse_section
    from comeir_dist.config.recipe import (HISTORY_CAP, dataset_profile, derive_recipe, recipe_text,
                                           held_out_note, write_recipe)
    from comeir_dist.config.run import RunConfig

    base, base_name = _base_config(args.base)
    profile = dataset_profile(args.dataset)
    out_dir = args.experiment_out or f"runs/experiment/{Path(args.dataset).resolve().name}_recipe"
    cap = HISTORY_CAP if args.history_cap is None else args.history_cap
    cfg, why = derive_recipe(profile, base, history_cap=cap, out=out_dir)
    sets = parse_sets(args.sets)
    for key, value in sets.items():
        _set_path(cfg, key, value)
    why += [f"{key}: {value} -- --set" for key, value in sets.items()]
    parse_section(RunConfig, cfg, source=f"{args.out} (derived)")  # a bad --set fails here, before writing
    write_recipe(args.out, recipe_text(cfg, why, profile, base_name), overwrite=args.overwrite)
    print(f"wrote {args.out}")
    for line in why:
        print("  " + line)
    note = held_out_note(profile)
    if note:
        print("note: " + note)
    return 0
