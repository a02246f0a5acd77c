"""One collective schedule for all Engram groups of a forward pass (fewer synchronisation points per step).

Called one group after another, every DMP-sharded group costs its own synchronisation points: a scalar
all-reduce agreeing on the KJT stride, then TorchRec's input exchange (the splits all-to-all, waited, then the
lengths/values all-to-all, waited) before its lookup can run. Under gloo on a shared CPU each wait also absorbs
the ranks' skew, so a forward over G groups paid ~3G blocking rendezvous.

:class:`PipelinedGroupsLookup` replaces that with TorchRec's own pipelining API (the one
``TrainPipelineSparseDist`` uses): ONE all-reduce of the vector of all groups' strides, then
``input_dist`` of every group (launching every splits all-to-all asynchronously), then every tensor exchange,
and only then ``compute_and_output_dist`` group by group (the output exchange stays lazy: it is resolved
when the model reads the pooled values). The collectives are issued in the same order on every rank (the
groups' order in the request dict, which the same model code builds on every rank). Results are identical to
calling the groups one by one (tested against the one-group-at-a-time path and against one process).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from comeir_dist.engram.tables import pad_kjt_stride


class PipelinedGroupsLookup:
    """``{group: KJT} -> {group: pooled KeyedTensor}`` over the attached group modules.

    ``modules``: group -> the module ``EngramTables.attach`` got for it (DMP, the stride-agreeing wrapper, or
    the gradient-scaling wrapper around either); ``unwrap(module) -> DMP``; ``scale(module, kt) -> kt`` applies
    the module's gradient scaling (identity when it has none)."""

    def __init__(self, modules: Mapping[str, nn.Module], unwrap, scale, pg: dist.ProcessGroup | None = None):
        self.modules = dict(modules)
        self.unwrap = unwrap
        self.scale = scale
        self.pg = pg

    def __call__(self, kjts: dict) -> dict:
        names = list(kjts)
        if not names:
            return {}
        if dist.get_world_size(self.pg) > 1:  # every rank feeds every group the largest stride (empty bags)
            strides = torch.tensor([kjts[g].stride() for g in names], dtype=torch.int64)
            dist.all_reduce(strides, op=dist.ReduceOp.MAX, group=self.pg)
            kjts = {g: pad_kjt_stride(kjts[g], int(s)) for g, s in zip(names, strides.tolist())}
        sharded = {g: self.unwrap(self.modules[g]).module for g in names}
        ctxs = {g: sharded[g].create_context() for g in names}
        splits = {g: sharded[g].input_dist(ctxs[g], kjts[g]) for g in names}  # all splits exchanges in flight
        tensors = {g: splits[g].wait() for g in names}  # all lengths/values exchanges in flight
        out = {}
        for g in names:
            out[g] = self.scale(self.modules[g], sharded[g].compute_and_output_dist(ctxs[g], tensors[g].wait()))
        return out
