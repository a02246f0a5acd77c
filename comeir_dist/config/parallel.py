"""Distributed-execution config: devices, process group, table sharding, DeepSpeed ZeRO, memory limits."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field

from comeir_dist.config.base import Section

ShardingType = Literal["table_wise", "row_wise", "column_wise"]


class ParallelConfig(Section):
    """How a run is spread over ranks. One process group serves TorchRec (tables) and DeepSpeed (dense)."""

    world_size: int = Field(1, ge=1, description="Number of training ranks (Ray Train workers / torchrun processes).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU.")
    sharding: Union[Literal["auto", "table_wise", "row_wise", "column_wise"], dict[str, ShardingType]] = Field(
        "auto", description="Engram table sharding: TorchRec planner ('auto'), one type for all tables, or {table: type}.")
    pipeline_lookups: bool = Field(
        True, description="Serve all Engram groups of a forward with one collective schedule (one stride all-reduce, "
        "every group's input exchange in flight before any group computes). False = one group after another "
        "(the round-2 path; same results, kept for A/B measurements).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage for the dense part.")
    deepspeed_config: Optional[str] = Field(None, description="configs/deepspeed/*.json; None = built from train/zero_stage.")
    device_memory_gib: Optional[float] = Field(None, gt=0, description="Memory per device for the plan check; None = detected.")
    reserve_gib: float = Field(2.0, ge=0, description="Activations/runtime reserve per rank in the memory plan.")
    headroom: float = Field(0.9, gt=0, le=1, description="Fraction of device memory the plan may use.")
    column_shards: Optional[int] = Field(
        None, ge=1, description="Column shards per column-wise table (None = world size). The fused row-wise Adagrad "
        "keeps one statistic per row AND column shard, so fixing this makes column-wise training identical on any "
        "number of ranks (shards are placed round-robin).")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="Write run/checkpoints/step-N (sharded tables, dense + optimizer, data position, RNG) "
        "every N steps and when training stops; None = no step checkpoints (only best/).")
    checkpoint_at_eval: Optional[bool] = Field(
        None, description="Also write run/checkpoints/step-N after every validation, so an interrupted run resumes from its "
        "last validation. None = on under `comeir experiment` (rerunning the same command continues an interrupted "
        "run), off for `comeir train`.")
    keep_checkpoints: int = Field(2, ge=1, description="Committed step checkpoints kept (older ones are deleted).")
    resume: Optional[bool] = Field(
        None, description="Continue from the newest committed run/checkpoints/step-N. None = yes if one exists.")
