"""The Engram read operator R_l(q, p) for one memory at one level (paper Eq. 5, 15, 16).

    lambda_o = sigmoid( (W_Q q)^T (W_K,o a_o) / sqrt(d_k) )          (Eq. 15)
    R(q, p)  = LN( sum_{o valid} lambda_o W_V,o a_o )                 (Eq. 16)

* ``a_o [..., d_m]`` is the concatenated multi-head address of order o (Eq. 14), from the tables.
* Invalid orders (``valid[..., o] == False``, e.g. too few history items or padding) contribute
  exactly 0: their address is replaced by zeros before any projection and their gate is zeroed, so
  whatever values sit in an invalid slot (even NaN) never reach the output or the gradients.
* If NO order is valid for a row, the output is the zero vector (LayerNorm of an all-zero sum would
  return the LN bias, i.e. a constant "memory" for rows that have none), and no gradient flows to
  the LN parameters from that row.
* W_Q, W_K,o, W_V,o have no bias (the gate is a pure compatibility score; a bias in W_V would make an
  empty read non-zero). d_k (the gate's "d" in Eq. 15) defaults to d_out.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class EngramRead(nn.Module):
    """R_l(q, p) of one memory at one level with ``n_orders`` n-gram orders."""

    def __init__(self, d_q: int, d_m: int, n_orders: int, d_out: int, d_k: int | None = None, ln_eps: float = 1e-5):
        super().__init__()
        if n_orders < 1:
            raise ValueError("n_orders must be >= 1")
        self.d_q, self.d_m, self.n_orders, self.d_out = d_q, d_m, n_orders, d_out
        self.d_k = d_k or d_out
        self.w_q = nn.Linear(d_q, self.d_k, bias=False)
        # per-order projections stored batched: [O, d_m, d_k] and [O, d_m, d_out]
        self.w_k = nn.Parameter(torch.empty(n_orders, d_m, self.d_k))
        self.w_v = nn.Parameter(torch.empty(n_orders, d_m, d_out))
        self.ln = nn.LayerNorm(d_out, eps=ln_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.w_q.reset_parameters()
        bound = 1.0 / math.sqrt(self.d_m)  # same scale as nn.Linear(d_m, .)
        nn.init.uniform_(self.w_k, -bound, bound)
        nn.init.uniform_(self.w_v, -bound, bound)
        self.ln.reset_parameters()

    def forward(self, q: torch.Tensor, addr: torch.Tensor, valid: torch.Tensor | None = None,
                return_gates: bool = False, q_index: torch.Tensor | None = None):
        """``q [..., d_q]``, ``addr [..., O, d_m]``, ``valid [..., O]`` (bool) -> ``[..., d_out]``.

        Leading dims of ``q`` broadcast against those of ``addr`` (e.g. ``q [B, 1, d_q]`` with
        candidate addresses ``[B, K, O, d_m]``). With ``return_gates`` also returns the gates
        ``lambda [..., O]`` (0 for invalid orders). ``q_index [M]`` (optional): ``q`` holds distinct
        queries and address row i uses ``q[q_index[i]]`` (gathered after the query projection).
        """
        if addr.shape[-2:] != (self.n_orders, self.d_m):
            raise ValueError(f"addr must end with ({self.n_orders}, {self.d_m}), got {tuple(addr.shape)}")
        if valid is None:
            valid = torch.ones(addr.shape[:-1], dtype=torch.bool, device=addr.device)
        valid = valid.bool()
        a = torch.where(valid.unsqueeze(-1), addr, torch.zeros((), dtype=addr.dtype, device=addr.device))
        a = a.to(self.w_k.dtype)
        # (W_Q q)^T (W_K,o a) = (W_K,o^T W_Q q)^T a: fold the key projection into the query side, so each
        # address row costs O*d_m for the gate instead of O*d_m*d_k (queries are shared by many addresses
        # at decode time: one user state scores every candidate code).
        g = torch.einsum("...k,odk->...od", self.w_q(q), self.w_k)  # [..., O, d_m]
        if q_index is not None:
            g = g[q_index]
        gate = torch.sigmoid((g * a).sum(-1) / math.sqrt(self.d_k))  # [..., O]  (Eq. 15)
        gate = gate * valid.to(gate.dtype)
        # sum_o lambda_o W_V,o a_o as one matmul over the concatenated gated addresses (Eq. 16)
        gated = (gate.unsqueeze(-1) * a).flatten(-2)  # [..., O*d_m]
        s = gated @ self.w_v.reshape(self.n_orders * self.d_m, self.d_out)  # [..., d_out]
        any_valid = valid.any(-1, keepdim=True)
        out = torch.where(any_valid, self.ln(s), torch.zeros((), dtype=s.dtype, device=s.device))
        return (out, gate) if return_gates else out
