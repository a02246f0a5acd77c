"""Build a ready-to-train (or evaluate) model from a RunConfig: data, SIDs, sharded tables, device."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from comeir_dist.config.run import RunConfig
from comeir_dist.data.dataset import check_dataset_dir

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The run's device from ``cfg.device`` (auto | cpu | cuda) and ``LOCAL_RANK``: the one implementation in
    :func:`comeir_dist.parallel.dist_env.resolve_device` (kept here for the callers that import it from setup)."""
    from comeir_dist.parallel.dist_env import resolve_device as _resolve

    return _resolve(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # derived seeds (seed + 7919 * (rank + 1)) may pass numpy's 2**32 limit
    torch.manual_seed(seed)


def load_inputs(cfg: RunConfig):
    """(SidTable, item embeddings) with one-line errors when a stage has not been run."""
    from comeir_dist.quant.embed import load_item_embeddings
    from comeir_dist.quant.sid_table import load_sids

    check_dataset_dir(cfg.dataset)
    sids = load_sids(cfg.dataset, cfg.sid_method)
    emb = load_item_embeddings(cfg.dataset)
    return sids, emb


def build_sharded_model(cfg: RunConfig, sids, emb, device: torch.device, plan="auto", column_shards=None,
                        grad_scale: float = 1.0, pg=None, init_seed: int | None = None):
    """Model on ``device`` with its Engram tables under DMP (fused row-wise Adagrad), same path for 1..N ranks.

    ``plan`` / ``column_shards`` / ``grad_scale``: see :func:`comeir_dist.parallel.engram_tables.shard_engram_tables`
    (training passes ``cfg.parallel.sharding``, ``cfg.parallel.column_shards`` and ``sparse_grad_scale(world)``).
    ``init_seed``: the tables' deterministic initialisation (the same on any number of ranks and sharding)."""
    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.engram_tables import shard_engram_tables

    model = build_model(cfg, sids.codes, sids.codebooks, emb, sparse_device="meta")
    if hasattr(model, "tables"):
        install_training_key_filter(model, cfg)  # before sharding: the filters act on the keys, not on the tables
        shard_engram_tables(model.tables, cfg.engram, device=device, plan=plan, pg=pg, column_shards=column_shards,
                            grad_scale=grad_scale, init_seed=init_seed,
                            pipelined=cfg.parallel.pipeline_lookups)
    model.to(device)
    if model.trie is not None:  # SID models' catalog prefix tree (sasrec has none)
        model.trie = model.trie.to(device)
    return model


def install_training_key_filter(model, cfg: RunConfig) -> None:
    """Key filters computed from the users' training sequences (model/key_support.py): ``engram.min_key_users``
    (live rows) and ``engram.cross_fit_unwritten: empty`` (the rows each cross-fit fold trains)."""
    import time

    from comeir_dist.model.key_support import install_fold_filter, install_key_filter
    from comeir_dist.train.samples import train_sequences

    e = cfg.engram  # the config refuses cross_fit_unwritten: empty without cross_fit
    if e.min_key_users <= 1 and e.cross_fit_unwritten != "empty":
        return
    t0, seqs = time.time(), train_sequences(cfg.dataset)
    if e.min_key_users > 1:
        live = install_key_filter(model, seqs, e.min_key_users)
        log.info("engram.min_key_users=%d: live share of the addressed rows per group %s (%.1f s)",
                 e.min_key_users, {g: round(v, 3) for g, v in live.items()}, time.time() - t0)
    if e.cross_fit_unwritten == "empty":
        live = install_fold_filter(model, seqs, cfg.max_history)
        log.info("engram.cross_fit_unwritten=empty: trained share of the two fold rows of the addressed keys per "
                 "group %s (%.1f s)", {g: round(v, 3) for g, v in live.items()}, time.time() - t0)


def dense_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Everything the dense optimizer may touch: never the Engram tables."""
    return [p for n, p in model.named_parameters() if not n.startswith("tables.") and p.requires_grad]


def check_memory_plan(cfg: RunConfig, world: int, device: str, num_items: int = 0, item_emb_dim: int = 384):
    """The ``comeir plan`` check for this run on ``world`` ranks: raises UserError (the plan's message)
    before anything big is allocated when a rank cannot hold its table shards + dense ZeRO share."""
    from comeir_dist.parallel.activation_plan import run_activations
    from comeir_dist.parallel.memory_plan import check_plan_fits, count_dense_params

    if not cfg.train.check_memory:
        return None
    pcfg = cfg.parallel.model_copy(update={"world_size": world})
    dense = count_dense_params(cfg, item_emb_dim=item_emb_dim, num_items=num_items)
    engram = cfg.engram if cfg.model.variant == "comeir" else None
    return check_plan_fits(engram, dense, pcfg, device=device, dense_dtype="bf16" if cfg.train.bf16 else "fp32",
                           activations=run_activations(cfg, world, num_items))
