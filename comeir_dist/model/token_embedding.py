"""SID token embedding, Eq. 2: e_c = W_E [e^B_c ; e^T_c] (frozen codebook vector + learnable token)."""
from __future__ import annotations

import torch
from torch import nn


class SidTokenEmbedding(nn.Module):
    """Maps codes ``[..., L]`` to token embeddings ``[..., L, d]``; codes of level l index level l's codebook."""

    def __init__(self, codebooks: torch.Tensor, token_dim: int, hidden: int):
        super().__init__()
        levels, size, dim_b = codebooks.shape
        self.levels, self.codebook_size = levels, size
        self.register_buffer("codebook", codebooks.float().reshape(levels * size, dim_b), persistent=False)  # e^B, frozen
        self.token = nn.Embedding(levels * size, token_dim)  # e^T, learnable
        nn.init.normal_(self.token.weight, std=0.02)
        self.proj = nn.Linear(dim_b + token_dim, hidden)  # W_E
        self.register_buffer("level_offset", torch.arange(levels) * size, persistent=False)

    def flat_index(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        off = self.level_offset[: codes.shape[-1]] if level is None else self.level_offset[level]
        return codes.clamp(min=0) + off

    def forward(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """``codes [..., l]`` (levels 1..l) or ``[...]`` of one ``level`` -> embeddings ``[..., (L,) d]``."""
        idx = self.flat_index(codes, level)
        return self.proj(torch.cat([self.codebook[idx], self.token(idx)], dim=-1))

    def level_table(self, level: int) -> torch.Tensor:
        """Embeddings of every code of one level, ``[C, d]`` (the candidate embeddings e_x of Eq. 10)."""
        codes = torch.arange(self.codebook_size, device=self.token.weight.device)
        return self.forward(codes, level)
