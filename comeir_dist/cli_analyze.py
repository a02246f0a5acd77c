"""`comeir analyze ...`: analyses of a prepared dataset and finished runs.

``comeir analyze memgen --dataset DIR --out DIR [--runs RUN ...]``: memorization / generalization labels of
every validation and test instance (Ding et al., "How Well Does Generative Recommendation Generalize?") and
the runs' Hit/NDCG@{5,10} per category with bootstrap CIs; see :mod:`comeir_dist.analysis.memgen_report`.
Exit status 0, or 2 with one line on a bad flag, a missing dataset / SIDs, or a run without per-user results.

``comeir analyze ensemble --gr RUN_OR_TOPN --id RUN_OR_TOPN [--top 50] --out DIR``: fixed-weight and adaptive
(``alpha = sigmoid(k (MSP - tau))``) fusion of a SID model with SASRec from their ``comeir evaluate --save-top``
files, parameters chosen on validation, reported on test; see :mod:`comeir_dist.analysis.ensemble`.

``comeir analyze paired --runs A B [--dataset DIR] [--split test] [--metric item/ndcg@10]``: A minus B over the
users both answered, with the paired standard error (:mod:`comeir_dist.analysis.paired`; ``NAME=P1,P2,P3``
averages each user's value over several runs first); a run named
``popular`` is the most-popular baseline of ``--dataset``.

``comeir analyze pairwise --experiment DIR [--labels A,B,...] [--dataset DIR] [--out FILE]``: every pair of an
experiment's variants the same way, each variant's seeds averaged per row; see :mod:`comeir_dist.analysis.pairwise`.

``comeir analyze keys --config FILE [--dataset DIR] [--set KEY=VALUE ...] [--out FILE.json]``: occupancy and
private-row share of every Engram table on the dataset's training sequences; see
:mod:`comeir_dist.analysis.key_tables`.

``comeir analyze positions --dataset DIR --runs [NAME=]RUN[,RUN...] ... [--no-test] [--out FILE.json]``: a metric by
how far each validation target sits from the test item, for the runs and the most-popular baseline; see
:mod:`comeir_dist.analysis.positions`.

``comeir analyze merge --checkpoint RUN/best [--split test] [--users 2048] [--out FILE.json]``: the Eq. 7 merge gate
and the encoder's memory term against s^0, per level; see :mod:`comeir_dist.analysis.merge_gate`.
"""
from __future__ import annotations

import argparse


def add_memgen_flags(p: argparse.ArgumentParser) -> None:
    from comeir_dist.cli import add_overwrite_flag

    p.add_argument("--dataset", required=True, help="prepared dataset dir (comeir prepare)")
    p.add_argument("--out", required=True, help="output dir: labels.parquet, summary.json, summary.md, summary.png")
    p.add_argument("--max-hop", dest="max_hop", type=int, default=4, help="largest hop H of the rule sets (default 4)")
    p.add_argument("--sid-method", dest="sid_method", default="rqkmeans",
                   help="SIDs (DIR/sids/<method>) of the token-level labels; 'none' skips them (default rqkmeans)")
    p.add_argument("--runs", nargs="*", default=[], metavar="[NAME=]PATH",
                   help="runs to break down by category: a run dir with test.users.parquet (comeir train / "
                        "experiment / evaluate --out), a *.users.parquet file, an experiment result file "
                        "(EXP/results/LABEL-seedN.json) or an experiment dir (all its runs with per-user results)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the markdown tables")
    add_overwrite_flag(p)


def run_memgen_cli(args: argparse.Namespace) -> int:
    import json

    from comeir_dist.analysis.memgen_report import brief, run_memgen

    res = run_memgen(args.dataset, args.out, max_hop=args.max_hop, sid_method=args.sid_method, runs=args.runs,
                     resamples=args.bootstrap, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(res.summary, indent=2) if args.json else res.markdown)
    print(brief(res))
    return 0


def add_ensemble_flags(p: argparse.ArgumentParser) -> None:
    from comeir_dist.cli import add_overwrite_flag

    where = ("a dir holding valid.top.parquet and test.top.parquet -- the run dir or its top/ (comeir evaluate "
             "--split valid|test --out RUN/top/<split>.json --save-top N) -- or one of those files")
    p.add_argument("--gr", required=True, metavar="RUN_OR_TOPN", help="the generative (SID) model: " + where)
    p.add_argument("--id", required=True, metavar="RUN_OR_TOPN", help="the SASRec item-ID model: " + where)
    p.add_argument("--top", type=int, default=50, help="top-N of each model fused per instance (default 50)")
    p.add_argument("--out", required=True, help="output dir: ensemble.json, ensemble.md")
    p.add_argument("--k-grid", dest="k_grid", default=None,
                   help="comma-separated slopes k of the adaptive weight (default 1,2,5,10,20,50,100)")
    p.add_argument("--json", action="store_true", help="print ensemble.json instead of the markdown")
    add_overwrite_flag(p)


def run_ensemble_cli(args: argparse.Namespace) -> int:
    import json

    from comeir_dist.analysis.ensemble import K_GRID, run_ensemble
    from comeir_dist.errors import UserError

    k_grid = K_GRID
    if args.k_grid is not None:
        try:
            k_grid = tuple(float(x) for x in args.k_grid.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--k-grid: {args.k_grid!r}; comma-separated numbers, e.g. 1,5,20") from None
    rep = run_ensemble(args.gr, args.id, args.out, top=args.top, k_grid=k_grid, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        from pathlib import Path

        print((Path(args.out) / "ensemble.md").read_text())
    return 0




def add_paired_flags(p: argparse.ArgumentParser) -> None:
    from comeir_dist.analysis.paired import METRIC, POPULAR
    from comeir_dist.analysis.runs import METRICS

    p.add_argument("--runs", nargs=2, required=True, metavar="[NAME=]PATH",
                   help="the two runs, A then B: run dirs with <split>.users.parquet, *.users.parquet files or "
                        f"experiment result files; '{POPULAR}' = the most-popular baseline of --dataset; "
                        "NAME=PATH,PATH,... = each user's value averaged over several runs (the seeds of a variant)")
    p.add_argument("--dataset", help=f"prepared dataset dir (needed for '{POPULAR}')")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="default test")
    p.add_argument("--metric", choices=METRICS, default=METRIC, help=f"default {METRIC}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _paired_side(spec: str, args: argparse.Namespace) -> tuple:
    """``(name, user_idx, values)`` of one side of ``comeir analyze paired``."""
    from comeir_dist.analysis.paired import POPULAR, seed_average, users_file_values
    from comeir_dist.analysis.runs import resolve_runs, split_name
    from comeir_dist.errors import UserError

    if spec == POPULAR:
        from comeir_dist.data.dataset import check_dataset_dir
        from comeir_dist.eval.popular import popular_per_user

        if not args.dataset:
            raise UserError(f"--runs {POPULAR}: the baseline needs --dataset DIR (the runs' dataset)")
        check_dataset_dir(args.dataset)
        return (POPULAR, *popular_per_user(args.dataset, args.split, args.metric))
    name, paths = split_name(spec)
    sides = []
    for path in paths.split(","):
        run = resolve_runs([path])[0]
        if args.split not in run.files:
            raise UserError(f"--runs {path}: no {args.split} per-user results (has {', '.join(sorted(run.files))})")
        sides.append((run.name, *users_file_values(run.files[args.split], args.metric)))
    if len(sides) == 1:
        return (name or sides[0][0], *sides[0][1:])
    return (name or "+".join(s[0] for s in sides), *seed_average(sides))


def run_paired_cli(args: argparse.Namespace) -> int:
    import json

    from comeir_dist.analysis.paired import align, paired_difference

    (na, ua, va), (nb, ub, vb) = (_paired_side(s, args) for s in args.runs)
    users, a, b = align(ua, va, ub, vb, na, nb)
    res = paired_difference(a, b, args.metric, users)
    if args.json:
        print(json.dumps({"a": na, "b": nb, "split": args.split, **res.as_dict()}, indent=2))
    else:
        rows = f" ({res.rows} rows, s.e. clustered by user)" if res.rows else ""
        print(f"{args.split} {res.metric} over {res.users} users{rows}: {na} {res.mean_a:.4f}, {nb} {res.mean_b:.4f}; "
              f"{na} - {nb} = {res.diff:+.4f} ± {res.se:.4f} (paired s.e., {res.z:+.1f} s.e.); better for "
              f"{res.a_better} / {res.b_better} {'rows' if res.rows else 'users'}")
    return 0


def add_pairwise_flags(p: argparse.ArgumentParser) -> None:
    from comeir_dist.analysis.paired import METRIC
    from comeir_dist.analysis.runs import METRICS

    p.add_argument("--experiment", required=True, help="a `comeir experiment` output dir (results/*.json and the "
                   "run dirs with their per-user results)")
    p.add_argument("--labels", help="comma-separated variants to compare (default: every label with per-user results)")
    p.add_argument("--dataset", help="prepared dataset dir: adds the most-popular baseline as a variant")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="default test")
    p.add_argument("--metric", choices=METRICS, default=METRIC, help=f"default {METRIC}")
    p.add_argument("--out", help="also write FILE.json and FILE.md")


def run_pairwise_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from comeir_dist.analysis.pairwise import experiment_variants, format_pairwise, pairwise, popular_variant
    from comeir_dist.utils.atomic import write_json_and_markdown
    from comeir_dist.utils.output_guard import check_out_file

    if args.out:  # before any work
        check_out_file(args.out)
    labels = [lab.strip() for lab in args.labels.split(",") if lab.strip()] if args.labels else None
    variants = experiment_variants(Path(args.experiment), labels, args.split, args.metric)
    if args.dataset:
        variants.append(popular_variant(args.dataset, args.split, args.metric))
    pairs = pairwise(variants, args.metric)
    table = format_pairwise(pairs, args.split)
    print(table)
    if args.out:
        write_json_and_markdown(Path(args.out), {"experiment": args.experiment, "split": args.split,
                                                 "seeds": {v.label: v.seeds for v in variants}, "pairs": pairs},
                                table + "\n")
    return 0


def add_keys_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML of a comeir run (its engram section)")
    p.add_argument("--dataset", help="prepared dataset dir (default: the config's)")
    p.add_argument("--sid-method", dest="sid_method")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set engram.s_t=2; repeatable")
    p.add_argument("--out", help="also write FILE.json and FILE.md")


def run_keys_cli(args: argparse.Namespace) -> int:
    from comeir_dist.analysis.key_tables import format_key_report, run_key_report
    from comeir_dist.cli_model import load_run_config, parse_sets

    cfg = load_run_config(args, parse_sets(args.sets))
    rep = run_key_report(cfg, args.out)
    print(format_key_report(rep))
    return 0


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a ComeIR run's best/ checkpoint")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="histories to read (default test)")
    p.add_argument("--users", type=int, default=2048, help="first N histories of the split (default 2048; 0 = all)")
    p.add_argument("--dataset", help="prepared dataset dir (default: the checkpoint's)")
    p.add_argument("--out", help="also write FILE.json")


def run_merge_cli(args: argparse.Namespace) -> int:
    from comeir_dist.analysis.merge_gate import format_merge_stats, run_merge_stats
    from comeir_dist.errors import UserError

    if args.users < 0:
        raise UserError(f"--users: {args.users}; must be >= 0 (0 = all)")
    rows = run_merge_stats(args.checkpoint, args.split, args.users or None, args.dataset, args.out)
    print(format_merge_stats(rows, f"memory-conditioned merge (Eq. 7) of {args.checkpoint} on {args.split}"))
    return 0


def add_positions_flags(p: argparse.ArgumentParser) -> None:
    from comeir_dist.analysis.paired import METRIC
    from comeir_dist.analysis.runs import METRICS

    p.add_argument("--dataset", required=True, help="the runs' prepared dataset dir (its validation targets)")
    p.add_argument("--runs", nargs="+", default=[], metavar="[NAME=]PATH[,PATH...]",
                   help="run dirs with valid.users.parquet (from `comeir evaluate --split valid --out RUN/valid.json`) "
                        "and test.users.parquet, or those files; PATH,PATH,... = each row averaged over the runs")
    p.add_argument("--metric", choices=METRICS, default=METRIC, help=f"default {METRIC}")
    p.add_argument("--no-test", dest="with_test", action="store_false", help="validation positions only")
    p.add_argument("--out", help="also write FILE.json")


def run_positions_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from comeir_dist.analysis.positions import as_dicts, format_positions, run_positions
    from comeir_dist.data.dataset import check_dataset_dir
    from comeir_dist.utils.atomic import write_json
    from comeir_dist.utils.output_guard import check_out_file

    if args.out:
        check_out_file(Path(args.out))
    check_dataset_dir(args.dataset)
    table = run_positions(args.dataset, args.runs, args.metric, args.with_test)
    print(format_positions(table, args.metric))
    if args.out:
        write_json(Path(args.out), {"dataset": args.dataset, "metric": args.metric,
                                    "runs": {name: as_dicts(means) for name, means in table.items()}})
    return 0


def add_analyze_command(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import command

    p = sub.add_parser("analyze", help="analyses of a dataset and finished runs (memgen: memorization vs "
                       "generalization categories, per-category metrics)")
    asub = p.add_subparsers(dest="analyze_cmd", required=True)
    q = asub.add_parser("memgen", help="label valid/test instances as memorization / generalization (type, hop) "
                        "/ uncategorized plus token-level prefix memorization; per-category Hit/NDCG of runs")
    add_memgen_flags(q)
    q = asub.add_parser("ensemble", help="fuse a SID model with SASRec per instance (fixed weight and adaptive "
                        "sigmoid(k (MSP - tau))), chosen on validation NDCG@10, reported on test")
    add_ensemble_flags(q)
    q = asub.add_parser("paired", help="A minus B on the same users: mean per-user difference of a metric and its "
                        "paired standard error (is A better than B on these users?)")
    add_paired_flags(q)
    q = asub.add_parser("pairwise", help="every pair of an experiment's variants on the same users, each variant's "
                        "seeds averaged per row: difference, paired standard error, z")
    add_pairwise_flags(q)
    q = asub.add_parser("keys", help="how the training sequences fill the Engram tables: occupancy and the share "
                        "of rows only one user addresses, per (memory, level, order)")
    add_keys_flags(q)
    q = asub.add_parser("merge", help="how open ComeIR's merge gate (Eq. 7) is on real histories and how large the "
                        "encoder's memory term is against s^0, per level, from a trained checkpoint")
    add_merge_flags(q)
    q = asub.add_parser("positions", help="a metric by how far each validation target sits from the test item "
                        "(prepare --valid-targets K), for runs and the most-popular baseline")
    add_positions_flags(q)

    @command("analyze")
    def _analyze(args) -> int:
        if args.analyze_cmd == "memgen":
            return run_memgen_cli(args)
        if args.analyze_cmd == "ensemble":
            return run_ensemble_cli(args)
        if args.analyze_cmd == "paired":
            return run_paired_cli(args)
        if args.analyze_cmd == "pairwise":
            return run_pairwise_cli(args)
        if args.analyze_cmd == "keys":
            return run_keys_cli(args)
        if args.analyze_cmd == "merge":
            return run_merge_cli(args)
        if args.analyze_cmd == "positions":
            return run_positions_cli(args)
        raise AssertionError(args.analyze_cmd)
