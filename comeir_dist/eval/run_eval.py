"""`comeir evaluate`: load a committed checkpoint, rank the catalog for every user of a split (constrained beam search
for SID models, all items for sasrec), write metrics.

``--save-top N`` (with ``--out X.json``) also writes ``X.top.parquet``: per user ``user_idx``, ``target``, ``items``
(top-N item indices, ``-1`` padding) and ``scores`` (beam log-probabilities for SID models -- shared by a SID's
collision group --, logits for sasrec; ``-inf`` padding), plus ``msp`` (maximum softmax probability over all items)
for sasrec. SID models search with a beam of at least N. The file's schema metadata (key ``comeir``) records the
split, variant, checkpoint, N and beam. ``comeir analyze ensemble`` fuses two models' files.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.base import parse_section
from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError
from comeir_dist.eval.evaluate import evaluate_arrays
from comeir_dist.eval.metrics import with_clustered_se
from comeir_dist.train.checkpoint_simple import load_checkpoint_into, read_meta
from comeir_dist.train.samples import split_samples
from comeir_dist.train.setup import build_sharded_model, load_inputs, resolve_device
from comeir_dist.utils.atomic import atomic_file, write_json
from comeir_dist.utils.output_guard import check_out_file

log = logging.getLogger(__name__)


def load_model_from_checkpoint(checkpoint: Path, dataset: str | None = None, device: str | None = None):
    meta = read_meta(checkpoint)
    data = meta["config"]
    if dataset:
        data["dataset"] = dataset
    if device:
        data["device"] = device
    cfg = parse_section(RunConfig, data, source=f"{checkpoint}/meta.json")
    sids, emb = load_inputs(cfg)
    dev = resolve_device(cfg.device)
    model = build_sharded_model(cfg, sids, emb, dev)
    load_checkpoint_into(checkpoint, model, meta, sids.fingerprint)
    return model, cfg, meta, dev


USERS_TOP = 10  # top items per user in <out>.users.parquet
TOP_SUFFIX = ".top.parquet"


def check_save_top(out: str | None, save_top: int | None) -> None:
    """``--save-top`` needs ``--out`` (the file goes beside it) and N >= 1; checked before any work."""
    if save_top is None:
        return
    if save_top < 1:
        raise UserError(f"--save-top: {save_top}; must be >= 1")
    if not out:
        raise UserError("--save-top: needs --out X.json (the top-N items go to X.top.parquet beside it)")
    check_out_file(Path(out).with_suffix(TOP_SUFFIX))


def search_width(cfg, beam_size: int | None, save_top: int | None) -> int:
    """The beam of SID models: ``--beam-size`` or ``eval.beam_size``, raised to ``--save-top`` N (N SIDs give at
    least N items). Full-catalog models (sasrec) rank every item whatever the beam."""
    beam = beam_size or cfg.eval.beam_size
    return max(beam, save_top or 0)


def write_top(path: Path, users, target, items, scores, msp, info: dict) -> None:
    """``<out>.top.parquet`` (layout in the module docstring), atomically."""
    import json

    import numpy as np

    cols = {"user_idx": pa.array(np.asarray(users), pa.int32()), "target": pa.array(np.asarray(target), pa.int32()),
            "items": pa.array(np.asarray(items).tolist(), pa.list_(pa.int32())),
            "scores": pa.array(np.asarray(scores, dtype=np.float32).tolist(), pa.list_(pa.float32()))}
    if msp is not None:
        cols["msp"] = pa.array(np.asarray(msp, dtype=np.float32), pa.float32())
    table = pa.table(cols).replace_schema_metadata({"comeir": json.dumps(info)})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def top_info(report: dict, top_n: int, msp) -> dict:
    return {"split": report["split"], "variant": report["variant"], "checkpoint": report["checkpoint"],
            "step": report["step"], "top_n": int(top_n), "beam_size": report["beam_size"],
            "scores": "logit" if msp is not None else "beam log-probability"}


def run_evaluate(checkpoint: str, split: str = "test", out: str | None = None, dataset: str | None = None,
                 beam_size: int | None = None, batch_size: int | None = None, max_users: int | None = None,
                 save_top: int | None = None) -> dict:
    if split not in ("valid", "test"):
        raise UserError(f"--split: {split!r}; allowed values: valid, test")
    if out:  # before minutes of work: a directory is not a file name (nothing is created here)
        check_out_file(out)
        check_out_file(Path(out).with_suffix(".users.parquet"))
    check_save_top(out, save_top)
    ckpt = Path(checkpoint)
    model, cfg, meta, dev = load_model_from_checkpoint(ckpt, dataset)
    from comeir_dist.train.archive_samples import run_split_samples

    users, hist, target = run_split_samples(cfg, split)  # archives with model.pref_memory
    if max_users:
        users, hist, target = users[:max_users], hist[:max_users], target[:max_users]
    beam = search_width(cfg, beam_size, save_top)
    top_n = max(USERS_TOP, save_top or 0)
    t0 = time.time()
    res = evaluate_arrays(model, hist, target, beam_size=beam, batch_size=batch_size or cfg.eval.batch_size,
                          ks=cfg.eval.ks, top_n=top_n, progress=True, device=dev)
    pu = res["per_user"]
    metrics = with_clustered_se(res["sums"].means(), users, (pu["P"], pu["G"], pu["found"], pu["sid_rank"]),
                                cfg.eval.ks) if len(target) else res["sums"].means()
    report = {"checkpoint": str(ckpt), "split": split, "variant": cfg.model.variant, "step": meta["step"],
              "beam_size": beam, "metrics": metrics, "ms_per_user": res["ms_per_user"],
              "wall_time_s": time.time() - t0, "dataset": cfg.dataset}
    if out:
        out_path = Path(out)
        if save_top:
            report["top_file"] = str(out_path.with_suffix(TOP_SUFFIX))
        write_json(out_path, report)
        per_user = pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(target, pa.int32()),
                             "top_items": pa.array(res["top_items"][:, :USERS_TOP].tolist(), pa.list_(pa.int32())),
                             "P": pa.array(res["per_user"]["P"], pa.int64()),
                             "G": pa.array(res["per_user"]["G"], pa.int64())})
        with atomic_file(out_path.with_suffix(".users.parquet")) as tmp:
            pq.write_table(per_user, tmp)
        if save_top:
            write_top(out_path.with_suffix(TOP_SUFFIX), users, target, res["top_items"][:, :save_top],
                      res["top_scores"][:, :save_top], res["msp"], top_info(report, save_top, res["msp"]))
    return report
