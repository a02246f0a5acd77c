"""Batched evaluation of a model on a split (no Python loop per user or beam).

SID models (comeir / flatten / tm): constrained beam search, SIDs expanded into items (``eval.ranking.rank_items``).
Models that score the whole catalog (``model.ranks_all_items``, sasrec): one forward pass per batch, all items
ranked (``eval.ranking.rank_scores``). Both give the same ``P`` / ``G`` / ``found`` / ``sid_rank`` per user, hence
the same metric definitions (``eval.metrics``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from comeir_dist.decode.beam import beam_search
from comeir_dist.eval.metrics import MetricSums
from comeir_dist.eval.ranking import rank_items, rank_scores
from comeir_dist.train.samples import to_batch


def rank_batch(model, batch, beam_size: int, top_n: int):
    """(ItemRanking with ``targets``, max softmax probability ``[B]`` or None) of one batch.

    SID models: top-N items of the beams, scores = the beam log-probabilities (shared by a collision group).
    Full-catalog models: top-N items by logit, scores = the logits, plus the MSP over all items."""
    if getattr(model, "ranks_all_items", False):
        logits = model.item_logits(batch).float()
        msp = torch.softmax(logits, dim=-1).max(-1).values
        return rank_scores(logits, batch.target, top_n=top_n), msp
    res = beam_search(model.decoder(batch), model.trie, batch.items.shape[0], model.levels, beam_size,
                      batch.items.device)
    return rank_items(res, model.trie, batch.target, top_n=top_n), None


@torch.no_grad()
def evaluate_arrays(model, hist: np.ndarray, target: np.ndarray, beam_size: int = 20, batch_size: int = 256,
                    ks=(5, 10), top_n: int = 10, progress: bool = False, device="cpu") -> dict:
    """Returns {"sums": MetricSums, "top_items": [U, top_n] int64, "top_scores": [U, top_n] float32 (beam
    log-probabilities / logits, ``-inf`` padding), "msp": [U] float32 or None (full-catalog models only),
    "per_user": {...}, "ms_per_user": float}."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    tops, top_scores, msps, per = [], [], [], {"P": [], "G": [], "found": [], "sid_rank": []}
    t0 = time.perf_counter()
    starts = range(0, len(target), batch_size)
    for s in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        batch = to_batch(hist[s:s + batch_size], target[s:s + batch_size], device)
        ranking, msp = rank_batch(model, batch, beam_size, top_n)
        t = ranking.targets
        sums = sums.merge(MetricSums.from_ranks(t, ks))
        tops.append(ranking.items.cpu().numpy())
        top_scores.append(ranking.scores.float().cpu().numpy())
        if msp is not None:
            msps.append(msp.float().cpu().numpy())
        for k in per:
            per[k].append(getattr(t, k).cpu().numpy())
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    full = bool(getattr(model, "ranks_all_items", False))
    return {"sums": sums, "top_items": np.concatenate(tops) if tops else np.zeros((0, top_n), np.int64),
            "top_scores": np.concatenate(top_scores) if tops else np.zeros((0, top_n), np.float32),
            "msp": (np.concatenate(msps) if msps else np.zeros(0, np.float32)) if full else None,
            "per_user": {k: np.concatenate(v) for k, v in per.items()} if tops else {},
            "ms_per_user": 1000 * elapsed / max(1, len(target))}
