"""Benchmark subcommands (`comeir bench latency`, `comeir bench lookup`, `comeir bench train`) registered on the
`comeir` parser."""
from __future__ import annotations

import argparse
from pathlib import Path

from comeir_dist.errors import UserError

DEFAULT_LATENCY_CONFIG = "configs/bench_latency_qwen3_0.6b.yaml"
LATENCY_FLAGS = {"batch_size": "batch_size", "beam_size": "beam_size", "reps": "reps", "warmup": "warmup",
                 "history": "history", "threads": "num_threads", "sparse": "sparse"}
LOOKUP_FLAGS = {"tables": "tables", "rows": "rows", "dim": "dim", "batch": "batch", "ids_per_bag": "ids_per_bag",
                "iters": "iters", "reps": "reps", "warmup": "warmup", "threads": "num_threads",
                "copy_mib": "copy_mib"}
TRAIN_FLAGS = {"steps": "steps", "warmup": "warmup", "threads": "threads", "profile_steps": "profile_steps",
               "repeats": "repeats"}
TRAIN_MODEL_FLAGS = {"s_t": "engram.s_t", "s_s": "engram.s_s"}  # overrides of the run config itself


def _config_data(path: str | None) -> dict:
    from comeir_dist.config.base import load_yaml

    return load_yaml(path) if path else {}


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    """``"100,200"`` -> (100, 200); anything else is a one-line user error naming the flag."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 100,200")
    return values


def latency_config(args):
    """LatencyBenchConfig from --config (default: the Qwen3-0.6B-shaped config if present, else the same
    values built in) with flag overrides, validated once."""
    from comeir_dist.cli import _overrides
    from comeir_dist.config.base import parse_section
    from comeir_dist.bench.latency import LatencyBenchConfig

    path = args.config
    if path is None and Path(DEFAULT_LATENCY_CONFIG).is_file():
        path = DEFAULT_LATENCY_CONFIG
    data = _config_data(path)
    data.update(_overrides(args, LATENCY_FLAGS))
    if args.variants:
        data["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if getattr(args, "decodings", None):
        data["decodings"] = [d.strip() for d in args.decodings.split(",") if d.strip()]
    return parse_section(LatencyBenchConfig, data, source=path or "flags")


def lookup_config(args):
    from comeir_dist.cli import _overrides
    from comeir_dist.config.base import parse_section
    from comeir_dist.bench.lookup import LookupBenchConfig

    data = _config_data(args.config)
    data.update(_overrides(args, LOOKUP_FLAGS))
    if args.paths:
        data["paths"] = [p.strip() for p in args.paths.split(",") if p.strip()]
    return parse_section(LookupBenchConfig, data, source=args.config or "flags")


def train_bench_config(args):
    """(RunConfig, BenchTrainSettings) from --config with flag overrides of its ``bench:`` section."""
    from comeir_dist.bench.train import load_bench_config
    from comeir_dist.cli import _overrides

    over = _overrides(args, TRAIN_FLAGS)
    if args.workers is not None:
        over["workers"] = list(_int_list("--workers", args.workers))
    if args.no_nn:
        over["compare_nn"] = False
    return load_bench_config(args.config, over, _overrides(args, TRAIN_MODEL_FLAGS))


def add_bench_commands(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import command

    p = sub.add_parser("bench", help="benchmarks: generation latency (paper Table 3), Engram lookup throughput, "
                                     "training throughput")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)

    q = bsub.add_parser("latency", help="per-batch generation latency of flatten / TM / ComeIR (Normal GR and NEZHA) "
                                       "on one shared backbone")
    q.add_argument("--config", help=f"benchmark YAML (default: {DEFAULT_LATENCY_CONFIG}, a Qwen3-0.6B-shaped backbone)")
    q.add_argument("--out", required=True, help="report JSON (a markdown table is written next to it as .md)")
    q.add_argument("--batch-size", dest="batch_size", type=int)
    q.add_argument("--beam-size", dest="beam_size", type=int)
    q.add_argument("--reps", type=int, help="timed repetitions per variant")
    q.add_argument("--warmup", type=int, help="untimed repetitions first")
    q.add_argument("--history", type=int, help="history items per user")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's; use 1 on a busy machine)")
    q.add_argument("--variants", help="comma-separated subset of flatten,tm,comeir")
    q.add_argument("--decodings", help="comma-separated subset of normal,nezha (generation architectures timed "
                                       "for every variant; default: the config's)")
    q.add_argument("--sparse", help="Engram tables: fused (DMP, as in evaluation) | unsharded")
    q.add_argument("--profile", action="store_true", help="add a torch.profiler op table per variant to the report")

    q = bsub.add_parser("lookup", help="Engram lookup throughput: fused DMP tables vs plain PyTorch, vs memory bandwidth")
    q.add_argument("--config", help="benchmark YAML (keys of comeir_dist.bench.lookup.LookupBenchConfig)")
    q.add_argument("--out", help="report JSON (a markdown table is written next to it as .md)")
    q.add_argument("--tables", type=int)
    q.add_argument("--rows", type=int)
    q.add_argument("--dim", type=int)
    q.add_argument("--batch", type=int, help="bags per table per iteration")
    q.add_argument("--ids-per-bag", dest="ids_per_bag", type=int)
    q.add_argument("--iters", type=int)
    q.add_argument("--reps", type=int)
    q.add_argument("--warmup", type=int)
    q.add_argument("--threads", type=int)
    q.add_argument("--copy-mib", dest="copy_mib", type=int, help="size of the bandwidth-roofline copy")
    q.add_argument("--paths", help="comma-separated subset of fused_dmp,fused_tbe,nn_dense_sgd,nn_dense_adagrad,"
                                   "nn_sparse_adagrad,nn_sparse_adam")

    q = bsub.add_parser("train", help="training-step throughput on 1 and N workers, time shares, fused tables vs "
                                      "nn.EmbeddingBag + dense Adagrad")
    q.add_argument("--config", required=True, help="run config YAML with an optional 'bench:' section "
                                                   "(e.g. configs/bench_train_cpu.yaml)")
    q.add_argument("--out", default=None, help="report JSON (default runs/bench/train.json); markdown next to it")
    q.add_argument("--workers", help="comma-separated world sizes (default 1,2)")
    q.add_argument("--steps", type=int, help="timed steps per run")
    q.add_argument("--warmup", type=int, help="untimed steps first")
    q.add_argument("--threads", type=int, help="torch threads per worker (threads x workers <= cores)")
    q.add_argument("--profile-steps", dest="profile_steps", type=int, help="profiled steps for the time shares")
    q.add_argument("--no-nn", dest="no_nn", action="store_true", help="skip the nn.EmbeddingBag baseline")
    q.add_argument("--repeats", type=int, help="measure everything N times (fresh processes, world sizes in "
                                               "alternating order); ratios as median [min, max]")
    q.add_argument("--s-t", dest="s_t", type=float, help="override engram.s_t of the benchmarked model")
    q.add_argument("--s-s", dest="s_s", type=float, help="override engram.s_s of the benchmarked model")

    q = bsub.add_parser("longseq", help="full-history attention vs preference memory (Rec2PM): serving bytes and "
                                       "latency per user as the history grows")
    q.add_argument("--out", required=True, help="report JSON (markdown table next to it as .md)")
    q.add_argument("--lengths", help="comma-separated history lengths (default 100,200,500,1000,2000)")
    q.add_argument("--reps", type=int, default=2)
    q.add_argument("--threads", type=int)
    q.add_argument("--qwen-lengths", help="history lengths timed at the Qwen3-0.6B shape (default 100,200; 'none' "
                                          "= storage only)")
    q.add_argument("--qwen-batch", type=int, help="users per request at the Qwen3-0.6B shape (default 4: the "
                                                  "beam-expanded KV cache of 32 users does not fit 24 GiB)")

    @command("bench")
    def _bench(args) -> int:
        if args.out:  # before the benchmark runs: a directory is not a report file name
            from comeir_dist.utils.output_guard import check_out_file

            check_out_file(args.out)
            check_out_file(Path(args.out).with_suffix(".md"))
        if args.bench_cmd == "latency":
            from comeir_dist.bench.latency import markdown_table, run_latency_bench

            rep = run_latency_bench(latency_config(args), args.out, profile=args.profile)
            print(markdown_table(rep))
            return 0
        if args.bench_cmd == "lookup":
            from comeir_dist.bench.lookup import markdown_table, run_lookup_bench

            rep = run_lookup_bench(lookup_config(args), args.out)
            print(markdown_table(rep))
            return 0
        if args.bench_cmd == "train":
            from comeir_dist.bench.train import DEFAULT_OUT, markdown_table, run_train_bench

            cfg, settings = train_bench_config(args)
            rep = run_train_bench(cfg, settings, args.out or DEFAULT_OUT, source=args.config)
            print(markdown_table(rep))
            return 0
        if args.bench_cmd == "longseq":
            from comeir_dist.bench.longseq import LENGTHS, QWEN_BATCH, QWEN_LENGTHS, markdown_table, run_longseq_bench

            lengths = _int_list("--lengths", args.lengths) if args.lengths else LENGTHS
            qwen = QWEN_LENGTHS if not args.qwen_lengths else (
                () if args.qwen_lengths == "none" else _int_list("--qwen-lengths", args.qwen_lengths))
            print(markdown_table(run_longseq_bench(args.out, lengths, reps=args.reps, threads=args.threads,
                                                   qwen_lengths=qwen, qwen_batch=args.qwen_batch or QWEN_BATCH)))
            return 0
        raise UserError(f"unknown bench command {args.bench_cmd!r}")  # pragma: no cover (argparse rejects it)

