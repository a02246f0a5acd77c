"""How `jobs/train_industrial.py` runs the training loop under Ray Train (TorchTrainer)."""
from __future__ import annotations

from typing import Optional

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
    name: Optional[str] = Field(None, description="Ray Train run name; None = the basename of `out`.")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts after a worker dies (-1 = unlimited); "
                              "each restart resumes from the last reported checkpoint.")
    local_num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray instance (None = all).")
