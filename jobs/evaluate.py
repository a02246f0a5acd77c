"""Ray-sharded evaluation of a checkpoint; submit it with `ray job submit ... -- python jobs/evaluate.py ...`.

Locally (starts its own Ray instance):
    python jobs/evaluate.py --checkpoint runs/train/comeir_cpu/best --split test --out runs/eval/test.json --num-workers 2
On a cluster (paths must be readable from every node):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --checkpoint /shared/run/best --split test --out /shared/eval/test.json --num-workers 8
Writes the `comeir evaluate` metrics JSON and <out>.users.parquet (user_idx, target, top_items, P, G).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from comeir_dist.entrypoint import run_entry  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="committed checkpoint dir (e.g. runs/train/comeir/best)")
    ap.add_argument("--split", default="test", help="valid | test")
    ap.add_argument("--out", help="metrics JSON path (per-user results go to <out>.users.parquet)")
    ap.add_argument("--dataset", help="override the dataset dir recorded in the checkpoint")
    ap.add_argument("--num-workers", dest="num_workers", type=int, default=2, help="Ray evaluation actors")
    ap.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=1.0,
                    help="Ray num_cpus per actor (= its torch threads)")
    ap.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float, default=0.0,
                    help="Ray num_gpus per actor (0 = CPU)")
    ap.add_argument("--beam-size", dest="beam_size", type=int)
    ap.add_argument("--batch-size", dest="batch_size", type=int)
    ap.add_argument("--max-users", dest="max_users", type=int)
    ap.add_argument("--ray-address", dest="ray_address", default=None, help="default: RAY_ADDRESS or a local instance")
    ap.add_argument("--ray-num-cpus", dest="ray_num_cpus", type=int, default=None, help="CPUs of a local Ray instance")
    args = ap.parse_args(argv)
    return run_entry("evaluate", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from comeir_dist.eval.ray_eval import evaluate_with_ray

    rep = evaluate_with_ray(args.checkpoint, args.split, args.out, args.dataset, num_workers=args.num_workers,
                            beam_size=args.beam_size, batch_size=args.batch_size, ray_address=args.ray_address,
                            max_users=args.max_users, cpus_per_worker=args.cpus_per_worker,
                            ray_num_cpus=args.ray_num_cpus, gpus_per_worker=args.gpus_per_worker)
    print(json.dumps(rep["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
