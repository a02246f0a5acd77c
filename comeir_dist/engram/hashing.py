"""Multi-head multiplicative-XOR hashing of n-gram keys (paper Eq. 39), vectorised int64 torch.

Definition (shared bit-for-bit by :func:`hash_keys` and the pure-Python :func:`hash_reference`)::

    phi(x_1..x_o) = ( XOR_{a=1..o} ((x_a * m_a) mod 2^62) ) mod H

* keys ``x_a`` are non-negative integers (SID codes or encoded SID prefixes, < D_max <= 2^62; the
  marker of a shortened inter key, ``engram.short_keys: shorten``, is D_l < 2^62, see patterns.py);
  ``x_1`` is the oldest element of the key, ``x_o`` the most recent (Eq. 13/19 order);
* ``m_a`` are odd multipliers in [2^20, 2^31) drawn from numpy's PCG64 seeded with
  SeedSequence([hash_seed, memory_id, level, order, head]) (memory_id: intra=1, inter=2), one per key
  position a (a draw of ``order`` integers, position a takes the a-th);
* torch multiplies int64 with two's-complement wrap-around (i.e. mod 2^64); masking the product with
  2^62 - 1 yields exactly (x_a * m_a) mod 2^62 for any non-negative x_a, so the vectorised result
  equals the arbitrary-precision Python one even if a product overflows. All XOR operands are then
  in [0, 2^62), the XOR is non-negative and the final ``remainder`` lands in [0, H).

Multipliers are recorded by :func:`multipliers_state` and saved with checkpoints; loading a
checkpoint whose multipliers differ from the current seed must be an error (a trained memory would
otherwise be silently scrambled).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from comeir_dist.engram.sizing import TableSpec

MASK62 = (1 << 62) - 1
_MEMORY_ID = {"intra": 1, "inter": 2}
_M_LOW, _M_HIGH = 1 << 20, 1 << 31


def hash_multipliers(seed: int, memory: str, level: int, order: int, head: int) -> list[int]:
    """The odd multipliers (m_1..m_o) of table (memory, level, order, head)."""
    ss = np.random.SeedSequence([int(seed), _MEMORY_ID[memory], int(level), int(order), int(head)])
    rng = np.random.Generator(np.random.PCG64(ss))
    draws = rng.integers(_M_LOW, _M_HIGH, size=order, dtype=np.int64)
    return [int(v) | 1 for v in draws]


def hash_reference(key: Sequence[int], multipliers: Sequence[int], modulus: int) -> int:
    """Pure-Python Eq. 39 (the specification the torch version is tested against)."""
    acc = 0
    for x, m in zip(key, multipliers, strict=True):
        acc ^= (int(x) * int(m)) % (1 << 62)
    return acc % int(modulus)


def hash_keys(keys: torch.Tensor, multipliers: Sequence[int] | torch.Tensor, modulus: int) -> torch.Tensor:
    """Vectorised Eq. 39. ``keys [..., o]`` int64 (non-negative) -> bucket ids ``[...]`` in [0, modulus)."""
    if keys.dtype != torch.int64:
        keys = keys.long()
    m = torch.as_tensor(multipliers, dtype=torch.int64, device=keys.device)
    if keys.shape[-1] != m.numel():
        raise ValueError(f"key width {keys.shape[-1]} != number of multipliers {m.numel()}")
    prod = (keys * m) & MASK62  # wrap-around multiply, then exact mod 2^62
    acc = prod[..., 0]
    for a in range(1, prod.shape[-1]):
        acc = torch.bitwise_xor(acc, prod[..., a])
    return torch.remainder(acc, int(modulus))


class TableHasher:
    """phi_{l,o,k} for one table: multipliers + prime modulus."""

    __slots__ = ("name", "multipliers", "modulus", "_m")

    def __init__(self, name: str, multipliers: Sequence[int], modulus: int):
        self.name = name
        self.multipliers = [int(v) for v in multipliers]
        self.modulus = int(modulus)
        self._m = torch.tensor(self.multipliers, dtype=torch.int64)

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        m = self._m if self._m.device == keys.device else self._m.to(keys.device)
        return hash_keys(keys, m, self.modulus)

    def __repr__(self) -> str:
        return f"TableHasher({self.name}, H={self.modulus}, m={self.multipliers})"


def build_hashers(specs: Iterable[TableSpec], seed: int) -> dict[str, TableHasher]:
    """One hasher per table spec (name -> hasher)."""
    return {s.name: TableHasher(s.name, hash_multipliers(seed, s.memory, s.level, s.order, s.head), s.rows)
            for s in specs}


def multipliers_state(hashers: dict[str, TableHasher]) -> dict[str, dict]:
    """JSON-able record of every table's modulus and multipliers (saved with checkpoints)."""
    return {n: {"modulus": h.modulus, "multipliers": list(h.multipliers)} for n, h in sorted(hashers.items())}


def check_multipliers_state(hashers: dict[str, TableHasher], saved: dict[str, dict]) -> None:
    """Raise ValueError naming the first table whose saved hash definition differs from ``hashers``."""
    cur = multipliers_state(hashers)
    if set(cur) != set(saved):
        missing = sorted(set(saved) ^ set(cur))
        raise ValueError(f"Engram table sets differ between checkpoint and config: {missing[:5]}")
    for n, v in cur.items():
        s = saved[n]
        if int(s["modulus"]) != v["modulus"] or [int(x) for x in s["multipliers"]] != v["multipliers"]:
            raise ValueError(f"Engram table {n}: hash definition differs from the checkpoint "
                             f"(saved H={s['modulus']} m={s['multipliers']}, now H={v['modulus']} m={v['multipliers']}); "
                             "use the checkpoint's hash_seed and sizes")
