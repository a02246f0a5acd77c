"""Sharding of the Engram EmbeddingBagCollection with TorchRec DMP (the ONLY torchrec.distributed user).

The tables always run through DistributedModelParallel with the FUSED (fbgemm TBE) kernel and the
exact row-wise Adagrad applied inside backward -- also in a single process, where
:func:`init_single_process_group` provides a world-size-1 gloo group, so one-process training and
multi-rank training share one code path. Dense parameters never hold these tables: after
``loss.backward()`` the looked-up rows are already updated; there is nothing to ``step()``.

Plans: ``"auto"`` runs the TorchRec planner (Topology(compute_device=<device type>), fused kernel,
never data-parallel; on CPU the bag sharder only offers table-/column-wise), a single sharding type
name applies it to every table, or a dict ``table name -> "table_wise" | "row_wise" | "column_wise"``
(unlisted tables default to table_wise). Explicit table-wise placement balances bytes greedily.

Under DMP all ranks must feed the same KJT stride: call the sharded tables through
:class:`EngramShardedLookup` (``batch.lookup(EngramShardedLookup(dmp))``), which agrees on it.
Checkpoints: ``dmp.state_dict()`` (ShardedTensors) and ``dmp.fused_optimizer.state_dict()`` (the
row-wise Adagrad accumulators) go through torch.distributed.checkpoint; the ``full=True`` helpers
below assemble whole tables on every rank and are meant for small tables and tests.
"""
from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from typing import Mapping, Union

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from comeir_dist.engram.tables import pad_kjt_stride

PlanSpec = Union[str, Mapping[str, str]]
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
_FUSED = "fused"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(backend: str = "gloo") -> dist.ProcessGroup:
    """The default process group; creates a world-size-1 group on a free localhost port if none exists."""
    if not dist.is_initialized():
        port = _free_port()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.group.WORLD


def fused_params(lr: float, eps: float) -> dict:
    """fbgemm fused-kernel parameters: exact row-wise Adagrad applied in backward."""
    return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": float(lr), "eps": float(eps)}


def make_sharder(lr: float, eps: float) -> EmbeddingBagCollectionSharder:
    return EmbeddingBagCollectionSharder(fused_params=fused_params(lr, eps))


def _table_sizes(ebc: EmbeddingBagCollection) -> dict[str, int]:
    out = {}
    for c in ebc.embedding_bag_configs():
        elt = 2 if str(c.data_type).endswith("FP16") else 4
        out[c.name] = c.num_embeddings * c.embedding_dim * elt
    return out


def _normalise_plan(ebc: EmbeddingBagCollection, plan: PlanSpec) -> dict[str, str] | None:
    names = [c.name for c in ebc.embedding_bag_configs()]
    if isinstance(plan, str):
        if plan == "auto":
            return None
        if plan not in SHARDING_TYPES:
            raise ValueError(f"plan must be 'auto', one of {SHARDING_TYPES} or a dict, got {plan!r}")
        return {n: plan for n in names}
    unknown = set(plan) - set(names)
    if unknown:
        raise ValueError(f"plan names unknown tables: {sorted(unknown)[:5]}")
    bad = {v for v in plan.values() if v not in SHARDING_TYPES}
    if bad:
        raise ValueError(f"plan sharding types must be in {SHARDING_TYPES}, got {sorted(bad)}")
    return {n: plan.get(n, "table_wise") for n in names}


def build_plan(ebc: EmbeddingBagCollection, plan: PlanSpec, sharder: EmbeddingBagCollectionSharder,
               pg: dist.ProcessGroup, device: torch.device, load: list[int] | None = None) -> ShardingPlan:
    """ShardingPlan for the collection (module path "").

    Explicit plans place table-wise tables greedily (largest first, on the least-loaded rank). ``load``: the
    bytes already placed per rank by earlier collections; it is updated in place, so several collections
    (one per Engram group) sharded one after another balance across groups instead of each starting at
    rank 0. The TorchRec planner (``"auto"``) plans each collection on its own."""
    world = dist.get_world_size(pg)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    per_table = _normalise_plan(ebc, plan)
    if per_table is None:
        types = ["table_wise", "column_wise"] if device.type == "cpu" else \
            ["table_wise", "row_wise", "column_wise", "table_row_wise"]
        constraints = {c.name: ParameterConstraints(sharding_types=types, compute_kernels=[_FUSED])
                       for c in ebc.embedding_bag_configs()}
        topo = TopologyFactory.create_topology(
            trainer_config=TrainerConfig(world_size=world, local_world_size=local_world),
            kernel_config=KernelConfig(compute_device=device.type))
        planner = EmbeddingShardingPlanner(topology=topo, constraints=constraints,
                                           storage_reservation=FixedPercentageStorageReservation(0.15))
        return planner.collective_plan(ebc, [sharder], pg)
    sizes = _table_sizes(ebc)
    if load is None:
        load = [0] * world
    elif not load:  # a fresh shared load vector
        load.extend([0] * world)
    gens = {}
    for name in sorted(per_table, key=lambda n: -sizes[n]):
        kind = per_table[name]
        if kind == "table_wise":
            r = min(range(world), key=lambda i: load[i])
            load[r] += sizes[name]
            gens[name] = table_wise(rank=r, compute_kernel=_FUSED)
        elif kind == "row_wise":
            for i in range(world):
                load[i] += sizes[name] // world
            gens[name] = row_wise(compute_kernel=_FUSED)
        else:
            for i in range(world):
                load[i] += sizes[name] // world
            gens[name] = column_wise(ranks=list(range(world)), compute_kernel=_FUSED)
    mplan = construct_module_sharding_plan(ebc, gens, sharder=sharder, local_size=local_world,
                                           world_size=world, device_type=device.type)
    return ShardingPlan({"": mplan})


def shard_engram_collection(ebc: EmbeddingBagCollection, pg: dist.ProcessGroup | None = None,
                            device: str | torch.device = "cpu", plan: PlanSpec = "auto",
                            lr: float = 0.05, eps: float = 1e-8,
                            load: list[int] | None = None) -> DistributedModelParallel:
    """Wrap the (preferably meta-device) collection in DMP: fused kernel + exact row-wise Adagrad in backward.

    ``pg=None`` uses the default group, creating a world-size-1 gloo group if there is none.
    ``init_data_parallel=False``: DMP never wraps anything in DDP here.
    """
    device = torch.device(device)
    if pg is None:
        pg = init_single_process_group("nccl" if device.type == "cuda" else "gloo")
    sharder = make_sharder(lr, eps)
    splan = build_plan(ebc, plan, sharder, pg, device, load)
    return DistributedModelParallel(module=ebc, env=ShardingEnv.from_process_group(pg), device=device,
                                    plan=splan, sharders=[sharder], init_data_parallel=False)


class EngramShardedLookup(torch.nn.Module):
    """Calls the DMP-sharded collection with a stride agreed by all ranks.

    DMP's pooled-output exchange needs the same KJT stride (bags per feature) on every rank; a rank
    with fewer requests (e.g. a smaller last batch) is padded with empty bags up to the maximum
    (one scalar all-reduce per forward; skipped at world size 1). Every rank must call it the same
    number of times (it is collective). Pass this module to ``EngramKeyBatch.lookup``.
    """

    def __init__(self, dmp: DistributedModelParallel, pg: dist.ProcessGroup | None = None):
        super().__init__()
        self.dmp = dmp
        self.pg = pg

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        if dist.get_world_size(self.pg) > 1:
            t = torch.tensor([kjt.stride()], dtype=torch.int64, device=kjt.lengths().device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
            kjt = pad_kjt_stride(kjt, int(t.item()))
        return self.dmp(kjt)


def _unwrap(m) -> DistributedModelParallel:
    return m.dmp if isinstance(m, EngramShardedLookup) else m


def describe_plan(dmp: DistributedModelParallel) -> dict[str, dict]:
    """table -> {sharding_type, compute_kernel, ranks} (for logs and tests). Accepts the lookup wrapper too."""
    dmp = _unwrap(dmp)
    out = {}
    for _, mp in dmp.plan.plan.items():
        for name, ps in mp.items():
            out[name] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": ps.ranks}
    return out


# ---- state ------------------------------------------------------------------------------------
@contextmanager
def _quiet_sharded_tensor():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        yield


def _local_pieces(value) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):  # pragma: no cover - not produced by the fused EBC path
            raise TypeError("DTensor state is not supported here; use torch.distributed.checkpoint")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, torch.Tensor):
        return [((0,) * value.dim(), value)]
    return []


def _global_shape(value) -> tuple[int, ...]:
    return tuple(value.size())


def sparse_state_dict(dmp: DistributedModelParallel, full: bool = False, copy: bool = True) -> dict[str, torch.Tensor]:
    """Table weights. ``full=False``: DMP's own (sharded) state dict, the form torch.distributed.checkpoint
    saves and reshards. ``full=True``: every table assembled as a plain CPU tensor on every rank
    (all-gather of local shards; for small tables, tests and single-process use). ``copy=False``: in one
    process, a table held whole by its one CPU shard is returned as that shard's (read-only) view instead of a
    copy -- for a caller that serialises at once (``best/``): an s_T = 8 table set (12 GB) is not held twice.
    Accepts an :class:`EngramShardedLookup` too (keys are those of the wrapped DMP)."""
    sd = _unwrap(dmp).state_dict()
    if not full:
        return sd
    with _quiet_sharded_tensor():
        return _assemble(sd, copy)


def _assemble(sd: dict, copy: bool = True) -> dict[str, torch.Tensor]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    shapes = {k: _global_shape(v) for k, v in sd.items()}
    if world == 1 and not copy:
        out = {}
        for k, v in sd.items():
            pieces = _local_pieces(v)
            t = pieces[0][1].detach() if len(pieces) == 1 else None
            if t is not None and t.device.type == "cpu" and tuple(t.shape) == tuple(shapes[k]):
                out[k] = t
        if len(out) == len(sd):
            return out
    # several ranks: the pieces are pickled by all_gather_object, so they must not be views of the fused buffer
    pieces = {k: [(o, t.detach().cpu().clone()) for o, t in _local_pieces(v)] for k, v in sd.items()}
    if world > 1:
        allp = [None] * world
        dist.all_gather_object(allp, pieces)
    else:
        allp = [pieces]
    out = {}
    for k, shp in shapes.items():
        dtype = sd[k].dtype
        full_t = torch.zeros(shp, dtype=dtype)
        for part in allp:
            for o, t in part.get(k, []):
                sl = tuple(slice(a, a + n) for a, n in zip(o, t.shape))
                full_t[sl] = t.to(dtype)
        out[k] = full_t
    return out


@torch.no_grad()
def load_sparse_state_dict(dmp: DistributedModelParallel, full_tables: Mapping[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tables into this rank's shards, whatever the sharding. Keys as in
    ``sparse_state_dict(dmp, full=True)`` (e.g. ``embedding_bags.<table>.weight``)."""
    with _quiet_sharded_tensor():
        _load(_unwrap(dmp).state_dict(), full_tables)


def _load(sd: dict, full_tables: Mapping[str, torch.Tensor]) -> None:
    missing = set(sd) - set(full_tables)
    if missing:
        raise KeyError(f"missing sparse tables: {sorted(missing)[:5]}")
    for k, v in sd.items():
        src = full_tables[k]
        if tuple(src.shape) != _global_shape(v):
            raise ValueError(f"{k}: shape {tuple(src.shape)} != {_global_shape(v)}")
        for o, t in _local_pieces(v):
            sl = tuple(slice(a, a + n) for a, n in zip(o, t.shape))
            t.copy_(src[sl].to(t.dtype))
