"""Single-process checkpoints of a trained model: dense state, full Engram tables, config and identity.

Layout of a checkpoint dir (written to a temp dir, renamed at the end; ``COMMITTED`` written last):
  dense.pt        model.state_dict() without the sparse tables (tensors only)
  tables.pt       {group: {key: full table}} (assembled from shards) -- ComeIR only (tensors only)
  meta.json       {"config": RunConfig, "step", "metrics", "sid_fingerprint", "hash_multipliers", ...}
  checksums.json  sha256 and size of the three files above; every file is fsynced before COMMITTED

Loading never unpickles: ``torch.load(weights_only=True)`` for the tensors, JSON for the rest; the checksums are
verified before ``torch.load`` (a mismatch is a one-line UserError). A ``best/`` written before checksums existed
has no ``checksums.json``: it still loads (the same weights-only path), with a warning that it is unverified.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from comeir_dist.errors import UserError
from comeir_dist.train import checkpoint_integrity as integrity
from comeir_dist.utils.atomic import atomic_dir

COMMIT = "COMMITTED"
log = logging.getLogger(__name__)


def dense_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("tables.")}


def hash_state(model) -> dict:
    from comeir_dist.engram.hashing import multipliers_state

    if not hasattr(model, "lookup"):
        return {}
    return {g: multipliers_state(ix.hashers) for g, ix in model.lookup.index.items()}


def save_checkpoint(path: Path, model, cfg, step: int, metrics: dict, sid_fingerprint: str,
                    dense: dict | None = None, write: bool = True) -> Path:
    """Write the checkpoint. ``dense``: the dense state to save (default ``dense_state(model)``; the
    distributed loop passes the fp32 master weights). With several ranks EVERY rank must call this (the
    full tables are assembled collectively) and only the rank with ``write=True`` writes; the result loads
    in one process whatever the number of ranks that trained it."""
    from comeir_dist.parallel.engram_tables import full_tables_state

    # views, not copies, of one process's tables: torch.save writes them straight from the live buffers
    tables = full_tables_state(model.tables, copy=False) if hasattr(model, "tables") else None
    if not write:
        return path
    with atomic_dir(path, overwrite=True) as tmp:  # best/ is written whole by comeir
        torch.save(dense if dense is not None else dense_state(model), tmp / "dense.pt")
        if tables is not None:
            torch.save(tables, tmp / "tables.pt")
        meta = {"config": cfg.model_dump(mode="json"), "step": step, "metrics": metrics,
                "sid_fingerprint": sid_fingerprint, "variant": cfg.model.variant,
                "hash_multipliers": hash_state(model)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        files = ["dense.pt", "meta.json"] + (["tables.pt"] if tables is not None else [])
        integrity.write_checksums(tmp, integrity.describe(tmp, files))  # fsynced and hashed before the commit
        integrity.durable_write_text(tmp / COMMIT, str(step))
    integrity.fsync_dir(Path(path).parent)
    return path


def _verify(path: Path, only=None) -> None:
    """UserError naming the bad file when a checksum does not match (before anything is deserialised)."""
    if not (path / integrity.CHECKSUMS).is_file():
        log.warning("%s: no %s (written before checksums); loading it unverified (weights-only)", path,
                    integrity.CHECKSUMS)
        return
    problem = integrity.verify(path, only=only)
    if problem is not None:
        raise UserError(f"{path}: damaged checkpoint: {problem}")


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not (path / "meta.json").is_file() or not (path / COMMIT).is_file():
        raise UserError(f"{path}: not a committed checkpoint (missing meta.json or {COMMIT})")
    if (path / integrity.CHECKSUMS).is_file():
        _verify(path, only=["meta.json"])
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / 'meta.json'}: malformed JSON: {exc.msg}") from None
    if isinstance(meta, dict):
        from comeir_dist.engram.config import upgrade_saved_config

        upgrade_saved_config(meta.get("config"))  # a checkpoint older than engram.short_keys was trained with drop
    return meta


def load_checkpoint_into(path: Path, model, meta: dict, sid_fingerprint: str) -> None:
    """Load weights, refusing a checkpoint trained on another SID table or with other hash seeds."""
    from comeir_dist.parallel.engram_tables import load_full_tables_state

    path = Path(path)
    if meta["sid_fingerprint"] != sid_fingerprint:
        raise UserError(f"{path}: checkpoint was trained on another SID table (fingerprint "
                        f"{meta['sid_fingerprint'][:12]} != dataset's {sid_fingerprint[:12]})")
    if meta.get("hash_multipliers", {}) != hash_state(model):
        raise UserError(f"{path}: Engram hash multipliers/table sizes differ from the config")
    lookup_cfg = getattr(getattr(model, "lookup", None), "cfg", None)
    if lookup_cfg is not None and isinstance(meta.get("config"), dict):
        from comeir_dist.engram.config import upgrade_saved_config
        from comeir_dist.train.checkpoint import check_short_keys

        check_short_keys(path, upgrade_saved_config(meta["config"]),
                         {"engram": {"short_keys": getattr(lookup_cfg, "short_keys", None)}})
    _verify(path)  # every file, before torch.load
    missing, unexpected = model.load_state_dict(torch.load(path / "dense.pt", weights_only=True), strict=False)
    missing = [k for k in missing if not k.startswith("tables.")]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tables"):
        load_full_tables_state(model.tables, torch.load(path / "tables.pt", weights_only=True, mmap=True))
