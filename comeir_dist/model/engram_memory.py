"""Engram memory plumbing for the model: sparse tables grouped per (memory, level), and their lookups.

Tables are grouped into one EmbeddingBagCollection per (memory, level) because every lookup of a
forward pass for one group shares a stride (KJT batch size): decoding level l then touches only the
groups of level l instead of padding all 30+ tables to the candidate count.

``EngramTables`` is the whole sparse part. It is a plain module here; ``comeir_dist.parallel`` wraps
it in DistributedModelParallel (fused row-wise Adagrad) without this file knowing about it.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.sizing import TableSpec, table_specs
from comeir_dist.engram.tables import EngramIndex, EngramKeyBatch, build_engram_collection


def group_name(memory: str, level: int) -> str:
    return f"{memory}_l{level}"


def grouped_specs(cfg: EngramConfig) -> dict[str, list[TableSpec]]:
    groups: dict[str, list[TableSpec]] = defaultdict(list)
    for s in table_specs(cfg):
        groups[group_name(s.memory, s.level)].append(s)
    return dict(groups)


class EngramTables(nn.Module):
    """All Engram tables: ``forward({group: KJT}) -> {group: KeyedTensor}``.

    Unsharded, the collections are ordinary submodules (``groups``). Once sharded, the distributed
    modules are attached with :meth:`attach` and kept OUTSIDE this module tree: the dense optimizer,
    ``model.state_dict()`` and DeepSpeed never see them (their state is saved through the sharded path),
    and a DMP nested in a module tree would rewrite its parent's state-dict keys.
    """

    def __init__(self, cfg: EngramConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.groups = nn.ModuleDict({
            g: build_engram_collection(specs, device=device, dtype=cfg.table_dtype, init_scale=cfg.init_scale)
            for g, specs in grouped_specs(cfg).items()})
        self._attached: dict[str, nn.Module] | None = None

    def attach(self, modules: dict[str, nn.Module]) -> None:
        """Serve lookups from ``modules`` (e.g. DMP-sharded collections) and drop the unsharded ones."""
        if set(modules) != set(self.groups.keys()):
            raise ValueError(f"attach needs every group {sorted(self.groups.keys())}, got {sorted(modules)}")
        object.__setattr__(self, "_attached", dict(modules))
        self.groups = nn.ModuleDict()

    def collections(self) -> dict[str, nn.Module]:
        return self._attached if self._attached is not None else dict(self.groups.items())

    def forward(self, kjts: dict):
        mods = self.collections()
        return {g: mods[g](kjt) for g, kjt in kjts.items()}


class EngramLookup:
    """Static addressing (hashers per group) and a per-forward request collector."""

    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        self.index = {g: EngramIndex(specs, cfg.hash_seed) for g, specs in grouped_specs(cfg).items()}

    def orders(self, memory: str, level: int) -> list[int]:
        g = group_name(memory, level)
        return self.index[g].orders(memory, level) if g in self.index else []

    def new_pass(self) -> "LookupPass":
        return LookupPass(self)


class LookupPass:
    """Collects ``add(memory, level, order, keys, valid)`` requests, then one ``run(tables)`` call."""

    def __init__(self, lookup: EngramLookup):
        self.lookup = lookup
        self.batches: dict[str, EngramKeyBatch] = {}
        self.handles: list[tuple[str, int]] = []
        self.results: list[torch.Tensor] | None = None

    def add(self, memory: str, level: int, order: int, keys: torch.Tensor, valid: torch.Tensor) -> int:
        g = group_name(memory, level)
        if g not in self.batches:
            self.batches[g] = self.lookup.index[g].new_batch()
        self.handles.append((g, self.batches[g].add_key(memory, level, order, keys, valid)))
        return len(self.handles) - 1

    def run(self, tables: nn.Module) -> None:
        if not self.batches:
            self.results = []
            return
        out = tables({g: b.kjt() for g, b in self.batches.items()})
        per_group = {g: b.unpack(out[g]) for g, b in self.batches.items()}
        self.results = [per_group[g][h] for g, h in self.handles]

    def __getitem__(self, handle: int) -> torch.Tensor:
        return self.results[handle]
