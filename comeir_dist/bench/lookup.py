"""`comeir bench lookup`: Engram table read throughput, the training path vs plain PyTorch tables.

Paths (same table shapes, same ids: uniform over the rows, as hashed Engram keys are; one id per bag by
default, since every Engram key reads exactly one row per head):

* ``fused_dmp``       -- the training path: TorchRec DMP (world size 1, gloo), table-wise, FUSED fbgemm kernel
                         with EXACT_ROWWISE_ADAGRAD applied inside backward (``parallel.sparse.shard_engram_collection``);
* ``fused_tbe``       -- the same fbgemm kernel called directly (``SplitTableBatchedEmbeddingBagsCodegen``): the
                         difference to ``fused_dmp`` is TorchRec's per-call overhead;
* ``nn_dense_sgd``    -- ``nn.EmbeddingBag`` per table, dense gradients, ``torch.optim.SGD``;
* ``nn_dense_adagrad``-- the same with dense ``torch.optim.Adagrad`` (the fused kernel's optimizer family);
* ``nn_sparse_adagrad`` / ``nn_sparse_adam`` -- ``nn.EmbeddingBag(sparse=True)`` with ``torch.optim.Adagrad`` /
                         ``torch.optim.SparseAdam``.

Each path is timed for forward only and for forward + backward + update. Paths and modes are measured
interleaved (for each repetition: every path, each timing ``iters`` iterations), after ``warmup``
iterations per path/mode; the per-iteration time is the median over repetitions.

Throughput: ``lookups/s`` (lookups = tables x batch x ids_per_bag per iteration) and ``row GB/s`` =
lookups x row bytes / time, i.e. the bytes of the rows a lookup has to read once. The roofline is the
machine's measured copy bandwidth (``dst.copy_(src)`` of a large tensor; read + write bytes counted, the
STREAM convention) with the same torch thread count; ``roofline_fraction`` = row GB/s / copy GB/s.
For training, the row GB/s still counts one row read per lookup (the update's read-modify-write of the
row and of its optimizer state comes on top), so its fraction is a lower bound of the traffic achieved.

``device`` (default ``cpu``, the measured configuration; ``auto`` = cuda when available): tables, ids and the
roofline copy live there. On CUDA the fused paths use the fbgemm CUDA kernel with the rows in device memory
(DMP over a world-size-1 NCCL group, ``EmbeddingLocation.DEVICE``), every timed block ends with
``torch.cuda.synchronize``, and the roofline is the device-memory copy bandwidth. The CUDA path has not been run.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from comeir_dist.config.base import Section, Seed

log = logging.getLogger(__name__)

PATHS = ("fused_dmp", "fused_tbe", "nn_dense_sgd", "nn_dense_adagrad", "nn_sparse_adagrad", "nn_sparse_adam")
PathName = Literal["fused_dmp", "fused_tbe", "nn_dense_sgd", "nn_dense_adagrad", "nn_sparse_adagrad", "nn_sparse_adam"]


class LookupBenchConfig(Section):
    tables: int = Field(4, ge=1, description="Number of tables (one KJT feature each).")
    rows: int = Field(250_000, ge=2, description="Rows per table (default: 64 MiB per fp32 table, far beyond the CPU caches).")
    dim: int = Field(64, ge=1, description="Row width (an inter-item Engram head at d_m=256, K_T=4 is 64).")
    batch: int = Field(32768, ge=1, description="Bags per table per iteration (a ComeIR training step of 256 samples "
                                                "reads ~10^5 rows in total).")
    ids_per_bag: int = Field(1, ge=1, description="Pooling factor (Engram: 1 id per bag).")
    iters: int = Field(10, ge=1, description="Iterations per timed block.")
    reps: int = Field(5, ge=1, description="Timed blocks per path and mode (interleaved across paths).")
    warmup: int = Field(3, ge=0, description="Untimed iterations per path and mode.")
    lr: float = Field(0.01, gt=0)
    copy_mib: int = Field(512, ge=16, description="Size of the tensor copied for the bandwidth roofline.")
    paths: list[PathName] = Field(default_factory=lambda: list(PATHS))
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (None = torch default).")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="Where tables, ids and the roofline copy live: "
        "cpu (default), cuda, or auto (cuda when available).")
    seed: Seed = 0


# ---- inputs ------------------------------------------------------------------------------------------------
def make_inputs(cfg: LookupBenchConfig, n: int = 4, device: torch.device | None = None):
    """``n`` KJTs (cycled through) with uniform ids, drawn on the host (the same ids on any device) and moved to
    ``device`` (None = host); per-table (values, offsets) views for nn.EmbeddingBag."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(cfg.seed)
    keys = [f"t{i}" for i in range(cfg.tables)]
    out = []
    for _ in range(n):
        values = torch.randint(0, cfg.rows, (cfg.tables * cfg.batch * cfg.ids_per_bag,), generator=g)
        lengths = torch.full((cfg.tables * cfg.batch,), cfg.ids_per_bag, dtype=torch.long)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        if device is not None:
            kjt = kjt.to(device)
        per = [(kjt[k].values(), kjt[k].offsets()[:-1].contiguous()) for k in keys]
        out.append((kjt, per))
    return keys, out


# ---- paths -------------------------------------------------------------------------------------------------
def _fused_dmp(cfg: LookupBenchConfig, keys, device: torch.device):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    from comeir_dist.parallel.sparse import shard_engram_collection

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=k, embedding_dim=cfg.dim, num_embeddings=cfg.rows,
                                                            feature_names=[k], pooling=PoolingType.SUM,
                                                            weight_init_min=-0.01, weight_init_max=0.01)
                                         for k in keys], device=torch.device("meta"))
    dmp = shard_engram_collection(ebc, device=device, plan="table_wise", lr=cfg.lr)

    def fwd(inp):
        return dmp(inp[0]).values()

    def train(inp):  # the fused kernel updates the looked-up rows inside backward: no step()
        fwd(inp).sum().backward()

    return fwd, train, dmp


def _fused_tbe(cfg: LookupBenchConfig, device: torch.device):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    cuda = device.type == "cuda"
    where = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if cuda else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(cfg.rows, cfg.dim, *where)] * cfg.tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=cfg.lr, eps=1e-8,
        weights_precision=SparseType.FP32, pooling_mode=PoolingMode.SUM,
        **({"device": device} if cuda else {}))

    def fwd(inp):
        return tbe(inp[0].values(), inp[0].offsets())

    def train(inp):
        fwd(inp).sum().backward()

    return fwd, train, tbe


def _nn_path(cfg: LookupBenchConfig, name: str, device: torch.device):
    sparse = name.startswith("nn_sparse")
    bags = torch.nn.ModuleList(torch.nn.EmbeddingBag(cfg.rows, cfg.dim, mode="sum", sparse=sparse, device=device)
                               for _ in range(cfg.tables))
    for b in bags:
        torch.nn.init.uniform_(b.weight, -0.01, 0.01)
    params = list(bags.parameters())
    opt = {"nn_dense_sgd": lambda: torch.optim.SGD(params, lr=cfg.lr),
           "nn_dense_adagrad": lambda: torch.optim.Adagrad(params, lr=cfg.lr),
           "nn_sparse_adagrad": lambda: torch.optim.Adagrad(params, lr=cfg.lr),
           "nn_sparse_adam": lambda: torch.optim.SparseAdam(params, lr=cfg.lr)}[name]()

    def fwd(inp):
        return torch.cat([b(v, o) for b, (v, o) in zip(bags, inp[1])], dim=1)

    def train(inp):
        opt.zero_grad(set_to_none=True)
        fwd(inp).sum().backward()
        opt.step()

    return fwd, train, (bags, opt)


def build_path(cfg: LookupBenchConfig, name: str, keys, device: torch.device | None = None):
    """(forward, train, state) of one path on ``device`` (None = ``cfg.device``)."""
    from comeir_dist.bench.latency import bench_device

    device = bench_device(cfg) if device is None else torch.device(device)
    if name == "fused_dmp":
        return _fused_dmp(cfg, keys, device)
    if name == "fused_tbe":
        return _fused_tbe(cfg, device)
    return _nn_path(cfg, name, device)


# ---- measurement -------------------------------------------------------------------------------------------
def copy_bandwidth(mib: int, reps: int = 7, device: torch.device | None = None) -> dict:
    """Large-tensor copy bandwidth on ``device`` (None = host): 2 x bytes / time (read + write), median over
    ``reps``."""
    from comeir_dist.bench.latency import sync

    n = mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    ts = []
    for _ in range(reps):
        sync(src.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(src.device)
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    del src, dst
    return {"bytes": n * 4, "median_s": t, "gb_s": 2 * n * 4 / t / 1e9, "best_gb_s": 2 * n * 4 / min(ts) / 1e9}


def _block(fn: Callable, inputs, iters: int, start: int, device: torch.device | None = None) -> float:
    from comeir_dist.bench.latency import sync

    dev = torch.device(device) if device is not None else None
    if dev is not None:
        sync(dev)
    t0 = time.perf_counter()
    for i in range(iters):
        fn(inputs[(start + i) % len(inputs)])
    if dev is not None:
        sync(dev)
    return (time.perf_counter() - t0) / iters


def run_lookup_bench(cfg: LookupBenchConfig, out: Optional[str] = None) -> dict:
    """Measure every path (forward; forward + backward + update), write JSON + markdown; return the report."""
    from comeir_dist.bench.latency import bench_device, machine_info, peak_rss_gib
    from comeir_dist.utils.atomic import write_json

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    dev = bench_device(cfg)
    info = machine_info(dev)
    keys, inputs = make_inputs(cfg, device=dev)
    bw = copy_bandwidth(cfg.copy_mib, device=dev)
    log.info("bench lookup: copy bandwidth %.2f GB/s on %s", bw["gb_s"], dev)
    paths = {name: build_path(cfg, name, keys, dev) for name in cfg.paths}
    lookups = cfg.tables * cfg.batch * cfg.ids_per_bag
    row_bytes = cfg.dim * 4
    times: dict[str, dict[str, list[float]]] = {p: {"forward": [], "train": []} for p in paths}
    for name, (fwd, train, _) in paths.items():
        with torch.no_grad():
            _block(fwd, inputs, cfg.warmup, 0, dev)
        _block(train, inputs, cfg.warmup, 0, dev)
    for rep in range(cfg.reps):
        names = list(paths)
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fwd, train, _ = paths[name]
            gc.collect()
            with torch.no_grad():
                times[name]["forward"].append(_block(fwd, inputs, cfg.iters, rep, dev))
            times[name]["train"].append(_block(train, inputs, cfg.iters, rep, dev))
            log.info("rep %d %-18s fwd %8.2f ms  train %8.2f ms", rep, name, 1e3 * times[name]["forward"][-1],
                     1e3 * times[name]["train"][-1])
    results = {}
    for name, modes in times.items():
        results[name] = {}
        for mode, ts in modes.items():
            t = float(np.median(ts))
            gbs = lookups * row_bytes / t / 1e9
            results[name][mode] = {"ms_per_iter": 1e3 * t, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
                                   "mlookups_s": lookups / t / 1e6, "row_gb_s": gbs,
                                   "roofline_fraction": gbs / bw["gb_s"], "reps": len(ts)}
    report = {"benchmark": "Engram table lookups: fused DMP (training path) vs plain PyTorch tables",
              "config": cfg.model_dump(mode="json"),
              "lookups_per_iter": lookups, "row_bytes": row_bytes,
              "table_mib": cfg.rows * cfg.dim * 4 / 2**20, "roofline_copy": bw, "results": results,
              "machine": {**info, "torch_threads": torch.get_num_threads(), "loadavg_end": list(os.getloadavg()),
                          "peak_rss_gib": peak_rss_gib()}}
    if "fused_dmp" in results:
        report["fused_dmp_train_speedup_over"] = {
            p: results["fused_dmp"]["train"]["mlookups_s"] / r["train"]["mlookups_s"]
            for p, r in results.items() if p != "fused_dmp"}
    if out:
        out_path = Path(out)
        write_json(out_path, report)
        out_path.with_suffix(".md").write_text(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    c = report["config"]
    bw = report["roofline_copy"]
    lines = [f"# Engram lookup throughput ({c['tables']} tables x {c['rows']:,} rows x {c['dim']} fp32, "
             f"{c['batch']} bags/table x {c['ids_per_bag']} id, uniform ids)", "",
             f"Roofline: large-tensor copy {bw['gb_s']:.2f} GB/s (read + write), "
             f"torch threads {report['machine']['torch_threads']}, device {report['machine'].get('device', 'cpu')}"
             f"{' (' + report['machine']['gpu'] + ')' if report['machine'].get('gpu') else ''}.", "",
             "| path | fwd M lookups/s | fwd row GB/s | fwd % roofline | train M lookups/s | train row GB/s | "
             "train % roofline |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p, r in report["results"].items():
        f, t = r["forward"], r["train"]
        lines.append(f"| {p} | {f['mlookups_s']:.2f} | {f['row_gb_s']:.3f} | {100 * f['roofline_fraction']:.1f}% | "
                     f"{t['mlookups_s']:.3f} | {t['row_gb_s']:.3f} | {100 * t['roofline_fraction']:.1f}% |")
    sp = report.get("fused_dmp_train_speedup_over")
    if sp:
        lines += ["", "fused_dmp training throughput over: " + ", ".join(f"{p} {x:.1f}x" for p, x in sp.items())]
    lines += ["", "train = forward + backward + optimizer update (fused: row-wise Adagrad inside backward).",
              "row GB/s = lookups x row bytes / time (one row read per lookup).", ""]
    return "\n".join(lines)
