"""Worker side of `comeir bench train` (one spawned process per rank; see ``comeir_dist.bench.train`` for the method).

Everything here runs inside a process started by :func:`comeir_dist.bench.train.run_groups`: it joins a gloo
group, builds the REAL training objects of ``train.loop`` (``build_sharded_model`` + ``init_tables_deterministic``
+ ``DenseEngine``, batches from ``EpochSampler`` cut by ``rank_slice``) and times the loop's step; with
``paths=["fused", "nn"]`` it also builds the same model with plain ``EmbeddingBagCollection`` tables trained by
``torch.optim.Adagrad`` over dense gradients and runs both interleaved, step by step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("comeir_dist.bench.train")

ROOT = "bench::step"
# record_function regions opened while profiling -> attribution label ("bucket.part")
REGIONS = {
    "bench::forward": "dense.forward",            # dense.loss(items, tgt): the DeepSpeed engine forward
    "bench::engram_keys": "keys.keys",            # LookupPass.add / .run: hashing into heads, KJT build, unpack
    "bench::tables_fwd": "tables.forward",        # EngramTables.forward: DMP (input dist, TBE, output dist) / EBC
    "bench::backward": "dense.backward",          # engine.backward(loss * weight)
    "bench::optimizer_step": "dense.optimizer",   # engine.step(): ZeRO AdamW step (+ clipping, param sync)
    "bench::tables_opt": "tables.optimizer",      # nn baseline only: torch.optim.Adagrad.step + zero_grad
    "bench::loss_log": "other.loss_log",          # the loop's float(loss) + loss all-reduce for logging
    "bench::batch": "other.batch",                # sampler + rank_slice + tensors
}
# autograd nodes created inside these forward regions are attributed to the same part in backward
BACKWARD_OF = {"tables.forward": "tables.backward_update", "keys.keys": "keys.keys"}
COMM_PATTERNS = ("bench::comm", "c10d::", "gloo", "awaitable wait", "nccl", "all_reduce", "allreduce", "all_to_all",
                 "alltoall", "all2all",
                 "reduce_scatter", "reducescatter", "all_gather", "allgather", "broadcast", "barrier",
                 "record_param_comms", "_wait_tensor", "wait_tensor")
BUCKETS = ("tables", "dense", "comm", "keys", "other")
BACKWARD_PREFIX = "autograd::engine::evaluate_function"
RESOLVE_LAZY = True  # while profiling, resolve DMP's LazyAwaitable outputs inside the table region


# ---- process entry ----------------------------------------------------------------------------------------
def worker_entry(rank: int, world: int, port: int, job: dict, results, turn=None) -> None:
    """Spawned target: join the group, run the job, put ``(rank, result | None, traceback | None)``. ``turn``
    (``bench.turns.Turn``): wait for the parent before each unit of work (groups taking turns)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("comeir_dist.bench").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock (a semaphore os._exit would leak)
    torch.set_num_threads(int(job["threads"]))
    code = 0
    try:
        dist.init_process_group(job["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        res = run_job(job, turn)
        dist.barrier()
        results.put((rank, res, None))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        code = 1
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the result is flushed to the parent; skip the interpreter teardown of torch/DeepSpeed/TorchRec (tens of
    # seconds on a loaded machine) -- nothing else is left to write
    results.close()
    results.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- training state ------------------------------------------------------------------------------------------
@dataclass
class PathState:
    name: str                 # "fused" | "nn"
    model: Any
    dense: Any
    sampler: Any
    table_opt: Optional[torch.optim.Optimizer] = None
    lookups: list = field(default_factory=list)      # per tables() call: {group: valid ids}
    bags: list = field(default_factory=list)         # per tables() call: stride x features
    capture: Optional[list] = None                   # KJT dicts of captured steps (isolated measurement)
    records: list = field(default_factory=list)      # per step: {"s", "loss", "lookups", "bags", "timed"}


def _count_hook(state: PathState):
    def hook(_module, args):
        kjts = args[0]
        state.lookups.append({g: int(k.lengths().sum()) for g, k in kjts.items()})
        state.bags.append(sum(int(k.stride()) * len(k.keys()) for k in kjts.values()))
        if state.capture is not None:
            state.capture.append(dict(kjts))
    return hook


def plain_tables(cfg, device) -> dict:
    """{group: unsharded EmbeddingBagCollection} (fp32, nn.EmbeddingBag with dense gradients) for every group."""
    from comeir_dist.engram.tables import build_engram_collection
    from comeir_dist.model.engram_memory import grouped_specs

    return {g: build_engram_collection(specs, device=device, dtype="fp32", init_scale=cfg.init_scale)
            for g, specs in grouped_specs(cfg).items()}


def build_plain_model(cfg, sids, emb, device):
    """The model of ``build_sharded_model`` with plain EmbeddingBagCollections attached instead of DMP: the same
    module tree (tables outside it, so DeepSpeed never sees them), the same lookups, a dense table gradient."""
    from comeir_dist.model.factory import build_model

    model = build_model(cfg, sids.codes, sids.codebooks, emb, sparse_device="meta")
    model.tables.attach(plain_tables(cfg.engram, device))
    model.to(device)
    model.trie = model.trie.to(device)
    return model


def table_parameters(tables) -> list[torch.nn.Parameter]:
    """Parameters of the attached table collections of an ``EngramTables``."""
    return [p for m in tables.collections().values() for p in m.parameters()]


def build_state(path: str, cfg, env, sids, emb, n_samples: int) -> PathState:
    """As ``train.loop._train``: seeded build, deterministic tables, per-rank seed, DenseEngine, sampler."""
    from comeir_dist.parallel.dense import DenseEngine
    from comeir_dist.parallel.engram_tables import init_tables_deterministic, sparse_grad_scale
    from comeir_dist.train.samples import EpochSampler
    from comeir_dist.train.setup import build_sharded_model, dense_parameters, seed_everything

    pc, tc = cfg.parallel, cfg.train
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    if path == "fused":
        model = build_sharded_model(cfg, sids, emb, env.device, plan=pc.sharding, column_shards=pc.column_shards,
                                    grad_scale=sparse_grad_scale(env.world_size))
    else:
        model = build_plain_model(cfg, sids, emb, env.device)
    init_tables_deterministic(model.tables, cfg.seed, cfg.engram.init_scale)
    seed_everything(cfg.seed + 7919 * (env.rank + 1))
    model.train()
    t1 = time.perf_counter()
    per_rank = math.ceil(tc.batch_size / env.world_size)
    dense = DenseEngine(model, cfg, env.device, env.world_size, per_rank, dense_parameters(model))
    table_opt = None
    if path == "nn":
        table_opt = torch.optim.Adagrad(table_parameters(model.tables), lr=cfg.engram.sparse_lr, eps=cfg.engram.eps)
    state = PathState(path, model, dense, EpochSampler(n_samples, tc.batch_size, cfg.seed), table_opt)
    model.tables.register_forward_pre_hook(_count_hook(state))
    log.info("bench train: %s model + tables %.1fs, DeepSpeed engine %.1fs", path, t1 - t0, time.perf_counter() - t1)
    return state


def _region(name: str, on: bool):
    return torch.profiler.record_function(name) if on else contextlib.nullcontext()


def train_step(state: PathState, hist, target, env, annotate: bool = False) -> tuple[float, int]:
    """One step of ``train.loop`` (same calls, same order); ``annotate`` adds record_function regions.
    Returns (this rank's loss, samples in the global batch)."""
    from comeir_dist.parallel.dist_env import all_reduce_sum
    from comeir_dist.train.loop import rank_slice

    dense = state.dense
    with _region("bench::batch", annotate):
        idx = state.sampler.next()
        mine, weight = rank_slice(idx, env.rank, env.world_size)
        items = torch.as_tensor(hist[mine], device=env.device)
        tgt = torch.as_tensor(target[mine], device=env.device)
    with _region("bench::forward", annotate):
        loss = dense.loss(items, tgt)
    dense.backward_step(loss * weight)  # engine.backward + engine.step (regions patched in by `annotations`)
    if state.table_opt is not None:  # nn baseline: the dense optimizer over the full table gradients
        with _region("bench::tables_opt", annotate):
            state.table_opt.step()
            state.table_opt.zero_grad(set_to_none=True)
    with _region("bench::loss_log", annotate):
        local = float(loss.detach()) * (len(mine) if weight else 0)
        all_reduce_sum([local], env)
    return float(loss.detach()), len(idx)


@contextlib.contextmanager
def annotations(state: PathState):
    """record_function regions around the table call, the lookup pass and the engine's backward / step,
    installed as instance attributes (nothing in the model code changes) and removed afterwards."""
    from torch.profiler import record_function

    def wrap(fn, name):
        def inner(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return inner

    model, engine = state.model, state.dense.engine
    tables, lookup = model.tables, model.lookup
    orig_new_pass = lookup.new_pass

    def new_pass(fold=None):
        lp = orig_new_pass(fold)
        lp.add = wrap(lp.add, "bench::engram_keys")
        lp.run = wrap(lp.run, "bench::engram_keys")
        return lp

    orig_forward = tables.forward

    def tables_forward(kjts):
        # DMP returns LazyAwaitables: their output exchange (pooled all-to-all, KeyedTensor assembly) would run at
        # the first use, in LookupPass.run's unpacking; resolve them here so it is counted with the table call
        from torchrec.distributed.types import LazyAwaitable

        with record_function("bench::tables_fwd"):
            out = orig_forward(kjts)
            if RESOLVE_LAZY:
                for v in out.values():
                    LazyAwaitable._wait_async(v)
        return out

    patches = [(tables, "forward", tables_forward), (lookup, "new_pass", new_pass),
               (engine, "backward", wrap(engine.backward, "bench::backward")),
               (engine, "step", wrap(engine.step, "bench::optimizer_step"))]
    for obj, name, fn in patches:
        object.__setattr__(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, _ in patches:
            obj.__dict__.pop(name, None)


COLLECTIVES = ("all_reduce", "all_to_all_single", "all_to_all", "reduce_scatter_tensor", "reduce_scatter",
               "all_gather_into_tensor", "all_gather", "broadcast", "barrier", "reduce", "all_gather_object",
               "broadcast_object_list")


@contextlib.contextmanager
def comm_annotations():
    """``bench::comm::<fn>`` regions around the torch.distributed collectives (a synchronous call then includes
    its wait) and ``bench::comm::wait`` around ``Work.wait`` (the wait of async collectives: TorchRec's
    all-to-all awaitables, DeepSpeed's async reductions). Patched for the profiled steps only."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    from torch.profiler import record_function

    def wrap(fn, name):
        def inner(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        inner.__wrapped__ = fn
        return inner

    saved = []
    for mod in (dist, c10d):
        for n in COLLECTIVES:
            fn = getattr(mod, n, None)
            if callable(fn):
                saved.append((mod, n, fn))
                setattr(mod, n, wrap(fn, f"bench::comm::{n}"))
    work = torch._C._distributed_c10d.Work
    saved.append((work, "wait", work.wait))
    work.wait = wrap(work.wait, "bench::comm::wait")
    try:
        yield
    finally:
        for obj, n, fn in reversed(saved):
            setattr(obj, n, fn)


# ---- profile attribution ---------------------------------------------------------------------------------------
def _is_comm(name: str) -> bool:
    n = name.lower()
    return any(p in n for p in COMM_PATTERNS)


def attribute(events, top: int = 8) -> dict:
    """Split the wall time of every ``bench::step`` tree into labels (see the module doc of bench.train).

    Each event gets a label: a communication op (name pattern) -> ``comm.<op>``; a bench region -> its label;
    an autograd backward node whose forward op ran inside the tables / keys region -> that part's backward label;
    anything else inherits its parent's label. The event's SELF time is added to its label, so the labels of a
    tree add up exactly to the root's duration (root self time = ``other``)."""
    roots = [e for e in events if e.name == ROOT and e.cpu_parent is None]
    # pass 1: sequence numbers of the forward ops run inside the table / key regions (one forward per step)
    seq_label: dict[int, str] = {}

    def collect(e, inside: Optional[str]):
        stack = [(e, inside)]
        while stack:
            ev, lab = stack.pop()
            own = REGIONS.get(ev.name)
            if own in BACKWARD_OF:
                lab = own
            elif own is not None:
                lab = None
            if ev.name.startswith(BACKWARD_PREFIX):
                continue  # backward subtrees are not forward ops
            if lab is not None and getattr(ev, "sequence_nr", -1) is not None and ev.sequence_nr >= 0:
                seq_label.setdefault(ev.sequence_nr, BACKWARD_OF[lab])
            stack.extend((c, lab) for c in ev.cpu_children)

    for r in roots:
        collect(r, None)
    # pass 2: self time per label
    seconds: dict[str, float] = defaultdict(float)
    comm_in: dict[str, float] = defaultdict(float)  # communication time by the phase it ran in
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = 0.0
    for r in roots:
        total += r.cpu_time_total / 1e6
        stack = [(r, "other.other", "other.other")]
        while stack:
            ev, parent_label, phase = stack.pop()
            lab = parent_label
            if _is_comm(ev.name):
                lab = "comm." + _comm_kind(ev.name) if not parent_label.startswith("comm.") else parent_label
                if ev.name.startswith(BACKWARD_PREFIX) and ev.sequence_nr in seq_label:
                    phase = seq_label[ev.sequence_nr]  # e.g. TorchRec's pooled all-to-all backward
            elif ev.name in REGIONS:
                lab = REGIONS[ev.name] if not parent_label.startswith("comm.") else parent_label
            elif ev.name.startswith(BACKWARD_PREFIX) and not parent_label.startswith("comm."):
                lab = seq_label.get(ev.sequence_nr, parent_label)
            if not lab.startswith("comm."):
                phase = lab
            s = max(ev.self_cpu_time_total, 0.0) / 1e6
            seconds[lab] += s
            if lab.startswith("comm."):
                comm_in[phase] += s
            by_op[lab.split(".")[0]][ev.name] += s
            stack.extend((c, lab, phase) for c in ev.cpu_children)
    n = max(1, len(roots))
    accounted = sum(seconds.values())
    buckets = {b: sum(v for k, v in seconds.items() if k.split(".")[0] == b) for b in BUCKETS}
    return {
        "steps": len(roots),
        "profiled_step_s": total / n,
        "seconds_per_step": {b: v / n for b, v in buckets.items()},
        "shares": {b: (v / total if total else 0.0) for b, v in buckets.items()},
        "detail_seconds_per_step": {k: v / n for k, v in sorted(seconds.items())},
        "comm_seconds_per_step_by_phase": {k: v / n for k, v in sorted(comm_in.items())},
        "unaccounted_fraction": (total - accounted) / total if total else 0.0,
        "top_ops_ms_per_step": {b: [[name, 1e3 * s / n] for name, s in sorted(ops.items(), key=lambda x: -x[1])[:top]]
                                for b, ops in by_op.items()},
    }


def _comm_kind(name: str) -> str:
    n = name.lower()
    for kind, pats in (("wait", ("bench::comm::wait", "awaitable wait")),
                       ("all_to_all", ("all_to_all", "alltoall", "all2all")),
                       ("reduce_scatter", ("reduce_scatter", "reducescatter")),
                       ("all_reduce", ("all_reduce", "allreduce")), ("all_gather", ("all_gather", "allgather")),
                       ("broadcast", ("broadcast",)), ("barrier", ("barrier",))):
        if any(p in n for p in pats):
            return kind
    return "other"


def profile_path(state: PathState, hist, target, env, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    n0 = len(state.lookups)
    with annotations(state), comm_annotations(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(ROOT):
                train_step(state, hist, target, env, annotate=True)
    t0 = time.perf_counter()
    att = attribute(prof.events())
    log.info("bench train: profile attribution took %.1fs", time.perf_counter() - t0)
    lk = [sum(d.values()) for d in state.lookups[n0:]]
    att["lookups_per_step"] = float(np.mean(lk)) if lk else 0.0
    t = att["detail_seconds_per_step"]
    table_s = sum(v for k, v in t.items() if k.startswith("tables."))
    att["table_s_per_step"] = table_s
    att["table_lookups_per_s"] = att["lookups_per_step"] / table_s if table_s > 0 else None
    return att


# ---- isolated table training ---------------------------------------------------------------------------------
def _outputs(mods: dict, batch: dict) -> list[torch.Tensor]:
    return [mods[g](kjt).values() for g, kjt in batch.items()]


def isolated_tables(fused_mods: dict, plain_mods: dict, plain_opt, batches: list[dict], reps: int,
                    warmup: int = 1, seed: int = 0) -> dict:
    """Forward and forward + backward + update of the tables alone on captured KJTs of real steps: fused DMP
    (row-wise Adagrad inside backward) vs plain EBC + ``torch.optim.Adagrad`` (dense gradients). Interleaved,
    median over ``reps`` passes over ``batches``; one random cotangent per output, the same for every pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cots = [[torch.randn(v.shape, generator=g) for v in _outputs(fused_mods, b)] for b in batches]

    def fused_train():
        for b, c in zip(batches, cots):
            torch.autograd.backward(_outputs(fused_mods, b), c)

    def plain_train():
        for b, c in zip(batches, cots):
            plain_opt.zero_grad(set_to_none=True)
            torch.autograd.backward(_outputs(plain_mods, b), c)
            plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def fwd(mods):
        def run():
            with torch.no_grad():
                for b in batches:
                    _outputs(mods, b)
        return run

    fns = {"fused": {"forward": fwd(fused_mods), "train": fused_train},
           "nn_embedding": {"forward": fwd(plain_mods), "train": plain_train}}
    times = {p: {m: [] for m in ms} for p, ms in fns.items()}
    for rep in range(warmup + reps):
        order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
        for p in order:
            for m, fn in fns[p].items():
                t0 = time.perf_counter()
                fn()
                dt = (time.perf_counter() - t0) / len(batches)
                if rep >= warmup:
                    times[p][m].append(dt)
    lookups = float(np.mean([sum(int(k.lengths().sum()) for k in b.values()) for b in batches]))
    out = {"batches": len(batches), "reps": reps, "lookups_per_batch": lookups, "paths": {}}
    for p, ms in times.items():
        out["paths"][p] = {m: {"ms_per_batch": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts),
                               "max_ms": 1e3 * max(ts), "lookups_per_s": lookups / float(np.median(ts))}
                           for m, ts in ms.items()}
    f, n = out["paths"]["fused"], out["paths"]["nn_embedding"]
    out["fused_over_nn_embedding"] = {m: f[m]["lookups_per_s"] / n[m]["lookups_per_s"] for m in f}
    return out


def unique_rows(batches: list[dict]) -> float:
    """Mean number of distinct (table, row) pairs per captured step: the rows the fused kernel updates."""
    per = []
    for b in batches:
        n = 0
        for kjt in b.values():
            for jt in kjt.to_dict().values():
                n += int(torch.unique(jt.values()).numel())
        per.append(n)
    return float(np.mean(per)) if per else 0.0


def capture_kjts(model, hist, target, idx_list, device) -> list[dict]:
    """The KJTs one training forward would send to the tables, for each batch (forward aborted at the tables)."""
    from comeir_dist.model.history import HistoryBatch

    class _Stop(Exception):
        pass

    got: list[dict] = []

    def hook(_m, args):
        got.append(dict(args[0]))
        raise _Stop

    h = model.tables.register_forward_pre_hook(hook)
    try:
        for idx in idx_list:
            items = torch.as_tensor(hist[idx], device=device)
            tgt = torch.as_tensor(target[idx], device=device)
            with torch.no_grad(), contextlib.suppress(_Stop):
                model.level_logits(HistoryBatch(items, tgt), model.catalog.item_codes(tgt))
    finally:
        h.remove()
    return got


def isolated_at_scale(cfg, s_t: float, sids, emb, hist, target, idx_list, device, reps: int) -> dict:
    """Isolated table training with the config's model at another inter scale ``s_t`` (real keys re-hashed)."""
    from comeir_dist.model.engram_memory import EngramTables
    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.engram_tables import init_tables_deterministic, shard_engram_tables
    from comeir_dist.engram.sizing import table_specs

    ecfg = cfg.engram.model_copy(update={"s_t": float(s_t)})
    c2 = cfg.model_copy(update={"engram": ecfg})
    model = build_model(c2, sids.codes, sids.codebooks, emb, sparse_device="meta")
    batches = capture_kjts(model, hist, target, idx_list, device)
    del model
    fused = EngramTables(ecfg, device="meta")
    shard_engram_tables(fused, ecfg, device=device, plan=cfg.parallel.sharding,
                        column_shards=cfg.parallel.column_shards)
    init_tables_deterministic(fused, cfg.seed, ecfg.init_scale)
    plain = EngramTables(ecfg, device="meta")
    plain.attach(plain_tables(ecfg, device))
    init_tables_deterministic(plain, cfg.seed, ecfg.init_scale)
    opt = torch.optim.Adagrad(table_parameters(plain), lr=ecfg.sparse_lr, eps=ecfg.eps)
    res = isolated_tables(fused.collections(), plain.collections(), opt, batches, reps)
    res["s_t"] = float(s_t)
    res["table_params"] = int(sum(s.rows * s.dim for s in table_specs(ecfg)))
    res["unique_rows_per_batch"] = unique_rows(batches)
    return res


# ---- the job ---------------------------------------------------------------------------------------------------
def run_job(job: dict, turn=None) -> dict:
    """Build the requested paths, run warm-up + timed steps interleaved, profile, (rank 0, world 1) isolated.
    With a ``turn`` (``bench.turns``) every unit of work -- the warm-up, each block of ``bench.interleave`` timed
    steps, the profiled steps -- waits for the parent's go and reports back when done."""
    from tqdm import tqdm

    from comeir_dist.bench.turns import Turn, units
    from comeir_dist.config.run import RunConfig
    from comeir_dist.parallel.dist_env import init_distributed
    from comeir_dist.train.samples import training_samples
    from comeir_dist.train.setup import load_inputs

    try:
        import deepspeed.utils

        deepspeed.utils.logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    turn = turn or Turn()
    cfg = RunConfig.model_validate(job["run"])
    s = job["settings"]
    env = init_distributed(cfg.device, cfg.parallel.backend)
    t_setup = time.perf_counter()
    sids, emb = load_inputs(cfg)
    hist, target = training_samples(cfg.dataset, cfg.max_history)
    setup = {"data_s": time.perf_counter() - t_setup}
    states = {}
    for p in job["paths"]:
        t0 = time.perf_counter()
        states[p] = build_state(p, cfg, env, sids, emb, len(target))
        setup[f"build_{p}_s"] = time.perf_counter() - t0
    setup_s = time.perf_counter() - t_setup
    log.info("bench train: world %d, paths %s built in %.1fs (%s)", env.world_size, list(states), setup_s,
             ", ".join(f"{k} {v:.1f}" for k, v in setup.items()))
    n_steps = s["warmup"] + s["steps"]
    rng_state = torch.get_rng_state()
    capture_from = n_steps - min(s["isolated_batches"], s["steps"]) if job.get("isolated") else None
    plan = units(s["warmup"], s["steps"], s.get("interleave") or s["steps"], s["profile_steps"])
    load_before = None
    bar = tqdm(total=n_steps * len(states), desc=f"bench train w{env.world_size} {'+'.join(states)}", unit="step",
               mininterval=2.0, disable=env.rank != 0)
    i = 0
    for kind, n in plan:
        if kind == "profile":
            break
        turn.wait()
        if kind == "timed" and load_before is None:
            load_before = list(os.getloadavg())
        for i in range(i, i + n):
            names = list(states) if i % 2 == 0 else list(states)[::-1]  # alternate the order of the paths
            for p in names:
                st = states[p]
                if i == 0:
                    torch.set_rng_state(rng_state)  # same dropout masks for the first step of every path
                if capture_from is not None and i == capture_from and p == "fused":
                    st.capture = []
                n0 = len(st.lookups)
                env.barrier()
                wall0, t0 = time.time(), time.perf_counter()
                loss, n_global = train_step(st, hist, target, env)
                dt = time.perf_counter() - t0
                lk = st.lookups[n0:]
                st.records.append({"step": i, "s": dt, "wall": [wall0, wall0 + dt], "loss": loss, "samples": n_global,
                                   "timed": i >= s["warmup"], "lookups": int(sum(sum(d.values()) for d in lk)),
                                   "lookups_by_group": {g: sum(d.get(g, 0) for d in lk) for g in (lk[0] if lk else {})},
                                   "bags": int(sum(st.bags[n0:]))})
                bar.update(1)
        i += 1
        turn.done()
    bar.close()
    captured = states["fused"].capture if "fused" in states else None
    if "fused" in states:
        states["fused"].capture = None
    result: dict = {"rank": env.rank, "world_size": env.world_size, "threads": torch.get_num_threads(),
                    "setup_s": setup_s, "setup_breakdown_s": setup,
                    "loadavg_steps": {"before": load_before or list(os.getloadavg()), "after": list(os.getloadavg())}, "paths": {}}
    for p, st in states.items():
        result["paths"][p] = {"records": st.records}
    if s["profile_steps"] > 0:
        turn.wait()
        for p, st in states.items():  # profiled steps after the timed ones (same process, same objects)
            log.info("bench train: profiling %s (%d steps)", p, s["profile_steps"])
            result["paths"][p]["profile"] = profile_path(st, hist, target, env, s["profile_steps"])
        turn.done()
    if job.get("isolated") and env.world_size == 1 and "fused" in states and "nn" in states and captured:
        log.info("bench train: isolated tables on %d captured steps", len(captured))
        iso = isolated_tables(states["fused"].model.tables.collections(), states["nn"].model.tables.collections(),
                              states["nn"].table_opt, captured, s["isolated_reps"])
        iso["s_t"] = float(cfg.engram.s_t)
        iso["table_params"] = int(sum(p.numel() for p in table_parameters(states["nn"].model.tables)))
        iso["unique_rows_per_batch"] = unique_rows(captured)
        result["isolated"] = [iso]
        if s["isolated_s_t"]:
            from comeir_dist.train.samples import EpochSampler

            smp = EpochSampler(len(target), cfg.train.batch_size, cfg.seed)  # the batches of the captured steps
            idx_list = [smp.next() for _ in range(n_steps)][capture_from:]
            states.clear()  # free the training models first: the larger tables need the memory
            captured = None
            import gc

            gc.collect()
            for s_t in s["isolated_s_t"]:
                log.info("bench train: isolated tables at s_t=%s", s_t)
                result["isolated"].append(isolated_at_scale(cfg, s_t, sids, emb, hist, target, idx_list, env.device,
                                                            s["isolated_reps"]))
                gc.collect()
    from comeir_dist.bench.latency import peak_rss_gib

    result["peak_rss_gib"] = peak_rss_gib()
    return result
