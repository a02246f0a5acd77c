"""Model-side subcommands (train / evaluate / experiment) registered on the `comeir` parser."""
from __future__ import annotations

import argparse
import json

from comeir_dist.errors import UserError

TRAIN_FLAGS = {"dataset": "dataset", "sid_method": "sid_method", "variant": "model.variant", "seed": "seed",
               "out": "out", "max_steps": "train.max_steps", "max_minutes": "train.max_minutes",
               "batch_size": "train.batch_size", "s_t": "engram.s_t", "s_s": "engram.s_s", "device": "device",
               "decoding": "model.decoding"}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (configs/*.yaml)")
    p.add_argument("--dataset")
    p.add_argument("--sid-method", dest="sid_method")
    p.add_argument("--variant", help="comeir | flatten | tm | sasrec")
    p.add_argument("--decoding", choices=["normal", "nezha"], help="generation architecture (model.decoding)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--max-minutes", dest="max_minutes", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--s-t", dest="s_t", type=float)
    p.add_argument("--s-s", dest="s_s", type=float)
    p.add_argument("--device")
    p.add_argument("--ablations", help="comma-separated ablation switches")


def load_run_config(args, extra: dict | None = None):
    from comeir_dist.cli import _overrides, _set_path
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    data = load_yaml(args.config) if args.config else {}
    for key, value in _overrides(args, TRAIN_FLAGS).items():
        _set_path(data, key, value)
    if getattr(args, "ablations", None):
        _set_path(data, "model.ablations", [a.strip() for a in args.ablations.split(",") if a.strip()])
    for key, value in (extra or {}).items():
        _set_path(data, key, value)
    return parse_section(RunConfig, data, source=args.config or "flags")


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` flags as {dotted key: YAML-parsed value}."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. engram.s_t=8")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: value is not valid YAML") from None
    return out


def add_model_commands(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import add_overwrite_flag, command

    p = sub.add_parser("train", help="train a model (ComeIR or a baseline) on a prepared dataset with SIDs")
    _add_train_flags(p)
    add_overwrite_flag(p)

    p = sub.add_parser("evaluate", help="evaluation of a checkpoint (constrained beam search; sasrec: all items)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/train/comeir/best)")
    p.add_argument("--split", default="test", help="valid | test")
    p.add_argument("--out", help="metrics JSON path (per-user top items go to <out>.users.parquet)")
    p.add_argument("--dataset", help="override the dataset dir recorded in the checkpoint")
    p.add_argument("--beam-size", dest="beam_size", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--max-users", dest="max_users", type=int)
    p.add_argument("--workers", type=int, default=None, help="shard users over N Ray actors (exact merge)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=None)
    p.add_argument("--ray-address", dest="ray_address", default=None)
    p.add_argument("--ray-num-cpus", dest="ray_num_cpus", type=int, default=None)
    p.add_argument("--save-top", dest="save_top", type=int, default=None, metavar="N",
                   help="also write each user's top-N items with scores (beam log-probabilities; sasrec: logits and "
                        "the max softmax probability) to <out>.top.parquet; SID models search with a beam >= N")

    p = sub.add_parser("experiment", help="train + evaluate several variants x seeds; results table")
    _add_train_flags(p)
    add_overwrite_flag(p)
    p.add_argument("--variants", default=None,  # popular,flatten,tm,comeir; with --arms: flatten
                   help="comma-separated: comeir, flatten, tm, sasrec (item-ID baseline), popular "
                        "(most-popular-unseen baseline)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--label", help="table label of this (single) variant, e.g. comeir-st8 (default: the variant)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (YAML value), e.g. --set engram.s_t=8; repeatable")
    p.add_argument("--arms", help="comma-separated named settings, each its own label (train/experiment.py ARMS), "
                   "e.g. decor-base,decor-comp,decor-comp-bos,decor-pre,decor-pre-comp,decor-full; applied after "
                   "--set; --variants then defaults to flatten (comeir for the comeir-* arms: comeir-dot, comeir-dot-xfit, "
                   "comeir-decoder-noeng, comeir-dot-xfit-noeng)")

    @command("train")
    def _train(args) -> int:
        cfg = load_run_config(args)
        from comeir_dist.train.loop import train

        out = train(cfg, overwrite=args.overwrite)
        print(json.dumps({"run": str(out), **{k: v for k, v in json.loads((out / "summary.json").read_text()).items()
                                              if k != "validation"}}))
        return 0

    @command("evaluate")
    def _evaluate(args) -> int:
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers: {args.workers}; must be >= 1")
        if args.workers:
            from comeir_dist.eval.ray_eval import evaluate_with_ray

            rep = evaluate_with_ray(args.checkpoint, args.split, args.out, args.dataset, num_workers=args.workers,
                                    beam_size=args.beam_size, batch_size=args.batch_size,
                                    ray_address=args.ray_address, max_users=args.max_users,
                                    cpus_per_worker=args.cpus_per_worker or 1.0, ray_num_cpus=args.ray_num_cpus,
                                    save_top=args.save_top)
        else:
            from comeir_dist.eval.run_eval import run_evaluate

            rep = run_evaluate(args.checkpoint, args.split, args.out, args.dataset, args.beam_size, args.batch_size,
                               args.max_users, save_top=args.save_top)
        print(json.dumps(rep["metrics"], indent=1))
        return 0

    @command("experiment")
    def _experiment(args) -> int:
        from comeir_dist.config.run import VARIANTS
        from comeir_dist.train.experiment import POPULAR, arm_variant, run_experiment

        arms = [a.strip() for a in (args.arms or "").split(",") if a.strip()] or None
        default = "popular,flatten,tm,comeir"
        if arms:  # ComeIR arms run ComeIR, the others (DECOR's) flatten
            default = "comeir" if all(arm_variant(a) == "comeir" for a in arms) else "flatten"
        variants = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
        allowed = (*VARIANTS, POPULAR)
        bad = [v for v in variants if v not in allowed]
        if bad:
            raise UserError(f"--variants: unknown variant {bad[0]!r}; allowed values: {', '.join(allowed)}")
        if args.seeds < 1:
            raise UserError(f"--seeds: {args.seeds}; must be >= 1")
        cfg = load_run_config(args, parse_sets(args.sets))
        table = run_experiment(cfg, variants, args.seeds, label=args.label, overwrite=args.overwrite, arms=arms)
        print(table)
        return 0
