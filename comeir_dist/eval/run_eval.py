"""`comeir evaluate`: load a committed checkpoint, run constrained beam search on a split, write metrics."""
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


def run_evaluate(checkpoint: str, split: str = "test", out: str | None = None, dataset: str | None = None,
                 beam_size: int | None = None, batch_size: int | None = None, max_users: int | None = None) -> dict:
    if split not in ("valid", "test"):
        raise UserError(f"--split: {split!r}; allowed values: valid, test")
    if out:  # before minutes of work: a directory is not a file name (nothing is created here)
        check_out_file(out)
        check_out_file(Path(out).with_suffix(".users.parquet"))
    ckpt = Path(checkpoint)
    model, cfg, meta, dev = load_model_from_checkpoint(ckpt, dataset)
    users, hist, target = split_samples(cfg.dataset, split, cfg.max_history)
    if max_users:
        users, hist, target = users[:max_users], hist[:max_users], target[:max_users]
    beam = beam_size or cfg.eval.beam_size
    t0 = time.time()
    res = evaluate_arrays(model, hist, target, beam_size=beam, batch_size=batch_size or cfg.eval.batch_size,
                          ks=cfg.eval.ks, progress=True, device=dev)
    metrics = res["sums"].means()
    report = {"checkpoint": str(ckpt), "split": split, "variant": cfg.model.variant, "step": meta["step"],
              "beam_size": beam, "metrics": metrics, "ms_per_user": res["ms_per_user"],
              "wall_time_s": time.time() - t0, "dataset": cfg.dataset}
    if out:
        out_path = Path(out)
        write_json(out_path, report)
        per_user = pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(target, pa.int32()),
                             "top_items": pa.array(res["top_items"].tolist(), pa.list_(pa.int32())),
                             "P": pa.array(res["per_user"]["P"], pa.int64()),
                             "G": pa.array(res["per_user"]["G"], pa.int64())})
        with atomic_file(out_path.with_suffix(".users.parquet")) as tmp:
            pq.write_table(per_user, tmp)
    return report
