"""Evaluation sharded over Ray actors: users in contiguous slices, results merged exactly.

Each actor is its own process: it loads the checkpoint ONCE (``load_model_from_checkpoint``; a ComeIR
model's Engram tables get that process's own world-size-1 gloo group), sets its torch threads to its
``num_cpus`` and runs batched constrained beam search (``evaluate_arrays``) on its slice.

Exactness: the slices are cut at multiples of the evaluation batch size, so every batch an actor
decodes is the very batch a single-process ``run_evaluate`` decodes. Actors return one
``MetricSums.state_dict()`` PER BATCH (plus the per-user arrays); the driver merges them in global batch
order starting from an empty ``MetricSums``, i.e. the same floating-point additions in the same order as
the single-process loop. The metrics are therefore bit-identical to ``run_evaluate`` (given identical
per-batch results), not merely close.

The output is the ``run_evaluate`` report (same keys, plus ``workers``) and ``<out>.users.parquet``
with the same columns (user_idx, target, top_items, P, G).

Works locally (a Ray instance is started for the call) or against a cluster (``ray_address`` /
``RAY_ADDRESS``). On a cluster the checkpoint and dataset paths must be readable from every node
(shared filesystem).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from comeir_dist.entrypoint import set_env_defaults
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)


class EvalWorker:
    """One Ray actor: holds a model loaded from the checkpoint; evaluates batches of users on request."""

    def __init__(self, checkpoint: str, dataset: Optional[str], num_threads: int):
        set_env_defaults()
        import torch

        torch.set_num_threads(max(1, int(num_threads)))
        from comeir_dist.eval.run_eval import load_model_from_checkpoint

        t0 = time.perf_counter()
        self.model, self.cfg, self.meta, self.device = load_model_from_checkpoint(Path(checkpoint), dataset)
        self.load_s = time.perf_counter() - t0
        self.num_threads = torch.get_num_threads()

    def evaluate(self, hist: np.ndarray, target: np.ndarray, beam_size: int, batch_size: int, ks,
                 top_n: int = 10) -> dict:
        """Per-batch metric sums (in order) and per-user arrays (top items and their scores, the MSP of a
        full-catalog model) for users ``hist [U, N]`` / ``target [U]``."""
        from comeir_dist.eval.evaluate import evaluate_arrays

        t0 = time.perf_counter()
        batches, tops, scores, msps, per = [], [], [], [], {"P": [], "G": [], "found": [], "sid_rank": []}
        for s in range(0, len(target), batch_size):
            # one evaluate_arrays call per batch: its sums are exactly the single-process per-batch sums
            res = evaluate_arrays(self.model, hist[s:s + batch_size], target[s:s + batch_size], beam_size=beam_size,
                                  batch_size=batch_size, ks=ks, top_n=top_n, progress=False, device=self.device)
            batches.append(res["sums"].state_dict())
            tops.append(res["top_items"])
            scores.append(res["top_scores"])
            if res["msp"] is not None:
                msps.append(res["msp"])
            for k in per:
                per[k].append(res["per_user"][k])
        return {"batches": batches, "top_items": np.concatenate(tops) if tops else np.zeros((0, top_n), np.int64),
                "top_scores": np.concatenate(scores) if tops else np.zeros((0, top_n), np.float32),
                "msp": np.concatenate(msps) if msps else None,
                "per_user": {k: np.concatenate(v) for k, v in per.items()} if tops else {},
                "elapsed_s": time.perf_counter() - t0, "load_s": self.load_s, "num_threads": self.num_threads,
                "pid": os.getpid()}


def batch_aligned_slices(n_users: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` user slices, one per worker, cut at multiples of ``batch_size``
    (balanced in whole batches; fewer slices than workers when there are fewer batches)."""
    if n_users <= 0:
        return []
    n_batches = math.ceil(n_users / batch_size)
    parts = [p for p in np.array_split(np.arange(n_batches), max(1, min(num_workers, n_batches))) if len(p)]
    return [(int(p[0]) * batch_size, min(n_users, (int(p[-1]) + 1) * batch_size)) for p in parts]


def _read_config(checkpoint: Path, dataset: Optional[str]):
    from comeir_dist.config.base import parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.train.checkpoint_simple import read_meta

    meta = read_meta(checkpoint)
    data = meta["config"]
    if dataset:
        data["dataset"] = dataset
    return parse_section(RunConfig, data, source=f"{checkpoint}/meta.json"), meta


def write_per_user(path: Path, users, target, top_items, P, G) -> None:
    """``<out>.users.parquet`` in the layout of ``run_evaluate``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from comeir_dist.utils.atomic import atomic_file

    table = pa.table({"user_idx": pa.array(np.asarray(users), pa.int32()),
                      "target": pa.array(np.asarray(target), pa.int32()),
                      "top_items": pa.array(np.asarray(top_items).tolist(), pa.list_(pa.int32())),
                      "P": pa.array(np.asarray(P), pa.int64()), "G": pa.array(np.asarray(G), pa.int64())})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def evaluate_with_ray(checkpoint: str, split: str = "test", out: Optional[str] = None, dataset: Optional[str] = None,
                      num_workers: int = 2, beam_size: Optional[int] = None, batch_size: Optional[int] = None,
                      ray_address: Optional[str] = None, max_users: Optional[int] = None,
                      cpus_per_worker: float = 1.0, ray_num_cpus: Optional[int] = None,
                      gpus_per_worker: float = 0.0, save_top: Optional[int] = None) -> dict:
    """Evaluate ``checkpoint`` on ``split`` with ``num_workers`` Ray actors; returns the report.

    ``cpus_per_worker``: Ray ``num_cpus`` of each actor (its torch thread count = max(1, floor of it)).
    ``ray_num_cpus``: CPUs of a local Ray instance started here (default: all cores).
    ``gpus_per_worker``: Ray ``num_gpus`` of each actor (0: Ray hides the GPUs, the model runs on CPU).
    ``save_top``: also write ``<out>.top.parquet`` (see :mod:`comeir_dist.eval.run_eval`).
    """
    from comeir_dist.eval.run_eval import TOP_SUFFIX, USERS_TOP, check_save_top, search_width, top_info, write_top
    from comeir_dist.eval.metrics import MetricSums, with_clustered_se
    from comeir_dist.orchestration.ray_session import ray_session
    from comeir_dist.train.archive_samples import run_split_samples
    from comeir_dist.utils.atomic import write_json

    if split not in ("valid", "test"):
        raise UserError(f"--split: {split!r}; allowed values: valid, test")
    if num_workers < 1:
        raise UserError(f"--workers: {num_workers}; must be >= 1")
    if cpus_per_worker <= 0:
        raise UserError(f"cpus_per_worker: {cpus_per_worker}; must be > 0")
    if out:  # before any actor starts: a directory is not a file name
        from comeir_dist.utils.output_guard import check_out_file

        check_out_file(out)
        check_out_file(Path(out).with_suffix(".users.parquet"))
    check_save_top(out, save_top)
    ckpt = Path(checkpoint)
    cfg, meta = _read_config(ckpt, dataset)  # validates the checkpoint before any actor starts
    users, hist, target = run_split_samples(cfg, split)  # archives with model.pref_memory
    if max_users:
        users, hist, target = users[:max_users], hist[:max_users], target[:max_users]
    beam = search_width(cfg, beam_size, save_top)
    top_n = max(USERS_TOP, save_top or 0)
    bs = batch_size or cfg.eval.batch_size
    ks = list(cfg.eval.ks)
    slices = batch_aligned_slices(len(target), bs, num_workers)
    threads = max(1, int(math.floor(cpus_per_worker)))
    t0 = time.time()
    results = []
    with ray_session(ray_address, ray_num_cpus):
        import ray

        total = ray.cluster_resources().get("CPU", 0)
        if len(slices) * cpus_per_worker > total:
            raise UserError(f"{len(slices)} evaluation workers x {cpus_per_worker} CPUs exceed the Ray cluster's "
                            f"{total:g} CPUs (use fewer --workers)")
        actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(EvalWorker)
        # absolute paths: an actor's working directory need not be the driver's
        ds = Path(cfg.dataset)
        ds_arg = str(ds.resolve()) if ds.exists() else (dataset or None)
        actors = [actor_cls.remote(str(ckpt.resolve()), ds_arg, threads) for _ in slices]
        refs = [a.evaluate.remote(hist[a0:a1], target[a0:a1], beam, bs, ks, top_n)
                for a, (a0, a1) in zip(actors, slices)]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise
        finally:
            for a in actors:
                ray.kill(a)
    sums = MetricSums()
    for r in results:  # global batch order: slice order, then batch order inside a slice
        for state in r["batches"]:
            sums = sums.merge(MetricSums.from_state(state))
    n = len(target)
    top_items = np.concatenate([r["top_items"] for r in results]) if results else np.zeros((0, top_n), np.int64)
    top_scores = np.concatenate([r["top_scores"] for r in results]) if results else np.zeros((0, top_n), np.float32)
    msp = np.concatenate([r["msp"] for r in results]) if results and results[0]["msp"] is not None else None
    per_user = {k: (np.concatenate([r["per_user"][k] for r in results]) if results else np.zeros(0, np.int64))
                for k in ("P", "G", "found", "sid_rank")}
    compute_s = sum(r["elapsed_s"] for r in results)
    metrics = with_clustered_se(sums.means(), users, tuple(per_user[k] for k in ("P", "G", "found", "sid_rank")),
                                cfg.eval.ks)  # several validation targets per user: errors clustered by user
    report = {"checkpoint": str(ckpt), "split": split, "variant": cfg.model.variant, "step": meta["step"],
              "beam_size": beam, "ms_per_user": 1000 * compute_s / max(1, n),
              "wall_time_s": time.time() - t0, "dataset": cfg.dataset,
              "metrics": metrics, "workers": [{"users": [a0, a1], "elapsed_s": r["elapsed_s"], "load_s": r["load_s"],
                           "num_threads": r["num_threads"]} for (a0, a1), r in zip(slices, results)]}
    if out:
        out_path = Path(out)
        if save_top:
            report["top_file"] = str(out_path.with_suffix(TOP_SUFFIX))
        write_json(out_path, report)
        write_per_user(out_path.with_suffix(".users.parquet"), users, target, top_items[:, :USERS_TOP], per_user["P"],
                       per_user["G"])
        if save_top:
            write_top(out_path.with_suffix(TOP_SUFFIX), users, target, top_items[:, :save_top],
                      top_scores[:, :save_top], msp, top_info(report, save_top, msp))
    log.info("evaluate (ray, %d workers): %s", len(slices), json.dumps(report["metrics"]))
    return report
