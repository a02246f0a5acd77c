"""`comeir bench train`: throughput of the REAL training step on 1 and N workers, where its time goes, and the
fused sharded Engram tables vs the same model with plain ``nn.EmbeddingBag`` tables and a dense optimizer.

What runs
    Every measurement runs in freshly spawned processes (``torch.multiprocessing`` "spawn", one per rank, one gloo
    group on a free localhost TCP port; :func:`run_groups`), each with ``torch.set_num_threads(threads)`` where
    ``threads x workers <= cores``. A rank builds exactly the objects of ``train.loop._train``: seeded
    ``build_sharded_model`` (DMP, fused ``EXACT_ROWWISE_ADAGRAD``), ``init_tables_deterministic``, the per-rank
    seed, ``DenseEngine`` (DeepSpeed ZeRO, client AdamW) over ``dense_parameters``, ``EpochSampler`` over the
    config's training samples. A step is the loop's step: next global batch, ``rank_slice``, ``dense.loss(items,
    tgt)``, ``dense.backward_step(loss * weight)``, ``float(loss)`` and the loss all-reduce for logging
    (``bench.train_worker.train_step``). ``warmup`` untimed steps, then ``steps`` timed steps (a barrier before
    each, outside the timing); a step's time is the slowest rank's; samples/s = global samples / summed step time.

Lookups
    Counted, not estimated: a forward pre-hook on ``model.tables`` (the single ``EngramTables`` call of a training
    forward, i.e. ``LookupPass.run``) sums the KJT lengths of every group = valid (key, head) ids = rows read; a
    masked / invalid key is an empty bag and is not counted. Every looked-up row also receives its gradient in the
    fused backward (rows hit several times are updated once, with the summed gradient; ``unique_rows`` reports
    how many). Rates are "lookups+updates/s" = lookups of all ranks / step time. The per-step counts only depend on
    the batch, so 1 and N workers and both table paths must report the same per-step totals (``checks``).

Time shares (``profile`` of every run, ``profile_steps`` extra steps after the timed ones)
    ``torch.profiler`` (CPU) over whole steps, each inside ``record_function("bench::step")``; while profiling,
    regions are added as instance attributes only (the model code is untouched): ``bench::forward`` (engine
    forward), ``bench::engram_keys`` (``LookupPass.add``/``run``: hashing keys into every head, KJT assembly,
    unpacking), ``bench::tables_fwd`` (``EngramTables.forward``: DMP input dist, fbgemm TBE, output dist -- the
    LazyAwaitables DMP returns are resolved inside this region while profiling, so their output exchange is not
    deferred into the unpacking; or the plain EBC), ``bench::comm::<fn>`` around the ``torch.distributed``
    collectives (a synchronous call then includes its wait) and ``bench::comm::wait`` around ``Work.wait`` (the
    wait of async collectives), ``bench::backward`` (``engine.backward``), ``bench::optimizer_step`` (``engine.step``),
    ``bench::tables_opt`` (baseline: ``Adagrad.step`` + ``zero_grad``). Attribution of each event's SELF time,
    so the parts of a step add up to its duration exactly:

    * ``comm``: ops whose name is a collective (``c10d::*``, gloo, TorchRec all-to-all awaitables / KJT
      all-to-all, reduce-scatter, all-gather, broadcast, barrier), wherever they run -- TorchRec's all-to-all
      of ids and pooled embeddings, DeepSpeed's gradient reduce(-scatter) / all-gather / norm all-reduce, the
      loss all-reduce. Under gloo on CPU a collective's time includes waiting for the slower rank;
    * ``tables``: the ``EngramTables`` call in forward, the autograd nodes created inside it in backward (found
      by the forward op's autograd ``sequence_nr``: the fused TBE backward that applies row-wise Adagrad, the
      pooled-output split/cat), and for the baseline the dense ``Adagrad.step`` / ``zero_grad``;
    * ``keys``: the Engram addressing work around the call (hashing into heads, KJT build, result unpacking, and
      the backward of the unpacking) -- the same ops for both table paths;
    * ``dense``: everything else of the engine forward, backward (incl. DeepSpeed's gradient hooks) and step;
    * ``other``: batch creation, ``float(loss)``, Python glue between the regions.

    The profiler adds per-op overhead (``profiled_step_s`` vs the timed step), so shares slightly over-weight
    parts made of many small ops. With N ranks every rank is attributed; the report gives rank 0 and the mean.

Fused vs plain tables (1 worker, ``compare_nn``)
    In the same 1-worker process, a second copy of the model is built by the same seeded code, but with the
    Engram groups as unsharded ``EmbeddingBagCollection`` s (``nn.EmbeddingBag`` per table, fp32, DENSE gradient:
    a full-size gradient per table per step) attached outside the module tree like the DMP modules (so DeepSpeed
    never sees them) and updated by ``torch.optim.Adagrad`` (``engram.sparse_lr``, ``engram.eps``) after the
    engine step. Identical initial tables, identical batches, identical dropout masks on the first step (its loss
    is compared). The two paths alternate step by step (order swapped every step) so machine load hits both.
    Reported: (a) in the training step -- lookups / profiled table seconds per step (forward + backward/update
    [+ optimizer]; ``keys`` excluded as it is the same work for both) = ``fused_over_nn_embedding``; (b) the tables
    alone on the KJTs captured from the last ``isolated_batches`` real steps (forward, backward with a fixed random
    output gradient, update; interleaved, median of ``isolated_reps``), also at the extra inter scales
    ``isolated_s_t`` (the same batches re-hashed for larger tables); (c) whole-step samples/s of both.
    The dense path's cost grows with the table SIZE (gradient memset, Adagrad over every row), the fused path's
    with the number of LOOKUPS; which one wins by how much depends on their ratio (see ``tables``).

Repeats and turns (``bench.repeats`` / ``--repeats``, ``bench.interleave``)
    Each repeat spawns every world size as its own process group with the fused tables only. With
    ``interleave: k`` (default 2) the groups are alive at the same time and take turns (``bench.turns``): the
    parent hands the machine to one group for its warm-up, then k timed steps at a time in ABBA order, then its
    profiled steps; the other group waits in a blocking queue read. Machine drift (25% between runs minutes
    apart on the shared 2-core machines) then hits the 1- and N-worker steps alike. ``interleave: 0`` runs them
    one after the other (order alternating between repeats). An N-over-1 ratio pairs the runs of one repeat.
    Then the 1-worker fused vs nn.EmbeddingBag pair runs alone. ``ratios`` reports every ratio the README states as median, min, max and relative spread over the
    repeats; ``runs`` / ``scaling`` / ``fused_vs_nn`` detail the first repeat.

Outputs: ``--out`` JSON (atomic; rewritten with ``"complete": false`` after each run group) and a markdown
table next to it (``.md``), which is also printed. Numbers on a shared 2-core machine are noisy.
"""
from __future__ import annotations

import logging
import os
import queue
import time
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, PositiveFloat, model_validator

from comeir_dist.config.base import Section
from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/bench/train.json"
SHARE_BUCKETS = ("tables", "dense", "comm", "keys", "other")


class BenchTrainSettings(Section):
    """The ``bench:`` section of a bench-train config (the rest of the file is a RunConfig)."""

    workers: list[int] = Field(default_factory=lambda: [1, 2], description="World sizes to measure (1 = one process).")
    steps: int = Field(8, ge=1, description="Timed training steps per run.")
    warmup: int = Field(2, ge=0, description="Untimed steps first.")
    profile_steps: int = Field(2, ge=0, description="Extra steps under torch.profiler for the time shares (0 = none).")
    threads: Optional[int] = Field(None, ge=1, description="torch threads per worker (None = cores // max(workers)).")
    compare_nn: bool = Field(True, description="Also train the plain nn.EmbeddingBag + torch.optim.Adagrad model "
                                               "(1 worker).")
    isolated_batches: int = Field(3, ge=1, description="Captured real steps replayed through the tables alone.")
    isolated_reps: int = Field(5, ge=1, description="Timed passes over the captured steps (median).")
    isolated_s_t: list[PositiveFloat] = Field(default_factory=list,
                                              description="Extra inter scales s_T for the isolated table comparison.")
    timeout_s: float = Field(1800, gt=0, description="A run group that takes longer is killed.")
    interleave: int = Field(2, ge=0, description="The world sizes of a repeat run AT ONCE and take turns, this many "
                                                 "timed steps per turn (bench.turns): machine drift hits both "
                                                 "sides of a ratio alike. 0 = one after the other.")
    repeats: int = Field(1, ge=1, description="Measure everything this many times in fresh processes, the world "
                                              "sizes in alternating order (1,2 then 2,1, ...); every ratio is "
                                              "reported as median [min, max] over the repeats.")

    @model_validator(mode="after")
    def _check(self):
        if not self.workers or any(w < 1 for w in self.workers) or len(set(self.workers)) != len(self.workers):
            raise ValueError("workers must be distinct positive integers, e.g. [1, 2]")
        self.__dict__["workers"] = sorted(self.workers)
        return self


class BenchTrainFile(RunConfig):
    """A RunConfig plus the ``bench:`` section."""

    bench: BenchTrainSettings = Field(default_factory=BenchTrainSettings)


def load_bench_config(path: str, overrides: Optional[dict] = None,
                      run_overrides: Optional[dict] = None) -> tuple[RunConfig, BenchTrainSettings]:
    """(run config, bench settings) from ``path`` with ``overrides`` of the bench section and dotted
    ``run_overrides`` of the run config (e.g. ``{"engram.s_t": 2.0}``); one-line errors."""
    from comeir_dist.cli import _set_path
    from comeir_dist.config.base import load_yaml, parse_section

    data = load_yaml(path)
    for key, value in (run_overrides or {}).items():
        _set_path(data, key, value)
    bench = data.get("bench") or {}
    if not isinstance(bench, dict):
        raise UserError(f"{path}: key 'bench' must be a mapping")
    data["bench"] = {**bench, **(overrides or {})}
    full = parse_section(BenchTrainFile, data, source=path)
    cfg = RunConfig.model_validate(full.model_dump(exclude={"bench"}))
    return cfg, full.bench


def resolve_threads(settings: BenchTrainSettings) -> int:
    cores = os.cpu_count() or 1
    threads = settings.threads or max(1, cores // max(settings.workers))
    if threads * max(settings.workers) > cores:
        raise UserError(f"bench.threads={threads} x {max(settings.workers)} workers > {cores} cores: use --threads "
                        f"{max(1, cores // max(settings.workers))} or fewer workers")
    return threads


def tables_info(cfg: RunConfig) -> dict:
    """Table sizes and the per-step state each path keeps or allocates (bytes)."""
    from comeir_dist.engram.sizing import table_specs

    specs = table_specs(cfg.engram)
    elt = 2 if cfg.engram.table_dtype == "fp16" else 4
    params = sum(s.rows * s.dim for s in specs)
    rows = sum(s.rows for s in specs)
    return {"num_tables": len(specs), "params": int(params), "rows": int(rows), "s_t": cfg.engram.s_t,
            "s_s": cfg.engram.s_s, "d_m": cfg.engram.d_m, "table_dtype": cfg.engram.table_dtype,
            "largest_table_rows": int(max(s.rows for s in specs)),
            "fused": {"weights_bytes": int(params * elt), "optimizer_state_bytes": int(rows * 4),
                      "gradient_bytes_per_step": 0,
                      "note": "fbgemm TBE, exact row-wise Adagrad: one fp32 accumulator per row (per column shard); "
                              "gradients are never materialised, looked-up rows are updated inside backward"},
            "nn_embedding": {"weights_bytes": int(params * 4), "optimizer_state_bytes": int(params * 4),
                             "gradient_bytes_per_step": int(params * 4),
                             "note": "nn.EmbeddingBag fp32 with dense gradients (a zero-filled full-size gradient "
                                     "per table per step) + torch.optim.Adagrad (one fp32 state per element, every "
                                     "row updated every step)"}}


def _check_memory(cfg: RunConfig, settings: BenchTrainSettings) -> None:
    """The isolated comparison at larger ``s_t`` holds fused tables + plain tables, Adagrad state and gradients."""
    if not settings.isolated_s_t:
        return
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return
    if avail is None:
        return
    for s_t in settings.isolated_s_t:
        c2 = cfg.model_copy(update={"engram": cfg.engram.model_copy(update={"s_t": float(s_t)})})
        need = 4 * tables_info(c2)["params"] * 4  # fused weights + plain weights, state, gradient (fp32)
        if need > 0.8 * avail:
            raise UserError(f"bench.isolated_s_t: s_t={s_t} needs ~{need / 2**30:.1f} GiB for the isolated table "
                            f"comparison, {avail / 2**30:.1f} GiB available")


def validate(cfg: RunConfig, settings: BenchTrainSettings) -> int:
    """Every check that can fail before a process is spawned; returns the threads per worker."""
    from comeir_dist.parallel.dist_env import resolve_backend, resolve_device
    from comeir_dist.train.setup import load_inputs

    if cfg.model.variant != "comeir":
        raise UserError(f"model.variant={cfg.model.variant!r}: bench train measures the Engram tables, use 'comeir'")
    if cfg.train.grad_accum_steps != 1:
        raise UserError(f"train.grad_accum_steps={cfg.train.grad_accum_steps}: bench train times one micro-batch per "
                        "step; set it to 1")
    if cfg.train.batch_size < max(settings.workers):
        raise UserError(f"train.batch_size={cfg.train.batch_size} < {max(settings.workers)} workers")
    resolve_backend(cfg.parallel.backend, resolve_device(cfg.device))
    load_inputs(cfg)  # dataset, SIDs and embeddings exist (one-line errors otherwise)
    _check_memory(cfg, settings)
    return resolve_threads(settings)


# ---- process groups -------------------------------------------------------------------------------------------
def run_groups(specs: dict, timeout: float, turns: Optional[tuple[list[str], int]] = None) -> dict:
    """Spawn every group ``label -> (world, job)`` at once (each its own gloo group on a free port) and return
    ``label -> per-rank results``. ``turns = (order, n_units)``: the groups take turns (``bench.turns``): no two
    groups ever step at the same time. Without ``turns`` there must be one group."""
    import torch.multiprocessing as mp

    from comeir_dist.bench.train_worker import worker_entry
    from comeir_dist.bench.turns import Turn, TurnTaker
    from comeir_dist.parallel.dist_env import _free_port, select_device

    if turns is None and len(specs) != 1:
        raise ValueError("several groups at once need turns")
    ctx = mp.get_context("spawn")
    first = next(iter(specs.values()))[1]
    child_env = {"OMP_NUM_THREADS": str(first["threads"]), "MKL_NUM_THREADS": str(first["threads"]),
                 # DeepSpeed fixes its accelerator at import: the children's must be the training device's
                 "DS_ACCELERATOR": select_device(first["run"].get("device", "auto")).type, "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    results = {label: ctx.Queue() for label in specs}
    gates = {label: ([ctx.Queue() for _ in range(world)], ctx.Queue()) for label, (world, _) in specs.items()}
    procs: dict[str, list] = {}
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)  # inherited by the spawned children (thread pools read it at import)
    try:
        for label, (world, job) in specs.items():
            port = _free_port()
            procs[label] = []
            for r in range(world):
                turn = Turn(gates[label][0][r], gates[label][1], r) if turns else Turn()
                procs[label].append(ctx.Process(target=worker_entry, args=(r, world, port, job, results[label], turn),
                                                daemon=False))
            for p in procs[label]:
                p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    got: dict[str, dict[int, tuple]] = {label: {} for label in specs}
    all_procs = [p for ps in procs.values() for p in ps]

    def drain() -> bool:
        """Collect finished ranks' results; False once any rank failed."""
        for label, q in results.items():
            while True:
                try:
                    rank, res, tb = q.get_nowait()
                except queue.Empty:
                    break
                got[label][rank] = (res, tb)
        return not any(tb is not None for g in got.values() for _, tb in g.values())

    deadline = time.monotonic() + timeout
    try:
        if turns:
            alive = lambda: drain() and all(p.is_alive() or p.exitcode == 0 for p in all_procs)  # noqa: E731
            try:
                TurnTaker({k: gates[k] for k in specs}, alive, timeout).run(*turns)
            except RuntimeError:
                drain()
                if not any(tb for g in got.values() for _, tb in g.values()):
                    raise
        while sum(len(g) for g in got.values()) < len(all_procs) and time.monotonic() < deadline:
            if not drain():
                break
            if all(not p.is_alive() for p in all_procs):
                time.sleep(0.5)
                drain()
                break
            time.sleep(0.2)
        failed = not drain()
        for p in all_procs:
            p.join(5.0 if failed else max(1.0, min(60.0, deadline - time.monotonic())))
    finally:
        for p in all_procs:  # only our own children, by their Process handle
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in results.values():
            q.close()
    out = {}
    for label, (world, _) in specs.items():
        errors = sorted((r, tb) for r, (_, tb) in got[label].items() if tb is not None)
        if errors:
            raise RuntimeError(f"bench train: {label}: rank {errors[0][0]} of {world} failed:\n{errors[0][1]}")
        if len(got[label]) < world:
            missing = sorted(set(range(world)) - set(got[label]))
            codes = [p.exitcode for p in procs[label]]
            raise RuntimeError(f"bench train: {label}: ranks {missing} of {world} returned nothing (exit codes "
                               f"{codes}; timeout {timeout:.0f}s)")
        out[label] = [got[label][r][0] for r in range(world)]
    return out


# ---- report -----------------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"median": float(np.median(a)), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


def summarize_path(ranks: list[dict], path: str, threads: int) -> dict:
    """One table path of one run group: step times (slowest rank), rates over all ranks, profile per rank."""
    recs = [r["paths"][path]["records"] for r in ranks]
    n = len(recs[0])
    step_s = [max(rr[i]["s"] for rr in recs) for i in range(n)]
    lookups = [sum(rr[i]["lookups"] for rr in recs) for i in range(n)]
    bags = [sum(rr[i]["bags"] for rr in recs) for i in range(n)]
    samples = [recs[0][i]["samples"] for i in range(n)]
    timed = [i for i in range(n) if recs[0][i]["timed"]]
    t = sum(step_s[i] for i in timed)
    groups = sorted({g for rr in recs for rec in rr for g in rec["lookups_by_group"]})
    out = {"workers": len(ranks), "threads_per_worker": threads, "timed_steps": len(timed),
           "warmup_steps": n - len(timed), "global_batch": int(np.median([samples[i] for i in timed])),
           "step_s": _stats([step_s[i] for i in timed]), "timed_s": t,
           "samples_per_s": sum(samples[i] for i in timed) / t,
           "lookups_per_step": float(np.mean([lookups[i] for i in timed])),
           "lookups_per_s": sum(lookups[i] for i in timed) / t,
           "lookups_by_group_per_step": {g: float(np.mean([sum(rr[i]["lookups_by_group"].get(g, 0) for rr in recs)
                                                           for i in timed])) for g in groups},
           "bags_per_step": float(np.mean([bags[i] for i in timed])),
           "per_step_lookups_all": lookups, "per_step_s_all": step_s, "per_step_timed": [recs[0][i]["timed"]
                                                                                         for i in range(n)],
           "per_step_wall_all": [[min(rr[i]["wall"][0] for rr in recs), max(rr[i]["wall"][1] for rr in recs)]
                                 for i in range(n)],
           "first_loss": recs[0][0]["loss"], "losses": [recs[0][i]["loss"] for i in range(n)],
           "setup_s": max(r["setup_s"] for r in ranks), "peak_rss_gib": [r.get("peak_rss_gib") for r in ranks],
           "loadavg_steps": ranks[0].get("loadavg_steps")}
    profs = [r["paths"][path].get("profile") for r in ranks]
    if all(profs):
        mean = {b: float(np.mean([p["shares"][b] for p in profs])) for b in SHARE_BUCKETS}
        out["profile"] = {"rank0": profs[0], "shares_mean_over_ranks": mean,
                          "shares_per_rank": [p["shares"] for p in profs],
                          "profiled_step_s_per_rank": [p["profiled_step_s"] for p in profs],
                          "profiler_overhead": profs[0]["profiled_step_s"] / out["step_s"]["median"] - 1}
    return out


def _fused_vs_nn(runs: dict, isolated: list, tables: dict) -> dict:
    f, n = runs.get("fused_w1_paired"), runs.get("nn_embedding_w1")
    if not f or not n:
        return {}
    res: dict = {"workers": 1, "table_state": {"fused": tables["fused"], "nn_embedding": tables["nn_embedding"]}}
    if "profile" in f and "profile" in n:
        pf, pn = f["profile"]["rank0"], n["profile"]["rank0"]
        res["in_training_step"] = {
            "fused": {"table_s_per_step": pf["table_s_per_step"], "lookups_per_step": pf["lookups_per_step"],
                      "lookups_per_s": pf["table_lookups_per_s"]},
            "nn_embedding": {"table_s_per_step": pn["table_s_per_step"], "lookups_per_step": pn["lookups_per_step"],
                             "lookups_per_s": pn["table_lookups_per_s"]},
            "parts_s_per_step": {
                "fused": {k: v for k, v in pf["detail_seconds_per_step"].items() if k.startswith("tables.")},
                "nn_embedding": {k: v for k, v in pn["detail_seconds_per_step"].items() if k.startswith("tables.")}},
            "method": "lookups per profiled step / profiled seconds of tables.forward + tables.backward_update "
                      "(+ tables.optimizer for the baseline) in the same steps"}
        if pf["table_lookups_per_s"] and pn["table_lookups_per_s"]:
            r = pf["table_lookups_per_s"] / pn["table_lookups_per_s"]
            res["in_training_step"]["ratio"] = r
            res["fused_over_nn_embedding"] = r
            res["requirement_5x_met"] = bool(r >= 5.0)
    res["whole_step"] = {"fused_samples_per_s": f["samples_per_s"], "nn_embedding_samples_per_s": n["samples_per_s"],
                         "ratio": f["samples_per_s"] / n["samples_per_s"]}
    if isolated:
        res["isolated"] = isolated
        res["isolated_fused_over_nn_embedding"] = {str(x["s_t"]): x["fused_over_nn_embedding"] for x in isolated}
    return res


def repeat_runs(groups: dict, threads: int) -> tuple[dict, list]:
    """Run summaries of one repeat's groups: ``{"w<N>": ranks}`` (fused only) and ``"pair"`` (1 worker, fused and
    nn.EmbeddingBag interleaved) -> ``({name: summary}, isolated results)``."""
    runs: dict = {}
    isolated: list = []
    for label, ranks in groups.items():
        for path in ranks[0]["paths"]:
            world = len(ranks)
            if label == "pair":
                name = "fused_w1_paired" if path == "fused" else "nn_embedding_w1"
            else:
                name = f"fused_w{world}"
            runs[name] = summarize_path(ranks, path, threads)
        isolated += ranks[0].get("isolated", [])
    return runs, isolated


def repeat_ratios(runs: dict, isolated: list, tables: dict) -> dict:
    """The ratios the README states, for one repeat: samples/s of N workers over 1, the comm share of N workers,
    fused over nn.EmbeddingBag (table training in the step, tables alone per s_T, whole step)."""
    out: dict = {}
    if "fused_w1" in runs:
        base = runs["fused_w1"]
        for name, r in runs.items():
            if name.startswith("fused_w") and name != "fused_w1_paired" and r["workers"] > 1:
                out[f"samples_per_s_{r['workers']}_over_1"] = r["samples_per_s"] / base["samples_per_s"]
                # the same global batch at the same step index on both sides (same sampler seed): per-step ratios
                # cancel the batch-to-batch cost differences; the median drops the odd disturbed step
                pairs = [a / b for a, b, t in zip(base["per_step_s_all"], r["per_step_s_all"], r["per_step_timed"])
                         if t and b > 0]
                if pairs:
                    out[f"per_step_{r['workers']}_over_1_median"] = float(np.median(pairs))
    for name, r in runs.items():
        if "profile" in r and name.startswith("fused_w") and r["workers"] > 1:
            out[f"comm_share_w{r['workers']}"] = r["profile"]["shares_mean_over_ranks"]["comm"]
    fv = _fused_vs_nn(runs, isolated, tables)
    if "fused_over_nn_embedding" in fv:
        out["fused_over_nn_in_step"] = fv["fused_over_nn_embedding"]
    for s_t, ratio in fv.get("isolated_fused_over_nn_embedding", {}).items():
        out[f"fused_over_nn_tables_alone_s_t{s_t}"] = ratio["train"]
    if "whole_step" in fv:
        out["fused_over_nn_whole_step"] = fv["whole_step"]["ratio"]
    return out


def ratio_stats(per_repeat: list[dict]) -> dict:
    """``{ratio: {median, min, max, spread = (max - min) / median, n, values}}`` over the repeats that have it."""
    out = {}
    for key in sorted({k for r in per_repeat for k in r}):
        vals = [r[key] for r in per_repeat if key in r]
        st = _stats(vals)
        out[key] = {**st, "spread": (st["max"] - st["min"]) / st["median"] if st["median"] else None,
                    "values": vals}
    return out


def build_report(cfg: RunConfig, settings: BenchTrainSettings, source: str, threads: int, repeats: list[dict],
                 info: dict, complete: bool) -> dict:
    """``repeats``: per repeat, ``{"order": [...], "groups": {"w<N>" | "pair": per-rank results}}``. ``runs``,
    ``scaling`` and ``fused_vs_nn`` describe the first repeat in full; ``ratios`` gives every ratio over all."""
    from comeir_dist.bench.latency import peak_rss_gib
    from comeir_dist.bench.train_worker import COMM_PATTERNS

    tables = tables_info(cfg)
    per_repeat = []
    for rep in repeats:
        runs_r, iso_r = repeat_runs(rep["groups"], threads)
        per_repeat.append({"order": rep["order"], "ratios": repeat_ratios(runs_r, iso_r, tables),
                           "samples_per_s": {k: r["samples_per_s"] for k, r in runs_r.items()},
                           "step_s_median": {k: r["step_s"]["median"] for k, r in runs_r.items()},
                           "loadavg_before": {k: (r.get("loadavg_steps") or {}).get("before", [None])[0]
                                              for k, r in runs_r.items()}})
    runs, isolated = repeat_runs(repeats[0]["groups"], threads) if repeats else ({}, [])
    checks: dict = {}
    for name, r in runs.items():
        if "profile" in r:
            checks[f"shares_sum_{name}"] = sum(r["profile"]["rank0"]["shares"].values())
    if "fused_w1_paired" in runs and "nn_embedding_w1" in runs:
        a, b = runs["fused_w1_paired"], runs["nn_embedding_w1"]
        checks["lookups_equal_fused_vs_nn"] = a["per_step_lookups_all"] == b["per_step_lookups_all"]
        checks["first_loss_abs_diff_fused_vs_nn"] = abs(a["first_loss"] - b["first_loss"])
    fused = [r for k, r in runs.items() if k.startswith("fused_w")]
    if len(fused) > 1:
        checks["lookups_equal_across_workers"] = all(r["per_step_lookups_all"] == fused[0]["per_step_lookups_all"]
                                                     for r in fused)
    scaling = {}
    if "fused_w1" in runs:
        base = runs["fused_w1"]["samples_per_s"]
        for k, r in runs.items():
            if k.startswith("fused_w") and k != "fused_w1_paired" and r["workers"] > 1:
                sp = r["samples_per_s"] / base
                scaling[f"{r['workers']}_over_1"] = {"samples_per_s_ratio": sp, "efficiency": sp / r["workers"]}
    return {
        "benchmark": "comeir bench train: real training step (TorchRec DMP fused tables + DeepSpeed ZeRO dense)",
        "complete": complete,
        "method": {
            "step": "train.loop step: EpochSampler global batch, rank_slice, dense.loss(items, tgt), "
                    "dense.backward_step(loss * weight), float(loss) + loss all-reduce; spawned gloo ranks",
            "timing": "warm-up steps untimed; per timed step the slowest rank's wall time (barrier before each "
                      "step, outside the timing); samples/s and lookups/s = totals over timed steps / summed time",
            "repeats": "every repeat spawns each world size as its own process group (fused tables only); with "
                       "interleave > 0 the groups run at once and take turns (warm-up, then interleave timed steps "
                       "per turn, ABBA order, then the profiled steps), else one after the other (order alternating "
                       "between repeats); then the 1-worker fused vs nn.EmbeddingBag pair alone; N-over-1 ratios "
                       "pair the runs of the same repeat; ratios = median [min, max] over repeats",
            "lookups": "forward pre-hook on model.tables: sum of KJT lengths (valid key x head ids) of all groups, "
                       "summed over ranks; every looked-up row is updated in the fused backward",
            "shares": "torch.profiler CPU over profile_steps extra steps; self time of every event attributed to "
                      "tables / dense / comm / keys / other (record_function regions patched onto instances, "
                      "backward nodes by autograd sequence_nr, collectives by op name); see module docstring",
            "comm_name_patterns": list(COMM_PATTERNS),
            "baseline": "same model, Engram groups as unsharded EmbeddingBagCollection (nn.EmbeddingBag, dense "
                        "gradients) + torch.optim.Adagrad(sparse_lr, eps), interleaved step by step with the fused "
                        "path in one 1-worker process",
            "isolated": "tables alone on KJTs captured from real steps: forward, backward with a fixed random "
                        "output gradient, update; interleaved, median over isolated_reps"},
        "config": {"source": source, "bench": settings.model_dump(mode="json"), "run": cfg.model_dump(mode="json")},
        "tables": tables,
        "runs": runs,
        "scaling": scaling,
        "fused_vs_nn": _fused_vs_nn(runs, isolated, tables),
        "repeats": per_repeat,
        "ratios": ratio_stats([r["ratios"] for r in per_repeat]),
        "checks": checks,
        "machine": {**info, "threads_per_worker": threads, "loadavg_end": list(os.getloadavg()),
                    "parent_peak_rss_gib": peak_rss_gib(),
                    "note": "shared machine: other jobs may run concurrently; numbers are noisy"},
    }


def run_train_bench(cfg: RunConfig, settings: BenchTrainSettings, out: Optional[str] = DEFAULT_OUT,
                    source: str = "config") -> dict:
    """Validate, then per repeat: every world size (fused tables; alternating order), then the 1-worker fused vs
    nn.EmbeddingBag pair; JSON + markdown rewritten (``complete: false``) after every group."""
    from comeir_dist.bench.latency import machine_info
    from comeir_dist.parallel.dist_env import resolve_backend, resolve_device

    threads = validate(cfg, settings)
    info = machine_info()
    backend = resolve_backend(cfg.parallel.backend, resolve_device(cfg.device))
    settings_d = settings.model_dump(mode="json")

    def job(paths: list[str]) -> dict:
        return {"run": cfg.model_dump(mode="json"), "settings": settings_d, "paths": paths, "threads": threads,
                "backend": backend, "isolated": paths == ["fused", "nn"]}

    from comeir_dist.bench.turns import units

    n_units = len(units(settings.warmup, settings.steps, settings.interleave or settings.steps,
                        settings.profile_steps))
    plan = []  # per repeat: [(labels, together)]
    for r in range(settings.repeats):
        order = [f"w{w}" for w in (settings.workers if r % 2 == 0 else settings.workers[::-1])]
        steps = [(order, True)] if settings.interleave and len(order) > 1 else [([x], False) for x in order]
        plan.append(steps + ([(["pair"], False)] if settings.compare_nn else []))
    repeats: list[dict] = []
    n_total, k = sum(len(p) for p in plan), 0
    for r, steps in enumerate(plan):
        repeats.append({"order": [], "groups": {}})
        for labels, together in steps:
            specs = {lb: (1, job(["fused", "nn"])) if lb == "pair" else (int(lb[1:]), job(["fused"])) for lb in labels}
            log.info("bench train: repeat %d/%d: %s (%s), %d thread(s) per worker", r + 1, settings.repeats,
                     " + ".join(labels), "taking turns" if together else "alone", threads)
            t0 = time.perf_counter()
            got = run_groups(specs, settings.timeout_s, (labels, n_units) if together else None)
            repeats[r]["groups"].update(got)
            repeats[r]["order"] += labels
            log.info("bench train: %s done in %.1fs", " + ".join(labels), time.perf_counter() - t0)
            k += 1
            if out and k < n_total:
                _write(out, build_report(cfg, settings, source, threads, repeats, info, complete=False))
    report = build_report(cfg, settings, source, threads, repeats, info, complete=True)
    if out:
        _write(out, report)
    return report


def _write(out: str, report: dict) -> None:
    from comeir_dist.utils.atomic import write_json_and_markdown

    write_json_and_markdown(out, report, markdown_table(report))


# ---- markdown ---------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(report: dict) -> str:
    t = report["tables"]
    run = report["config"]["run"]
    lines = [f"# comeir bench train ({report['config']['source']})", "",
             f"Global batch {run['train']['batch_size']}, Engram s_T={t['s_t']} s_S={t['s_s']} d_m={t['d_m']}: "
             f"{t['num_tables']} tables, {t['params'] / 1e6:.2f} M parameters "
             f"({t['fused']['weights_bytes'] / 2**20:.1f} MiB {t['table_dtype']}). "
             f"{report['machine'].get('cpu_count')} cores, {report['machine']['threads_per_worker']} torch thread(s) "
             f"per worker; shared machine, numbers are noisy.", "",
             "| run | workers | step s (median) | samples/s | M lookups+updates/s | lookups/step | "
             "tables | dense | comm | keys | other |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["runs"].items():
        sh = r.get("profile", {}).get("shares_mean_over_ranks", {})
        lines.append(f"| {name} | {r['workers']} | {r['step_s']['median']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['lookups_per_s'] / 1e6:.3f} | {r['lookups_per_step']:,.0f} | "
                     + " | ".join(_pct(sh.get(b)) for b in SHARE_BUCKETS) + " |")
    loads = [f"{name} {r['loadavg_steps']['before'][0]:.1f} -> {r['loadavg_steps']['after'][0]:.1f}"
             for name, r in report["runs"].items() if r.get("loadavg_steps")]
    if loads:
        lines += ["", "1-minute load average before -> after the timed steps (2 = both cores busy): "
                      + ", ".join(loads) + "."]
    for k, v in report.get("scaling", {}).items():
        lines += ["", f"Scaling {k.replace('_over_', ' vs ')} worker(s) in the first repeat: samples/s "
                      f"x{v['samples_per_s_ratio']:.2f} (parallel efficiency {100 * v['efficiency']:.0f}%)."]
    ratios = report.get("ratios") or {}
    if ratios:
        n = len(report.get("repeats", []))
        orders = "; ".join(" ".join(r["order"]) for r in report.get("repeats", []))
        lines += ["", f"## Ratios over {n} repeat(s) (fresh processes; group order per repeat: {orders})", "",
                  "| ratio | median | min | max | spread (max-min)/median | values |", "|---|---:|---:|---:|---:|---|"]
        for key, st in ratios.items():
            fmt = _pct if key.startswith("comm_share") else (lambda x: f"{x:.2f}x")
            spread = "-" if st["spread"] is None else f"{100 * st['spread']:.0f}%"
            lines.append(f"| {key} | **{fmt(st['median'])}** | {fmt(st['min'])} | {fmt(st['max'])} | {spread} | "
                         + ", ".join(fmt(v) for v in st["values"]) + " |")
    for name, r in report["runs"].items():
        prof = r.get("profile")
        if not prof:
            continue
        comm = prof["rank0"].get("comm_seconds_per_step_by_phase", {})
        where = ", ".join(f"{k} {v:.3f}" for k, v in sorted(comm.items(), key=lambda x: -x[1]) if v >= 5e-4)
        lines += ["", f"{name}: profiled step {prof['rank0']['profiled_step_s']:.3f} s on rank 0 (profiler overhead "
                      f"{100 * prof['profiler_overhead']:+.0f}% vs the timed median)"
                      + (f"; communication s/step by phase on rank 0: {where}" if where else "")
                      + ("; comm share per rank: " + ", ".join(_pct(x['comm']) for x in prof["shares_per_rank"])
                         if len(prof["shares_per_rank"]) > 1 else "") + "."]
    lines += ["", "Shares: profiled steps (self time per op); tables = Engram table forward + fused backward/update "
                  "(+ Adagrad step for nn.EmbeddingBag); keys = hashing/KJT build/unpack; comm = gloo collectives "
                  "(TorchRec all-to-all, DeepSpeed reduce/all-gather, loss all-reduce); mean over ranks."]
    fv = report.get("fused_vs_nn") or {}
    if fv:
        lines += ["", "## Fused sharded tables vs nn.EmbeddingBag + torch.optim.Adagrad (dense gradients), 1 worker",
                  "",
                  "| measure | fused M lookups/s | nn.EmbeddingBag M lookups/s | fused / nn |", "|---|---:|---:|---:|"]
        it = fv.get("in_training_step")
        if it and "ratio" in it:
            lines.append(f"| table training inside the step (s_T={t['s_t']}, profiled) | "
                         f"{it['fused']['lookups_per_s'] / 1e6:.3f} | "
                         f"{it['nn_embedding']['lookups_per_s'] / 1e6:.3f} | "
                         f"**{it['ratio']:.2f}x** |")
        for iso in fv.get("isolated", []):
            p = iso["paths"]
            for m, label in (("train", "tables alone, forward+backward+update"), ("forward", "tables alone, forward")):
                size = f", {iso['table_params'] / 1e6:.0f} M params" if iso.get("table_params") else ""
                lines.append(f"| {label} (s_T={iso['s_t']}{size}, real keys) | "
                             f"{p['fused'][m]['lookups_per_s'] / 1e6:.3f} | "
                             f"{p['nn_embedding'][m]['lookups_per_s'] / 1e6:.3f} | "
                             f"{iso['fused_over_nn_embedding'][m]:.2f}x |")
        ws = fv["whole_step"]
        lines.append(f"| whole training step (samples/s) | {ws['fused_samples_per_s']:.1f} | "
                     f"{ws['nn_embedding_samples_per_s']:.1f} | {ws['ratio']:.2f}x |")
        st = fv["table_state"]
        lines += ["", f"State: fused weights {st['fused']['weights_bytes'] / 2**20:.1f} MiB + row-wise Adagrad "
                      f"{st['fused']['optimizer_state_bytes'] / 2**20:.2f} MiB, no gradient; nn.EmbeddingBag weights "
                      f"{st['nn_embedding']['weights_bytes'] / 2**20:.1f} MiB + Adagrad "
                      f"{st['nn_embedding']['optimizer_state_bytes'] / 2**20:.1f} MiB + a "
                      f"{st['nn_embedding']['gradient_bytes_per_step'] / 2**20:.1f} MiB dense gradient every step."]
        if "fused_over_nn_embedding" in fv:
            ok = "meets" if fv["requirement_5x_met"] else "does NOT meet"
            lines += ["", f"fused_over_nn_embedding = {fv['fused_over_nn_embedding']:.2f}x ({ok} the >= 5x target)."]
    ch = report.get("checks", {})
    if ch:
        lines += ["", "Checks: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                             for k, v in ch.items())]
    if not report.get("complete", True):
        lines += ["", "(partial report: not every run group has finished)"]
    return "\n".join(lines) + "\n"
