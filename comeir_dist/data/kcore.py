"""Iterated k-core filtering of user-item interactions."""
from __future__ import annotations

from collections import Counter


def dedupe_consecutive_repeats(sequences: dict[str, list[str]]) -> dict[str, list[str]]:
    """Keep the first occurrence of each item per user (a repeat is not a new next-item target)."""
    out = {}
    for u, seq in sequences.items():
        seen: set[str] = set()
        out[u] = [i for i in seq if not (i in seen or seen.add(i))]
    return out


def k_core(sequences: dict[str, list[str]], k: int) -> dict[str, list[str]]:
    """Drop users and items with fewer than ``k`` interactions until nothing changes (fixed point)."""
    seqs = {u: list(s) for u, s in sequences.items()}
    while True:
        item_counts = Counter(i for s in seqs.values() for i in s)
        changed = False
        new: dict[str, list[str]] = {}
        for u, s in seqs.items():
            kept = [i for i in s if item_counts[i] >= k]
            if len(kept) != len(s):
                changed = True
            if len(kept) >= k:
                new[u] = kept
            else:
                changed = changed or bool(s)
        if not changed and len(new) == len(seqs):
            return new
        seqs = new
