"""`comeir bench train`: throughput of the REAL training step on 1 and N workers, where its time goes, and the
fused sharded Engram tables vs the same model with plain ``nn.EmbeddingBag`` tables and a dense optimizer.

What runs
    Every measurement runs in freshly spawned processes (``torch.multiprocessing`` "spawn", one per rank, one gloo
    group on a free localhost TCP port; :func:`run_group`), each with ``torch.set_num_threads(threads)`` where
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
def run_group(world: int, job: dict, timeout: float) -> list[dict]:
    """Spawn ``world`` ranks running ``train_worker.run_job(job)``; per-rank results in rank order."""
    import torch.multiprocessing as mp

    from comeir_dist.bench.train_worker import worker_entry
    from comeir_dist.parallel.dist_env import _free_port, select_device

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    child_env = {"OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
                 # DeepSpeed fixes its accelerator at import: the children's must be the training device's
                 "DS_ACCELERATOR": select_device(job["run"].get("device", "auto")).type, "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)  # inherited by the spawned children (thread pools read it at import)
    try:
        procs = [ctx.Process(target=worker_entry, args=(r, world, port, job, results), daemon=False)
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    got: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, res, tb = results.get(timeout=1.0)
                got[rank] = (res, tb)
                if tb is not None:
                    break
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(max(1.0, min(60.0, deadline - time.monotonic())) if not any(v[1] for v in got.values()) else 5.0)
    finally:
        for p in procs:  # only our own children, by their Process handle
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    errors = sorted((r, tb) for r, (_, tb) in got.items() if tb is not None)
    if errors:
        raise RuntimeError(f"bench train: rank {errors[0][0]} of {world} failed:\n{errors[0][1]}")
    if len(got) < world:
        missing = sorted(set(range(world)) - set(got))
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"bench train: ranks {missing} of {world} returned nothing (exit codes {codes}; "
                           f"timeout {timeout:.0f}s)")
    return [got[r][0] for r in range(world)]


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
           "per_step_lookups_all": lookups, "per_step_s_all": step_s,
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
    f, n = runs.get("fused_w1"), runs.get("nn_embedding_w1")
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


def build_report(cfg: RunConfig, settings: BenchTrainSettings, source: str, threads: int, groups: dict,
                 info: dict, complete: bool) -> dict:
    from comeir_dist.bench.latency import peak_rss_gib
    from comeir_dist.bench.train_worker import COMM_PATTERNS

    tables = tables_info(cfg)
    runs: dict = {}
    isolated: list = []
    for world, ranks in sorted(groups.items()):
        for path in ranks[0]["paths"]:
            name = f"{'fused' if path == 'fused' else 'nn_embedding'}_w{world}"
            runs[name] = summarize_path(ranks, path, threads)
        isolated += ranks[0].get("isolated", [])
    checks: dict = {}
    for name, r in runs.items():
        if "profile" in r:
            checks[f"shares_sum_{name}"] = sum(r["profile"]["rank0"]["shares"].values())
    if "fused_w1" in runs and "nn_embedding_w1" in runs:
        a, b = runs["fused_w1"], runs["nn_embedding_w1"]
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
            if k.startswith("fused_w") and r["workers"] > 1:
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
        "checks": checks,
        "machine": {**info, "threads_per_worker": threads, "loadavg_end": list(os.getloadavg()),
                    "parent_peak_rss_gib": peak_rss_gib(),
                    "note": "shared machine: other jobs may run concurrently; numbers are noisy"},
    }


def run_train_bench(cfg: RunConfig, settings: BenchTrainSettings, out: Optional[str] = DEFAULT_OUT,
                    source: str = "config") -> dict:
    """Validate, run every group (1 worker with the baseline first, then N workers), write JSON + markdown."""
    from comeir_dist.bench.latency import machine_info
    from comeir_dist.parallel.dist_env import resolve_backend, resolve_device

    threads = validate(cfg, settings)
    info = machine_info()
    backend = resolve_backend(cfg.parallel.backend, resolve_device(cfg.device))
    groups: dict[int, list[dict]] = {}
    settings_d = settings.model_dump(mode="json")
    for k, world in enumerate(settings.workers):
        paths = ["fused", "nn"] if (world == 1 and settings.compare_nn) else ["fused"]
        job = {"run": cfg.model_dump(mode="json"), "settings": settings_d, "paths": paths, "threads": threads,
               "backend": backend, "isolated": world == 1 and settings.compare_nn}
        log.info("bench train: run group %d/%d: %d worker(s) x %d thread(s), paths %s", k + 1, len(settings.workers),
                 world, threads, paths)
        t0 = time.perf_counter()
        groups[world] = run_group(world, job, settings.timeout_s)
        log.info("bench train: %d worker(s) done in %.1fs", world, time.perf_counter() - t0)
        if out and k + 1 < len(settings.workers):
            _write(out, build_report(cfg, settings, source, threads, groups, info, complete=False))
    report = build_report(cfg, settings, source, threads, groups, info, complete=True)
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
        lines += ["", f"Scaling {k.replace('_over_', ' vs ')} worker(s): samples/s x{v['samples_per_s_ratio']:.2f} "
                      f"(parallel efficiency {100 * v['efficiency']:.0f}%)."]
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
