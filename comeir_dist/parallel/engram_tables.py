"""Put a model's EngramTables under TorchRec DMP (fused row-wise Adagrad), one DMP per table group."""
from __future__ import annotations

import torch

from comeir_dist.engram.config import EngramConfig
from comeir_dist.parallel.sparse import load_sparse_state_dict, shard_engram_collection, sparse_state_dict


def shard_engram_tables(tables: torch.nn.Module, cfg: EngramConfig, device: str | torch.device = "cpu",
                        plan="auto", pg=None) -> torch.nn.Module:
    """Shard every group collection of ``tables`` (built on the meta device) with DMP and attach the result.

    One forward still issues one lookup per group; the fused kernel updates looked-up rows in backward.
    """
    sharded = {}
    for name, ebc in tables.groups.items():
        group_plan = plan if isinstance(plan, str) else {k: v for k, v in plan.items()
                                                         if k in {c.name for c in ebc.embedding_bag_configs()}}
        sharded[name] = shard_engram_collection(ebc, pg=pg, device=device, plan=group_plan,
                                                lr=cfg.sparse_lr, eps=cfg.eps)
    tables.attach(sharded)
    return tables


def full_tables_state(tables: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{group: {key: full CPU tensor}} assembled from the shards (collective when world > 1)."""
    return {g: sparse_state_dict(m, full=True) for g, m in tables.collections().items()}


def load_full_tables_state(tables: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for g, m in tables.collections().items():
        load_sparse_state_dict(m, state[g])
