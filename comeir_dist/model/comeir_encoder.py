"""ComeIR input constructor: one memory-conditioned vector per history item (paper Sections 3.2-3.4).

    q_n = W_mm m_n;  alpha = softmax_l(q_n . e_{c^l} / sqrt d);  s^0_n = sum_l alpha e_{c^l}     (Eq. 4)
    z^S_{n,l} = R^S_l(s^0_n, p^S_{n,l});  eta^S_{n,l} = W^S_{C,l}[z^S_{n,2}; ...; z^S_{n,l}] + b  (Eq. 6, 17)
    q^T_{n,l} = sum_{a in H_n} pi_{a,l} s^0_a  (window w);  eta^T_{n,l} = R^T_l(q^T_{n,l}, p^T_{n,l})  (Eq. 18-21)
    u = [eta^S; eta^T];  omega = sigma((W_Q s^{l-1})^T (W_K,l u) + b_l);  s^l = s^{l-1} + omega W_V,l u  (Eq. 7)
    r_n = LN(s^L)
Ablations: no_mm_scoring (mean pooling), no_memory_merge (one linear layer over [s^0; u_1..u_L]),
no_e_intra / no_e_inter (the corresponding eta is 0 and its tables are not read by the encoder).
Extensions (EncoderMemoryOptions): model.encoder_memory_grad false (the encoder's reads do not write the rows),
model.merge_gate_bias (initial b_l of the Eq. 7 gate), model.merge_value_init zero (W^M_{V,l} starts at 0),
model.merge_input_norm (the merge starts from LN(s^0), the scale of the memory reads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comeir_dist.engram.patterns import encode_prefix, inter_keys, intra_keys
from comeir_dist.model.engram_memory import LookupPass, inter_short_marker


def window_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     window: int) -> torch.Tensor:
    """For every position n: softmax over a in [n-w+1, n] (real items only) of q_n.k_a/sqrt(d), sum of v_a.

    ``query/keys/values [B, N, d]``, ``mask [B, N]`` -> ``[B, N, d]`` (zeros where position n is padding).
    """
    b, n, d = keys.shape
    pad = window - 1
    k = F.pad(keys, (0, 0, pad, 0)).unfold(1, window, 1)  # [B, N, d, w]
    v = F.pad(values, (0, 0, pad, 0)).unfold(1, window, 1)
    m = F.pad(mask, (pad, 0)).unfold(1, window, 1)  # [B, N, w]
    scores = torch.einsum("bnd,bndw->bnw", query, k) / math.sqrt(d)
    scores = scores.masked_fill(~m, float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully padded rows -> 0
    return torch.einsum("bnw,bndw->bnd", attn, v)


@dataclass(frozen=True)
class EncoderMemoryOptions:
    """The encoder-side extensions of round 22 (``model.encoder_memory_grad``, ``model.merge_gate_bias``,
    ``model.merge_value_init``, ``model.merge_input_norm``); the defaults are the paper's encoder."""

    memory_grad: bool = True  # False: the encoder reads the Engram rows, never writes them
    gate_bias: float = 0.0  # initial b_l of the Eq. 7 gate
    value_init: str = "default"  # "zero": W^M_{V,l} starts at 0
    input_norm: bool = False  # the merge starts from LN(s^0)

    @classmethod
    def from_model_config(cls, m) -> "EncoderMemoryOptions":
        """From a ``ModelConfig``."""
        return cls(m.encoder_memory_grad, m.merge_gate_bias, m.merge_value_init, m.merge_input_norm)


class ComeIREncoder(nn.Module):
    def __init__(self, levels: int, codebook_size: int, d: int, d_mm: int, window: int, reads: nn.ModuleDict,
                 ablations: set[str], d_max: int, options: EncoderMemoryOptions = EncoderMemoryOptions()):
        super().__init__()
        self.levels, self.codebook_size, self.d, self.window, self.d_max = levels, codebook_size, d, window, d_max
        self.reads = reads  # shared with the head: R^S_l / R^T_l per level
        self.ablations = ablations
        self.memory_grad = options.memory_grad  # model.encoder_memory_grad: False = read the rows, never write them
        self.w_mm = nn.Linear(d_mm, d)  # W_mm (Eq. 4)
        self.intra_adapters = nn.ModuleDict({str(l): nn.Linear((l - 1) * d, d) for l in range(2, levels + 1)})
        self.wq_p = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W^P_{Q,l} (Eq. 21)
        self.wk_p = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(levels))  # W^P_{K,l}
        if "no_memory_merge" in ablations:
            self.linear_merge = nn.Linear((1 + 2 * levels) * d, d)
        else:
            self.wq_m = nn.Linear(d, d, bias=False)  # W^M_Q
            self.wk_m = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(levels))  # W^M_{K,l}
            self.wv_m = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(levels))  # W^M_{V,l}
            self.b_m = nn.Parameter(torch.full((levels,), float(options.gate_bias)))  # model.merge_gate_bias
            self.merge_in_ln = nn.LayerNorm(d) if options.input_norm else None  # model.merge_input_norm
            if options.value_init == "zero":  # model.merge_value_init: the merge starts as the identity on s^0
                for w in self.wv_m:
                    nn.init.zeros_(w.weight)
        self.out_ln = nn.LayerNorm(d)

    def item_context(self, tok: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        """s^0 (Eq. 4) from token embeddings ``[..., L, d]`` and cached item embeddings ``[..., d_mm]``."""
        if "no_mm_scoring" in self.ablations:
            return tok.mean(dim=-2)
        q = self.w_mm(mm)
        alpha = torch.softmax(torch.einsum("...d,...ld->...l", q, tok) / math.sqrt(self.d), dim=-1)
        return torch.einsum("...l,...ld->...d", alpha, tok)

    def request(self, lp: LookupPass, codes: torch.Tensor, mask: torch.Tensor, units: list[torch.Tensor]) -> dict:
        """Register the encoder's Engram keys; returns handles to read after ``lp.run``. Every key of history row b
        is in that row's cross-fit fold ``lp.fold[b]`` (engram.cross_fit)."""
        handles = {"intra": {}, "inter": {}}
        fold = None if lp.fold is None else lp.fold.unsqueeze(1)  # keys are [B, N]
        if "no_e_intra" not in self.ablations:
            for l in range(2, self.levels + 1):
                handles["intra"][l] = [_add(lp, "intra", l, o, *intra_keys(codes, mask, l, o), fold)
                                       for o in lp.lookup.orders("intra", l)]
        if "no_e_inter" not in self.ablations:
            for l in range(1, self.levels + 1):
                # Eq. 13/19 at the history start: engram.short_keys (None = drop, else the shortening marker)
                marker = inter_short_marker(lp.lookup, l, self.codebook_size, self.d_max)
                handles["inter"][l] = [_add(lp, "inter", l, o, *inter_keys(units[l - 1], mask, o, marker), fold)
                                       for o in lp.lookup.orders("inter", l)]
        return handles

    def merge_gate(self, level: int, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """omega of Eq. 7 at merge step ``level`` (0-based): sigma((W_Q s)^T (W_K,l u) + b_l), ``[..., 1]``."""
        return torch.sigmoid((self.wq_m(s) * self.wk_m[level](u)).sum(-1, keepdim=True) + self.b_m[level])

    def _read(self, lp: LookupPass, memory: str, level: int, handles: list, query: torch.Tensor) -> torch.Tensor:
        addr, valid = read_addresses(lp, handles)
        if not self.memory_grad:
            addr = addr.detach()
        return self.reads[f"{memory}{level}"](query, addr, valid)

    def forward(self, tok: torch.Tensor, mm: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor,
                units: list[torch.Tensor], lp: LookupPass, handles: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(R^I [B, N, d], s^0 [B, N, d])``; ``lp`` must have been run."""
        s0 = self.item_context(tok, mm)
        zeros = torch.zeros_like(s0)
        eta_s, eta_t = [zeros], []
        z = []
        for l in range(2, self.levels + 1):
            if l in handles["intra"]:
                z.append(self._read(lp, "intra", l, handles["intra"][l], s0))
                eta_s.append(self.intra_adapters[str(l)](torch.cat(z, dim=-1)))
            else:
                eta_s.append(zeros)
        for l in range(1, self.levels + 1):
            if l in handles["inter"]:
                q_t = window_attention(self.wq_p[l - 1](s0), self.wk_p[l - 1](s0), s0, mask, self.window)
                eta_t.append(self._read(lp, "inter", l, handles["inter"][l], q_t))
            else:
                eta_t.append(zeros)
        us = [torch.cat([eta_s[l], eta_t[l]], dim=-1) for l in range(self.levels)]
        if "no_memory_merge" in self.ablations:
            s = self.linear_merge(torch.cat([s0, *us], dim=-1))
        else:
            s = s0 if self.merge_in_ln is None else self.merge_in_ln(s0)
            for l, u in enumerate(us):
                s = s + self.merge_gate(l, s, u) * self.wv_m[l](u)
        r = self.out_ln(s) * mask.unsqueeze(-1)
        return r, s0


def _add(lp: LookupPass, memory: str, level: int, order: int, keys: torch.Tensor, valid: torch.Tensor, fold=None):
    return lp.add(memory, level, order, keys, valid, fold), valid


def read_addresses(lp: LookupPass, handles: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the per-order addresses ``[..., O, d_m]`` (a view of the lookup output when possible) and
    validity ``[..., O]`` of (handle, valid) pairs; a pair's valid None means all its keys are valid, and
    the returned validity is None when that holds for every pair (the read then skips masking)."""
    addr = lp.stacked([h for h, _ in handles])
    if all(v is None for _, v in handles):
        return addr, None
    valid = torch.stack([torch.ones((), dtype=torch.bool, device=addr.device).expand(addr.shape[:-2])
                         if v is None else v.expand(addr.shape[:-2]) for _, v in handles], dim=-1)
    return addr, valid


def history_units(codes: torch.Tensor, levels: int, codebook_size: int, d_max: int) -> list[torch.Tensor]:
    """Inter-item units c^{<=l} per history position, one ``[B, N]`` tensor per level (Eq. 18)."""
    return [encode_prefix(codes, l, codebook_size, d_max) for l in range(1, levels + 1)]
