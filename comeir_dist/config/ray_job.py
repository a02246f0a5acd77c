"""How `jobs/train_industrial.py` runs the training loop under Ray Train (TorchTrainer)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from comeir_dist.config.base import Section


class RayTrainConfig(Section):
    """Ray Train worker group, storage and failure handling. The number of workers is ``parallel.world_size``."""

    address: Optional[str] = Field(None, description="Ray cluster to join; None = RAY_ADDRESS (set by `ray job "
                                   "submit`) or a local Ray instance started by the job.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per training worker (also its torch threads).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; > 0 = use_gpu (device cuda, NCCL).")
    storage_path: str = Field("runs/ray_results", description="Ray Train storage (experiment state and the reported "
                              "checkpoint manifests). Multi-node: a path every node can read (NFS) or s3://...")
    name: Optional[str] = Field(None, description="Ray Train run name under storage_path; None = the basename of "
                                "`out` plus a short hash of its absolute path (see default_run_name), so two runs "
                                "whose out dirs share a basename never share Ray state.")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts after a worker dies (-1 = unlimited); "
                              "each restart resumes from the last reported checkpoint.")
    local_num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray instance (None = all).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy of the worker group (ScalingConfig.placement_strategy): "
        "PACK = as few nodes as possible; STRICT_SPREAD = one worker per node (the job waits until there are "
        "parallel.world_size nodes with a worker's resources free); SPREAD / STRICT_PACK as in Ray.")

    def run_name(self, out: str) -> str:
        """``name`` if set, else :func:`default_run_name` of ``out``."""
        return self.name or default_run_name(out)


def default_run_name(out: str) -> str:
    """``<basename of out>-<8 hex digits of sha256(absolute out)>``: stable for one out path (a restarted job
    finds its Ray state again), different for two out paths with the same basename. URIs are hashed as given."""
    full = out if "://" in out else str(Path(out).expanduser().resolve())
    base = full.rstrip("/").rsplit("/", 1)[-1] or "run"
    return f"{base}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"
