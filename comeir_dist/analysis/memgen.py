"""Memorization vs generalization labels of next-item instances.

Definitions of Ding et al., "How Well Does Generative Recommendation Generalize?" as released with the
paper (MemGen-GR ``genrec/fine_grained_evaluator.py`` and ``genrec/token_prefix_evaluator.py``):

* Rule sets come from the training sequences only (each user's items but the last two). A pair
  ``x_i -> x_j`` with ``1 <= j - i <= H`` belongs to ``R_h`` for every ``h >= j - i`` (so
  ``R_1 <= R_2 <= ... <= R_H``); rules are global (the union over users).
* An instance (history ``x_1 .. x_n``, target ``v``) is **memorization** when ``x_n -> v`` is in ``R_1``
  (exclusive: no generalization type is then looked at).
* Otherwise, for each type and ``h = 1, 2, .. H`` (substitutability from ``h = 2``), skipping ``h > n``,
  the instance has ``type_h`` at the smallest ``h`` for which some ``u`` among the last ``h`` history items
  satisfies, under ``R_h``:

  - substitutability: ``u -> v``
  - symmetry: ``v -> u``
  - transitivity: some ``x`` with ``u -> x`` and ``x -> v``
  - 2nd-order symmetry: some ``x`` with (``v -> x`` and ``x -> u``) or (``v -> x`` and ``u -> x``) or
    (``x -> v`` and ``x -> u``).

  Any type makes the instance **generalization** (all types are kept, each at its minimum hop); none
  makes it **uncategorized**.
* Token level: with ``P_n(i)`` the first ``n`` SID tokens of item ``i``, the same rule sets built over
  prefixes give prefix-``n`` memorization ``P_n(x_n) -> P_n(v)`` in ``R_1`` (:func:`window_hop` == 1) and
  its minimum hop ``h``: some ``u`` among the last ``min(h, n)`` items with ``P_n(u) -> P_n(v)`` in ``R_h``
  (the released token evaluator does not skip ``h > n``; it only skips missing positions).

Everything is computed on arrays: a rule set is one sorted array of pair keys ``a * N + b`` with the
smallest distance at which the pair occurs (``R_h`` = keys with distance ``<= h``), plus its reverse.
Membership is a binary search; a composed check (transitivity, 2nd-order symmetry) expands, per queried
pair, the smaller of the two neighbour lists and looks the other leg up, giving directly the smallest
``h`` at which the composition holds (``min_x max(d(leg 1), d(leg 2))``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

TYPES = ("substitutability", "symmetry", "transitivity", "2nd_symmetry")
TYPE_MIN_HOP = {"substitutability": 2, "symmetry": 1, "transitivity": 1, "2nd_symmetry": 1}
CATEGORIES = ("memorization", "generalization", "uncategorized")
MEMORIZATION, GENERALIZATION, UNCATEGORIZED = 0, 1, 2
NONE = 255  # "no such transition" in the uint8 hop arrays
MAX_HOP_LIMIT = 64
_DENSE_MAX = 1 << 26  # node count^2 up to which hop lookups use a dense N x N uint8 table (64 MiB)
_CHUNK_ROWS = 1 << 22  # neighbour rows expanded at once by the composed checks (bounded memory)


@dataclass
class Sequences:
    """Ragged integer sequences: ``flat[offsets[i]:offsets[i + 1]]`` is sequence ``i``."""

    flat: np.ndarray     # int64
    offsets: np.ndarray  # int64 [S + 1]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "Sequences":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter((x for s in seqs for x in s), dtype=np.int64, count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @classmethod
    def from_arrow(cls, column) -> "Sequences":
        """From a pyarrow list column (chunked or not, sliced or not)."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        lengths = np.nan_to_num(lengths.astype(np.float64)).astype(np.int64)  # a null list counts as empty
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def map(self, table: np.ndarray) -> "Sequences":
        """The same sequences with every element ``x`` replaced by ``table[x]``."""
        return Sequences(np.asarray(table, np.int64)[self.flat], self.offsets)


class TransitionRules:
    """``R_1 .. R_H`` of a set of sequences over ``num_nodes`` nodes (items or SID prefixes).

    ``keys`` are the distinct pairs ``a * N + b`` (``b`` followed ``a`` within ``H`` positions in some
    sequence), sorted; ``dist`` the smallest such distance (the pair is in ``R_h`` iff ``dist <= h``).
    :meth:`side` gives the successor ("out") or predecessor ("in") lists, built on first use."""

    def __init__(self, num_nodes: int, max_hop: int, keys: np.ndarray, dist: np.ndarray):
        self.num_nodes, self.max_hop, self.keys, self.dist = int(num_nodes), int(max_hop), keys, dist
        self._sides: Dict[str, tuple] = {}
        self._dense: Optional[np.ndarray] = None

    def size(self, h: int) -> int:
        """Number of pairs in ``R_h``."""
        return int(np.count_nonzero(self.dist <= h))

    def hop(self, a, b) -> np.ndarray:
        """Smallest ``h`` with ``a -> b`` in ``R_h`` (uint8, :data:`NONE` if in none); negative ids: NONE."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        n = self.num_nodes
        if n * n > _DENSE_MAX:
            return _lookup(self.keys, self.dist, n, a, b)
        if self._dense is None:  # few nodes (e.g. SID prefixes): an N x N table, one gather per lookup
            self._dense = np.full(n * n, NONE, np.uint8)
            self._dense[self.keys] = self.dist
        a, b = np.broadcast_arrays(a, b)
        ok = (a >= 0) & (b >= 0) & (a < n) & (b < n)
        return np.where(ok, self._dense[np.where(ok, a * n + b, 0)], NONE).astype(np.uint8)

    def contains(self, a, b, h: int) -> np.ndarray:
        return self.hop(a, b) <= h

    def side(self, which: str) -> tuple:
        """``(nbr, nd, ptr, keys, dist)`` of the successors ("out": ``node -> x``) or predecessors ("in":
        ``x -> node``): ``nbr[ptr[a]:ptr[a + 1]]`` are ``a``'s neighbours nearest first, ``nd`` their
        distances; ``keys`` / ``dist`` the pairs ``node * N + x`` sorted, for lookups."""
        if which not in ("out", "in"):
            raise ValueError(which)
        if which not in self._sides:
            n, H = self.num_nodes, self.max_hop
            if which == "out":
                keys, dist = self.keys, self.dist
            else:  # reversed pairs, sorted
                rk = np.sort(((self.keys % n) * n + self.keys // n) * (H + 1) + self.dist) if len(self.keys) \
                    else self.keys
                keys, dist = rk // (H + 1), (rk % (H + 1)).astype(np.uint8)
            node, x = keys // n, keys % n
            by = np.sort((node * (H + 1) + dist) * n + x) if len(keys) else keys  # node, then distance, then x
            nbr = (by % n).astype(np.int32 if n < 2 ** 31 else np.int64)
            nd = ((by // n) % (H + 1)).astype(np.uint8)
            counts = np.bincount(node, minlength=n) if len(keys) else np.zeros(n, np.int64)
            ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._sides[which] = (nbr, nd, ptr, keys, dist)
        return self._sides[which]


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of an int array by sorting (numpy's hash-based unique is much slower here)."""
    s = np.sort(a)
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each element of ``a`` among them)."""
    order = np.argsort(a)
    s = a[order]
    first = np.concatenate([[True], s[1:] != s[:-1]]) if len(s) else np.zeros(0, bool)
    inv = np.empty(len(a), np.int64)
    inv[order] = np.cumsum(first) - 1
    return s[first], inv


def _search(keys: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """``np.searchsorted(keys, needles)``, sorting the needles first when they are not (binary searches with
    ascending needles are many times faster: they stay in cache)."""
    if len(needles) < 2 or bool((needles[1:] >= needles[:-1]).all()):
        return np.searchsorted(keys, needles)
    order = np.argsort(needles)
    out = np.empty(len(needles), np.int64)
    out[order] = np.searchsorted(keys, needles[order])
    return out


def _lookup(keys: np.ndarray, dist: np.ndarray, n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.broadcast_arrays(a, b)
    out = np.full(a.shape, NONE, np.uint8)
    ok = (a >= 0) & (b >= 0) & (a < n) & (b < n)
    if not len(keys) or not ok.any():
        return out
    k = a[ok] * n + b[ok]
    j = np.minimum(_search(keys, k), len(keys) - 1)
    out[ok] = np.where(keys[j] == k, dist[j], NONE)
    return out


def build_rules(seqs: Sequences, num_nodes: int, max_hop: int) -> TransitionRules:
    """The rule sets ``R_1 .. R_max_hop`` of ``seqs`` (node ids ``0 .. num_nodes - 1``)."""
    if not 1 <= max_hop <= MAX_HOP_LIMIT:
        raise ValueError(f"max_hop must be in 1..{MAX_HOP_LIMIT}, got {max_hop}")
    n = max(1, int(num_nodes))
    if n * n * (max_hop + 1) >= 2 ** 63:
        raise ValueError(f"{n} nodes: pair keys (a * N + b) * (H + 1) + d would overflow int64")
    flat = seqs.flat
    if len(flat) and (flat.min() < 0 or flat.max() >= n):
        raise ValueError(f"sequence ids must be in 0..{n - 1}, got {flat.min()}..{flat.max()}")
    # items after each position inside its own sequence
    after = np.repeat(seqs.offsets[1:], seqs.lengths) - np.arange(len(flat), dtype=np.int64) - 1
    parts = []
    for d in range(1, max_hop + 1):
        idx = np.flatnonzero(after >= d)
        if not len(idx):
            break
        parts.append(_sorted_unique((flat[idx] * n + flat[idx + d]) * (max_hop + 1) + d))
    if parts:
        # (pair, distance) codes sorted: the first code of each pair holds its smallest distance
        codes = np.sort(np.concatenate(parts))
        pair = codes // (max_hop + 1)
        first = np.concatenate([[True], pair[1:] != pair[:-1]])
        keys, dist = pair[first], (codes[first] % (max_hop + 1)).astype(np.uint8)
    else:
        keys, dist = np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return TransitionRules(n, max_hop, keys, dist)


def compose_hop(rules: TransitionRules, a, side_a: str, b, side_b: str, best=None, enough=1) -> np.ndarray:
    """Per query ``q``: the smallest ``h`` such that some ``x`` is an ``side_a`` neighbour of ``a[q]`` and an
    ``side_b`` neighbour of ``b[q]``, both in ``R_h``, i.e. ``min_x max(d_a(a, x), d_b(b, x))``; NONE if
    there is no such ``x``. ``side`` "out": ``node -> x``; "in": ``x -> node``.

    ``best`` (per query, default NONE): only values below it are looked for (the result is
    ``min(best, value)``). ``enough`` (scalar or per query, default 1): a query stops as soon as a value
    ``<= enough`` is found, which is then returned (so the result is exact when ``<= enough`` does not
    matter, e.g. with the default). The shorter of the two neighbour lists is scanned nearest first in
    growing blocks, each neighbour looked up on the other side, until a query's value cannot improve."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out = np.full(len(a), NONE, np.uint8) if best is None else np.array(best, np.uint8, copy=True)
    enough = np.broadcast_to(np.asarray(enough, np.int64), a.shape)
    if not len(a) or not len(rules.keys):
        return out
    A, B = rules.side(side_a), rules.side(side_b)
    deg_a = A[2][a + 1] - A[2][a]
    deg_b = B[2][b + 1] - B[2][b]
    from_a = deg_a <= deg_b
    for sel, src, dst, S, T in ((from_a, a, b, A, B), (~from_a, b, a, B, A)):
        q = np.flatnonzero(sel)
        q = q[np.argsort(dst[q], kind="stable")]  # lookups grouped by the other node: near-sorted needles
        if len(q):
            out[q] = _scan_min(src[q], S, dst[q], T, rules.num_nodes, out[q], enough[q])
    return out


def _scan_min(src, S, dst, T, n: int, best: np.ndarray, enough: np.ndarray) -> np.ndarray:
    nbr, nd, ptr = S[:3]
    t_keys, t_dist = T[3], T[4]
    best = best.copy()
    start = ptr[src]
    deg = ptr[src + 1] - start
    act = np.flatnonzero((deg > 0) & (best > enough))
    act = act[nd[start[act]] < best[act]]  # a neighbour at distance >= best cannot improve it
    offset, block = 0, 4
    while len(act):
        c_all = np.minimum(deg[act] - offset, block)
        csum = np.cumsum(c_all)
        i0 = 0
        while i0 < len(act):  # pieces of bounded size
            base = csum[i0 - 1] if i0 else 0
            i1 = max(i0 + 1, int(np.searchsorted(csum, base + _CHUNK_ROWS, side="right")))
            q, c = act[i0:i1], c_all[i0:i1]
            total = int(c.sum())
            first = np.cumsum(c) - c
            pos = np.repeat(start[q] + offset - first, c) + np.arange(total, dtype=np.int64)
            k = np.repeat(dst[q], c) * n + nbr[pos]
            j = np.minimum(np.searchsorted(t_keys, k), len(t_keys) - 1)
            w = np.where(t_keys[j] == k, np.maximum(nd[pos], t_dist[j]), NONE).astype(np.uint8)
            best[q] = np.minimum(best[q], np.minimum.reduceat(w, first))
            i0 = i1
        offset += block
        block *= 2
        act = act[deg[act] > offset]
        act = act[(best[act] > enough[act]) & (nd[start[act] + offset] < best[act])]
    return best


def transitivity_hop(rules: TransitionRules, u, v, best=None, enough=1) -> np.ndarray:
    """Smallest ``h`` with some ``x``: ``u -> x`` and ``x -> v`` in ``R_h`` (``best``/``enough``: see
    :func:`compose_hop`)."""
    return compose_hop(rules, u, "out", v, "in", best, enough)


def second_order_symmetry_hop(rules: TransitionRules, u, v, best=None, enough=1) -> np.ndarray:
    """Smallest ``h`` with some ``x``: (v -> x, x -> u) or (v -> x, u -> x) or (x -> v, x -> u) in ``R_h``."""
    best = compose_hop(rules, v, "out", u, "in", best, enough)
    best = compose_hop(rules, v, "out", u, "out", best, enough)
    return compose_hop(rules, v, "in", u, "in", best, enough)


def _last_items(hist: Sequences, max_hop: int):
    """``u[i, d - 1]`` = the ``d``-th most recent history item of instance ``i`` (-1 if missing)."""
    d = np.arange(1, max_hop + 1, dtype=np.int64)
    valid = hist.lengths[:, None] >= d[None, :]
    idx = np.where(valid, hist.offsets[1:, None] - d[None, :], 0)
    u = np.where(valid, hist.flat[idx] if len(hist.flat) else 0, -1)
    return u, valid, d


@dataclass
class Labels:
    """Per-instance labels (arrays of length M)."""

    history_len: np.ndarray        # int64
    target: np.ndarray             # int64
    category: np.ndarray           # int8: MEMORIZATION / GENERALIZATION / UNCATEGORIZED
    type_hop: Dict[str, np.ndarray]  # TYPES -> int8 minimum hop, 0 = type not satisfied (or memorization)
    token_hop: Optional[np.ndarray] = None  # [M, L] int8: minimum hop of prefix-n memorization, 0 = none

    def __len__(self) -> int:
        return len(self.target)


def label_instances(rules: TransitionRules, hist: Sequences, targets) -> Labels:
    """Category and generalization types (each at its minimum hop) of every (history, target) instance."""
    H, n = rules.max_hop, rules.num_nodes
    targets = np.asarray(targets, np.int64)
    if len(targets) != len(hist):
        raise ValueError(f"{len(hist)} histories but {len(targets)} targets")
    for name, arr in (("history", hist.flat), ("target", targets)):
        if len(arr) and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"{name} ids must be in 0..{n - 1}, got {arr.min()}..{arr.max()}")
    M = len(targets)
    u, valid, d = _last_items(hist, H)
    vv = np.broadcast_to(targets[:, None], u.shape)
    fwd = np.full(u.shape, NONE, np.int16)
    fwd[valid] = rules.hop(u[valid], vv[valid])
    mem = valid[:, 0] & (fwd[:, 0] <= 1)
    need = valid & ~mem[:, None]
    limit = np.minimum(hist.lengths, H)
    type_hop = {}
    # single-rule types: one lookup per (instance, position)
    for t, ab in (("substitutability", None), ("symmetry", (vv, u))):
        if ab is None:
            val = fwd
        else:
            val = np.full(u.shape, NONE, np.int16)
            val[need] = rules.hop(ab[0][need], ab[1][need])
        cand = np.where(need, np.maximum(np.maximum(val, d[None, :]), TYPE_MIN_HOP[t]), NONE)
        hop = cand.min(axis=1) if M else np.zeros(0, np.int16)
        type_hop[t] = np.where(hop <= limit, hop, 0).astype(np.int8)
    # composed types: positions nearest first; a pair at distance d is looked at only for instances whose
    # best hop so far is above max(d, min hop), and only values below that best are searched for
    for t, fn in (("transitivity", transitivity_hop), ("2nd_symmetry", second_order_symmetry_hop)):
        best = np.full(M, NONE, np.int16)
        for di in range(H):
            floor = max(di + 1, TYPE_MIN_HOP[t])
            inst = np.flatnonzero(need[:, di] & (best > floor))
            if not len(inst):
                continue
            pairs, inv = _unique_inverse(u[inst, di] * n + targets[inst])
            cap = np.zeros(len(pairs), np.int16)
            np.maximum.at(cap, inv, best[inst])  # the loosest instance decides what is still useful
            val = fn(rules, pairs // n, pairs % n, best=np.minimum(cap, NONE).astype(np.uint8), enough=floor)
            best[inst] = np.minimum(best[inst], np.maximum(val[inv].astype(np.int16), floor))
        type_hop[t] = np.where(best <= limit, best, 0).astype(np.int8)
    any_type = np.zeros(M, bool)
    for t in TYPES:
        any_type |= type_hop[t] > 0
    category = np.where(mem, MEMORIZATION, np.where(any_type, GENERALIZATION, UNCATEGORIZED)).astype(np.int8)
    return Labels(hist.lengths.copy(), targets, category, {t: type_hop[t] for t in TYPES})


def window_hop(rules: TransitionRules, hist: Sequences, targets) -> np.ndarray:
    """Smallest ``h <= H`` such that some ``u`` among the last ``min(h, n)`` history items has ``u -> v`` in
    ``R_h`` (int8, 0 = none): the released prefix-memorization rule (``h > n`` is not skipped)."""
    H = rules.max_hop
    targets = np.asarray(targets, np.int64)
    u, valid, d = _last_items(hist, H)
    hop = rules.hop(u, np.broadcast_to(targets[:, None], u.shape)).astype(np.int16)
    cand = np.where(valid, np.maximum(hop, d[None, :]), NONE)
    best = cand.min(axis=1) if len(targets) else np.zeros(0, np.int16)
    return np.where(best <= H, best, 0).astype(np.int8)


def prefix_ids(codes: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Dense id of the first ``n`` SID tokens of every item, and the number of distinct prefixes."""
    codes = np.asarray(codes, np.int64)[:, :n]
    base = int(codes.max()) + 1 if codes.size else 1
    if codes.size and codes.min() >= 0 and base ** n < 2 ** 62:  # one integer per prefix (mixed radix)
        code = np.zeros(len(codes), np.int64)
        for c in range(n):
            code = code * base + codes[:, c]
        uniq, inv = _unique_inverse(code)
        return inv, len(uniq)
    uniq, inv = np.unique(codes, axis=0, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), len(uniq)


def prefix_rules(train: Sequences, codes: np.ndarray, max_hop: int) -> list:
    """Per prefix length ``n = 1..L``: (prefix id of every item, rule sets over the prefixes of ``train``)."""
    out = []
    for level in range(1, codes.shape[1] + 1):
        pid, count = prefix_ids(codes, level)
        out.append((pid, build_rules(train.map(pid), count, max_hop)))
    return out


def token_hops(rules_by_level: list, hist: Sequences, targets) -> np.ndarray:
    """``[M, L]`` int8: per prefix length ``n = 1..L`` (:func:`prefix_rules`), the minimum hop of prefix-``n``
    memorization (0 = none; 1 = ``P_n(x_n) -> P_n(v)`` occurs in the training sequences)."""
    targets = np.asarray(targets, np.int64)
    out = np.zeros((len(targets), len(rules_by_level)), np.int8)
    for i, (pid, rules) in enumerate(rules_by_level):
        out[:, i] = window_hop(rules, hist.map(pid), pid[targets])
    return out
