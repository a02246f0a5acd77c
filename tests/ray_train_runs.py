"""Tiny 2-worker `jobs/train_industrial.py` runs for the Ray tests: their config, logged losses and the
checkpoints Ray Train's controller has registered."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.fixtures import tiny_run_config

EVERY = 5  # checkpoint interval (steps)


def job_config(ds: Path, root: Path, name: str, steps: int, **ray: object) -> Path:
    """``root/name.yaml``: 2 gloo workers, row-wise tables, ZeRO-2, a checkpoint every EVERY steps, one restart
    allowed; ``ray`` keys override the ``ray`` section. The run writes ``root/name/run`` and
    ``root/name/ray_results/run`` (fixed name: the tests read it)."""
    cfg = tiny_run_config(ds, root / name / "run", max_steps=steps, eval_every=steps, log_every=1, eval_users=16)
    data = cfg.model_dump(mode="json")
    data["device"] = "cpu"
    data["parallel"].update({"world_size": 2, "backend": "gloo", "sharding": "row_wise", "zero_stage": 2,
                             "checkpoint_every": EVERY, "keep_checkpoints": 3})
    data["ray"].update({"cpus_per_worker": 1, "storage_path": str(root / name / "ray_results"), "max_failures": 1,
                        "name": "run", **ray})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def logged_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every loss line of ``run/train_log.jsonl``, in log order."""
    recs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def registered_checkpoints(storage: Path) -> list[str]:
    """Checkpoint dirs Ray Train's controller has registered (its checkpoint manager snapshot)."""
    try:
        snap = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in snap.get("checkpoint_results", [])]
