"""Batched catalog-constrained beam search over semantic IDs (paper Eq. 11, Eq. 28, App. A.4).

The search loops only over the ``L`` SID levels; users and beams are handled as tensor dimensions.

At level ``l`` (0-based) every live beam holds a partial SID ``c^{<l}`` and an accumulated score
``s_l = sum_t log P(c^t | ..., c^{<t})`` (Eq. 28). The model (``step_fn``) returns RAW scores (logits)
``psi_l(x)`` for every code ``x`` of every beam. The search ALWAYS applies the catalog prefix tree itself:
codes outside the valid set ``V_l(c^{<l})`` get ``-inf`` and the log-probability is a log-softmax over the
valid codes only (Eq. 11). Hence ``step_fn`` may return raw logits or full-vocabulary log-probabilities
(a constant shift per row does not change the renormalised result); it must not rely on its own
normalisation being kept.

Then the ``beam_size`` best ``(beam, child)`` pairs per user are kept with one ``torch.topk`` over
``K*C`` candidates. If a user has fewer valid continuations than ``beam_size`` the remaining slots are
filled with dead hypotheses (score ``-inf``). Dead hypotheses never become SIDs: in the result their
codes are ``-1`` and their score ``-inf``; they always sort after the live ones.

``step_fn`` contract::

    step_fn(level: int, prefixes: LongTensor[B, K, level], parent: LongTensor[B, K] | None)
        -> FloatTensor[B, K, C]   (raw scores / logits for the next code of every beam)

* level 0: ``K == 1`` (one empty prefix per user), ``parent is None``.
* level > 0: ``K == beam_size``; ``parent[b, k]`` is the index (in ``[0, K_prev)``) of the level-``l-1``
  beam that beam ``k`` of user ``b`` extends, i.e. ``prefixes[b, k, :-1] == prev_prefixes[b, parent[b, k]]``
  and ``prefixes[b, k, -1]`` is the newly chosen code. A step_fn with per-beam state (a KV cache, the
  NEZHA recurrent state) reorders it with ``state.gather(1, parent)`` / ``state[b_idx, parent]`` before
  consuming the new code. Dead slots also have a valid ``parent`` and codes in ``[0, C)`` (so embedding
  look-ups never fail); their outputs are ignored.

Cost per level: one ``step_fn`` call on ``B*K`` beams, one searchsorted over the catalog prefixes, one
``[B, K*C]`` top-k, i.e. ~8 elementwise passes over ``[B, K, C]`` floats. Measured with a trivial step_fn,
``K=20, C=128, L=3``, 20k items, one (shared, busy) CPU thread: ~5 ms for ``B=32``, ~60-80 ms for ``B=512``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from comeir_dist.decode.trie import PrefixTrie

__all__ = ["BeamResult", "StepFn", "beam_search", "masked_log_softmax"]

StepFn = Callable[[int, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

_NEG_INF = float("-inf")


@dataclass
class BeamResult:
    """Completed SIDs per user, best first.

    ``codes``: LongTensor ``[B, K, L]`` (``-1`` in dead slots); ``scores``: FloatTensor ``[B, K]``,
    accumulated log-probability ``s_L`` (Eq. 28), descending, ``-inf`` in dead slots. Live slots hold
    distinct, catalog-valid SIDs.
    """

    codes: torch.Tensor
    scores: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """BoolTensor ``[B, K]``: slot holds a real catalog SID (live slots come first)."""
        return torch.isfinite(self.scores)

    @property
    def batch_size(self) -> int:
        return int(self.scores.shape[0])

    @property
    def beam_size(self) -> int:
        return int(self.scores.shape[1])

    def to(self, device: Union[str, torch.device]) -> "BeamResult":
        return BeamResult(codes=self.codes.to(device), scores=self.scores.to(device))


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log-softmax of ``logits`` over positions where ``valid`` is True (Eq. 11); ``-inf`` elsewhere.

    Rows without any valid (finite) entry become all ``-inf`` (no NaN).
    """
    neg_inf = torch.tensor(_NEG_INF, dtype=logits.dtype, device=logits.device)
    z = torch.where(valid, logits, neg_inf)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lse = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    return torch.where(valid, z - lse, neg_inf)


@torch.no_grad()
def beam_search(
    step_fn: StepFn,
    trie: PrefixTrie,
    batch_size: int,
    levels: Optional[int] = None,
    beam_size: int = 20,
    device: Union[str, torch.device, None] = None,
) -> BeamResult:
    """Catalog-constrained beam search for ``batch_size`` users (see module docstring for ``step_fn``).

    ``levels`` must equal ``trie.num_levels`` (``None`` = take it from the trie): only complete SIDs are
    returned. ``device`` defaults to the trie's device; the trie is moved there if needed.
    Returns a :class:`BeamResult` with ``K = beam_size`` slots per user, sorted by score descending.
    """
    if levels is None:
        levels = trie.num_levels
    if int(levels) != trie.num_levels:
        raise ValueError(f"beam_search(levels={levels}) but catalog SIDs have {trie.num_levels} levels")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = trie.device if device is None else torch.device(device)
    trie = trie.to(device)
    B, C, L = int(batch_size), trie.num_codes, int(levels)

    prefixes = torch.zeros(B, 1, 0, dtype=torch.long, device=device)
    keys = torch.zeros(B, 1, dtype=torch.long, device=device)        # encoded prefixes
    scores = torch.zeros(B, 1, dtype=torch.float32, device=device)   # s_l, -inf = dead
    parent: Optional[torch.Tensor] = None

    for level in range(L):
        K = prefixes.shape[1]
        logits = step_fn(level, prefixes, parent)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (B, K, C):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"step_fn(level={level}) must return scores of shape {(B, K, C)}, got {shape}")
        logits = logits.to(device=device, dtype=torch.float32)

        # Eq. 11 + Eq. 28 fused: total = s_l + log_softmax over valid codes, -inf elsewhere.
        rows, found = trie.prefix_rows(level, keys)                      # [B, K]
        ok = found & torch.isfinite(scores)                              # live beam with a catalog prefix
        valid = trie.child_table[level][rows] & ok.unsqueeze(-1)        # [B, K, C] = V_l(prefix)
        z = logits.masked_fill(~valid, _NEG_INF)                         # dead rows: all -inf
        m = z.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = (z - m).exp_().sum(-1, keepdim=True).log_().add_(m)        # [B, K, 1]
        if torch.isnan(lse).any():
            raise FloatingPointError(f"step_fn(level={level}) produced NaN/+inf scores for catalog-valid codes")
        # per-row offset; rows without any finite valid logit -> +inf (stay all -inf, never NaN)
        offset = lse - scores.unsqueeze(-1)
        offset = torch.where(ok.unsqueeze(-1) & torch.isfinite(offset), offset, torch.full_like(offset, float("inf")))
        total = z.sub_(offset).reshape(B, K * C)

        k = min(beam_size, K * C)
        top_scores, top_idx = torch.topk(total, k, dim=1, largest=True, sorted=True)
        if k < beam_size:  # pad with dead slots pointing at beam 0 / code 0
            pad = beam_size - k
            top_scores = torch.cat([top_scores, top_scores.new_full((B, pad), _NEG_INF)], 1)
            top_idx = torch.cat([top_idx, top_idx.new_zeros((B, pad))], 1)
        parent = torch.div(top_idx, C, rounding_mode="floor")          # [B, beam]
        child = top_idx - parent * C                                   # [B, beam]
        gathered = prefixes.gather(1, parent.unsqueeze(-1).expand(-1, -1, level))
        prefixes = torch.cat([gathered, child.unsqueeze(-1)], dim=-1)
        keys = keys.gather(1, parent) * C + child
        scores = top_scores

    alive = torch.isfinite(scores)
    codes = torch.where(alive.unsqueeze(-1), prefixes, torch.full_like(prefixes, -1))
    scores = torch.where(alive, scores, torch.full_like(scores, _NEG_INF))
    return BeamResult(codes=codes, scores=scores)
