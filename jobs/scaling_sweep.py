"""Engram scaling sweep as one script (the same function as `comeir scaling`); submit it with
`ray job submit --working-dir . -- python jobs/scaling_sweep.py --config configs/scaling_cpu.yaml`.

Locally: python jobs/scaling_sweep.py --config configs/scaling_cpu.yaml [--s-t 0.5,1,2,4,8] [--dry-run]
Every point is a Ray task on the cluster at RAY_ADDRESS (inside `ray job submit`) or a local Ray instance;
finished points are skipped on rerun.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from comeir_dist.cli_scaling import add_scaling_flags, run_scaling  # noqa: E402
from comeir_dist.entrypoint import run_entry  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scaling_flags(ap)
    args = ap.parse_args(argv)
    if args.config is None and Path("configs/scaling_cpu.yaml").is_file():
        args.config = "configs/scaling_cpu.yaml"
    return run_entry("scaling_sweep", lambda: run_scaling(args),
                     interrupted="interrupted (finished points are kept; rerun to continue)")


if __name__ == "__main__":
    sys.exit(main())
