"""RQ-KMeans (paper App. B.2.1): residual quantisation whose codebooks are k-means centroids.

Level l fits k-means (k-means++ seeding, Lloyd iterations) on the current residuals r_{l-1}, the
cluster index becomes c^l and the chosen centroid is subtracted (Eq. 29 with b_{l,j} = centroid j).
The SID length L and codebook size C are exactly as configured: no extra disambiguation level.

Everything runs in torch on the CPU with a seeded ``torch.Generator``; for a given seed, input and
thread count the result is bit-for-bit reproducible. The same ``kmeans`` routine initialises the
RQ-VAE codebooks (rqvae.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RQResult:
    """Output of a residual quantiser fitted on embeddings x [I, d]."""

    codes: np.ndarray       # [I, L] int64, c_n^l
    codebooks: np.ndarray   # [L, C, D] float32, b_{l,j} (D = d for RQ-KMeans, latent dim for RQ-VAE)
    recon: np.ndarray       # [I, d] float32, reconstruction of the input embedding


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, k] between rows of x [n, d] and c [k, d] (clamped at 0)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) with a seeded generator."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    closest = sq_dists(x, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: fall back to uniform picks
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=gen))
        centers.append(x[idx])
        closest = torch.minimum(closest, sq_dists(x, x[idx:idx + 1])[:, 0])
    return torch.stack(centers).clone()


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means on x [n, d]; returns (centroids [k, d], assignment [n] int64).

    Empty clusters are re-seeded with the points farthest from their current centroid (one distinct
    point per empty cluster), so every code can be used whenever n >= k.
    """
    x = x.detach().float()
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means with k={k} > n={n} points")
    cent = _kmeanspp(x, k, gen)
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        d = sq_dists(x, cent)
        new_min, new_assign = d.min(1)
        counts = torch.bincount(new_assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = torch.argsort(new_min, descending=True, stable=True)[: len(empty)]
            new_assign[far] = empty
            counts = torch.bincount(new_assign, minlength=k)
        sums = torch.zeros_like(cent).index_add_(0, new_assign, x)
        cent = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        converged = torch.equal(new_assign, assign) and not len(empty)
        assign = new_assign
        if converged:
            break
    assign = sq_dists(x, cent).argmin(1)  # final assignment matches the returned centroids
    return cent, assign


def rq_assign(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual assignment of Eq. 29: returns (codes [n, L], x_hat = sum of chosen codewords)."""
    r = x
    codes = []
    for cb in codebooks:
        c = sq_dists(r, cb).argmin(1)
        codes.append(c)
        r = r - cb[c]
    return torch.stack(codes, 1), x - r


def fit_rqkmeans(x: np.ndarray, levels: int, codebook_size: int, iters: int = 50,
                 seed: int = 0) -> RQResult:
    """Fit L levels of k-means on residuals of ``x`` [I, d] (deterministic for ``seed``)."""
    gen = torch.Generator().manual_seed(int(seed))
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    r = xt.clone()
    books, codes = [], []
    for _ in range(levels):
        cent, assign = kmeans(r, codebook_size, iters, gen)
        books.append(cent)
        codes.append(assign)
        r = r - cent[assign]
    codebooks = torch.stack(books)
    return RQResult(codes=torch.stack(codes, 1).numpy().astype(np.int64),
                    codebooks=codebooks.numpy().astype(np.float32),
                    recon=(xt - r).numpy().astype(np.float32))
