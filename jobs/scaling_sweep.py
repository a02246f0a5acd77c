"""Engram scaling sweep as one script (the same function as `comeir scaling`); submit it with
`ray job submit --working-dir . -- python jobs/scaling_sweep.py --config configs/scaling_cpu.yaml`.

Locally: python jobs/scaling_sweep.py --config configs/scaling_cpu.yaml [--s-t 0.5,1,2,4,8] [--dry-run]
Every point is a Ray task on the cluster at RAY_ADDRESS (inside `ray job submit`) or a local Ray instance;
finished points are skipped on rerun.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from comeir_dist.cli_scaling import add_scaling_flags, run_scaling  # noqa: E402
from comeir_dist.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scaling_flags(ap)
    args = ap.parse_args(argv)
    if args.config is None and Path("configs/scaling_cpu.yaml").is_file():
        args.config = "configs/scaling_cpu.yaml"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("comeir_dist").setLevel(logging.INFO)
    try:
        return run_scaling(args)
    except UserError as exc:
        print(f"scaling_sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scaling_sweep: interrupted (finished points are kept; rerun to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
