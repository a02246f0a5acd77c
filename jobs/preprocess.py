"""prepare -> embed -> quantize as one script; submit it with `ray job submit ... -- python jobs/preprocess.py`.

Locally: python jobs/preprocess.py --config configs/preprocess.yaml [--methods rqkmeans,rqvae]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from comeir_dist.config.base import load_yaml, parse_section  # noqa: E402
from comeir_dist.config.pipeline import PipelineConfig  # noqa: E402
from comeir_dist.entrypoint import run_entry  # noqa: E402
from comeir_dist.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/preprocess.yaml")
    ap.add_argument("--methods", default=None, help="comma-separated quantizers (default: quantize.method)")
    args = ap.parse_args(argv)
    return run_entry("preprocess", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = parse_section(PipelineConfig, load_yaml(args.config), source=args.config)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        if m not in ("rqkmeans", "rqvae"):
            raise UserError(f"--methods: unknown method {m!r}; allowed values: rqkmeans, rqvae")
    from comeir_dist.orchestration.pipeline import run_pipeline

    out = run_pipeline(cfg, methods)
    print(f"dataset ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
