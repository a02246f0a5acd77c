"""Per-rank memory plan of a run: Engram table shards, their fused Adagrad state, the dense ZeRO share, a reserve.

Backs ``comeir plan`` and the fit check training runs before it allocates anything
(:func:`check_plan_fits`). Pure arithmetic over :func:`comeir_dist.engram.sizing.table_specs`; it never
allocates a table and does not import torchrec.

Memory model, per rank (all numbers are bytes; "GiB" = 2**30):

* **Engram weights**: ``rows * dim * (2 fp16 | 4 fp32)`` of every shard the rank holds. The fused fbgemm
  kernel keeps no fp32 master copy of fp16 tables.
* **Engram optimizer**: fused ``EXACT_ROWWISE_ADAGRAD`` keeps ONE fp32 accumulator per row of a shard,
  ``rows * 4``. A column-wise shard keeps all rows of its table, so every column shard has its own
  ``rows * 4`` accumulator (column-wise replicates the optimizer state).
* **Dense ZeRO share** (``P`` dense params, ``T`` of them trainable, ``W`` ranks): weights ``w`` = 2 bytes
  (bf16/fp16) or 4 (fp32), grads the same, AdamW state ``K`` = 12 bytes/param (fp32 master + m + v; also
  under fp32 with ZeRO >= 1, whose optimizer keeps an fp32 partition copy), ``K`` = 8 for plain fp32
  stage 0 (m + v only). Stage 0: ``P*w + T*w + T*K``; stage 1 shards the optimizer state (``T*K/W``);
  stage 2 also the grads (``T*w/W``); stage 3 also the weights (``P*w/W``). A DeepSpeed JSON's
  ``offload_optimizer`` (device cpu/nvme) removes ``T*K/W`` from the device, ``offload_param`` (stage 3)
  the weights. The engine's precision always comes from ``train.bf16`` (a JSON's bf16/fp16 are not
  used), its stage from the JSON if it names one, else ``parallel.zero_stage``. Replicated buffers
  (item catalog: ``items * (emb_dim*4 + L*8)``, codebooks) count on every rank.
* **Reserve**: fixed per rank (``parallel.reserve_gib``, default 2 GiB): CUDA context, NCCL/gloo buffers,
  TorchRec all-to-all buffers, activations of moderate batches, the interpreter and its libraries.
  Activations grow with batch size and sequence length: raise it for large batches. The one term that grows
  with the square of a history, the Rec2PM global pass (``model.pref_memory``), is estimated and added to the
  reserve (``activation_bytes``; :mod:`comeir_dist.parallel.activation_plan`).
* A rank fits when its total <= ``device_memory * headroom`` (``parallel.headroom``: the fraction of a
  device the plan may use, default 0.9).

Placement mirrors :func:`comeir_dist.parallel.sparse.build_plan`:

* ``table_wise``: tables sorted by weight bytes (largest first, stable) each go to the least-loaded rank
  (ties -> lowest rank); a row-/column-wise table adds ``bytes // W`` to every rank's load. The sharder
  shards the (memory, level) group collections one after another and carries the per-rank load from one
  group to the next (``balance="group"``, the default, reproduces that; with ``sharding: auto`` the TorchRec
  planner sees one group at a time, so the load restarts per group). ``balance="global"`` sorts all tables
  together (a lower bound the per-group sharder may miss by up to one table per group).
* ``row_wise``: TorchRec blocks of ``ceil(rows / W)`` rows (the last non-empty rank takes the rest).
* ``column_wise``: ``parallel.column_shards`` (default W) shards of ``dim / shards`` columns placed
  round-robin over the ranks, as :mod:`comeir_dist.parallel.engram_tables` does (``dim % shards == 0``
  required, on CUDA also widths % 4 == 0 for fbgemm; otherwise the plan is infeasible).
* ``auto`` emulates the TorchRec planner: a table whose weights + accumulator exceed
  ``auto_split_fraction`` (default 1.0) x min(its fair share ``total / W``, the per-rank table budget)
  is split -- row-wise on CUDA; on CPU the bag sharder offers no row-wise, and the planner's column
  shards are ``>= 128`` columns wide (``MIN_CW_DIM``), so such a table is cut into those blocks, one
  whole table when ``dim <= 128`` -- and every other table (or block) is placed table-wise as above.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.sizing import TableSpec, table_specs
from comeir_dist.errors import UserError

GIB = 2**30
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")  # = comeir_dist.parallel.sparse.SHARDING_TYPES
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
ADAGRAD_ROW_BYTES = 4  # one fp32 accumulator per row (EXACT_ROWWISE_ADAGRAD)
DEFAULT_RESERVE_GIB = 2.0
DEFAULT_HEADROOM = 0.9
PLANNER_MIN_CW_DIM = 128  # torchrec.distributed.planner.constants.MIN_CW_DIM
MAX_SUGGESTED_WORLD = 4096


# ---- dense parameter count ----------------------------------------------------------------------
@dataclass(frozen=True)
class DenseCount:
    """Dense parameters of the model (everything but the Engram tables)."""

    params: int
    trainable: Optional[int] = None  # None = all of them
    buffer_bytes: int = 0  # replicated buffers (item catalog, codebooks)
    source: str = "given"

    @property
    def n_trainable(self) -> int:
        return self.params if self.trainable is None else self.trainable


@contextlib.contextmanager
def _params_on_meta():
    """Create every nn.Parameter on the meta device (buffers stay real): counts a model without memory."""
    import torch

    orig = torch.nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig


def _count(module, skip: str = "tables.") -> tuple[int, int]:
    ps = [(n, p) for n, p in module.named_parameters() if not n.startswith(skip)]
    return sum(p.numel() for _, p in ps), sum(p.numel() for _, p in ps if p.requires_grad)


def backbone_hf_config(bb):
    """(transformers config, config key, origin note) of a ``model.backbone`` with ``path`` or ``config_file``:
    the local checkpoint's ``config.json``, else the config file; a ``path`` that is not a local directory without
    a ``config_file`` is an error (nothing is downloaded)."""
    from comeir_dist.model.backbone import load_config_file, resolve_config_file

    if bb.path and Path(bb.path).is_dir():
        from transformers import AutoConfig

        return (AutoConfig.from_pretrained(bb.path, local_files_only=True), "model.backbone.path",
                f", backbone config of {bb.path}")
    if bb.config_file:
        return (load_config_file(bb.config_file), "model.backbone.config_file",
                f", backbone from config_file {resolve_config_file(bb.config_file)}")
    raise UserError(f"model.backbone.path: {bb.path} is not a local directory (nothing is downloaded)")


def count_dense_params(run_cfg, item_emb_dim: int = 384, num_items: int = 0) -> DenseCount:
    """Build the configured model with every parameter on the meta device (Engram tables on
    ``sparse_device="meta"``, fake codes/codebooks/item embeddings of the configured shape) and count
    its dense parameters. The HF backbone is built on the meta device from a config, never from weights:
    the ``config.json`` of a local checkpoint (``model.backbone.path``), else -- when ``path`` is unset or
    not on this machine -- ``model.backbone.config_file`` (so a cluster run can be planned anywhere). Its
    token table is frozen (inputs are embeddings), as in training. A ``path``
    that does not exist without a ``config_file`` is an error, as in training.
    ``item_emb_dim``: width of the item embeddings / codebook vectors (384 for all-MiniLM-L6-v2).
    """
    import numpy as np

    from comeir_dist.model.backbone import backbone_from_config
    from comeir_dist.model.factory import build_model

    L, C = run_cfg.engram.levels, run_cfg.engram.codebook_size
    codes = np.stack([np.arange(C)] * L, axis=1)
    codebooks = np.zeros((L, C, item_emb_dim), np.float32)
    emb = np.zeros((C, item_emb_dim), np.float32)
    sasrec = run_cfg.model.variant == "sasrec"
    if sasrec:  # one dense embedding per item (no SIDs, no catalog buffers): the catalog size sets the count
        if num_items < 1:
            raise UserError("model.variant sasrec: its dense part holds one embedding per item; give the catalog "
                            "size (comeir plan --num-items N)")
        codes = np.broadcast_to(np.zeros((1, L), np.int64), (num_items, L))  # only its length is read
    bb = run_cfg.model.backbone
    hf = None
    cfg = run_cfg
    origin = ""
    if bb.path or bb.config_file:
        hf_conf, key, origin = backbone_hf_config(bb)
        with _params_on_meta():
            hf = backbone_from_config(hf_conf, key=key)
        small = bb.model_copy(update={"path": None, "config_file": None, "hidden_size": int(hf_conf.hidden_size),
                                      "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 8,
                                      "head_dim": 8})
        cfg = run_cfg.model_copy(update={"model": run_cfg.model.model_copy(update={"backbone": small})})
    with _params_on_meta():
        model = build_model(cfg, codes, codebooks, emb, sparse_device="meta")
    total, trainable = _count(model)
    if hf is not None:
        b_total, b_train = _count(model.backbone, skip="\0")
        h_total, h_train = _count(hf, skip="\0")
        total, trainable = total - b_total + h_total, trainable - b_train + h_train
    buffers = 0 if sasrec else num_items * (item_emb_dim * 4 + L * 8) + L * C * item_emb_dim * 4
    return DenseCount(total, trainable, buffers, source=f"model {run_cfg.model.variant} (meta build{origin})")


# ---- plan types ---------------------------------------------------------------------------------
@dataclass
class RankMemory:
    rank: int
    table_bytes: int  # Engram weights of the shards on this rank
    optimizer_bytes: int  # row-wise Adagrad accumulators of those shards
    dense_bytes: int  # ZeRO share of dense weights + grads + AdamW state, plus replicated buffers
    reserve: int
    total: int
    fits: bool
    shards: int  # number of table shards on this rank


@dataclass
class TablePlacement:
    name: str
    group: str
    rows: int
    dim: int
    sharding: str
    ranks: list[int]
    weight_bytes: int  # summed over ranks
    optimizer_bytes: int  # summed over ranks (column-wise counts one accumulator per shard)


@dataclass
class DenseShare:
    params: int
    trainable: int
    dtype: str
    zero_stage: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    offload: str = ""
    source: str = "given"

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.buffer_bytes


@dataclass(frozen=True)
class _Settings:
    world: int
    device: str
    table_dtype: str
    dense_dtype: str
    zero_stage: int
    sharding: Union[str, Mapping[str, str]]
    device_memory: int
    headroom: float
    reserve: int
    balance: str = "group"
    auto_split_fraction: float = 1.0
    offload_optimizer: bool = False
    offload_params: bool = False
    column_shards: Optional[int] = None  # None = one per rank


@dataclass
class MemoryPlan:
    world_size: int
    device: str
    table_dtype: str
    sharding: Any
    balance: str
    device_memory_bytes: int
    headroom: float
    usable_bytes: int
    reserve_bytes: int
    ranks: list[RankMemory]
    tables: list[TablePlacement]
    dense: DenseShare
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    activation_bytes: int = 0  # estimated activations included in the reserve (Rec2PM global pass)
    activation_note: str = ""

    @property
    def fits(self) -> bool:
        return not self.problems and all(r.fits for r in self.ranks)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: (r.total, -r.rank))

    @property
    def assignment(self) -> dict[str, list[int]]:
        return {t.name: t.ranks for t in self.tables}

    @property
    def totals(self) -> dict[str, int]:
        return {"table_params": sum(t.rows * t.dim for t in self.tables),
                "table_bytes": sum(r.table_bytes for r in self.ranks),
                "optimizer_bytes": sum(r.optimizer_bytes for r in self.ranks),
                "dense_bytes": sum(r.dense_bytes for r in self.ranks),
                "reserve_bytes": sum(r.reserve for r in self.ranks),
                "total_bytes": sum(r.total for r in self.ranks)}

    def message(self) -> str:
        """One line: why the plan fails (worst rank, missing bytes, what to change), or that it fits."""
        w = self.worst
        if self.problems:
            return "memory plan is not feasible: " + "; ".join(self.problems)
        if self.fits:
            return (f"memory plan fits: worst rank {w.rank} uses {_gib(w.total)} of {_gib(self.usable_bytes)} usable "
                    f"({self.headroom:g} x {_gib(self.device_memory_bytes)}) on {self.world_size} {self.device} "
                    f"rank(s)")
        bad = sum(not r.fits for r in self.ranks)
        text = (f"memory plan does not fit: rank {w.rank} needs {_gib(w.total)} (Engram weights {_gib(w.table_bytes)}, "
                f"Adagrad {_gib(w.optimizer_bytes)}, dense ZeRO-{self.dense.zero_stage} {_gib(w.dense_bytes)}, "
                f"reserve {_gib(w.reserve)}) but only {_gib(self.usable_bytes)} of {_gib(self.device_memory_bytes)} "
                f"per device are usable (headroom {self.headroom:g}): {_gib(w.total - self.usable_bytes)} missing; "
                f"{bad} of {self.world_size} rank(s) over")
        fixes = [x for x in self.suggestions if not x.startswith("(")]
        notes = [x for x in self.suggestions if x.startswith("(")]
        return text + (". Try: " + "; ".join(fixes) if fixes else "") + "".join(" " + n for n in notes)

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "message": self.message(), "world_size": self.world_size, "device": self.device,
                "table_dtype": self.table_dtype, "sharding": self.sharding, "balance": self.balance,
                "device_memory_bytes": self.device_memory_bytes, "headroom": self.headroom,
                "usable_bytes": self.usable_bytes, "reserve_bytes": self.reserve_bytes,
                "activation_bytes": self.activation_bytes, "activation_note": self.activation_note,
                "dense": {**asdict(self.dense), "total_bytes_per_rank": self.dense.total},
                "totals": self.totals, "ranks": [asdict(r) for r in self.ranks],
                "tables": [asdict(t) for t in self.tables], "problems": self.problems,
                "suggestions": self.suggestions}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---- arithmetic ---------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_wise_rows(rows: int, world: int) -> list[int]:
    """Rows per rank of a TorchRec row-wise shard: blocks of ceil(rows/W), e.g. 10 over 4 -> [3, 3, 3, 1]."""
    block = _cdiv(rows, world)
    last = rows // block
    return [block if r < last else (rows - block * last if r == last else 0) for r in range(world)]


def column_wise_ok(dim: int, shards: int, device: str = "cpu") -> bool:
    """``dim`` splits into ``shards`` equal column shards (on CUDA fbgemm also wants widths % 4 == 0)."""
    return dim % shards == 0 and (device != "cuda" or shards == 1 or (dim // shards) % 4 == 0)


def planner_cw_block(dim: int) -> int:
    """Width of the TorchRec planner's column shards (``_find_base_dim(MIN_CW_DIM, dim)``)."""
    for i in range(PLANNER_MIN_CW_DIM, dim):
        if dim % i == 0 and i % 4 == 0:
            return i
    return dim


def dense_share(count: Union[int, DenseCount], dtype: str, zero_stage: int, world: int,
                offload_optimizer: bool = False, offload_params: bool = False) -> DenseShare:
    """Per-rank bytes of the dense part under DeepSpeed ZeRO (see the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dense dtype {dtype!r}; allowed values: bf16, fp16, fp32")
    if not 0 <= zero_stage <= 3:
        raise UserError(f"zero_stage {zero_stage}; allowed values: 0, 1, 2, 3")
    c = count if isinstance(count, DenseCount) else DenseCount(int(count))
    p, t, w = c.params, c.n_trainable, DTYPE_BYTES[dtype]
    k = 8 if (dtype == "fp32" and zero_stage == 0) else 12
    params = _cdiv(p * w, world) if zero_stage >= 3 else p * w
    grads = _cdiv(t * w, world) if zero_stage >= 2 else t * w
    optim = _cdiv(t * k, world) if zero_stage >= 1 else t * k
    offload = []
    if offload_optimizer:
        optim, offload = 0, offload + ["optimizer"]
    if offload_params and zero_stage == 3:
        params, offload = 0, offload + ["params"]
    return DenseShare(p, t, dtype, zero_stage, params, grads, optim, c.buffer_bytes, "+".join(offload), c.source)


def _group(spec: TableSpec) -> str:
    return f"{spec.memory}_l{spec.level}"  # = comeir_dist.model.engram_memory.group_name


def _resolve_types(specs: Sequence[TableSpec], st: _Settings, elt: int, table_budget: int) -> dict[str, str]:
    names = [s.name for s in specs]
    if isinstance(st.sharding, Mapping):
        unknown = sorted(set(st.sharding) - set(names))
        if unknown:
            raise UserError(f"parallel.sharding names unknown tables: {unknown[:5]} (see `comeir params`)")
        bad = sorted({v for v in st.sharding.values() if v not in SHARDING_TYPES})
        if bad:
            raise UserError(f"parallel.sharding: {bad[0]!r}; allowed values: {', '.join(SHARDING_TYPES)}")
        return {n: st.sharding.get(n, "table_wise") for n in names}
    if st.sharding in SHARDING_TYPES:
        return {n: st.sharding for n in names}
    if st.sharding != "auto":
        raise UserError(f"parallel.sharding: {st.sharding!r}; allowed values: auto, {', '.join(SHARDING_TYPES)}")
    cost = {s.name: s.rows * (s.dim * elt + ADAGRAD_ROW_BYTES) for s in specs}
    threshold = st.auto_split_fraction * min(sum(cost.values()) / st.world, max(table_budget, 0))
    out = {}
    for s in specs:
        split = st.world > 1 and cost[s.name] > threshold
        out[s.name] = ("row_wise" if st.device == "cuda" else "planner_cw") if split else "table_wise"
    return out


def _plan(specs: Sequence[TableSpec], dense: DenseCount, st: _Settings) -> MemoryPlan:
    W, elt = st.world, DTYPE_BYTES[st.table_dtype]
    dshare = dense_share(dense, st.dense_dtype, st.zero_stage, W, st.offload_optimizer, st.offload_params)
    usable = int(st.device_memory * st.headroom)
    types = _resolve_types(specs, st, elt, usable - st.reserve - dshare.total)
    weights, optim, nshards = [0] * W, [0] * W, [0] * W
    problems: list[str] = []
    placements: list[TablePlacement] = []
    groups: dict[str, list[TableSpec]] = {}
    for s in specs:
        groups.setdefault(_group(s) if st.balance == "group" else "all", []).append(s)
    load = [0] * W
    for _, members in groups.items():
        if st.balance == "group" and st.sharding == "auto":
            load = [0] * W  # the TorchRec planner plans every group collection on its own
        # explicit plans: groups are sharded one after another, carrying the per-rank load (build_plan's `load`)
        for s in sorted(members, key=lambda s: -(s.rows * s.dim * elt)):
            kind, size = types[s.name], s.rows * s.dim * elt
            ncs = st.column_shards or W
            if kind == "column_wise" and not column_wise_ok(s.dim, ncs, st.device):
                problems.append(f"column_wise: table {s.name} (dim {s.dim}) cannot be split into {ncs} column shards "
                                f"(needs dim % shards == 0{', widths % 4 == 0 on cuda' if st.device == 'cuda' else ''}"
                                f"); use row_wise or set parallel.column_shards")
                kind = "table_wise"
            if kind == "table_wise":
                r = min(range(W), key=lambda i: load[i])
                load[r] += size
                shards = [(r, s.rows, s.dim)]
            elif kind == "row_wise":
                for i in range(W):
                    load[i] += size // W
                shards = list(zip(range(W), row_wise_rows(s.rows, W), [s.dim] * W))  # TorchRec keeps empty shards
            elif kind == "column_wise":
                for i in range(W):
                    load[i] += size // W
                shards = [(i % W, s.rows, s.dim // ncs) for i in range(ncs)]  # round-robin, as engram_tables
            else:  # planner_cw: the CPU planner's column blocks, each placed like a table
                block = planner_cw_block(s.dim)
                kind = "table_wise" if block == s.dim else "column_wise"
                shards = []
                for _ in range(s.dim // block):
                    r = min(range(W), key=lambda i: load[i])
                    load[r] += s.rows * block * elt
                    shards.append((r, s.rows, block))
            for r, rows, cols in shards:
                weights[r] += rows * cols * elt
                optim[r] += rows * ADAGRAD_ROW_BYTES
                nshards[r] += 1
            placements.append(TablePlacement(s.name, _group(s), s.rows, s.dim, kind, [r for r, _, _ in shards],
                                             sum(n * c * elt for _, n, c in shards),
                                             sum(n * ADAGRAD_ROW_BYTES for _, n, _ in shards)))
    order = {s.name: i for i, s in enumerate(specs)}
    placements.sort(key=lambda p: order[p.name])
    ranks = []
    for r in range(W):
        total = weights[r] + optim[r] + dshare.total + st.reserve
        ranks.append(RankMemory(r, weights[r], optim[r], dshare.total, st.reserve, total, total <= usable, nshards[r]))
    sharding = dict(st.sharding) if isinstance(st.sharding, Mapping) else st.sharding
    return MemoryPlan(W, st.device, st.table_dtype, sharding, st.balance, st.device_memory, st.headroom, usable,
                      st.reserve, ranks, placements, dshare, problems)


def _min_world(specs, dense, st: _Settings) -> Optional[int]:
    """Smallest world size >= st.world that fits (doubling, then bisection; verified)."""
    lo, hi = st.world, None
    w = st.world
    while w < MAX_SUGGESTED_WORLD:
        w = min(w * 2, MAX_SUGGESTED_WORLD)
        if _plan(specs, dense, replace(st, world=w)).fits:
            hi = w
            break
        lo = w
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _plan(specs, dense, replace(st, world=mid)).fits:
            hi = mid
        else:
            lo = mid
    return hi


def _suggestions(specs, dense, st: _Settings, plan: MemoryPlan) -> list[str]:
    out = []
    if plan.problems:
        return out
    nw = _min_world(specs, dense, st)
    host = " (ranks on separate hosts: ranks on one host share its memory)" if st.device == "cpu" else ""
    out.append(f"world size >= {nw}{host}" if nw else
               f"(more ranks alone do not help: none up to {MAX_SUGGESTED_WORLD} fits)")
    if st.table_dtype == "fp32":
        alt = replace(st, table_dtype="fp16")
        if _plan(specs, dense, alt).fits:
            out.append(f"fp16 tables fit at world size {st.world}")
        else:
            nw16 = _min_world(specs, dense, alt)
            if nw16 and (nw is None or nw16 < nw):
                out.append(f"fp16 tables need world size >= {nw16}")
    if st.sharding != "row_wise" and st.world > 1:
        alt = replace(st, sharding="row_wise")
        if _plan(specs, dense, alt).fits:
            out.append(f"sharding row_wise fits at world size {st.world}")
    if st.zero_stage < 3 and st.world > 1 and _plan(specs, dense, replace(st, zero_stage=3)).fits:
        out.append(f"zero_stage 3 fits at world size {st.world}")
    return out


# ---- public API ---------------------------------------------------------------------------------
def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}; allowed values: auto, cpu, cuda")
    return device


def detect_device_memory_gib(device: str) -> float:
    """Memory of one device: the current GPU, or on CPU the host memory (cgroup limit if lower) divided by
    ``LOCAL_WORLD_SIZE`` (ranks on one host share it)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
            if v.isdigit():
                total = min(total, int(v))
        except OSError:
            pass
    return total / GIB / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"  # = parallel/dense.py


def read_deepspeed_config(path: str, default_stage: int = 0) -> dict[str, Any]:
    """ZeRO stage and offload flags of a DeepSpeed JSON, found as :func:`comeir_dist.parallel.dense.
    deepspeed_config` finds it (the path, else ``configs/deepspeed/<name>``). Precision is not read: the
    engine always takes it from ``train.bf16``."""
    p = Path(path)
    if not p.is_file() and (DS_CONFIG_DIR / p.name).is_file():
        p = DS_CONFIG_DIR / p.name
    if not p.is_file():
        raise UserError(f"parallel.deepspeed_config: {path} not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: malformed JSON: {exc.msg}") from None
    z = ds.get("zero_optimization") or {}
    off = lambda k: (z.get(k) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return {"zero_stage": int(z.get("stage", default_stage)), "offload_optimizer": off("offload_optimizer"),
            "offload_params": off("offload_param")}


def plan_memory(engram_cfg: Union[EngramConfig, Sequence[TableSpec], None], dense_params: Union[int, DenseCount],
                pcfg=None, *,
                device: Optional[str] = None, dense_dtype: str = "fp32", table_dtype: Optional[str] = None,
                balance: str = "group", auto_split_fraction: float = 1.0, suggest: bool = True,
                activations=None) -> MemoryPlan:
    """Per-rank memory plan. ``engram_cfg``: the Engram config (tables from ``table_specs``), an explicit
    list of :class:`TableSpec`, or None for a model without Engram tables (flatten / tm).

    ``pcfg`` is a :class:`comeir_dist.config.parallel.ParallelConfig` (None = its defaults); fields used:
    world_size, sharding, column_shards, zero_stage, deepspeed_config (its stage and offload win),
    device_memory_gib (None = detected), reserve_gib, headroom, and ``device`` if present (else the ``device``
    argument, else the machine's). ``table_dtype`` defaults to ``engram_cfg.table_dtype``; ``dense_dtype`` is
    the engine's precision: "bf16" when ``train.bf16``, else "fp32". ``activations``: an
    activation estimate (``total``, ``describe()``; :func:`~comeir_dist.parallel.activation_plan.run_activations`) or None,
    added to every rank's reserve.
    """
    if pcfg is None:
        from comeir_dist.config.parallel import ParallelConfig

        pcfg = ParallelConfig()
    g = lambda name, default: getattr(pcfg, name, default)  # noqa: E731
    dev = resolve_device(device or g("device", "auto"))
    world = int(g("world_size", 1))
    if world < 1:
        raise UserError(f"parallel.world_size {world}; must be >= 1")
    mem_gib = g("device_memory_gib", None)
    mem_gib = detect_device_memory_gib(dev) if mem_gib is None else float(mem_gib)
    if mem_gib <= 0:
        raise UserError(f"parallel.device_memory_gib {mem_gib}; must be > 0")
    headroom = float(g("headroom", DEFAULT_HEADROOM))
    if not 0 < headroom <= 1:
        raise UserError(f"parallel.headroom {headroom}; must be in (0, 1] (fraction of device memory the plan may use)")
    reserve = g("reserve_gib", None)
    reserve = DEFAULT_RESERVE_GIB if reserve is None else float(reserve)
    if reserve < 0:
        raise UserError(f"parallel.reserve_gib {reserve}; must be >= 0")
    tdt = table_dtype or (engram_cfg.table_dtype if isinstance(engram_cfg, EngramConfig) else "fp32")
    if tdt not in ("fp16", "fp32"):
        raise UserError(f"table dtype {tdt!r}; allowed values: fp16, fp32")
    if balance not in ("group", "global"):
        raise UserError(f"balance {balance!r}; allowed values: group, global")
    ds = {"zero_stage": int(g("zero_stage", 0)), "offload_optimizer": False, "offload_params": False}
    if g("deepspeed_config", None):
        ds.update(read_deepspeed_config(g("deepspeed_config", None), ds["zero_stage"]))
    cshards = g("column_shards", None)
    act = activations.total if activations is not None else 0
    st = _Settings(world, dev, tdt, dense_dtype, ds["zero_stage"], g("sharding", "auto"), int(mem_gib * GIB),
                   headroom, int(reserve * GIB) + act, balance, float(auto_split_fraction),
                   ds["offload_optimizer"], ds["offload_params"], int(cshards) if cshards else None)
    specs = table_specs(engram_cfg) if isinstance(engram_cfg, EngramConfig) else list(engram_cfg or [])
    dense = dense_params if isinstance(dense_params, DenseCount) else DenseCount(int(dense_params))
    plan = _plan(specs, dense, st)
    if activations is not None:
        plan.activation_bytes, plan.activation_note = act, activations.describe() + " (in the reserve)"
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(specs, dense, st, plan)
        if act > st.reserve - act:  # the archive-quadratic term dominates the reserve: say how to shrink it
            plan.suggestions.insert(0, f"more train.grad_accum_steps or {activations.remedy} ({_gib(act)}/rank of "
                                       f"activations: {activations.describe()})")
    return plan


def check_plan_fits(engram_cfg: Union[EngramConfig, Sequence[TableSpec], None],
                    dense_params: Union[int, DenseCount], pcfg=None, **kwargs) -> MemoryPlan:
    """:func:`plan_memory`, raising :class:`UserError` with ``plan.message()`` when a rank does not fit."""
    plan = plan_memory(engram_cfg, dense_params, pcfg, **kwargs)
    if not plan.fits:
        raise UserError(plan.message())
    return plan


def format_plan(plan: MemoryPlan, show_tables: bool = False, max_ranks: int = 32) -> str:
    """Readable per-rank table (the most loaded ``max_ranks`` ranks when there are more)."""
    d = plan.dense
    t = plan.totals
    sharding = plan.sharding if isinstance(plan.sharding, str) else f"{len(plan.sharding)} explicit"
    kinds: dict[str, int] = {}
    for p in plan.tables:
        kinds[p.sharding] = kinds.get(p.sharding, 0) + 1
    lines = [
        f"memory plan: {plan.world_size} x {plan.device} rank(s), {_gib(plan.device_memory_bytes)} each, "
        f"usable {_gib(plan.usable_bytes)} (headroom {plan.headroom:g}), reserve {_gib(plan.reserve_bytes)}/rank",
        f"Engram: {len(plan.tables)} tables, {t['table_params']:,} params, {plan.table_dtype} weights "
        f"{_gib(t['table_bytes'])} + row-wise Adagrad {_gib(t['optimizer_bytes'])}; sharding {sharding} -> "
        + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none")
        + (f" (greedy balance: {plan.balance})" if plan.tables else ""),
        f"dense: {d.params:,} params ({d.trainable:,} trainable, {d.source}), {d.dtype}, ZeRO-{d.zero_stage}"
        + (f", offload {d.offload}" if d.offload else "")
        + f": per rank weights {_gib(d.param_bytes)} + grads {_gib(d.grad_bytes)} + AdamW {_gib(d.optimizer_bytes)}"
        + (f" + buffers {_gib(d.buffer_bytes)}" if d.buffer_bytes else ""),
        *([plan.activation_note] if plan.activation_note else []),
        "",
        f"{'rank':>5} {'shards':>6} {'engram w':>11} {'adagrad':>10} {'dense':>10} {'reserve':>10} {'total':>11}  fits",
    ]
    rows = plan.ranks
    if len(rows) > max_ranks:
        rows = sorted(sorted(rows, key=lambda r: -r.total)[:max_ranks], key=lambda r: r.rank)
    for r in rows:
        lines.append(f"{r.rank:>5} {r.shards:>6} {_gib(r.table_bytes):>11} {_gib(r.optimizer_bytes):>10} "
                     f"{_gib(r.dense_bytes):>10} {_gib(r.reserve):>10} {_gib(r.total):>11}  "
                     f"{'yes' if r.fits else 'NO'}")
    if len(rows) < len(plan.ranks):
        lines.append(f"  ... {len(plan.ranks) - len(rows)} less loaded ranks not shown")
    lo = min(plan.ranks, key=lambda r: r.total)
    lines.append(f"{'sum':>5} {sum(r.shards for r in plan.ranks):>6} {_gib(t['table_bytes']):>11} "
                 f"{_gib(t['optimizer_bytes']):>10} {_gib(t['dense_bytes']):>10} {_gib(t['reserve_bytes']):>10} "
                 f"{_gib(t['total_bytes']):>11}  (least loaded rank {lo.rank}: {_gib(lo.total)})")
    if show_tables and plan.tables:
        lines += ["", f"{'table':<18} {'rows':>12} {'dim':>4} {'sharding':<12} {'weights':>10}  ranks"]
        for p in plan.tables:
            rk = ",".join(map(str, p.ranks)) if len(p.ranks) <= 8 else f"{p.ranks[0]}..{p.ranks[-1]} ({len(p.ranks)})"
            lines.append(f"{p.name:<18} {p.rows:>12,} {p.dim:>4} {p.sharding:<12} {_gib(p.weight_bytes):>10}  {rk}")
    lines += ["", ("OK: " if plan.fits else "DOES NOT FIT: ") + plan.message()]
    return "\n".join(lines)
