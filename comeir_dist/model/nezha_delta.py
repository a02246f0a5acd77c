"""The NEZHA transition input Delta_l of Eq. 42 (App. B.2.3), ``model.nezha_delta``.

The paper only says Delta_l(c^l) is "constructed from the generated code embedding and the next-level
inter-item context". Two readings are offered:

* ``code``: Delta_l(c) = e_c, the SID-token embedding of the generated level-l code (Eq. 2, the same
  ``SidTokenEmbedding`` the inputs use). The GRU then carries only the generated prefix.
* ``code_context``: Delta_l(c) = e_c + W^Delta_{V,l} g_l with the inter-item context
      g_l = sum_{a in H_N} pi_a v_a,  pi = softmax_a((W^Delta_{Q,l}(h_u^l + e_c))^T (W^Delta_{K,l} v_a) / sqrt d)
  over the last ``window`` history item vectors v_a (ComeIR: the MM-guided item contexts s^0_a of Eq. 4,
  the values of the decode query Eq. 25; TM: the merged item inputs; flatten: the mean of the item's L
  token embeddings). The query is the recurrent state after seeing the new code, so the context is the
  part of the recent history relevant to the NEXT level; it is computed per beam (the state and the
  code differ per beam) against the per-user history, never copied per beam.

``state``/``code_emb`` are ``[B, d]`` (teacher forcing) or ``[B, K, d]`` (one row per beam);
``items [B, N, d]`` and ``mask [B, N]`` are per user (left padded: the last columns are the most recent).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class CodeDelta(nn.Module):
    """Delta_l(c) = e_c."""

    def forward(self, step: int, code_emb: torch.Tensor, state: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return code_emb


class CodeContextDelta(nn.Module):
    """Delta_l(c) = e_c + W_V,l g_l, g_l = windowed attention over history items queried by h_u^l + e_c."""

    def __init__(self, steps: int, d: int, window: int):
        super().__init__()
        self.d, self.window = d, window
        self.wq = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(steps))  # W^Delta_{Q,l}
        self.wk = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(steps))  # W^Delta_{K,l}
        self.wv = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(steps))  # W^Delta_{V,l}

    def forward(self, step: int, code_emb: torch.Tensor, state: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        v, m = items[:, -self.window:], mask[:, -self.window:]
        q = self.wq[step](state + code_emb)
        per_user = q.dim() == 2
        q = q.unsqueeze(1) if per_user else q  # [B, K, d]
        scores = torch.einsum("bkd,bwd->bkw", q, self.wk[step](v)) / math.sqrt(self.d)
        scores = scores.masked_fill(~m.unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # no real history item: zero context
        ctx = torch.einsum("bkw,bwd->bkd", attn, v.to(attn.dtype))
        ctx = ctx[:, 0] if per_user else ctx
        return code_emb + self.wv[step](ctx)


def build_delta(kind: str, steps: int, d: int, window: int) -> nn.Module:
    if kind == "code":
        return CodeDelta()
    if kind == "code_context":
        return CodeContextDelta(steps, d, window)
    raise ValueError(f"nezha_delta: {kind!r}; allowed values: code, code_context")
