"""Catalog prefix tree over semantic IDs (paper App. A.4, "Catalog-valid Prefix Decoding").

Every item ``i`` has one SID ``codes[i] = (c^1, ..., c^L)`` with codes in ``[0, C)``. Several items may
share one SID (collisions). The trie answers, for a batch of partial SIDs (prefixes) of length ``l``,
which codes ``x`` make ``prefix + (x,)`` a prefix of some catalog SID: the valid set
``V_l(c^{<l})`` of Eq. 11. It also maps complete SIDs back to their items.

Representation (fully vectorised, no Python per-node objects):

* A prefix ``(c^1..c^l)`` is encoded in mixed radix base ``C``:
  ``key = ((c^1 * C + c^2) * C + ...) + c^l`` (the empty prefix has key 0). ``C**L`` must fit in int64.
* Per level ``l`` (0-based, ``l`` = prefix length) we keep the sorted unique keys of the catalog prefixes
  of length ``l`` (``prefix_keys[l]``, shape ``[P_l]``) and a dense bool table ``child_table[l]`` of shape
  ``[P_l, C]``: row ``r`` marks the children of prefix ``prefix_keys[l][r]``. A prefix is looked up with
  ``torch.searchsorted``; unknown prefixes have no valid children. Memory is ``O(sum_l P_l * C)`` bits
  (``P_l <= min(I, C**l)``), never ``C**l``.
* ``sid_keys`` (sorted unique encoded complete SIDs, ``[S]``) + CSR ``sid_offsets`` (``[S+1]``) /
  ``sid_items`` (``[I]``): the items of SID ``s`` are ``sid_items[sid_offsets[s]:sid_offsets[s+1]]``,
  sorted by item index. ``item_sid[i]`` is the row of item ``i``'s SID in ``sid_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from comeir_dist.errors import UserError

__all__ = ["PrefixTrie"]

_INT64_MAX = (1 << 63) - 1


def _as_long_tensor(codes, device=None) -> torch.Tensor:
    if isinstance(codes, torch.Tensor):
        t = codes
    else:
        t = torch.as_tensor(np.asarray(codes))
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"SID codes must be an integer array, got dtype {t.dtype}")
    t = t.to(dtype=torch.long)
    if device is not None:
        t = t.to(device)
    return t


@dataclass(frozen=True, eq=False, repr=False)
class PrefixTrie:
    """Immutable catalog prefix tree; build with :meth:`from_codes`, move with :meth:`to`."""

    num_codes: int                      # C
    num_levels: int                     # L
    num_items: int                      # I
    prefix_keys: Tuple[torch.Tensor, ...]   # per level l in [0, L): sorted unique keys [P_l] (level 0: [0])
    child_table: Tuple[torch.Tensor, ...]   # per level l in [0, L): bool [P_l, C]
    sid_keys: torch.Tensor              # [S] sorted unique encoded complete SIDs
    sid_offsets: torch.Tensor           # [S+1] CSR offsets into sid_items
    sid_items: torch.Tensor             # [I] item indices grouped by SID, ascending inside a group
    item_sid: torch.Tensor              # [I] row in sid_keys of each item's SID
    sid_codes: torch.Tensor             # [S, L] the distinct SIDs (rows of sid_keys, decoded)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, codes, num_codes: int, device: Union[str, torch.device, None] = None) -> "PrefixTrie":
        """Build the trie from item SIDs ``codes`` (int array/tensor ``[I, L]``, values in ``[0, C)``).

        ``num_codes`` is the codebook size ``C`` (same for every level). The trie lives on ``device``
        (default: the device of ``codes`` if it is a tensor, else CPU).
        """
        t = _as_long_tensor(codes, device)
        if t.dim() != 2:
            raise ValueError(f"SID codes must have shape [num_items, num_levels], got {tuple(t.shape)}")
        num_items, num_levels = int(t.shape[0]), int(t.shape[1])
        C = int(num_codes)
        if C < 1:
            raise UserError(f"codebook size must be >= 1, got {num_codes}")
        if num_levels < 1:
            raise UserError("SIDs must have at least one level")
        if num_items < 1:
            raise UserError("cannot build a prefix tree from an empty catalog (0 items)")
        if C ** num_levels > _INT64_MAX:
            raise UserError(f"C**L = {C}**{num_levels} does not fit in int64; cannot encode SIDs")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= C:
            raise UserError(f"SID codes must lie in [0, {C}); found values in [{lo}, {hi}]")

        dev = t.device
        prefix_keys: List[torch.Tensor] = []
        child_table: List[torch.Tensor] = []
        key = torch.zeros(num_items, dtype=torch.long, device=dev)   # encoded prefix of length l
        for level in range(num_levels):
            uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
            table = torch.zeros(uniq.numel(), C, dtype=torch.bool, device=dev)
            table[inverse, t[:, level]] = True
            prefix_keys.append(uniq)
            child_table.append(table)
            key = key * C + t[:, level]

        sid_keys, item_sid = torch.unique(key, sorted=True, return_inverse=True)
        # stable sort by SID keeps items ascending inside each SID group
        order = torch.sort(item_sid, stable=True).indices
        counts = torch.bincount(item_sid, minlength=sid_keys.numel())
        offsets = torch.zeros(sid_keys.numel() + 1, dtype=torch.long, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        # sid_codes: first item of each group gives the codes
        sid_codes = t[order[offsets[:-1]]]
        trie = cls(
            num_codes=C,
            num_levels=num_levels,
            num_items=num_items,
            prefix_keys=tuple(prefix_keys),
            child_table=tuple(child_table),
            sid_keys=sid_keys,
            sid_offsets=offsets,
            sid_items=order,
            item_sid=item_sid,
            sid_codes=sid_codes,
        )
        # Each item has exactly one SID by construction (one row of codes per item).
        assert trie.sid_items.numel() == num_items
        return trie

    def to(self, device: Union[str, torch.device]) -> "PrefixTrie":
        """A copy of the trie on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.sid_keys.device == device:
            return self
        mv = lambda x: x.to(device)  # noqa: E731
        return PrefixTrie(
            num_codes=self.num_codes,
            num_levels=self.num_levels,
            num_items=self.num_items,
            prefix_keys=tuple(mv(x) for x in self.prefix_keys),
            child_table=tuple(mv(x) for x in self.child_table),
            sid_keys=mv(self.sid_keys),
            sid_offsets=mv(self.sid_offsets),
            sid_items=mv(self.sid_items),
            item_sid=mv(self.item_sid),
            sid_codes=mv(self.sid_codes),
        )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.sid_keys.device

    @property
    def num_sids(self) -> int:
        """Number of distinct complete SIDs in the catalog."""
        return int(self.sid_keys.numel())

    @property
    def sid_sizes(self) -> torch.Tensor:
        """``[S]`` number of items sharing each distinct SID (collision group size)."""
        return self.sid_offsets[1:] - self.sid_offsets[:-1]

    # ------------------------------------------------------------------ encoding
    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """Mixed-radix key of (partial) SIDs: ``codes [..., l] -> LongTensor [...]`` (empty prefix -> 0).

        Codes are assumed to lie in ``[0, C)``; use :meth:`valid_mask`/:meth:`lookup_sid` to test
        membership.
        """
        codes = _as_long_tensor(codes)
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(codes.shape[-1]):
            key = key * self.num_codes + codes[..., level]
        return key

    def decode(self, keys: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``keys [...] -> codes [..., length]`` (default length L)."""
        length = self.num_levels if length is None else int(length)
        keys = _as_long_tensor(keys)
        out = torch.empty(*keys.shape, length, dtype=torch.long, device=keys.device)
        k = keys.clone()
        for level in range(length - 1, -1, -1):
            out[..., level] = k % self.num_codes
            k = torch.div(k, self.num_codes, rounding_mode="floor")
        return out

    # ------------------------------------------------------------------ queries
    def prefix_rows(self, level: int, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows of encoded prefixes of length ``level`` in ``child_table[level]``.

        Returns ``(rows, found)`` with the shape of ``keys``; ``rows`` is clamped (valid index) where
        ``found`` is False.
        """
        if not 0 <= level < self.num_levels:
            raise ValueError(f"prefix level must be in [0, {self.num_levels}), got {level}")
        table_keys = self.prefix_keys[level]
        keys = keys.to(table_keys.device)
        rows = torch.searchsorted(table_keys, keys.contiguous())
        rows = rows.clamp_(max=table_keys.numel() - 1)
        found = table_keys[rows] == keys
        return rows, found

    def valid_mask_keys(self, level: int, keys: torch.Tensor) -> torch.Tensor:
        """Like :meth:`valid_mask` but for already-encoded prefixes ``keys [...] -> BoolTensor [..., C]``."""
        rows, found = self.prefix_rows(level, keys)
        return self.child_table[level][rows] & found.unsqueeze(-1)

    def valid_mask(self, prefixes: torch.Tensor, level: Optional[int] = None) -> torch.Tensor:
        """Catalog-valid next codes: ``prefixes LongTensor [..., l] -> BoolTensor [..., C]``.

        ``mask[..., x]`` is True iff ``prefix + (x,)`` is a prefix of some catalog SID (the children of the
        prefix in the tree). ``l = prefixes.shape[-1]`` (``level`` may be passed to double-check); for
        ``l = 0`` the result is the set of first codes. Prefixes not in the catalog give an all-False row.
        """
        prefixes = _as_long_tensor(prefixes)
        length = prefixes.shape[-1]
        if level is not None and int(level) != length:
            raise ValueError(f"valid_mask(level={level}) got prefixes of length {length}")
        bad = ((prefixes < 0) | (prefixes >= self.num_codes)).any(-1) if length else None
        keys = self.encode(prefixes.clamp(0, self.num_codes - 1)) if length else \
            torch.zeros(prefixes.shape[:-1], dtype=torch.long, device=prefixes.device)
        mask = self.valid_mask_keys(length, keys)
        if bad is not None:
            mask = mask & ~bad.to(mask.device).unsqueeze(-1)
        return mask

    def level_mask_fn(self, level: int):
        """``valid_mask`` bound to one level: a function ``prefixes [..., level] -> BoolTensor [..., C]``."""
        return lambda prefixes: self.valid_mask(prefixes, level=level)

    def lookup_sid(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows in ``sid_keys`` of encoded complete SIDs: ``keys [...] -> (rows [...], found [...])``.

        ``rows`` is -1 where the SID is not in the catalog.
        """
        keys = keys.to(self.sid_keys.device)
        rows = torch.searchsorted(self.sid_keys, keys.contiguous()).clamp_(max=self.num_sids - 1)
        found = self.sid_keys[rows] == keys
        return torch.where(found, rows, torch.full_like(rows, -1)), found

    def contains(self, codes: torch.Tensor) -> torch.Tensor:
        """Whether complete SIDs ``codes [..., L]`` belong to the catalog -> BoolTensor ``[...]``."""
        codes = _as_long_tensor(codes)
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"complete SIDs have {self.num_levels} levels, got {codes.shape[-1]}")
        in_range = ((codes >= 0) & (codes < self.num_codes)).all(-1)
        _, found = self.lookup_sid(self.encode(codes.clamp(0, self.num_codes - 1)))
        return found & in_range.to(found.device)

    def items_of(self, sid_row: int) -> torch.Tensor:
        """Item indices (ascending) sharing the SID in row ``sid_row`` of ``sid_keys``."""
        return self.sid_items[self.sid_offsets[sid_row]:self.sid_offsets[sid_row + 1]]

    def items_of_codes(self, codes: Sequence[int]) -> torch.Tensor:
        """Item indices (ascending) whose SID is ``codes`` (length L); empty if not in the catalog."""
        key = self.encode(torch.as_tensor(list(codes), dtype=torch.long, device=self.device))
        row, found = self.lookup_sid(key.reshape(1))
        if not bool(found[0]):
            return self.sid_items[:0]
        return self.items_of(int(row[0]))

    def num_children(self, level: int) -> torch.Tensor:
        """``[P_level]`` number of children of every catalog prefix of length ``level``."""
        return self.child_table[level].sum(-1)

    def __repr__(self) -> str:  # tensors are large; keep it short
        return (f"PrefixTrie(items={self.num_items}, sids={self.num_sids}, L={self.num_levels}, "
                f"C={self.num_codes}, prefixes={[int(k.numel()) for k in self.prefix_keys]}, "
                f"device={self.device})")
