"""SID token embedding e_c of a code c of level l (``model.token_fusion``):

* ``concat`` (default, ComeIR Eq. 2): e_c = W_E [e^B_c ; e^T_c], frozen codebook vector + learnable token.
* ``learned`` (DECOR's TIGER base): e_c = E[c], a learned code embedding of the backbone width, nothing else.
* ``pretrained``: e_c = W e^B_c, the frozen codebook vector only, projected (no per-code parameter).
* ``decor`` (DECOR Eq. 9-11): e_c = W_fuse [LN(W_pre e_pre_c) || LN(W_collab e_collab_c)] with e_pre_c = e^B_c
  (:class:`comeir_dist.model.decor.DecomposedFusion`).

e^B is row c of the frozen quantizer codebook of level l (``codebooks.npy`` of the SID method): a non-persistent
buffer, never a parameter, so no optimizer, weight decay or checkpoint load ever changes it."""
from __future__ import annotations

import torch
from torch import nn

from comeir_dist.model.decor_config import TOKEN_FUSIONS, DecorConfig


class SidTokenEmbedding(nn.Module):
    """Maps codes ``[..., L]`` to token embeddings ``[..., L, d]``; codes of level l index level l's codebook."""

    def __init__(self, codebooks: torch.Tensor, token_dim: int, hidden: int, fusion: str = "concat",
                 decor: DecorConfig | None = None):
        super().__init__()
        if fusion not in TOKEN_FUSIONS:
            raise ValueError(f"token_fusion: {fusion!r}; allowed values: {', '.join(TOKEN_FUSIONS)}")
        levels, size, dim_b = codebooks.shape
        self.levels, self.codebook_size, self.fusion = levels, size, fusion
        self.register_buffer("codebook", codebooks.float().reshape(levels * size, dim_b), persistent=False)  # e^B, frozen
        if fusion == "concat":  # unchanged construction order: bit-identical to the pre-fusion-option model
            self.token = nn.Embedding(levels * size, token_dim)  # e^T, learnable
            nn.init.normal_(self.token.weight, std=0.02)
            self.proj = nn.Linear(dim_b + token_dim, hidden)  # W_E
        elif fusion == "learned":
            self.token = nn.Embedding(levels * size, hidden)  # TIGER: the code embedding is the LLM input
            nn.init.normal_(self.token.weight, std=0.02)
        elif fusion == "pretrained":
            self.proj = nn.Linear(dim_b, hidden)  # W: frozen e^B -> backbone width
        else:
            from comeir_dist.model.decor import DecomposedFusion

            cfg = decor or DecorConfig()
            self.fuse = DecomposedFusion(levels * size, dim_b, cfg.collab_dim or dim_b, cfg.fuse_dim or hidden, hidden,
                                         layer_norm=cfg.fusion_ln)
        self.register_buffer("level_offset", torch.arange(levels) * size, persistent=False)

    def flat_index(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        off = self.level_offset[: codes.shape[-1]] if level is None else self.level_offset[level]
        return codes.clamp(min=0) + off

    def forward(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """``codes [..., l]`` (levels 1..l) or ``[...]`` of one ``level`` -> embeddings ``[..., (L,) d]``."""
        idx = self.flat_index(codes, level)
        if self.fusion == "concat":
            return self.proj(torch.cat([self.codebook[idx], self.token(idx)], dim=-1))  # Eq. 2
        if self.fusion == "learned":
            return self.token(idx)
        if self.fusion == "pretrained":
            return self.proj(self.codebook[idx])
        return self.fuse(self.codebook[idx], idx)  # DECOR Eq. 9-11, e_pre = the frozen codebook row

    def pretrained(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """e_pre / e^B of the codes (a view of the frozen codebook, no gradient)."""
        return self.codebook[self.flat_index(codes, level)]

    def level_table(self, level: int) -> torch.Tensor:
        """Embeddings of every code of one level, ``[C, d]``: the candidate embeddings e_x of ComeIR's head (Eq. 10)
        and DECOR's composition candidates N(c) (Eq. 16-17)."""
        codes = torch.arange(self.codebook_size, device=self.level_offset.device)
        return self.forward(codes, level)
