"""The embedded default end to end (`make demo`): bundled data -> embed -> SIDs -> train ComeIR -> test metrics.

Everything runs on a local Ray instance (or RAY_ADDRESS) on CPU: embedding shards and quantizer restarts
are Ray tasks, training + evaluation run as one Ray task.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comeir_dist.config.base import load_yaml, parse_section  # noqa: E402
from comeir_dist.config.pipeline import PipelineConfig  # noqa: E402
from comeir_dist.config.run import RunConfig  # noqa: E402
from comeir_dist.entrypoint import configure_logging, run_entry  # noqa: E402


def train_and_evaluate(run_cfg_json: str) -> dict:
    """Ray task body: train, then evaluate the best checkpoint on the test split."""
    configure_logging()
    from comeir_dist.eval.run_eval import run_evaluate
    from comeir_dist.train.loop import train

    cfg = RunConfig.model_validate_json(run_cfg_json)
    out = train(cfg)
    return run_evaluate(str(out / "best"), "test", str(out / "test.json"))


def format_metrics(report: dict) -> str:
    m = report["metrics"]
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {v:.4f} |" for k, v in m.items() if k != "users"]
    rows.append(f"| users | {m['users']} |")
    rows.append(f"| eval ms/user (beam {report['beam_size']}) | {report['ms_per_user']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="configs/preprocess.yaml")
    ap.add_argument("--config", default="configs/comeir_cpu.yaml")
    ap.add_argument("--max-minutes", type=float, default=None, help="override train.max_minutes")
    args = ap.parse_args(argv)
    return run_entry("demo", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    pcfg = parse_section(PipelineConfig, load_yaml(args.pipeline), source=args.pipeline)
    data = load_yaml(args.config)
    if args.max_minutes:
        data.setdefault("train", {})["max_minutes"] = args.max_minutes
    rcfg = parse_section(RunConfig, data, source=args.config)
    import ray

    from comeir_dist.orchestration.pipeline import run_pipeline
    from comeir_dist.orchestration.ray_session import ray_session

    with ray_session(pcfg.ray_address, pcfg.ray_num_cpus):
        run_pipeline(pcfg, [rcfg.sid_method])
        # Ray pins a task's torch threads to its CPU count: give training the whole local node
        cpus = max(1, min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1))
        if rcfg.train.num_threads is None:
            rcfg.train.num_threads = cpus
        task = ray.remote(num_cpus=cpus)(train_and_evaluate)
        report = ray.get(task.remote(rcfg.model_dump_json()))
    print(f"\nComeIR on the bundled data, test split ({report['checkpoint']}):\n")
    print(format_metrics(report))
    print(json.dumps({"test_json": str(Path(rcfg.out) / "test.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
