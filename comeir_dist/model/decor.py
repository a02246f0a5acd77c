"""DECOR (/work/shared/papers/decor.md): decomposed embedding fusion and contextualized token composition for the
SID variants (``model.token_fusion: decor``, ``model.decor``; config in decor_config.py).

Decomposed embedding fusion (Sec. 4.2.3), the token embedding of every input and candidate code:
    e_pre  = C_l[c]                     frozen quantizer codebook row of the code's level       (Eq. 9)
    e_coll = E_collab[c]                learned from scratch
    e_fused = W_fuse [LN(W_pre e_pre) || LN(W_collab e_coll)]                                  (Eq. 10-11)

Contextualized token composition (Sec. 4.2.4), the generated codes fed back to the backbone (flatten / tm, Normal
GR): for the fed-back code c of level l,
    s_j = w^T tanh(W h_j + b),  a_j = softmax_j(s_j),  u_c = MLP_ctx(sum_j a_j h_j)           (Eq. 13-14)
    a_c' = softmax_{c' in level l}(<W_q u_c, W_k e_c'> / sqrt d)                               (Eq. 16)
    e~_c = sum_{c'} a_c' e_c'                                                                  (Eq. 17)
    e_final = alpha e~_c + (1 - alpha) e_c                                                     (Eq. 18)
and, with N > 0 BOS queries Q (``bos_queries``), a BOS input composed over Q with the history context:
    e^_BOS = sum_q softmax_q(<W_q u_0, W_k q> / sqrt d) q;  BOS = alpha e^_BOS + (1 - alpha) e_BOS   (Eq. 19)
h_j are the STATIC fused embeddings (Eq. 11) of the context tokens, e_c' the static fused embeddings of every code
of level l (``SidTokenEmbedding.level_table``).

Where the paper is silent (decisions, each tested in tests/unit/test_decor.py):
* Context of the fed-back code c^l: every history token (L per item, also for tm whose backbone inputs are merged
  items) and the generated codes c^1..c^l, INCLUDING c^l itself (``context_current: false`` drops it). With c^l
  left out u would not depend on c^l, so e~ (Eq. 16-17 have no other dependence on c) would be the same vector
  for every code at that position: a context-predicted "expected code", not a refinement of c^l. Including it is
  still causal: c^l is known when it is fed to predict c^{l+1}; level-l logits see only codes < l.
* BOS context: the history tokens only (nothing is generated yet).
* Where BOS sits in a decoder-only backbone: one extra input after the last history input; the level-1 logits
  are read at the BOS position instead of at the last history input, and c^1..c^{L-1} follow it. Its residual
  partner e_BOS is a learned vector (the paper's "original fused embedding for the BOS token"; BOS is no SID code
  so there is no codebook row to fuse), mixed with the same alpha as Eq. 18.
* MLP_ctx = Linear(d, H) - GELU - Linear(H, d), H = ``ctx_hidden`` (default d); the scorer's W maps d -> H.
* Eq. 16 is scaled by 1/sqrt(d) (the scaled dot product of the paper's attention primer, Sec. 3.1.7), so the
  initial composition weights are near uniform rather than saturated.
* One W_q / W_k and one pooling network for all levels (the paper defines a single one).
* The softmax pooling of Eq. 14 is computed as an online softmax: history statistics once per user (all-position
  training: once per position, :func:`prefix_states`), then one generated token at a time (:func:`extend`). Teacher forcing and the KV-cached decoder call the same functions
  in the same order, so they give the same numbers (decoder == teacher forcing, tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from comeir_dist.model.decor_config import DecorConfig


# ---- decomposed embedding fusion (Eq. 9-11) -------------------------------------------------------------------
class DecomposedFusion(nn.Module):
    """e_fused = W_fuse [LN(W_pre e_pre) || LN(W_collab e_collab)] (Eq. 10-11); e_pre is passed in (frozen)."""

    def __init__(self, rows: int, dim_pre: int, dim_collab: int, fuse_dim: int, hidden: int, layer_norm: bool = True):
        super().__init__()
        self.collab = nn.Embedding(rows, dim_collab)  # E_collab, random init, trained by the recommender loss
        nn.init.normal_(self.collab.weight, std=0.02)
        self.w_pre = nn.Linear(dim_pre, fuse_dim, bias=False)  # W_pre (Eq. 10)
        self.w_collab = nn.Linear(dim_collab, fuse_dim, bias=False)  # W_collab (Eq. 10)
        self.ln_pre = nn.LayerNorm(fuse_dim) if layer_norm else nn.Identity()
        self.ln_collab = nn.LayerNorm(fuse_dim) if layer_norm else nn.Identity()
        self.w_fuse = nn.Linear(2 * fuse_dim, hidden)  # W_fuse (Eq. 11); the bias matches Eq. 2's W_E

    def forward(self, e_pre: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pre = self.ln_pre(self.w_pre(e_pre))  # Eq. 10, pretrained channel
        coll = self.ln_collab(self.w_collab(self.collab(idx)))  # Eq. 10, collaborative channel
        return self.w_fuse(torch.cat([pre, coll], dim=-1))  # Eq. 11


# ---- contextualized token composition (Eq. 12-19) -------------------------------------------------------------
@dataclass
class PoolState:
    """Online softmax of the attention pooling (Eq. 14) over the tokens seen so far, per row:
    ``m`` = max score ``[R]``, ``z`` = sum exp(s - m) ``[R]``, ``v`` = sum exp(s - m) h ``[R, d]``."""

    m: torch.Tensor
    z: torch.Tensor
    v: torch.Tensor

    def rows(self, index: torch.Tensor) -> "PoolState":
        return PoolState(self.m[index], self.z[index], self.v[index])

    def pooled(self) -> torch.Tensor:
        """sum_j a_j h_j (Eq. 13 inside MLP_ctx); rows without any token give 0."""
        return (self.v / self.z.clamp(min=torch.finfo(self.z.dtype).tiny).unsqueeze(-1)) * (self.z > 0).unsqueeze(-1)


class BosQueries(nn.Module):
    """Q_BOS (N learnable queries) and the static BOS embedding e_BOS. A module call (not a bare parameter read) so
    that ZeRO-3 gathers the weights for it."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.q = nn.Parameter(torch.randn(n, d) * 0.02)
        self.e = nn.Parameter(torch.randn(d) * 0.02)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.e


class DecorComposer(nn.Module):
    """The composition network: attention pooling (Eq. 13-14), composition (Eq. 16-18), BOS queries (Eq. 19)."""

    def __init__(self, d: int, cfg: DecorConfig):
        super().__init__()
        hidden = cfg.ctx_hidden or d
        self.alpha, self.context_current, self.d = float(cfg.alpha), bool(cfg.context_current), d
        self.score_w = nn.Linear(d, hidden)  # W, b (Eq. 14)
        self.score_v = nn.Linear(hidden, 1, bias=False)  # w (Eq. 14)
        self.mlp_ctx = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))  # MLP_ctx (Eq. 13)
        self.w_q = nn.Linear(d, d, bias=False)  # W_q (Eq. 16)
        self.w_k = nn.Linear(d, d, bias=False)  # W_k (Eq. 16)
        self.bos = BosQueries(cfg.bos_queries, d) if cfg.bos_queries else None

    # -- Eq. 14: scores and the online softmax ------------------------------------------------------------------
    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """s_j = w^T tanh(W h_j + b), ``h [..., d]`` -> ``[...]`` (fp32)."""
        return self.score_v(torch.tanh(self.score_w(h))).squeeze(-1).float()

    def history_state(self, hist: torch.Tensor, mask: torch.Tensor) -> PoolState:
        """Pooling statistics of the history tokens ``hist [B, T, d]`` (real where ``mask [B, T]``)."""
        s = self.scores(hist).masked_fill(~mask, float("-inf"))
        m = s.max(dim=-1).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m.unsqueeze(-1))  # 0 at padding
        return PoolState(m, e.sum(-1), torch.einsum("bt,btd->bd", e, hist.float()))

    def prefix_states(self, hist: torch.Tensor, mask: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> PoolState:
        """Pooling statistics of ``hist [B, T, d]`` (real where ``mask``) over tokens ``0..t[r]`` of row ``b[r]``, one
        state per r (all-position training: the history of every position of a window). The same pooled vectors as
        :func:`history_state` on each prefix: the scores are shifted by the row's maximum over the whole window
        instead of the prefix's (the online softmax takes any shift)."""
        s = self.scores(hist).masked_fill(~mask, float("-inf"))
        m = s.max(dim=-1).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m.unsqueeze(-1))  # 0 at padding
        z = e.cumsum(-1)[b, t]
        v = (e.unsqueeze(-1) * hist.float()).cumsum(1)[b, t]
        return PoolState(m[b], z, v)

    def extend(self, st: PoolState, h: torch.Tensor) -> PoolState:
        """Add one token ``h [R, d]`` to every row's pooling (online softmax)."""
        s = self.scores(h)
        m = torch.maximum(st.m, s)
        a, b = torch.exp(st.m - m), torch.exp(s - m)
        return PoolState(m, st.z * a + b, st.v * a.unsqueeze(-1) + b.unsqueeze(-1) * h.float())

    def contexts(self, st: PoolState, gen: torch.Tensor) -> list[torch.Tensor]:
        """Context vectors u (Eq. 13) after 0, 1, ..., G generated tokens ``gen [R, G, d]``: ``G + 1`` of ``[R, d]``."""
        out = [self.mlp_ctx(st.pooled().to(gen.dtype))]
        for j in range(gen.shape[1]):
            st = self.extend(st, gen[:, j])
            out.append(self.mlp_ctx(st.pooled().to(gen.dtype)))
        return out

    # -- Eq. 16-18 ------------------------------------------------------------------------------------------------
    def weights(self, u: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        """a_c' = softmax over the candidates ``cands [C, d]`` of <W_q u, W_k e_c'> / sqrt d (Eq. 16), ``[R, C]``."""
        return torch.softmax(self.w_q(u) @ self.w_k(cands).t() / math.sqrt(self.d), dim=-1)

    def mix(self, composed: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        return self.alpha * composed + (1.0 - self.alpha) * static  # Eq. 18

    def compose(self, st: PoolState, gen: torch.Tensor, tables: list[torch.Tensor], positions=None,
                with_weights: bool = False):
        """Composed embeddings of the fed-back codes.

        ``st``: history pooling per row; ``gen [R, G, d]``: static fused embeddings of the generated codes c^1..c^G;
        ``tables[j] [C, d]``: static embeddings of every code of level j+1 (the candidates N(c), same level only).
        Returns ``[R, len(positions), d]`` (default: all G positions) and, with ``with_weights``, the composition
        weights ``[R, C]`` per position."""
        positions = list(range(gen.shape[1])) if positions is None else list(positions)
        need = max(positions) + 1 if positions else 0
        ctx = self.contexts(st, gen[:, :need])  # ctx[k]: history + c^1..c^k
        out, ws = [], []
        for j in positions:
            u = ctx[j + 1] if self.context_current else ctx[j]
            w = self.weights(u, tables[j])  # Eq. 16, over level j+1's codes only
            out.append(self.mix(w.to(tables[j].dtype) @ tables[j], gen[:, j]))  # Eq. 17-18
            ws.append(w)
        res = torch.stack(out, dim=1) if out else gen[:, :0]
        return (res, ws) if with_weights else res

    def bos_input(self, st: PoolState, dtype: torch.dtype, with_weights: bool = False):
        """The composed BOS input ``[R, d]`` (Eq. 19 + the residual of Eq. 18), context = the history only."""
        q, e = self.bos()
        u = self.mlp_ctx(st.pooled().to(dtype))
        w = self.weights(u, q.to(dtype))
        out = self.mix(w.to(dtype) @ q.to(dtype), e.to(dtype).expand(u.shape[0], -1))
        return (out, w) if with_weights else out


def above_uniform(weights: list[torch.Tensor]) -> dict:
    """Per-candidate statistics of composition weights ``[R, C]`` stacked over batches: how many candidates ever
    / on average receive more than the uniform weight 1/C."""
    w = torch.cat(weights).float()
    c = w.shape[1]
    above = w > 1.0 / c
    return {"candidates": c, "tokens": int(w.shape[0]),
            "above_uniform_mean": int((w.mean(0) > 1.0 / c).sum()),  # mean weight over tokens > 1/C
            "above_uniform_any": int(above.any(0).sum()),  # > 1/C for at least one token
            "above_uniform_per_token": float(above.sum(1).float().mean()),  # candidates > 1/C per token, mean
            "max_weight_mean": float(w.max(1).values.mean())}


@torch.no_grad()
def composition_usage(model, hist, target, batch_size: int = 256) -> dict:
    """How many codes of each level receive composition weight above uniform (1/C) on ``hist``/``target``
    (validation samples), teacher forced with the target SIDs; plus the BOS queries. Also the static usage: the
    distinct codes of each level among the composed tokens (what a static embedding lookup would touch)."""
    from comeir_dist.train.samples import to_batch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_level, bos, static = None, [], None
    try:
        for i in range(0, len(target), batch_size):
            batch = to_batch(hist[i:i + batch_size], target[i:i + batch_size], device)
            codes = model.catalog.item_codes(batch.target)
            ws, wb = model.composition_weights(batch, codes)
            per_level = [[] for _ in ws] if per_level is None else per_level
            static = [set() for _ in ws] if static is None else static
            for j, w in enumerate(ws):
                per_level[j].append(w.cpu())
                static[j].update(codes[:, j].tolist())
            if wb is not None:
                bos.append(wb.cpu())
    finally:
        model.train(was_training)
    levels = [{"level": j + 1, **above_uniform(w), "static_codes_used": len(static[j])}
              for j, w in enumerate(per_level or [])]
    return {"users": int(len(target)), "levels": levels, "bos": above_uniform(bos) if bos else None}
