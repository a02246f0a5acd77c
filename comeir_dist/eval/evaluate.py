"""Batched constrained beam-search evaluation of a model on a split (no Python loop per user or beam)."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from comeir_dist.decode.beam import beam_search
from comeir_dist.eval.metrics import MetricSums
from comeir_dist.eval.ranking import rank_items
from comeir_dist.train.samples import to_batch


@torch.no_grad()
def evaluate_arrays(model, hist: np.ndarray, target: np.ndarray, beam_size: int = 20, batch_size: int = 256,
                    ks=(5, 10), top_n: int = 10, progress: bool = False, device="cpu") -> dict:
    """Returns {"sums": MetricSums, "top_items": [U, top_n] int64, "per_user": {...}, "ms_per_user": float}."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    tops, per = [], {"P": [], "G": [], "found": [], "sid_rank": []}
    t0 = time.perf_counter()
    levels = model.levels
    starts = range(0, len(target), batch_size)
    for s in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        batch = to_batch(hist[s:s + batch_size], target[s:s + batch_size], device)
        res = beam_search(model.decoder(batch), model.trie, batch.items.shape[0], levels, beam_size, device)
        ranking = rank_items(res, model.trie, batch.target, top_n=top_n)
        t = ranking.targets
        sums = sums.merge(MetricSums.from_ranks(t, ks))
        tops.append(ranking.items.cpu().numpy())
        for k in per:
            per[k].append(getattr(t, k).cpu().numpy())
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    return {"sums": sums, "top_items": np.concatenate(tops) if tops else np.zeros((0, top_n), np.int64),
            "per_user": {k: np.concatenate(v) for k, v in per.items()} if tops else {},
            "ms_per_user": 1000 * elapsed / max(1, len(target))}
