"""Memory-restoring prediction head (paper Section 3.5, Appendix A.4), Normal-GR form (zeta_l = h_u).

For level l, every catalog-valid candidate code x of every beam prefix c^{<l} is scored:
    q^D_{u,l} = sum_{a in H_N} rho_{a,l} s^0_a,  rho = softmax((W^D_Q zeta)^T (W^D_K s^0_a)/sqrt d)   (Eq. 25)
    eta^S(x)  = R^S_l(zeta, (c^{<l}, x))       for l > 1, else 0                                    (Eq. 23)
    eta^T(x)  = R^T_l(q^D_{u,l}, Suffix(C^{<=l} + c^{<=l}(x)))                                       (Eq. 24, 26)
    mu(x)     = W_S,l eta^S(x) + W_T,l eta^T(x)                                                      (Eq. 27, 8, 9)
    psi(x)    = w_l^T LN(W_H,l zeta + W_C,l e_x + mu(x))                                             (Eq. 10)
With ``interaction="dot"`` (an extension, not in the paper) a direct user-candidate term is added:
    psi(x)   += LN(W_Q,l zeta + sum_{j<l} P_{l,j}[c^j])^T (W_O,l e_x) + b_l(x)
Without it h_u and e_x meet only inside the LayerNorm, and the generated prefix reaches the score only
through the intra-memory key; the extra term is the output layer flatten / TM have (a state that has
seen the prefix, scored against every code), at O(B K d C) per level.
Only valid (beam, x) pairs are computed: the prefix tree leaves a handful of children per prefix at
deep levels, so memory reads cost O(valid pairs), not O(beams x C). Invalid logits are -inf; the
normalisation over valid codes (Eq. 11) happens in the loss / beam search.
At inference the reads run in blocks of pairs and may fold W_S / W_T through their LayerNorm
(``EngramRead._fold``); training takes the plain path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from comeir_dist.engram.patterns import candidate_prefix_units, inter_candidate_keys, intra_candidate_keys
from comeir_dist.model.comeir_encoder import read_addresses
from comeir_dist.model.engram_memory import LookupPass, inter_short_marker


@dataclass
class HeadRequest:
    level: int
    b: torch.Tensor  # [M] user index of each valid (beam, candidate) pair
    k: torch.Tensor  # [M] beam index
    x: torch.Tensor  # [M] candidate code
    shape: tuple[int, int, int]  # (B, K, C)
    intra: list
    inter: list
    prefixes: torch.Tensor  # [B, K, level-1] generated codes c^{<l}


class MemoryHead(nn.Module):
    def __init__(self, levels: int, codebook_size: int, d: int, window: int, reads: nn.ModuleDict,
                 ablations: set[str], d_max: int, interaction: str = "none", memory_grad: bool = True):
        super().__init__()
        self.interaction = interaction
        # False: the head reads the tables but never writes them (its keys contain the candidate, so after one
        # epoch the rows it trains hold each training sample's own label; the encoder still trains every row)
        self.memory_grad = memory_grad
        self.levels, self.codebook_size, self.d, self.window, self.d_max = levels, codebook_size, d, window, d_max
        self.reads = reads
        self.use_intra = "no_d_intra" not in ablations
        self.use_inter = "no_d_inter" not in ablations
        self.wq_d = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W^D_{Q,l}
        self.wk_d = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W^D_{K,l}
        self.w_s = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W_{S,l}
        self.w_t = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W_{T,l}
        self.w_h = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))  # W_{H,l}
        self.w_c = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W_{C,l}
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(levels))
        self.w_out = nn.ModuleList(nn.Linear(d, 1, bias=False) for _ in range(levels))  # w_l
        if interaction == "dot":
            self.w_q_dot = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))  # W_Q,l
            # P_{l,j}: embeddings of the generated code of level j < l, one table per (l, j)
            self.prefix_emb = nn.ModuleList(nn.Embedding(codebook_size, d) for _ in range(levels * (levels - 1) // 2))
            self.ln_dot = nn.ModuleList(nn.LayerNorm(d) for _ in range(levels))
            self.w_o_dot = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W_O,l
            self.b_dot = nn.Parameter(torch.zeros(levels, codebook_size))  # b_l(x)
            for e in self.prefix_emb:
                nn.init.normal_(e.weight, std=0.02)

    def request(self, lp: LookupPass, level: int, prefixes: torch.Tensor, cand_valid: torch.Tensor,
                hist_units: list[torch.Tensor], mask: torch.Tensor, row_fold: torch.Tensor | None = None) -> HeadRequest:
        """Register Engram keys of the valid candidates of ``prefixes [B, K, level-1]`` (level is 1-based).
        ``row_fold [B]``: the cross-fit fold of each row (engram.cross_fit; None = the pass's own rows' folds are
        not used)."""
        bsz, nbeam, ncode = cand_valid.shape
        b, k, x = cand_valid.nonzero(as_tuple=True)
        fold = None if row_fold is None else row_fold.index_select(0, b)  # [M]: every pair in its user's fold
        pre = prefixes.reshape(bsz * nbeam, level - 1).index_select(0, b * nbeam + k)  # [M, level-1]
        intra, inter = [], []
        if self.use_intra and level > 1:
            sid = intra_candidate_keys(pre, x.unsqueeze(1), level)[:, 0]  # (c^{<l}, x)  [M, level]
            ones = torch.ones((), dtype=torch.bool, device=sid.device).expand(sid.shape[0])
            for o in lp.lookup.orders("intra", level):
                # the order-o key (Eq. 23) is the last o codes of (c^{<l}, x); always valid (None: no masking)
                intra.append((lp.add("intra", level, o, sid[:, level - o:], ones, fold), None))
        if self.use_inter:
            units = candidate_prefix_units(pre, x.unsqueeze(1), self.codebook_size, self.d_max)  # [M, 1]
            hist = hist_units[level - 1]
            # the encoder's rule for keys longer than the history (Eq. 13/19, engram.short_keys): the same
            # function builds teacher-forced (level_logits) and beam-search keys
            marker = inter_short_marker(lp.lookup, level, self.codebook_size, self.d_max)
            for o in lp.lookup.orders("inter", level):
                # the history context of an order-o key is per user: build it once, then gather per pair
                ctx, ok = inter_candidate_keys(hist, mask, torch.zeros_like(hist[:, :1]), o, marker)
                keys = torch.cat([ctx[:, 0, : o - 1].index_select(0, b), units], dim=-1)
                if marker is not None:  # shortened keys are always valid (None: the read skips masking)
                    inter.append((lp.add("inter", level, o, keys, ok[:, 0].index_select(0, b), fold), None))
                    continue
                valid = ok[:, 0].index_select(0, b)
                inter.append((lp.add("inter", level, o, keys * valid.unsqueeze(-1), valid, fold), valid))
        return HeadRequest(level, b, k, x, (bsz, nbeam, ncode), intra, inter, prefixes)

    def decode_query(self, level: int, zeta: torch.Tensor, s0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q^D_{u,l} (Eq. 25) over the last ``window`` history positions (left padding: the last columns)."""
        s = s0[:, -self.window:]
        m = mask[:, -self.window:]
        scores = torch.einsum("bd,bnd->bn", self.wq_d[level - 1](zeta), self.wk_d[level - 1](s)) / math.sqrt(self.d)
        rho = torch.softmax(scores.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
        return torch.einsum("bn,bnd->bd", rho, s)

    def logits(self, lp: LookupPass, req: HeadRequest, zeta: torch.Tensor, s0: torch.Tensor, mask: torch.Tensor,
               code_emb: torch.Tensor) -> torch.Tensor:
        """Raw scores ``[B, K, C]`` (-inf for invalid codes); ``code_emb [C, d]`` = e_x of this level."""
        l = req.level
        i = l - 1
        # per-user / per-code terms are computed once and gathered per (beam, candidate) pair
        base = _pair_sum(self.w_h[i](zeta), self.w_c[i](code_emb), req.b, req.x)  # W_H zeta + W_C e_x  [M, d]
        # mu(x) = W_S eta^S + W_T eta^T (Eq. 27), added in place (one [M, d] tensor fewer per read)
        if req.intra:
            addr, valid = read_addresses(lp, req.intra)
            addr = addr if self.memory_grad else addr.detach()
            base = _add(base, _projected_read(self.reads[f"intra{l}"], self.w_s[i], zeta, addr, valid, req.b))
        if req.inter:
            q = self.decode_query(l, zeta, s0, mask)
            addr, valid = read_addresses(lp, req.inter)
            addr = addr if self.memory_grad else addr.detach()
            base = _add(base, _projected_read(self.reads[f"inter{l}"], self.w_t[i], q, addr, valid, req.b))
        hidden = self.ln[i](base)
        psi = self.w_out[i](hidden).squeeze(-1)
        if self.interaction == "dot":
            psi = psi + self._dot_scores(l, zeta, req.prefixes, code_emb)[req.b, req.k, req.x]
        out = torch.full(req.shape, float("-inf"), dtype=psi.dtype, device=psi.device)
        out[req.b, req.k, req.x] = psi
        return out


    def _dot_scores(self, level: int, zeta: torch.Tensor, prefixes: torch.Tensor, code_emb: torch.Tensor):
        """``[B, K, C]``: LN(W_Q zeta + sum_j P_{l,j}[c^j])^T (W_O e_x) + b_l(x) for every beam and code."""
        i = level - 1
        q = self.w_q_dot[i](zeta).unsqueeze(1).expand(-1, prefixes.shape[1], -1)  # [B, K, d]
        first = i * (i - 1) // 2  # tables of level l start after those of levels < l
        for j in range(i):
            q = q + self.prefix_emb[first + j](prefixes[:, :, j])
        q = self.ln_dot[i](q)
        return q @ self.w_o_dot[i](code_emb).t() + self.b_dot[i]


def _pair_sum(h: torch.Tensor, c: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``h[b] + c[x]`` for ``h [B, d]``, ``c [C, d]`` and M pairs ``(b, x)``.

    When the pairs are many (shallow levels: up to B*K*C), one row gather from the table of all B*C sums
    is cheaper than two [M, d] gathers and an add; the sums are the same floating-point additions."""
    if 2 * b.numel() >= h.shape[0] * c.shape[0]:
        return (h.unsqueeze(1) + c).flatten(0, 1).index_select(0, b * c.shape[0] + x)
    return h.index_select(0, b) + c.index_select(0, x)


def _projected_read(read: nn.Module, proj: nn.Linear, q: torch.Tensor, addr: torch.Tensor, valid, q_index):
    """``proj(R(q, p))`` per pair (W_S eta^S or W_T eta^T, Eq. 23-24, 27).

    At inference the projection weight is handed to the read, which folds it through its LayerNorm when
    that is cheaper (wide backbones). Reading ``proj.weight`` directly is safe there: inference runs with
    full weights (ZeRO-3 validation gathers them, ``DenseEngine.inference``); with autograd the module
    is called, so ZeRO-3 gathers its weight for the call."""
    # ZeRO-3 partitions the weight between module calls (``ds_id``): only a module call gathers it
    if torch.is_grad_enabled() or hasattr(proj.weight, "ds_id"):
        return proj(read(q, addr, valid, q_index=q_index))
    return read(q, addr, valid, q_index=q_index, proj=proj.weight)


def _add(base: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``base + term``, in place unless that would change the result dtype (autograd allows it: no
    producer of ``base`` saves its output)."""
    return base.add_(term) if torch.promote_types(base.dtype, term.dtype) == base.dtype else base + term
