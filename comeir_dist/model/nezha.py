"""NEZHA-style generation (paper App. B.2.3, Eq. 40-42; the NEZHA branches of Algorithms 1-2), shared by
comeir, flatten and tm (``model.decoding: nezha``).

    H^+  = LLM([inputs; p_1; ...; p_L])                 (Eq. 40)  L trainable placeholders after the history
    xi_l = h_u^l + h_l,   h_u^1 = h_u                   (Eq. 41)  zeta_l = xi_l is what the output layer scores
    h_u^{l+1} = GRU_l(Delta_l(c^l), h_u^l)              (Eq. 42)  Delta_l: see nezha_delta.py

``h_u`` is the backbone output at the last history input and ``h_l`` the output at placeholder l. The
backbone is causal and the placeholders come after the history, so they change nothing at the history
positions: ``h_u`` is exactly the Normal-GR user state. The backbone runs ONCE per batch, training or
inference; the per-level work is one GRU cell step (and the output layer).

* Training (Algorithm 1, lines 11-22): teacher forcing, c^l = the ground-truth code; :meth:`NezhaDecoding.teacher_forced`.
* Inference (Algorithm 2, lines 7-19): :class:`NezhaBeams` keeps one recurrent state per beam hypothesis.
  At level l > 0 the beam search hands the step function each beam's ``parent``; the states are reordered
  with it and GRU_{l-1} consumes the newly chosen code, so only surviving beams are updated (the same
  result as updating every expanded candidate, Alg. 2 line 18, and keeping the selected ones).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from comeir_dist.model.backbone import run_backbone
from comeir_dist.model.nezha_delta import build_delta


class Placeholders(nn.Module):
    """p_1..p_L (Eq. 40), randomly initialised. A module call (not a bare parameter read) so that ZeRO-3
    gathers the weight for it."""

    def __init__(self, levels: int, d: int):
        super().__init__()
        self.p = nn.Parameter(torch.randn(levels, d) * 0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[inputs; p_1..p_L]`` and its attention mask (placeholders are always real positions)."""
        b, levels = x.shape[0], self.p.shape[0]
        p = self.p.to(x.dtype).unsqueeze(0).expand(b, -1, -1)
        ones = torch.ones(b, levels, dtype=torch.bool, device=mask.device)
        return torch.cat([x, p], dim=1), torch.cat([mask, ones], dim=1)


class NezhaDecoding(nn.Module):
    """Placeholders, GRU_1..GRU_{L-1} and Delta_1..Delta_{L-1}: the dense parameters NEZHA adds."""

    def __init__(self, levels: int, d: int, delta: str = "code", window: int = 4):
        super().__init__()
        self.levels, self.d = levels, d
        self.placeholders = Placeholders(levels, d)
        self.gru = nn.ModuleList(nn.GRUCell(d, d) for _ in range(levels - 1))  # GRU_l, l = 1..L-1
        self.delta = build_delta(delta, levels - 1, d, window)

    def encode(self, backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass over ``[x; p_1..p_L]`` (Eq. 40) -> ``(h_u [B, d], (h_1..h_L) [B, L, d])``.

        ``x [B, T, d]`` left padded with ``mask [B, T]``: column T-1 is the last history input."""
        t = x.shape[1]
        xp, mp = self.placeholders(x, mask)
        h, _ = run_backbone(backbone, xp, mp)
        return h[:, t - 1], h[:, t:]

    def advance(self, step: int, state: torch.Tensor, code_emb: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Eq. 42 after generating the code of level ``step + 1`` (0-based ``step``): h_u^{l+1} from h_u^l.

        ``state``/``code_emb`` ``[B, d]`` or ``[B, K, d]`` (per beam); ``items [B, N, d]``, ``mask [B, N]`` per user."""
        delta = self.delta(step, code_emb, state, items, mask)
        shape = state.shape
        new = self.gru[step](delta.reshape(-1, shape[-1]).to(state.dtype), state.reshape(-1, shape[-1]))
        return new.reshape(shape)

    def teacher_forced(self, h_u: torch.Tensor, h_p: torch.Tensor, code_embs: torch.Tensor, items: torch.Tensor,
                       mask: torch.Tensor) -> list[torch.Tensor]:
        """xi_1..xi_L (Eq. 41), each ``[B, d]``, with the ground-truth codes' embeddings ``code_embs [B, L-1, d]``
        driving the recurrence (Eq. 42, teacher forcing)."""
        state, xis = h_u, []
        for l in range(self.levels):
            xis.append(state + h_p[:, l])
            if l + 1 < self.levels:
                state = self.advance(l, state, code_embs[:, l], items, mask)
        return xis


class NezhaBeams:
    """Per-beam recurrent state during one batch's beam search (Algorithm 2, NEZHA branch).

    ``code_embed(codes [B, K], level) -> [B, K, d]`` embeds the generated codes of a (0-based) level."""

    def __init__(self, nezha: NezhaDecoding, h_u: torch.Tensor, h_p: torch.Tensor, items: torch.Tensor,
                 mask: torch.Tensor, code_embed: Callable[[torch.Tensor, int], torch.Tensor]):
        self.nezha, self.h_p, self.items, self.mask, self.code_embed = nezha, h_p, items, mask, code_embed
        self.state = h_u.unsqueeze(1)  # [B, 1, d]: h_u^1 = h_u for the empty prefix

    def states(self, level: int, prefixes: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
        """xi_{level+1} ``[B, K, d]`` for ``prefixes [B, K, level]`` (the beam search's step arguments)."""
        if level > 0:
            state = self.state.gather(1, parent.unsqueeze(-1).expand(-1, -1, self.state.shape[-1]))  # follow parents
            code = self.code_embed(prefixes[:, :, -1], level - 1)  # c^{level}: the newly chosen code
            self.state = self.nezha.advance(level - 1, state, code, self.items, self.mask)
        return self.state + self.h_p[:, level].unsqueeze(1)
