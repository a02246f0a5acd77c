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
* Inference with ``q_index`` (the memory-restoring head: 10^4+ (beam, candidate) rows per level) runs in
  blocks of rows and can apply the caller's output projection (W_S / W_T, Eq. 27) folded through the
  LayerNorm; training and the encoder take the plain single-pass path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Inference with ``q_index`` is computed in blocks of about this many address elements (rows x O x d_m;
# 2^20 floats = 4 MiB per temporary).
BLOCK_ELEMS = 1 << 20


class EngramRead(nn.Module):
    """R_l(q, p) of one memory at one level with ``n_orders`` n-gram orders."""

    def __init__(self, d_q: int, d_m: int, n_orders: int, d_out: int, d_k: int | None = None, ln_eps: float = 1e-5,
                 addr_dropout: float = 0.0):
        super().__init__()
        self.addr_dropout = addr_dropout  # training only: dropout on the looked-up addresses (regularises rows)
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
                return_gates: bool = False, q_index: torch.Tensor | None = None, proj: torch.Tensor | None = None):
        """``q [..., d_q]``, ``addr [..., O, d_m]``, ``valid [..., O]`` (bool) -> ``[..., d_out]``.

        Leading dims of ``q`` broadcast against those of ``addr`` (e.g. ``q [B, 1, d_q]`` with
        candidate addresses ``[B, K, O, d_m]``). With ``return_gates`` also returns the gates
        ``lambda [..., O]`` (0 for invalid orders). ``q_index [M]`` (optional): ``q`` holds distinct
        queries and address row i uses ``q[q_index[i]]`` (gathered after the query projection).
        ``proj [d_2, d_out]`` (optional): return ``R(q, p) proj^T``; at inference with ``q_index`` it is
        folded through the LayerNorm when that is cheaper (see :meth:`_fold`).
        """
        if addr.shape[-2:] != (self.n_orders, self.d_m):
            raise ValueError(f"addr must end with ({self.n_orders}, {self.d_m}), got {tuple(addr.shape)}")
        # when every order is valid (e.g. decoding full histories) the masking is the identity: skip its
        # passes over [..., O, d_m] and [..., d_out]
        if valid is not None:
            valid = None if bool(valid.all()) else valid.bool()
        # (W_Q q)^T (W_K,o a) = (W_K,o^T W_Q q)^T a: fold the key projection into the query side, so each
        # address row costs O*d_m for the gate instead of O*d_m*d_k (queries are shared by many addresses
        # at decode time: one user state scores every candidate code).
        g = torch.einsum("...k,odk->...od", self.w_q(q), self.w_k)  # [..., O, d_m]
        fold = None
        rows = max(1, BLOCK_ELEMS // (self.n_orders * self.d_m))
        if q_index is None or addr.dim() != 3 or torch.is_grad_enabled():
            out = self._read(g, addr, valid, q_index, return_gates)
        else:
            fold = self._fold(proj, addr.shape[0]) if proj is not None else None
            if addr.shape[0] <= rows:
                out = self._read(g, addr, valid, q_index, return_gates, fold)
            else:
                # many rows (decoding: every valid (beam, candidate) pair) go in blocks, so the [rows, O, d_m]
                # temporaries stay cache-sized and are reused instead of fresh memory for every tensor
                parts = (self._read(g, addr[i:i + rows], None if valid is None else valid[i:i + rows],
                                    q_index[i:i + rows], return_gates, fold) for i in range(0, addr.shape[0], rows))
                out = _cat_blocks(parts, addr.shape[0], rows, return_gates)
        if proj is None or fold is not None:
            return out
        return (out[0] @ proj.t(), out[1]) if return_gates else out @ proj.t()

    def _read(self, g: torch.Tensor, addr: torch.Tensor, valid: torch.Tensor | None, q_index: torch.Tensor | None,
              return_gates: bool, fold: tuple | None = None):
        """Eq. 15-16 for the folded query ``g [..., O, d_m]`` (``valid`` None = every order valid)."""
        if valid is None:
            a = addr
        else:
            a = torch.where(valid.unsqueeze(-1), addr, torch.zeros((), dtype=addr.dtype, device=addr.device))
        a = a.to(self.w_k.dtype)
        if self.addr_dropout and self.training and torch.is_grad_enabled():
            a = torch.nn.functional.dropout(a, self.addr_dropout)
        if q_index is not None:
            g = g.index_select(0, q_index)  # (index_select: a plain row gather, faster than g[q_index])
        gate = torch.sigmoid((g * a).sum(-1) / math.sqrt(self.d_k))  # [..., O]  (Eq. 15)
        if valid is not None:
            gate = gate * valid.to(gate.dtype)
        # sum_o lambda_o W_V,o a_o as one matmul over the concatenated gated addresses (Eq. 16)
        gated = (gate.unsqueeze(-1) * a).flatten(-2)  # [..., O*d_m]
        if fold is None:
            out = self.ln(gated @ self.w_v.reshape(self.n_orders * self.d_m, self.d_out))  # [..., d_out]
        else:
            t, gram, bias = fold  # P LN(s) with s = gated W_V, without forming s (see _fold)
            var = ((gated @ gram) * gated).sum(-1, keepdim=True).div_(self.d_out).clamp_(min=0)
            out = (gated @ t).mul_(var.add_(self.ln.eps).rsqrt_()).add_(bias)
        if valid is not None:
            out = torch.where(valid.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return (out, gate) if return_gates else out

    def _fold(self, proj: torch.Tensor, rows: int) -> tuple | None:
        """``P LN(s)`` (P = ``proj``) folded through the LayerNorm, if cheaper for ``rows`` rows; else None.

        With s = x W_V (x = gated addresses, n = O*d_m wide) and W_c = W_V minus its row means:
            s - mean(s) = x W_c,   var(s) = x (W_c W_c^T) x^T / d_out,
            P LN(s) = (x T) / sqrt(var(s) + eps) + P beta,   T = W_c (P diag(gamma))^T     [n, d_2]
        i.e. n*d_2 + n^2 multiply-adds per row instead of n*d_out + d_out*d_2 (and no [rows, d_out] LN):
        worth it when n < d_out (e.g. a 1024-wide backbone with O*d_m = 512), once T and W_c W_c^T are paid.
        Not under autocast: T and W_c W_c^T would be rounded to the low precision.
        """
        n, d, d2 = self.n_orders * self.d_m, self.d_out, proj.shape[0]
        plain = rows * (n * d + d * d2)
        folded = rows * (n * d2 + n * n) + n * d * d2 + n * n * d
        if (folded >= plain or self.ln.weight is None or self.ln.bias is None
                or torch.is_autocast_enabled(proj.device.type)):
            return None
        wv = self.w_v.reshape(n, d)
        wc = wv - wv.mean(dim=1, keepdim=True)
        return wc @ (proj * self.ln.weight).t(), wc @ wc.t(), proj @ self.ln.bias


def _cat_blocks(parts, rows: int, block: int, return_gates: bool):
    """Write per-block outputs (and gates) into full ``[rows, ...]`` tensors as they are produced."""
    out = gates = None
    for i, part in enumerate(parts):
        o, gt = part if return_gates else (part, None)
        if out is None:
            out = o.new_empty(rows, o.shape[-1])
            gates = gt.new_empty(rows, gt.shape[-1]) if return_gates else None
        out[i * block:(i + 1) * block] = o
        if return_gates:
            gates[i * block:(i + 1) * block] = gt
    return (out, gates) if return_gates else out
