"""Eq. 12: token-level cross-entropy over SID levels, normalised over catalog-valid codes (Eq. 11)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comeir_dist.decode.trie import PrefixTrie


def constrained_sid_loss(level_logits: list[torch.Tensor], target_codes: torch.Tensor, trie: PrefixTrie) -> torch.Tensor:
    """Mean over the batch of -sum_l log P(c^l | c^{<l}) with invalid children masked out.

    ``level_logits[l]`` is ``[B, C]`` for the teacher-forced ground-truth prefix ``target_codes[:, :l]``.
    """
    return sid_token_losses(level_logits, target_codes, trie).mean()


def sid_token_losses(level_logits: list[torch.Tensor], target_codes: torch.Tensor, trie: PrefixTrie) -> torch.Tensor:
    """Per sample ``[B]``: -sum_l log P(c^l | c^{<l}) over the catalog-valid children (Eq. 11-12), in fp32."""
    total = level_logits[0].new_zeros(target_codes.shape[0], dtype=torch.float32)
    for l, logits in enumerate(level_logits):
        valid = trie.valid_mask(target_codes[:, :l], level=l)
        masked = logits.float().masked_fill(~valid, float("-inf"))
        total = total + F.cross_entropy(masked, target_codes[:, l], reduction="none")
    return total
