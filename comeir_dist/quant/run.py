"""`comeir quantize`: item embeddings -> L-level semantic IDs with RQ-KMeans or RQ-VAE (App. B.2.1).

``run_quantize`` validates its inputs up front (embeddings present and finite, C <= number of
items), then fits ``cfg.restarts`` independent quantisers with seeds ``cfg.seed + i`` as parallel Ray
tasks (``num_cpus=cfg.cpus_per_task`` each) and keeps one.

Selection criterion (also stored in report.json): the restart with the **highest number of distinct
SIDs** wins; ties are broken by the **lower reconstruction MSE**, then by the lower seed. Distinct SIDs
come first because a collision makes items indistinguishable to the generator; the reconstruction
error says how much of the embedding the codes keep.

RQ-KMeans uses balanced k-means by default (``kmeans_balanced``); ``assign`` chooses the codes: the
balanced clusters (default) or each item's nearest fitted centroid per level (``argmin``, Eq. 29). With
``resolve_collisions`` (effective value: ``QuantizeConfig.collisions_resolved``; default on, off for
``assign: argmin``) items that still share a SID are spread over the last level (collisions.py);
report.json keeps ``pre_resolution_distinct_sids`` (old name ``argmin_distinct_sids``) and
``reassigned_items``, and the collision groups of the written codes (``collision_groups``,
``max_items_per_sid``, ``items_in_collisions``, ``collision_group_sizes``).

Output, written atomically to DIR/sids/<method>/:
  codes.parquet   item_idx int32, codes list<int32> of length L, sorted by item_idx
  codebooks.npy   float32 [L, C, D]: the frozen e^B of Eq. 2 (RQ-KMeans: centroids in embedding
                  space; RQ-VAE: codebooks in latent space)
  report.json     method, levels, codebook_size, chosen seed, per-level utilisation, distinct_sids,
                  distinct_fraction, items_in_collisions, max_items_per_sid, recon_mse, wall_time_s,
                  every restart's summary, selection_criterion, fingerprint (sha256 of the int32
                  [I, L] codes array bytes, followed by ``sid_tag`` when set: ``assign=argmin``) and the
                  embedding fingerprint it was computed from.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.pipeline import QuantizeConfig
from comeir_dist.data.schema import sids_dir
from comeir_dist.errors import UserError
from comeir_dist.quant.embed import META_FILE, load_item_embeddings
from comeir_dist.quant.report import SELECTION_CRITERION, codes_fingerprint, select_best, summarize

log = logging.getLogger(__name__)

CODES_FILE = "codes.parquet"
CODEBOOKS_FILE = "codebooks.npy"
REPORT_FILE = "report.json"


def validate_inputs(emb: np.ndarray, cfg: QuantizeConfig, source: str = "item_emb.parquet") -> None:
    """UserError when the embeddings cannot be quantised with ``cfg``."""
    n = emb.shape[0]
    if cfg.codebook_size > n:
        raise UserError(f"quantize.codebook_size = {cfg.codebook_size} exceeds the number of items "
                        f"({n}); use codebook_size <= {n}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise UserError(f"{source}: {int(bad.sum())} embeddings contain NaN/inf "
                        f"(first item_idx {int(np.flatnonzero(bad)[0])}); re-run `comeir embed --force`")
    if cfg.method == "rqvae" and cfg.latent_dim < 1:
        raise UserError(f"quantize.latent_dim = {cfg.latent_dim}: must be >= 1")


def fit_quantizer(emb: np.ndarray, cfg: QuantizeConfig, seed: int, num_threads: int = 1) -> dict:
    """Fit one quantiser (one restart) in this process; returns codes, codebooks and its summary."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        return _fit(emb, cfg, seed)
    finally:
        torch.set_num_threads(threads_before)


def _fit(emb: np.ndarray, cfg: QuantizeConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    if cfg.method == "rqkmeans":
        from comeir_dist.quant.rqkmeans import fit_rqkmeans

        res = fit_rqkmeans(emb, cfg.levels, cfg.codebook_size, cfg.kmeans_iters, seed,
                           resolve_collisions=cfg.collisions_resolved, balanced=cfg.kmeans_balanced,
                           assign=cfg.assign)
    elif cfg.method == "rqvae":
        from comeir_dist.quant.rqvae import fit_rqvae

        res, _ = fit_rqvae(emb, cfg, seed)
    else:  # pragma: no cover - QuantizeConfig restricts method
        raise UserError(f"quantize.method = {cfg.method!r}: allowed values 'rqkmeans', 'rqvae'")
    wall = time.perf_counter() - t0
    summary = summarize(res.codes, cfg.codebook_size, emb, res.recon, wall, seed)
    summary.update(res.info)
    return {"seed": int(seed), "codes": res.codes.astype(np.int32), "codebooks": res.codebooks,
            "summary": summary}


def _fit_task(emb: np.ndarray, cfg_json: str, seed: int, num_threads: int) -> dict:
    """Ray task body (config passed as JSON so workers rebuild the pydantic model)."""
    return fit_quantizer(emb, QuantizeConfig.model_validate_json(cfg_json), seed, num_threads)


def _run_restarts(emb: np.ndarray, cfg: QuantizeConfig, ray_address, ray_num_cpus) -> list[dict]:
    from tqdm.auto import tqdm

    from comeir_dist.orchestration.ray_session import ray_session

    seeds = [cfg.seed + i for i in range(cfg.restarts)]
    threads = max(1, int(cfg.cpus_per_task))
    results = []
    with ray_session(ray_address, ray_num_cpus):
        import ray

        emb_ref = ray.put(emb)
        task = ray.remote(num_cpus=cfg.cpus_per_task)(_fit_task)
        pending = [task.remote(emb_ref, cfg.model_dump_json(), s, threads) for s in seeds]
        with tqdm(total=len(pending), desc=f"quantize {cfg.method} restarts", unit="run") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    r = ray.get(ref)
                    s = r["summary"]
                    log.info("quantize %s seed %d: distinct %d/%d (%.4f), recon_mse %.3e, %.1f s",
                             cfg.method, r["seed"], s["distinct_sids"], s["items"],
                             s["distinct_fraction"], s["recon_mse"], s["wall_time_s"])
                    results.append(r)
                    bar.update(1)
    results.sort(key=lambda r: r["seed"])
    return results


def write_sids(out_dir: Path, codes: np.ndarray, codebooks: np.ndarray, report: dict) -> None:
    """Write codes.parquet, codebooks.npy and report.json into ``out_dir`` (an existing temp dir)."""
    n, levels = codes.shape
    flat = pa.array(np.ascontiguousarray(codes, dtype=np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, n * levels + 1, levels, dtype=np.int32))
    table = pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)),
                      "codes": pa.ListArray.from_arrays(offsets, flat)},
                     schema=pa.schema([pa.field("item_idx", pa.int32(), nullable=False),
                                       pa.field("codes", pa.list_(pa.int32()), nullable=False)]))
    pq.write_table(table, out_dir / CODES_FILE)
    np.save(out_dir / CODEBOOKS_FILE, np.ascontiguousarray(codebooks, dtype=np.float32))
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def run_quantize(dataset_dir: Path, cfg: QuantizeConfig, ray_address: Optional[str] = None,
                 ray_num_cpus: Optional[int] = None) -> Path:
    """Quantise the item embeddings of ``dataset_dir``; returns DIR/sids/<method>/."""
    from comeir_dist.utils.atomic import atomic_dir

    dataset_dir = Path(dataset_dir)
    emb = load_item_embeddings(dataset_dir)
    validate_inputs(emb, cfg, str(dataset_dir / "item_emb.parquet"))
    emb_fp = None
    meta = dataset_dir / META_FILE
    if meta.is_file():
        try:
            emb_fp = json.loads(meta.read_text()).get("input_fingerprint")
        except ValueError:
            emb_fp = None

    t0 = time.perf_counter()
    results = _run_restarts(emb, cfg, ray_address, ray_num_cpus)
    wall = time.perf_counter() - t0
    summaries = [r["summary"] for r in results]
    best = results[select_best(summaries)]
    s = best["summary"]
    codes = best["codes"]
    report = {
        "method": cfg.method, "levels": cfg.levels, "codebook_size": cfg.codebook_size,
        "items": s["items"], "seed": best["seed"],
        "utilisation": s["utilisation"], "used_codes": s["used_codes"],
        "distinct_sids": s["distinct_sids"], "distinct_fraction": s["distinct_fraction"],
        "items_in_collisions": s["items_in_collisions"], "max_items_per_sid": s["max_items_per_sid"],
        "collision_groups": s["collision_groups"], "collision_group_sizes": s["collision_group_sizes"],
        "recon_mse": s["recon_mse"], "recon_rel_err": s["recon_rel_err"],
        "assign": cfg.assign if cfg.method == "rqkmeans" else "argmin",
        "resolve_collisions": cfg.collisions_resolved,
        "pre_resolution_distinct_sids": s.get("pre_resolution_distinct_sids", s["argmin_distinct_sids"]),
        "argmin_distinct_sids": s["argmin_distinct_sids"], "reassigned_items": s["reassigned_items"],
        "codebook_shape": list(best["codebooks"].shape),
        "wall_time_s": round(wall, 3),
        "selection_criterion": SELECTION_CRITERION,
        "restarts": summaries,
        "config": cfg.model_dump(),
        "embedding_fingerprint": emb_fp,
        "sid_tag": cfg.sid_tag,
        "fingerprint": codes_fingerprint(codes, cfg.sid_tag),
    }
    out = sids_dir(dataset_dir, cfg.method)
    with atomic_dir(out, overwrite=True) as tmp:  # sids/<method>/ is written whole by comeir
        write_sids(tmp, codes, best["codebooks"], report)
    log.info("quantize %s: kept seed %d, distinct %d/%d (%.4f), %d items in %d collision groups (largest %d), "
             "recon_mse %.3e, %.1f s -> %s", cfg.method, best["seed"], s["distinct_sids"], s["items"],
             s["distinct_fraction"], s["items_in_collisions"], s["collision_groups"], s["max_items_per_sid"],
             s["recon_mse"], wall, out)
    return out
