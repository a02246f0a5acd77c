"""``engram.min_key_users``: Engram rows that fewer than N training users address are never read nor trained.

Why (issue 11, README "What holds ComeIR back"): after one epoch ComeIR's memories replay training labels. On the
bundled data 87% of the consecutive item pairs of the training sequences occur in ONE user's sequence only; the
row of such a key is written by that user's samples alone and read back by them, so from epoch 2 it carries the
sample's own label (the training loss falls off a cliff at the epoch boundary while validation falls). A key
that several users produce holds what they share -- a co-occurrence a different user's validation transition can
use. This filter keeps only those rows: a key's row is live when at least ``min_key_users`` distinct users'
training sequences produce that key; every other key reads an EMPTY bag (the zero vector, exactly like a padded
key: no row is read, none is trained). ``min_key_users: 1`` (the default) installs nothing: the paper's memory.

Support counting: every user's full TRAINING sequence (``train.parquet``, never validation or test items) goes
through the encoder's own key construction (``ComeIREncoder.request``, so units, orders, hashing and the
``short_keys`` rule are those of training), and a row's support is the number of distinct users whose keys hash
to it, per head table. The keys of a sequence are its n-grams of consecutive items, which include every
transition (context, next item) the memory-restoring head reads for a target; the head's other candidates'
rows are live iff some users' sequences contain that transition. (With ``short_keys: shorten`` the shortened keys
are counted at the start of each training sequence only, not at the start of every max_history window.)
Deterministic (data + config + hash seed): training and every later load compute the same filter, so nothing is
stored in checkpoints; each rank computes it itself (identical on every rank, no communication).
"""
from __future__ import annotations

import numpy as np
import torch

from comeir_dist.model.comeir_encoder import history_units
from comeir_dist.train.samples import pad_left


def row_support(model, sequences: list, batch_users: int = 256, cap: int = 127) -> dict[str, torch.Tensor]:
    """Distinct users per row (capped at ``cap``), ``{table name: int16 [rows]}``, of every Engram table the
    encoder addresses when it reads ``sequences`` (one item-index list or array per user)."""
    lookup = model.lookup
    support = {s.name: torch.zeros(s.rows, dtype=torch.int16)
               for idx in lookup.index.values() for s in idx.specs}
    installed = {g: idx.row_filter for g, idx in lookup.index.items()}
    for idx in lookup.index.values():  # count every key, also those an installed filter would empty
        idx.row_filter = None
    try:
        _count(model, sequences, support, batch_users, cap)
    finally:
        for g, idx in lookup.index.items():
            idx.row_filter = installed[g]
    return support


def _count(model, sequences: list, support: dict, batch_users: int, cap: int) -> None:
    lookup = model.lookup
    for start in range(0, len(sequences), batch_users):
        chunk = [np.asarray(q).tolist() for q in sequences[start:start + batch_users]]  # lists or arrays
        items = torch.as_tensor(pad_left(chunk, max([1, *(len(s) for s in chunk)])))
        codes = model.catalog.item_codes(items)
        units = history_units(codes, model.levels, model.codebook_size, model.d_max)
        lp = lookup.new_pass()
        model.encoder.request(lp, codes, items >= 0, units)
        for batch in lp.batches.values():
            for name, ids, valid, shape in batch.addressed_rows():  # encoder requests are [users, positions, ...]
                owner = torch.arange(ids.numel()) // (ids.numel() // shape[0])
                ok = valid.cpu()
                pairs = torch.unique(ids.cpu()[ok] * len(chunk) + owner[ok])  # distinct (row, user) of this chunk
                r, c = torch.unique(pairs // len(chunk), return_counts=True)
                support[name][r] = (support[name][r].int() + c).clamp(max=cap).to(torch.int16)


def fold_row_support(model, sequences: list, max_history: int, cap: int,
                     long_in_both: bool = False) -> list[dict[str, torch.Tensor]]:
    """:func:`row_support` of each cross-fit fold's users (fold 0, fold 1), a user in the fold of its last window
    (:func:`~comeir_dist.engram.cross_fit.sequence_folds`, as at test time). ``long_in_both``: a user whose sequence
    is longer than ``max_history`` counts in both folds (its training windows fall in either as they slide)."""
    from comeir_dist.engram.cross_fit import sequence_folds

    folds = sequence_folds(sequences, max_history)
    return [row_support(model, [q for q, f in zip(sequences, folds)
                                if f == k or (long_in_both and len(q) > max_history)], cap=cap) for k in (0, 1)]


def install_key_filter(model, sequences: list, min_users: int) -> dict[str, float]:
    """Compute the support of ``model``'s Engram rows from ``sequences`` and make every key whose row has fewer
    than ``min_users`` users an empty bag (``EngramIndex.row_filter``). Returns the live fraction of the rows
    each group's requests touched (for the log)."""
    if min_users <= 1:
        return {}
    support = row_support(model, sequences, cap=min(127, min_users))
    live = {}
    for g, idx in model.lookup.index.items():
        idx.row_filter = {s.name: support[s.name] >= min_users for s in idx.specs}
        touched = sum(int((support[s.name] > 0).sum()) for s in idx.specs)
        kept = sum(int(idx.row_filter[s.name].sum()) for s in idx.specs)
        live[g] = kept / max(1, touched)
    return live


def install_fold_filter(model, sequences: list, max_history: int) -> dict[str, float]:
    """``engram.cross_fit_unwritten: empty``: a cross-fitted key reads the zero vector when its row in the other
    fold is never trained, i.e. no training sequence of that fold produces the key (``EngramIndex.fold_filter``).

    A user's fold is that of its last training window (:func:`~comeir_dist.engram.cross_fit.sequence_folds`); a user
    whose training sequence is longer than ``max_history`` has windows in both folds as the window slides, so its
    keys count in both (its rows may be trained by either). Like ``min_key_users``, the count covers the n-grams
    of the sequences, which include every transition the head reads for a training target; a candidate transition
    no user of a fold made is empty there. Returns, per group, the live share of the (row, fold) pairs the two
    folds' sequences touch together (for the log)."""
    by_fold = fold_row_support(model, sequences, max_history, cap=1, long_in_both=True)
    live = {}
    for g, idx in model.lookup.index.items():
        idx.fold_filter = {s.name: torch.stack([by_fold[0][s.name] > 0, by_fold[1][s.name] > 0]) for s in idx.specs}
        kept = sum(int(idx.fold_filter[s.name].sum()) for s in idx.specs)
        touched = sum(int(idx.fold_filter[s.name].any(dim=0).sum()) for s in idx.specs)
        live[g] = kept / max(1, 2 * touched)
    return live
