#!/usr/bin/env python
"""Verify training checkpoints before trusting (resuming from, exporting, copying) them.

    python tools/verify_checkpoint.py RUN/checkpoints/step-N     # one step checkpoint
    python tools/verify_checkpoint.py RUN/best                   # the best-model checkpoint
    python tools/verify_checkpoint.py RUN [--json]               # every step-N + best/, newest intact step

Checks with the product's own code (nothing is re-implemented, nothing is unpickled):

* step checkpoints (``comeir_dist.train.checkpoint.verify_step``): the ``COMMITTED`` marker, ``checksums.json``,
  every listed file's size and sha256, the files ``state.json`` requires (every rank's dense part and RNG state,
  the table metadata) and the checkpoint format;
* ``best/`` (``comeir_dist.train.checkpoint_simple``): ``COMMITTED`` and the checksums of dense/tables/meta.

Prints each checkpoint's manifest (step, world size, SID fingerprint, file count and sizes). Exit 0: everything
checked is intact; 1: something is damaged (one line per damaged checkpoint on stderr naming the file), or a run
dir has no committed checkpoint; 2: bad input (one line).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import human_bytes, run_tool  # noqa: E402

PROG = "verify_checkpoint"
_STEP_RE = re.compile(r"^step-(\d+)$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Verify the completeness (COMMITTED marker) and sha256 "
                                "checksums of comeir checkpoints and print their manifests.")
    p.add_argument("path", help="RUN/checkpoints/step-N, RUN/best, or a run dir RUN (verifies every step-N and best/, "
                                "reports the newest intact step)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


# ---- one checkpoint ------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _sizes(d: Path) -> tuple[dict, bool]:
    """({relative file: bytes}, listed): from checksums.json when readable, else the files on disk."""
    from comeir_dist.train import checkpoint_integrity as integrity

    try:
        listed = integrity.read_checksums(d)
    except ValueError:
        listed = None
    if listed is not None:
        return {rel: int(info["bytes"]) for rel, info in listed.items()}, True
    files = {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    return files, False


def _parts(files: dict) -> dict:
    """Bytes per top-level part (tables, dense, rng, state.json, ...)."""
    out: dict = {}
    for rel, n in files.items():
        key = rel.split("/")[0]
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def step_manifest(d: Path) -> dict:
    from comeir_dist.train.checkpoint_dirs import COMMIT

    state = _read_json(d / "state.json")
    state = state if isinstance(state, dict) else {}
    files, listed = _sizes(d)
    loop = state.get("loop") if isinstance(state.get("loop"), dict) else {}
    m = _STEP_RE.match(d.name)
    commit_text = (d / COMMIT).read_text().strip() if (d / COMMIT).is_file() else None
    return {
        "step": state.get("step", int(m.group(1)) if m else None),
        "format": state.get("format"),
        "committed_step": commit_text,
        "world_size": state.get("world_size"),
        "dense_parts": state.get("dense_parts"),
        "zero_stage": state.get("zero_stage"),
        "bf16": state.get("bf16"),
        "variant": state.get("variant"),
        "sid_fingerprint": state.get("sid_fingerprint"),
        "optimizer_step": state.get("optimizer_step"),
        "sampler": state.get("sampler"),
        "best_valid_ndcg@10": loop.get("best"),
        "best_step": loop.get("best_step"),
        "stop_reason": loop.get("stop_reason"),
        "table_groups": sorted(state["table_layout"]) if isinstance(state.get("table_layout"), dict) else None,
        "file_count": len(files),
        "total_bytes": sum(files.values()),
        "bytes_by_part": _parts(files),
        "files_listed_in_checksums": listed,
        "files": files,
    }


def best_manifest(d: Path) -> dict:
    meta = _read_json(d / "meta.json")
    meta = meta if isinstance(meta, dict) else {}
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    files, listed = _sizes(d)
    return {
        "step": meta.get("step"),
        "variant": meta.get("variant") or (cfg.get("model") or {}).get("variant"),
        "sid_fingerprint": meta.get("sid_fingerprint"),
        "sid_method": cfg.get("sid_method"),
        "metrics": meta.get("metrics"),
        "world_size": (cfg.get("parallel") or {}).get("world_size"),
        "file_count": len(files),
        "total_bytes": sum(files.values()),
        "bytes_by_part": _parts(files),
        "files_listed_in_checksums": listed,
        "files": files,
    }


def check_step(d: Path) -> dict:
    """Verify one ``step-N`` dir with the product's :func:`verify_step` (commit marker first)."""
    from comeir_dist.train import checkpoint as ckpt
    from comeir_dist.train.checkpoint_dirs import COMMIT

    if not (d / COMMIT).is_file():
        problem = f"{COMMIT}: missing (not committed: the write was interrupted; resume ignores this step)"
    else:
        problem = ckpt.verify_step(d)
        state = _read_json(d / "state.json")
        fmt = state.get("format") if isinstance(state, dict) else None
        if problem and problem.startswith("checksums.json: missing") and fmt is not None and fmt != ckpt.FORMAT:
            problem = (f"checksums.json: missing (checkpoint format {fmt}, written by an older comeir-dist with "
                       f"pickled metadata: not verifiable, refused by resume)")
    return {"path": str(d), "kind": "step", "intact": problem is None, "problem": problem,
            "manifest": step_manifest(d)}


def check_best(d: Path) -> dict:
    """Verify a ``best/`` dir (checkpoint_simple layout) with the product's checksum code."""
    from comeir_dist.train import checkpoint_integrity as integrity
    from comeir_dist.train.checkpoint_simple import COMMIT

    manifest = best_manifest(d)
    if not (d / COMMIT).is_file():
        problem = f"{COMMIT}: missing (not committed)"
    elif not (d / integrity.CHECKSUMS).is_file():
        problem = f"{integrity.CHECKSUMS}: missing (written before checksums: cannot be verified)"
    else:
        required = ["dense.pt", "meta.json"] + (["tables.pt"] if (d / "tables.pt").exists() else [])
        problem = integrity.verify(d, required=required)
    return {"path": str(d), "kind": "best", "intact": problem is None, "problem": problem, "manifest": manifest}


# ---- what was given --------------------------------------------------------------------------------------------
def classify(path: Path) -> tuple[str, Path]:
    """('step' | 'best' | 'run', dir); a one-line UserError for anything else."""
    from comeir_dist.errors import UserError

    if not path.exists():
        raise UserError(f"{path}: not found")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; give RUN/checkpoints/step-N, RUN/best or a run dir")
    if _STEP_RE.match(path.name) or (path / "state.json").is_file():
        return "step", path
    if (path / "meta.json").is_file() or path.name == "best":
        return "best", path
    if path.name == "checkpoints" and not (path / "checkpoints").exists():
        return "run", path.parent
    if (path / "checkpoints").is_dir() or (path / "best").is_dir():
        return "run", path
    raise UserError(f"{path}: not a checkpoint (RUN/checkpoints/step-N, RUN/best) nor a run dir (no checkpoints/ or "
                    f"best/ inside)")


def verify_path(path: str | Path) -> dict:
    """The full report of ``path`` (see the module docstring); ``report["ok"]`` decides the exit code."""
    from comeir_dist.train.checkpoint_dirs import step_dirs

    kind, d = classify(Path(path))
    if kind == "step":
        results = [check_step(d)]
    elif kind == "best":
        results = [check_best(d)]
    else:
        results = [check_step(sd) for _, sd, _ in step_dirs(d)]
        if (d / "best").is_dir():
            results.append(check_best(d / "best"))
    steps = [r for r in results if r["kind"] == "step"]
    intact_steps = [r for r in steps if r["intact"]]
    newest = max(intact_steps, key=lambda r: r["manifest"]["step"] or -1)["path"] if intact_steps else None
    # an interrupted (uncommitted) step inside a run dir is normal after a crash: reported, not a failure
    damaged = [r for r in results if not r["intact"] and not (kind == "run" and r["kind"] == "step"
                                                              and r["problem"].startswith("COMMITTED: missing"))]
    problem = None
    if kind == "run" and not damaged and not any(r["intact"] for r in results):
        problem = f"{d}: no committed checkpoint (checkpoints/step-N with COMMITTED, or best/)"
    return {"path": str(path), "kind": kind, "ok": not damaged and problem is None,
            "newest_intact_step": newest, "checkpoints": results, "damaged": [r["path"] for r in damaged],
            "problem": problem}


def format_report(rep: dict) -> str:
    lines = []
    for r in rep["checkpoints"]:
        m = r["manifest"]
        partial = not r["intact"] and r["problem"].startswith("COMMITTED: missing")
        status = "intact" if r["intact"] else ("NOT COMMITTED" if partial else "DAMAGED") + f": {r['problem']}"
        lines.append(f"{r['path']}: {status}")
        if r["kind"] == "step" and m["format"] is None:
            lines.append("  no readable state.json")
        elif r["kind"] == "step":
            lines.append(f"  step {m['step']} (format {m['format']}), world size {m['world_size']} (dense parts "
                         f"{m['dense_parts']}, ZeRO stage {m['zero_stage']}), variant {m['variant']}, "
                         f"optimizer step {m['optimizer_step']}")
        else:
            metric = (m.get("metrics") or {}).get("item/ndcg@10") if isinstance(m.get("metrics"), dict) else None
            lines.append(f"  best model at step {m['step']}, variant {m['variant']}, SID method {m['sid_method']}"
                         + (f", valid ndcg@10 {metric:.4f}" if isinstance(metric, (int, float)) else ""))
        lines.append(f"  SID fingerprint {m['sid_fingerprint']}")
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in m["bytes_by_part"].items())
        src = "" if m["files_listed_in_checksums"] else " (on disk; no readable checksums.json)"
        lines.append(f"  {m['file_count']} files{src}, {human_bytes(m['total_bytes'])}"
                     + (f": {parts}" if parts else ""))
    if rep["kind"] == "run":
        if not rep["checkpoints"]:
            lines.append(f"{rep['path']}: no checkpoints")
        lines.append(f"newest intact step checkpoint: {rep['newest_intact_step'] or 'none'}")
    return "\n".join(lines)


def run(args) -> int:
    rep = verify_path(args.path)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    for r in rep["checkpoints"]:
        if r["path"] in rep["damaged"]:
            print(f"{PROG}: error: {r['path']}: {r['problem']}", file=sys.stderr)
    if rep["problem"]:
        print(f"{PROG}: error: {rep['problem']}", file=sys.stderr)
    return 0 if rep["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(PROG, lambda: run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
