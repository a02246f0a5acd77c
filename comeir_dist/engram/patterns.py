"""Discrete Engram lookup patterns (paper Eq. 13, 17-20, 22-24), vectorised and batch-first.

Conventions
-----------
* ``codes [B, N, L]`` int64 SID codes in [0, C); levels are 1-based in the API (``level=l`` means
  code c^l, stored at ``codes[..., l-1]``).
* ``mask [B, N]`` bool, True for real history items. The house convention is LEFT padding (real items
  occupy the last positions, so ``N-1`` is the most recent item), but every function here only needs
  the real items of a row to be contiguous: keys are built from neighbouring positions and the
  decode-side variant locates the most recent real item from the mask, so RIGHT padding works too.
* Keys have a trailing dimension of width o ordered oldest -> newest: ``key[..., o-1]`` is the
  element at the lookup position (x_o in Eq. 39).
* Short histories (``engram.short_keys``). Eq. 13/19 clamp the suffix at the sequence start:
  g_o(p) = (p_max(1, T-o+1), ..., p_T), i.e. with only k < o real items the order-o key is the k
  items themselves, still read from the ORDER-o tables (Eq. 14 addresses M_{l,o,k} for every o in
  O_l). Two rules are implemented (only inter keys are affected: an intra key of order o <= l always
  has its o codes):

  - ``drop`` (``short_marker=None``, the rule of every run before the option existed): an order-o key
    is valid iff all o of its elements are real items; otherwise that order contributes nothing.
  - ``shorten`` (``short_marker=M``): the key is valid whenever its lookup position is a real item;
    the o-k missing (pre-history) elements are the constant marker M = D_l (:func:`short_key_marker`,
    the first integer outside the unit domain [0, D_l)), so the key is (M, .., M, x_1, .., x_k). Only
    real items and the marker are hashed, never a padding position's unit, and the result does not
    depend on the padding id or the padding length. Because the multipliers of Eq. 39 are odd,
    x -> (x m_a) mod 2^62 is a bijection, so the marker's term differs from every real unit's term
    at the same key position: a shortened key is never *systematically* equal to a full key of the
    same order (plain zero padding would be: unit 0 is a real SID prefix and hashes to the zero
    term, so (0, y, x) would be the full key of a history starting with prefix 0). The number of
    markers encodes the actual length k. A shortened order-o key over k items is also distinct from
    the genuine order-k key of the same items: Eq. 14 reads it from the order-o tables (own
    multipliers, own prime modulus, own gate and W_V,o), which is what the paper's g_o with the
    clamped index implies; we do not share rows between orders.

  Invalid keys are returned as zeros and must be looked up as empty bags (see
  ``tables.EngramKeyBatch``).

Units: an inter-item unit at level l is the mixed-radix (base C) integer of the SID prefix c^{<=l},
reduced into D_l = min(C^l, D_max): Horner's rule u <- (u*C + c) mod D_l, which equals
(sum_i c^i C^{l-i}) mod D_l, i.e. the exact encoding whenever C^l <= D_max (true for C=128, L=3).
"""
from __future__ import annotations

import torch

_INT64_MAX = (1 << 63) - 1


def unit_domain(level: int, codebook_size: int, d_max: int) -> int:
    """D_l = min(C^l, D_max)."""
    return min(codebook_size**level, d_max)


def short_key_marker(level: int, codebook_size: int, d_max: int) -> int:
    """Marker M = D_l standing for each missing (pre-history) element of a shortened level-l inter key
    (``engram.short_keys: shorten``, Eq. 13/19): no real unit equals it (units lie in [0, D_l))."""
    m = unit_domain(level, codebook_size, d_max)
    if m >= 1 << 62:
        raise ValueError(f"short-key marker D_l={m} must be < 2^62 (lower d_max)")
    return m


def _horner(codes: torch.Tensor, codebook_size: int, domain: int) -> torch.Tensor:
    if domain * codebook_size >= _INT64_MAX:
        raise ValueError(f"prefix encoding would overflow int64 (D={domain}, C={codebook_size})")
    u = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=codes.device)
    for i in range(codes.shape[-1]):
        u = torch.remainder(u * codebook_size + codes[..., i].long(), domain)
    return u


def encode_prefix(codes: torch.Tensor, level: int, codebook_size: int, d_max: int) -> torch.Tensor:
    """Integer unit of the prefix c^{<=l}: ``codes [..., L] -> [...]`` in [0, D_l)."""
    if not 1 <= level <= codes.shape[-1]:
        raise ValueError(f"level {level} outside 1..{codes.shape[-1]}")
    return _horner(codes[..., :level], codebook_size, unit_domain(level, codebook_size, d_max))


def candidate_prefix_units(prefix: torch.Tensor, cand: torch.Tensor, codebook_size: int, d_max: int) -> torch.Tensor:
    """Units of the candidate prefixes c^{<=l}(x) = (c^1..c^{l-1}, x) (Eq. 22).

    ``prefix [M, l-1]`` generated codes (width 0 at level 1), ``cand [M, K]`` (or ``[K]``) candidate
    codes -> ``[M, K]`` units, identical to ``encode_prefix`` of the concatenated SID prefix.
    """
    level = prefix.shape[-1] + 1
    dom = unit_domain(level, codebook_size, d_max)
    cand = _expand_cand(cand, prefix.shape[0])
    u = _horner(prefix, codebook_size, dom)
    return torch.remainder(u.unsqueeze(-1) * codebook_size + cand.long(), dom)


def _expand_cand(cand: torch.Tensor, m: int) -> torch.Tensor:
    return cand.unsqueeze(0).expand(m, -1) if cand.dim() == 1 else cand


# ---- intra-item (Eq. 13, 17) -------------------------------------------------------------------
def intra_keys(codes: torch.Tensor, mask: torch.Tensor, level: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-o suffix key of the conditional pattern (c^{<l}, c^l): the codes c^{l-o+1..l}.

    ``codes [..., L]``, ``mask [...]`` -> ``keys [..., o]`` (zeros where invalid), ``valid [...]``.
    Requires 2 <= l and 1 <= o <= l.
    """
    if not (1 <= order <= level <= codes.shape[-1]):
        raise ValueError(f"intra key needs 1 <= order({order}) <= level({level}) <= L({codes.shape[-1]})")
    keys = codes[..., level - order:level].long()
    valid = mask.bool()
    return keys * valid.unsqueeze(-1), valid


def intra_candidate_keys(prefix: torch.Tensor, cand: torch.Tensor, order: int) -> torch.Tensor:
    """Decode-side intra key of (c^{<l}_{N+1}, x) (Eq. 23): ``prefix [M, l-1]``, ``cand [M, K]`` or ``[K]``
    -> ``keys [M, K, o]`` = last o-1 generated codes followed by the candidate. Always valid (o <= l)."""
    level = prefix.shape[-1] + 1
    if not 1 <= order <= level:
        raise ValueError(f"intra candidate key needs 1 <= order({order}) <= level({level})")
    m = prefix.shape[0]
    cand = _expand_cand(cand, m).long()
    k = cand.shape[-1]
    ctx = prefix[:, level - order:].long().unsqueeze(1).expand(m, k, order - 1)
    return torch.cat([ctx, cand.unsqueeze(-1)], dim=-1)


# ---- inter-item (Eq. 18-20, 24) ----------------------------------------------------------------
def inter_keys(units: torch.Tensor, mask: torch.Tensor, order: int,
               short_marker: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-o suffix of the unit sequence ending at every position n (Eq. 19-20).

    ``units [B, N]``, ``mask [B, N]`` -> ``keys [B, N, o]`` (key[b, n, j] = units[b, n-o+1+j], zeros
    where invalid) and ``valid [B, N]``.

    ``short_marker`` None (``short_keys: drop``): valid iff all o positions exist and are real items.
    ``short_marker`` M (``short_keys: shorten``, Eq. 13/19 clamped suffix): valid iff position n is a
    real item; elements before the first real item are M (see the module docstring).
    """
    if order < 1:
        raise ValueError("order must be >= 1")
    b, n = units.shape
    mask = mask.bool()
    u = torch.where(mask, units.long(), torch.zeros((), dtype=torch.int64, device=units.device))
    if order > 1:
        u = torch.cat([u.new_zeros(b, order - 1), u], dim=1)
        mk = torch.cat([mask.new_zeros(b, order - 1), mask], dim=1)
    else:
        mk = mask
    keys = u.unfold(1, order, 1)  # [B, N, o]
    if short_marker is None:
        valid = mk.unfold(1, order, 1).all(dim=-1)
    else:
        # padding never enters: every non-real element of the window becomes the marker
        keys = torch.where(mk.unfold(1, order, 1), keys, torch.full((), int(short_marker), dtype=torch.int64,
                                                                  device=units.device))
        valid = mask
    return keys * valid.unsqueeze(-1), valid


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the most recent real item per row (``-1`` for an empty history). ``mask [B, N] -> [B]``."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).amax(dim=1)


def inter_candidate_keys(hist_units: torch.Tensor, hist_mask: torch.Tensor, cand_units: torch.Tensor,
                         order: int, short_marker: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-side inter key (Eq. 24): the last o-1 history units followed by the candidate unit.

    ``hist_units [B, N]``, ``hist_mask [B, N]``, ``cand_units [B, K]`` -> ``keys [B, K, o]`` (zeros
    where invalid), ``valid [B, K]``. ``short_marker`` None (``drop``): valid iff the o-1 most recent
    history positions are real items (always valid for o = 1). ``short_marker`` M (``shorten``):
    always valid; missing history elements (short or empty history) are M, exactly as
    :func:`inter_keys` builds the key of the candidate appended to the history.
    """
    b, n = hist_units.shape
    cand_units = _expand_cand(cand_units, b).long()
    k = cand_units.shape[-1]
    if order == 1:
        return cand_units.unsqueeze(-1), torch.ones(b, k, dtype=torch.bool, device=cand_units.device)
    last = last_positions(hist_mask)  # [B]
    offs = torch.arange(-(order - 2), 1, device=hist_units.device)  # o-1 offsets, oldest first
    pos = last.unsqueeze(1) + offs  # [B, o-1]
    inside = pos >= 0
    posc = pos.clamp(min=0, max=n - 1)
    ctx = torch.gather(hist_units.long(), 1, posc)
    real = inside & torch.gather(hist_mask.bool(), 1, posc)  # [B, o-1]
    if short_marker is not None:
        ctx = torch.where(real, ctx, torch.full((), int(short_marker), dtype=torch.int64, device=ctx.device))
        keys = torch.cat([ctx.unsqueeze(1).expand(b, k, order - 1), cand_units.unsqueeze(-1)], dim=-1)
        return keys, torch.ones(b, k, dtype=torch.bool, device=cand_units.device)
    ok = real.all(dim=1)  # [B]
    ctx = ctx * ok.unsqueeze(1)
    keys = torch.cat([ctx.unsqueeze(1).expand(b, k, order - 1), cand_units.unsqueeze(-1)], dim=-1)
    valid = ok.unsqueeze(1).expand(b, k)
    return keys * valid.unsqueeze(-1), valid
