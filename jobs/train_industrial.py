"""Train ComeIR as a Ray Train job: TorchRec-sharded Engram tables + DeepSpeed ZeRO dense part, fault tolerant.

Locally (starts its own Ray; bundled data prepared by `make demo` or jobs/preprocess.py):
    python jobs/train_industrial.py --config configs/industrial_cpu.yaml
Submitted to a running head (paths must be absolute and readable from every node):
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_industrial.py \\
        --config configs/industrial.yaml --dataset /shared/data/industrial --out /shared/runs/industrial \\
        --storage-path /shared/ray_results --num-workers 16 --gpus-per-worker 1
The worker function is `comeir_dist.train.loop.train`, the loop of `comeir train`. Exit 0 on success,
2 with one line for bad input, 1 when the Ray Train run failed (after `ray.max_failures` restarts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from comeir_dist.entrypoint import run_entry  # noqa: E402

FLAGS = {"dataset": "dataset", "out": "out", "max_steps": "train.max_steps", "max_minutes": "train.max_minutes",
         "batch_size": "train.batch_size", "s_t": "engram.s_t", "s_s": "engram.s_s", "seed": "seed",
         "num_workers": "parallel.world_size", "checkpoint_every": "parallel.checkpoint_every",
         "zero_stage": "parallel.zero_stage", "deepspeed_config": "parallel.deepspeed_config",
         "cpus_per_worker": "ray.cpus_per_worker", "gpus_per_worker": "ray.gpus_per_worker",
         "storage_path": "ray.storage_path", "max_failures": "ray.max_failures", "name": "ray.name",
         "address": "ray.address", "local_num_cpus": "ray.local_num_cpus", "table_dtype": "engram.table_dtype"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run config YAML (configs/industrial.yaml, configs/industrial_cpu.yaml)")
    ap.add_argument("--dataset", help="prepared dataset dir with SIDs (absolute under `ray job submit`)")
    ap.add_argument("--out", help="run dir: step checkpoints, logs, summary (shared storage on a multi-node cluster)")
    ap.add_argument("--overwrite", action="store_true",
                    help="accept an --out dir holding content comeir did not write: nothing there is deleted, "
                         "same-named files are replaced")
    ap.add_argument("--max-steps", dest="max_steps", type=int)
    ap.add_argument("--max-minutes", dest="max_minutes", type=float)
    ap.add_argument("--batch-size", dest="batch_size", type=int, help="GLOBAL batch (per device x workers)")
    ap.add_argument("--s-t", dest="s_t", type=float, help="inter-memory scale s_T")
    ap.add_argument("--s-s", dest="s_s", type=float, help="intra-memory scale s_S")
    ap.add_argument("--table-dtype", dest="table_dtype", help="fp32 | fp16 Engram table storage")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers = ranks")
    ap.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float)
    ap.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float)
    ap.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    ap.add_argument("--zero-stage", dest="zero_stage", type=int)
    ap.add_argument("--deepspeed-config", dest="deepspeed_config")
    ap.add_argument("--storage-path", dest="storage_path", help="Ray Train storage (NFS path or s3://...)")
    ap.add_argument("--max-failures", dest="max_failures", type=int, help="worker-group restarts (-1 = unlimited)")
    ap.add_argument("--name", help="Ray Train run name (default: basename of --out + hash of its absolute path)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--local-num-cpus", dest="local_num_cpus", type=int, help="CPUs of a local Ray instance")
    return ap.parse_args(argv)


def load_config(args: argparse.Namespace):
    from comeir_dist.cli import _overrides, _set_path
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    data = load_yaml(args.config)
    for key, value in _overrides(args, FLAGS).items():
        _set_path(data, key, value)
    return parse_section(RunConfig, data, source=args.config)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_entry("train_industrial", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from comeir_dist.orchestration.ray_train import run_ray_train

    try:
        res = run_ray_train(load_config(args), overwrite=args.overwrite)
    except RuntimeError as exc:  # the run failed (Ray Train gave up after max_failures): one line, exit 1
        print(f"train_industrial: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    s = res["summary"] or {}
    restarts = sum(1 for a in res["attempts"] if a.get("resume_from") and a.get("rank") == 0)
    print(json.dumps({"run_dir": res["run_dir"], "steps": s.get("steps"), "stop_reason": s.get("stop_reason"),
                      "best_valid_ndcg@10": s.get("best_valid_ndcg@10"), "test": s.get("test"),
                      "world_size": s.get("world_size"), "restarts_resumed": restarts,
                      "ray_checkpoint": res["ray_checkpoint"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
