"""Map beam-search SIDs back to catalog items and locate each user's target (DESIGN "Evaluation protocol").

Completed SIDs are expanded into their items in beam order. All items of one SID (a collision group) are
tied: for display they are listed by ascending item index, but metrics never use that order. For a
target item we report

* ``P``  - number of items in SIDs ranked strictly ahead of the target's SID (if the target's SID is not
  among the beams: the number of items in all returned SIDs),
* ``G``  - number of catalog items sharing the target's SID (its tie group, ``>= 1``),
* ``found`` - whether the target's SID is among the live beams,
* ``sid_rank`` - 1-based position of the target's SID among the beams (0 if not found).

Nothing here looks at the target to build the ranking; the target is only located in it afterwards.
Each item has exactly one SID (one row of codes per item in :class:`PrefixTrie`), so an item can never
appear twice in a user's list.

Everything is vectorised over users and beams.

A model that scores the whole catalog (sasrec) is ranked by :func:`rank_scores` with the same definitions:
``P`` = items scored strictly higher than the target, ``G`` = items with exactly the target's score (its tie
group, ``>= 1``), ``found`` always true (every item is ranked), ``sid_rank = P + 1`` (an item ID is its own
one-token ID: the "SID-level" metrics are the item ranking with ties resolved in the target's favour).
Top-N lists break ties by ascending item index, as collision groups are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from comeir_dist.decode.beam import BeamResult
from comeir_dist.decode.trie import PrefixTrie

__all__ = ["TargetRanks", "ItemRanking", "beam_sid_rows", "expand_items", "locate_targets", "rank_items",
           "rank_scores"]


@dataclass
class TargetRanks:
    """Position of each user's target in the tied item ranking (all LongTensor/BoolTensor ``[B]``)."""

    P: torch.Tensor
    G: torch.Tensor
    found: torch.Tensor
    sid_rank: torch.Tensor


@dataclass
class ItemRanking:
    """Top-N items per user: ``items`` LongTensor ``[B, N]`` (``-1`` padding when the beams hold fewer
    than N items), ``scores`` FloatTensor ``[B, N]`` (the SID score shared by the tie group, ``-inf``
    padding), ``sid_rank`` LongTensor ``[B, N]`` (1-based beam position the item came from, 0 padding).
    ``targets`` is set when targets were given."""

    items: torch.Tensor
    scores: torch.Tensor
    sid_rank: torch.Tensor
    targets: Optional[TargetRanks] = None


def beam_sid_rows(result: BeamResult, trie: PrefixTrie) -> torch.Tensor:
    """Row in ``trie.sid_keys`` of every beam's SID: LongTensor ``[B, K]``, ``-1`` for dead slots.

    A SID repeated in a later beam (cannot happen with :func:`beam_search`) is treated as dead, so each
    SID - and hence each item - is counted once, at its best position.
    """
    codes = result.codes.to(trie.device)
    live = torch.isfinite(result.scores.to(trie.device))
    if codes.shape[-1] != trie.num_levels:
        raise ValueError(f"beam SIDs have {codes.shape[-1]} levels, catalog has {trie.num_levels}")
    in_range = ((codes >= 0) & (codes < trie.num_codes)).all(-1)
    keys = trie.encode(codes.clamp(0, trie.num_codes - 1))
    rows, found = trie.lookup_sid(keys)
    bad = live & ~(found & in_range)
    if bool(bad.any()):
        raise ValueError("beam result contains live SIDs that are not in the catalog")
    rows = torch.where(live, rows, torch.full_like(rows, -1))
    K = rows.shape[1]
    if K > 1:
        earlier = torch.ones(K, K, dtype=torch.bool, device=rows.device).tril(-1)  # [k, j]: j < k
        dup = ((rows.unsqueeze(2) == rows.unsqueeze(1)) & earlier & (rows >= 0).unsqueeze(1)).any(-1)
        rows = torch.where(dup, torch.full_like(rows, -1), rows)
    return rows


def _group_sizes(rows: torch.Tensor, trie: PrefixTrie) -> torch.Tensor:
    sizes = trie.sid_sizes[rows.clamp(min=0)]
    return torch.where(rows >= 0, sizes, torch.zeros_like(sizes))


def expand_items(result: BeamResult, trie: PrefixTrie, top_n: int, rows: Optional[torch.Tensor] = None) -> ItemRanking:
    """Top-``top_n`` items per user from the beams (SIDs in beam order, ties by item index)."""
    if rows is None:
        rows = beam_sid_rows(result, trie)
    B, K = rows.shape
    sizes = _group_sizes(rows, trie)
    incl = torch.cumsum(sizes, 1)                                   # [B, K]
    excl = incl - sizes
    j = torch.arange(int(top_n), device=rows.device).expand(B, -1).contiguous()  # [B, N]
    k = torch.searchsorted(incl.contiguous(), j, right=True).clamp_(max=K - 1)   # beam holding slot j
    present = j < incl[:, -1:]
    row = rows.gather(1, k).clamp(min=0)
    pos = trie.sid_offsets[row] + (j - excl.gather(1, k))
    pos = torch.where(present, pos, torch.zeros_like(pos))
    items = torch.where(present, trie.sid_items[pos], torch.full_like(pos, -1))
    scores = result.scores.to(rows.device).gather(1, k)
    scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
    sid_rank = torch.where(present, k + 1, torch.zeros_like(k))
    return ItemRanking(items=items, scores=scores, sid_rank=sid_rank)


def locate_targets(result: BeamResult, trie: PrefixTrie, targets, rows: Optional[torch.Tensor] = None) -> TargetRanks:
    """``P``, ``G``, ``found``, ``sid_rank`` of each user's target item (``targets``: int ``[B]``)."""
    if rows is None:
        rows = beam_sid_rows(result, trie)
    targets = torch.as_tensor(targets, dtype=torch.long, device=rows.device).reshape(-1)
    B = rows.shape[0]
    if targets.numel() != B:
        raise ValueError(f"got {targets.numel()} targets for {B} users")
    if B and (int(targets.min()) < 0 or int(targets.max()) >= trie.num_items):
        raise ValueError(f"target item indices must lie in [0, {trie.num_items})")
    sizes = _group_sizes(rows, trie)
    incl = torch.cumsum(sizes, 1)
    excl = incl - sizes
    tsid = trie.item_sid[targets]                                   # [B]
    match = rows == tsid.unsqueeze(1)                               # [B, K]; at most one True per row
    found = match.any(1)
    pos = match.to(torch.int8).argmax(1)                            # first match (0 if none)
    total = incl[:, -1] if incl.shape[1] else torch.zeros(B, dtype=torch.long, device=rows.device)
    P = torch.where(found, excl.gather(1, pos.unsqueeze(1)).squeeze(1), total)
    G = trie.sid_sizes[tsid]
    sid_rank = torch.where(found, pos + 1, torch.zeros_like(pos))
    return TargetRanks(P=P, G=G, found=found, sid_rank=sid_rank)


def rank_items(result: BeamResult, trie: PrefixTrie, targets=None, top_n: int = 10) -> ItemRanking:
    """:func:`expand_items` plus, when ``targets`` is given, :func:`locate_targets` in ``.targets``."""
    rows = beam_sid_rows(result, trie)
    ranking = expand_items(result, trie, top_n, rows=rows)
    if targets is not None:
        ranking.targets = locate_targets(result, trie, targets, rows=rows)
    return ranking


def rank_scores(scores: torch.Tensor, targets=None, top_n: int = 10) -> ItemRanking:
    """Top-``top_n`` items of full catalog scores ``[B, I]`` (ties by ascending item index; ``-1`` / ``-inf``
    padding when ``top_n > I``) and, with ``targets``, their ``P`` / ``G`` / ``found`` / ``sid_rank``."""
    scores = scores.float()
    B, I = scores.shape
    n = min(int(top_n), I)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]  # stable: ties by index
    top = scores.gather(1, order)
    pad = int(top_n) - n
    items = torch.cat([order, order.new_full((B, pad), -1)], 1)
    top = torch.cat([top, top.new_full((B, pad), float("-inf"))], 1)
    ranks = torch.arange(1, int(top_n) + 1, device=scores.device).expand(B, -1)
    ranking = ItemRanking(items=items, scores=top, sid_rank=torch.where(items >= 0, ranks, torch.zeros_like(ranks)))
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device).reshape(-1)
        if targets.numel() != B:
            raise ValueError(f"got {targets.numel()} targets for {B} users")
        if B and (int(targets.min()) < 0 or int(targets.max()) >= I):
            raise ValueError(f"target item indices must lie in [0, {I})")
        t = scores.gather(1, targets.unsqueeze(1))
        P = (scores > t).sum(1)
        G = (scores == t).sum(1)
        ranking.targets = TargetRanks(P=P, G=G, found=torch.ones(B, dtype=torch.bool, device=scores.device),
                                      sid_rank=P + 1)
    return ranking
