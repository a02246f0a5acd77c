"""Serving state of ``model.pref_memory`` (Rec2PM): `comeir memory build` and evaluation from stored memories.

``build`` loads a checkpoint, compresses every user's archived history of a split (all complete segments, one
backbone pass per segment, ``PrefMemoryTM.compress``) and writes ``OUT/memories.safetensors`` (no pickle):

* ``memory`` float32 ``[U, P, d]`` (P = C in overwrite mode; append mode: C per segment, left-padded),
* ``memory_mask`` bool ``[U, P]``, ``recent`` int64 ``[U, context + segment_items]`` (the recent segment, -1 padding; comeir: preceded by its
  ``context_items`` context items),
* ``user_idx`` / ``target`` int64 ``[U]``,

plus ``OUT/memory.json`` (checkpoint, split, mode, tokens, bytes per user). Bytes per user = the real memory
slots x d x 4 (float32); the recent segment's item ids are reported separately (they are the raw working memory,
not compressed state). :func:`evaluate_from_memories` ranks the catalog from the stored memory plus the recent
segment (no pass over the archive).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from comeir_dist.errors import UserError

MEMORY_FILE = "memories.safetensors"
REPORT_FILE = "memory.json"


@torch.no_grad()
def compress_archives(model, hist: np.ndarray, batch_size: int = 256, device="cpu") -> dict:
    """{memory [U, P, d], memory_mask [U, P], recent [U, seg]} (CPU tensors) of archive rows ``hist [U, A]``."""
    was = model.training
    model.eval()
    mems, masks, recents = [], [], []
    for s in range(0, len(hist), batch_size):
        items = torch.as_tensor(hist[s:s + batch_size], device=device)
        m, mm, r, _ = model.compress(items)
        mems.append(m.float().cpu()), masks.append(mm.cpu()), recents.append(r.cpu())
    model.train(was)
    width = max((m.shape[1] for m in mems), default=0)
    d = model.q_mem.shape[1]

    def lpad(t, fill):
        gap = width - t.shape[1]
        return torch.cat([torch.full((t.shape[0], gap, *t.shape[2:]), fill, dtype=t.dtype), t], dim=1)

    if not mems:
        return {"memory": torch.zeros(0, 0, d), "memory_mask": torch.zeros(0, 0, dtype=torch.bool),
                "recent": torch.zeros(0, model.pm.segment_items + model.context_items, dtype=torch.long)}
    return {"memory": torch.cat([lpad(m, 0.0) for m in mems]), "memory_mask": torch.cat([lpad(m, False) for m in masks]),
            "recent": torch.cat(recents).long()}


def save_memories(out: Path, state: dict, users, target, info: dict) -> dict:
    from safetensors.torch import save_file

    from comeir_dist.utils.atomic import atomic_file, write_json

    out.mkdir(parents=True, exist_ok=True)
    tensors = {"memory": state["memory"].contiguous(), "memory_mask": state["memory_mask"].contiguous(),
               "recent": state["recent"].contiguous(), "user_idx": torch.as_tensor(np.asarray(users), dtype=torch.long),
               "target": torch.as_tensor(np.asarray(target), dtype=torch.long)}
    with atomic_file(out / MEMORY_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"comeir": json.dumps(info)})
    slots = state["memory_mask"].sum(-1).float()
    d = state["memory"].shape[-1]
    report = {**info, "users": int(len(users)), "dim": int(d),
              "bytes_per_user_mean": float(slots.mean() * d * 4) if len(users) else 0.0,
              "bytes_per_user_max": float(slots.max() * d * 4) if len(users) else 0.0,
              "recent_item_bytes_per_user": int(state["recent"].shape[1] * 8), "file": str(out / MEMORY_FILE)}
    write_json(out / REPORT_FILE, report)
    return report


def load_memories(path: str | Path) -> dict:
    """The tensors of ``memories.safetensors`` (a dir or the file itself); safetensors never unpickles."""
    from safetensors.torch import load_file

    p = Path(path)
    p = p / MEMORY_FILE if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"--memories: {p} not found (write it with `comeir memory build`)")
    return load_file(str(p))


@torch.no_grad()
def evaluate_from_memories(model, store: dict, beam_size: int = 20, batch_size: int = 256, ks=(5, 10),
                           top_n: int = 10, device="cpu") -> dict:
    """Like ``eval.evaluate.evaluate_arrays`` but every batch is a ``MemoryBatch`` (stored M + recent segment)."""
    from comeir_dist.eval.evaluate import rank_batch
    from comeir_dist.eval.metrics import MetricSums
    from comeir_dist.model.pref_memory import MemoryBatch

    was = model.training
    model.eval()
    sums, tops = MetricSums(), []
    n = store["target"].shape[0]
    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        batch = MemoryBatch(store["recent"][sl].to(device), store["target"][sl].to(device),
                            store["memory"][sl].to(device), store["memory_mask"][sl].to(device))
        ranking, _ = rank_batch(model, batch, beam_size, top_n)
        sums = sums.merge(MetricSums.from_ranks(ranking.targets, ks))
        tops.append(ranking.items.cpu().numpy())
    model.train(was)
    return {"sums": sums, "top_items": np.concatenate(tops) if tops else np.zeros((0, top_n), np.int64),
            "ms_per_user": 1000 * (time.perf_counter() - t0) / max(1, n)}


def run_memory_build(checkpoint: str, dataset: str | None, out: str, split: str = "test",
                     batch_size: int | None = None, overwrite: bool = False) -> dict:
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.archive_samples import run_split_samples
    from comeir_dist.utils.output_guard import check_out_dir, claim_out_dir

    if split not in ("valid", "test"):
        raise UserError(f"--split: {split!r}; allowed values: valid, test")
    check_out_dir(out, "memory", overwrite=overwrite)  # a foreign dir is refused before any work
    model, cfg, meta, dev = load_model_from_checkpoint(Path(checkpoint), dataset)
    if not cfg.model.pref_memory.enabled:
        raise UserError(f"--checkpoint {checkpoint}: trained without model.pref_memory.enabled; nothing to build")
    users, hist, target = run_split_samples(cfg, split)
    t0 = time.time()
    state = compress_archives(model, hist, batch_size or cfg.eval.batch_size, dev)
    pm = cfg.model.pref_memory
    info = {"checkpoint": str(checkpoint), "split": split, "dataset": cfg.dataset, "mode": pm.mode,
            "tokens": pm.tokens, "segment_items": pm.segment_items, "archive_items": pm.archive_items,
            "step": meta.get("step")}
    claim_out_dir(out, "memory", None, "comeir memory build", overwrite=overwrite)
    report = save_memories(Path(out), state, users, target, info)
    report["build_seconds"] = time.time() - t0
    return report


def run_memory_evaluate(checkpoint: str, memories: str, out: str | None = None, beam_size: int | None = None) -> dict:
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.utils.atomic import write_json

    model, cfg, meta, dev = load_model_from_checkpoint(Path(checkpoint))
    store = load_memories(memories)
    res = evaluate_from_memories(model, store, beam_size=beam_size or cfg.eval.beam_size,
                                 batch_size=cfg.eval.batch_size, ks=cfg.eval.ks, device=dev)
    report = {"checkpoint": str(checkpoint), "memories": str(memories), "metrics": res["sums"].means(),
              "ms_per_user": res["ms_per_user"]}
    if out:
        write_json(Path(out), report)
    return report
