"""Put a model's EngramTables under TorchRec DMP (fused row-wise Adagrad), one DMP per table group.

Multi-rank rules implemented here (the model code knows nothing about them):

* every group is called through :class:`~comeir_dist.parallel.sparse.EngramShardedLookup` when the
  world size is > 1 (all ranks agree on the KJT stride; the lookups are collectives);
* gradients: DeepSpeed AVERAGES dense gradients over ranks and TorchRec divides the pooled-output
  gradients by the world size in the backward exchange (``comm_ops`` gradient division, on by default)
  before the shard owner sums all ranks' rows -- the same average. The training loop weights each
  rank's loss by ``n_r * world / n`` so both are the global-batch mean. :func:`sparse_grad_scale` gives
  the extra factor for the tables (1, or ``1/world`` if gradient division was switched off), applied by
  ``grad_scale`` (:class:`GradScaledLookup`);
* ``column_shards``: column-wise tables get this many column shards placed round-robin over the ranks
  (default: one per rank). The row-wise Adagrad keeps one statistic per (row, column shard), so a fixed
  count makes column-wise training -- and its optimizer-state layout -- independent of the world size;
* :func:`init_tables_deterministic`: uniform(-s, s) values drawn per (seed, table, block of rows), so
  the initial tables are identical whatever the sharding and the number of ranks. The blocks are
  independent, so they are filled by ``torch.get_num_threads()`` threads (same values as one thread);
* sharding skips TorchRec's own initialisation (``uniform_`` from the global generator over every
  local row, single-threaded: ~75 s for the 8 GiB of fp16 inter tables at s_T=4) and fills the tables
  with :func:`init_tables_deterministic` instead, seeded by ``init_seed`` or by one draw from torch's
  global generator (so ``torch.manual_seed`` still fixes the initial tables).
"""
from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from comeir_dist.engram.config import EngramConfig
from comeir_dist.parallel.pipelined_lookup import PipelinedGroupsLookup
from comeir_dist.parallel.sparse import (EngramShardedLookup, _unwrap, build_plan, init_single_process_group,
                                         load_sparse_state_dict, make_sharder, shard_engram_collection,
                                         sparse_state_dict)

INIT_BLOCK_ROWS = 1 << 16


def shard_engram_tables(tables: torch.nn.Module, cfg: EngramConfig, device: str | torch.device = "cpu",
                        plan="auto", pg=None, column_shards: int | None = None,
                        grad_scale: float = 1.0, init_seed: int | None = None,
                        pipelined: bool = True) -> torch.nn.Module:
    """Shard every group collection of ``tables`` (built on the meta device) with DMP and attach the result.

    One forward still issues one lookup per group; the fused kernel updates looked-up rows in backward.
    The tables start as :func:`init_tables_deterministic` with ``init_seed`` (None = one draw from torch's
    global generator) and scale ``cfg.init_scale``: a caller that initialises them again with the same
    seed gets the same values. ``pipelined``: serve a forward's groups with one collective schedule (``parallel.pipeline_lookups``).
    """
    if init_seed is None:
        init_seed = int(torch.randint(0, 2**62, (1,)).item())
    sharded = {}
    load: list[int] = []  # bytes per rank placed so far: groups balance across each other (build_plan)
    for name, ebc in tables.groups.items():
        group_plan = plan if isinstance(plan, str) else {k: v for k, v in plan.items()
                                                         if k in {c.name for c in ebc.embedding_bag_configs()}}
        with _skip_backend_init():
            if column_shards is None:
                dmp = shard_engram_collection(ebc, pg=pg, device=device, plan=group_plan, lr=cfg.sparse_lr,
                                              eps=cfg.eps, load=load)
            else:
                dmp = _shard_with_column_shards(ebc, pg, device, group_plan, cfg, column_shards, load)
        init_tables_deterministic({name: dmp}, init_seed, cfg.init_scale)
        world = dist.get_world_size(pg) if dist.is_initialized() else 1
        mod: torch.nn.Module = EngramShardedLookup(dmp, pg) if world > 1 else dmp
        if grad_scale != 1.0:
            mod = GradScaledLookup(mod, grad_scale)
        sharded[name] = mod
    tables.attach(sharded, call_groups=PipelinedGroupsLookup(sharded, dmp_of, _scaled_output, pg) if pipelined
                  else None)
    return tables


def _scaled_output(module: torch.nn.Module, kt):
    """``kt`` with the gradient scaling of the attached group ``module`` (identity without a wrapper)."""
    return module.scaled(kt) if isinstance(module, GradScaledLookup) else kt


def _shard_with_column_shards(ebc, pg, device, plan, cfg: EngramConfig, column_shards: int,
                              load: list[int] | None = None):
    """Like ``shard_engram_collection``, with every column-wise table split into ``column_shards`` shards."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv

    device = torch.device(device)
    if pg is None:
        pg = init_single_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size(pg)
    sharder = make_sharder(cfg.sparse_lr, cfg.eps)
    splan = build_plan(ebc, plan, sharder, pg, device, load)
    mplan = splan.plan[""]
    dims = {c.name: c.embedding_dim for c in ebc.embedding_bag_configs()}
    cw = [n for n, ps in mplan.items() if ps.sharding_type == "column_wise"]
    bad = [n for n in cw if dims[n] % column_shards]
    if bad:
        raise ValueError(f"parallel.column_shards={column_shards} does not divide the width of table {bad[0]} "
                         f"({dims[bad[0]]})")
    if cw:
        gens = {n: column_wise(ranks=[i % world for i in range(column_shards)], compute_kernel="fused") for n in cw}
        new = construct_module_sharding_plan(ebc, gens, sharder=sharder, local_size=world, world_size=world,
                                             device_type=device.type)
        for n in cw:
            mplan[n] = new[n]
    return DistributedModelParallel(module=ebc, env=ShardingEnv.from_process_group(pg), device=device, plan=splan,
                                    sharders=[sharder], init_data_parallel=False)


def sparse_grad_scale(world: int) -> float:
    """Factor that makes the table gradients the average over ranks, like DeepSpeed's dense gradients."""
    from torchrec.distributed.comm_ops import get_gradient_division

    return 1.0 if get_gradient_division() or world == 1 else 1.0 / world


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class GradScaledLookup(torch.nn.Module):
    """Identity on the pooled lookup result, gradient multiplied by ``scale`` (see module docstring)."""

    def __init__(self, inner: torch.nn.Module, scale: float):
        super().__init__()
        self.inner = inner
        self.scale = float(scale)

    @property
    def dmp(self):
        return dmp_of(self.inner)

    def forward(self, kjt):
        return self.scaled(self.inner(kjt))

    def scaled(self, kt):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(),
                           values=_ScaleGrad.apply(kt.values(), self.scale), key_dim=kt.key_dim())


def dmp_of(module: torch.nn.Module):
    """The DistributedModelParallel behind an attached group module (wrappers unwrapped)."""
    while isinstance(module, GradScaledLookup):
        module = module.inner
    return _unwrap(module)


def group_dmps(tables: torch.nn.Module) -> dict:
    """{group: DMP} of attached (sharded) tables."""
    return {g: dmp_of(m) for g, m in tables.collections().items()}


# ---- initialisation -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _skip_backend_init():
    """While sharding, TorchRec leaves the zero-allocated fp32/fp16 weights of its fused kernels as they are
    (it would draw uniform values twice: the kernel's ``init_parameters`` and the sharded collection's
    ``reset_parameters``, both single-threaded); the caller fills them with :func:`init_tables_deterministic`.
    Data-parallel tables (never used for the Engram memory) and other dtypes keep TorchRec's initialisation."""
    from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    orig_kernel = BaseBatchedEmbeddingBag.init_parameters
    orig_reset = ShardedEmbeddingBagCollection.reset_parameters

    def init_parameters(self) -> None:
        if any(p.dtype not in (torch.float32, torch.float16) for p in self.split_embedding_weights()):
            orig_kernel(self)

    def reset_parameters(self) -> None:
        plan = self.module_sharding_plan
        if any(plan[c.name].sharding_type == "data_parallel" or plan[c.name].compute_kernel != "fused"
               or self.embedding_bags[c.name].weight.dtype not in (torch.float32, torch.float16)
               for c in self._embedding_bag_configs):
            orig_reset(self)

    BaseBatchedEmbeddingBag.init_parameters = init_parameters
    ShardedEmbeddingBagCollection.reset_parameters = reset_parameters
    try:
        yield
    finally:
        BaseBatchedEmbeddingBag.init_parameters = orig_kernel
        ShardedEmbeddingBagCollection.reset_parameters = orig_reset


def _block_seed(seed: int, table: str, block: int) -> int:
    h = hashlib.sha256(f"{seed}/{table}/{block}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def table_block(seed: int, table: str, block: int, rows: int, dim: int, scale: float) -> torch.Tensor:
    """Rows ``[block*B, block*B + rows)`` of a table's initial values (B = INIT_BLOCK_ROWS), fp32 CPU."""
    g = torch.Generator().manual_seed(_block_seed(seed, table, block))
    return torch.rand(rows, dim, generator=g).mul_(2 * scale).sub_(scale)


@torch.no_grad()
def init_tables_deterministic(tables, seed: int, scale: float, num_threads: int | None = None) -> None:
    """Overwrite every local shard with uniform(-scale, scale) values that depend only on (seed, table,
    global row block): the same initial tables on 1 or N ranks and for any sharding. Local work only.

    ``tables``: an :class:`~comeir_dist.model.engram_memory.EngramTables` with attached (sharded) groups,
    or a ``{group: module}`` dict. Blocks are filled by ``num_threads`` threads (default
    ``torch.get_num_threads()``); every block has its own generator, so the values do not depend on it."""
    from comeir_dist.parallel.sparse import _local_pieces, _quiet_sharded_tensor

    mods = tables.items() if isinstance(tables, dict) else group_dmps(tables).items()
    jobs = []
    with _quiet_sharded_tensor():
        for _, mod in mods:
            for key, value in dmp_of(mod).state_dict().items():
                table = key.split(".")[-2]  # embedding_bags.<table>.weight
                rows, dim = tuple(value.size())
                for (r0, c0), t in _local_pieces(value):
                    nr = t.shape[0]
                    for b in range(r0 // INIT_BLOCK_ROWS, (r0 + nr - 1) // INIT_BLOCK_ROWS + 1) if nr else ():
                        jobs.append((table, b, rows, dim, r0, c0, t))

    def fill(job) -> None:
        table, b, rows, dim, r0, c0, t = job
        b0 = b * INIT_BLOCK_ROWS
        blk = table_block(seed, table, b, min(INIT_BLOCK_ROWS, rows - b0), dim, scale)
        lo, hi = max(r0, b0), min(r0 + t.shape[0], b0 + blk.shape[0])
        t[lo - r0:hi - r0].copy_(blk[lo - b0:hi - b0, c0:c0 + t.shape[1]])

    threads = max(1, min(num_threads or torch.get_num_threads(), len(jobs)))
    if threads == 1:
        for job in jobs:
            fill(job)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="engram-init") as pool:
        for _ in pool.map(fill, jobs):  # re-raises a worker's exception
            pass


@torch.no_grad()
def reinit_tables(model: torch.nn.Module, seed: int, scale: float) -> int:
    """Fresh tables under ``model``: :func:`init_tables_deterministic` values for ``seed`` and zeroed row-wise
    Adagrad statistics (the fused optimizer's state tensors are views of the kernels' buffers). Local work only;
    every rank passes the same seed, so the result does not depend on the sharding. Returns the groups reset."""
    from comeir_dist.model.engram_memory import EngramTables
    from comeir_dist.parallel.sparse import _local_pieces, _quiet_sharded_tensor

    n = 0
    for tables in (t for t in model.modules() if isinstance(t, EngramTables)):
        init_tables_deterministic(tables, seed, scale)
        with _quiet_sharded_tensor():
            for dmp in group_dmps(tables).values():
                for state in dmp.fused_optimizer.state_dict()["state"].values():
                    for v in state.values():
                        if torch.is_tensor(v):
                            for _, t in _local_pieces(v):
                                t.zero_()
                n += 1
    return n


# ---- whole-table state (small tables: best/ checkpoints, tests) -------------------------------------------
def full_tables_state(tables: torch.nn.Module, copy: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{group: {key: full CPU tensor}} assembled from the shards (collective when world > 1); ``copy=False``
    returns views of single-process CPU tables (see ``sparse_state_dict``)."""
    return {g: sparse_state_dict(m, full=True, copy=copy) for g, m in group_dmps(tables).items()}


def load_full_tables_state(tables: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for g, m in group_dmps(tables).items():
        load_sparse_state_dict(m, state[g])


def set_sparse_lr(model: torch.nn.Module, lr: float) -> int:
    """Set the learning rate of every fused table optimizer under ``model`` (DMP ``fused_optimizer``; the
    fused kernels read it from their param group on ``step()``). Returns how many optimizers were set."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from comeir_dist.model.engram_memory import EngramTables

    # the sharded collections are kept outside the module tree (EngramTables.attach): walk them explicitly
    roots = [c for t in model.modules() if isinstance(t, EngramTables) for c in t.collections().values()]
    n = 0
    for mod in (m for r in roots + [model] for m in r.modules()):
        if isinstance(mod, DistributedModelParallel):
            opt = mod.fused_optimizer
            for group in opt.param_groups:
                group["lr"] = float(lr)
            opt.step()  # applies the param-group lr to the kernels; the fused update itself runs in backward
            n += 1
    return n
