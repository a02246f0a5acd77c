"""RQ-VAE (paper App. B.2.1, Eq. 29-30) in torch, CPU.

Model: encoder MLP d -> hidden_dims -> latent_dim (ReLU between layers), decoder its mirror, and L
residual codebooks b_l of C vectors in latent space.

Quantisation (Eq. 29): r_0 = z = Enc(m); c^l = argmin_j ||r_{l-1} - b_{l,j}||^2; r_l = r_{l-1} - b_{l,c^l};
z_hat = sum_l b_{l,c^l}. The codeword subtracted from the residual is passed with a stop-gradient, so
each codebook is trained only by its own codebook term and the encoder by the commitment and
reconstruction terms (the stop-gradients written in Eq. 30).

Loss (Eq. 30), squared L2 norms summed over dimensions and averaged over the minibatch:
    ||m - Dec(z_st)||^2 + sum_l ( ||sg(r_{l-1}) - b_{l,c^l}||^2 + beta * ||r_{l-1} - sg(b_{l,c^l})||^2 )
with the straight-through estimator z_st = z + sg(z_hat - z).

Training: codebooks are initialised by k-means (rqkmeans.kmeans) on the encoder outputs / residuals
of a first pass over all items; Adam for ``epochs`` epochs over shuffled minibatches. Dead codes:
every ``dead_code_every`` epochs, codes not selected by any item during that window are re-seeded
from randomly chosen current residuals of their level (and their Adam moments reset). No re-seeding
happens in the last window, so the final codebooks have been trained after the last reset.
After training, codes are the argmin of Eq. 29; with ``cfg.collisions_resolved`` items sharing a SID
are spread over the last level (collisions.py) and decoded from the codes they end up with.
Deterministic for a given seed (torch.manual_seed + a seeded generator; single-threaded by default).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn

from comeir_dist.config.pipeline import QuantizeConfig
from comeir_dist.quant.collisions import resolve_last_level
from comeir_dist.quant.rqkmeans import RQResult, kmeans, sq_dists

log = logging.getLogger(__name__)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder, decoder and L residual codebooks [L, C, latent_dim]."""

    def __init__(self, in_dim: int, hidden_dims: list[int], latent_dim: int, levels: int,
                 codebook_size: int):
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), in_dim])
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent_dim) * 0.01)

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    def quantize(self, z: torch.Tensor):
        """Eq. 29 on latents z [B, D]; returns codes [B, L], z_hat, codebook loss, commitment loss."""
        r = z
        z_hat = torch.zeros_like(z)
        codes, cb_loss, commit = [], z.new_zeros(()), z.new_zeros(())
        for l in range(self.levels):
            book = self.codebooks[l]
            c = sq_dists(r.detach(), book.detach()).argmin(1)
            b = book[c]
            cb_loss = cb_loss + ((r.detach() - b) ** 2).sum(-1).mean()
            commit = commit + ((r - b.detach()) ** 2).sum(-1).mean()
            z_hat = z_hat + b.detach()
            r = r - b.detach()
            codes.append(c)
        return torch.stack(codes, 1), z_hat, cb_loss, commit

    def forward(self, x: torch.Tensor, beta: float):
        z = self.encoder(x)
        codes, z_hat, cb_loss, commit = self.quantize(z)
        z_st = z + (z_hat - z).detach()
        x_hat = self.decoder(z_st)
        recon = ((x - x_hat) ** 2).sum(-1).mean()
        loss = recon + cb_loss + beta * commit
        return loss, codes, {"recon": recon, "codebook": cb_loss, "commit": commit}

    @torch.no_grad()
    def residuals(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Residual inputs r_0..r_{L-1} of every level for x (no grad)."""
        r = self.encoder(x)
        out = []
        for l in range(self.levels):
            out.append(r)
            r = r - self.codebooks[l][sq_dists(r, self.codebooks[l]).argmin(1)]
        return out

    @torch.no_grad()
    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [n, L], Dec(z_hat) [n, d]) for x."""
        codes, z_hat, _, _ = self.quantize(self.encoder(x))
        return codes, self.decoder(z_hat)


@torch.no_grad()
def _reseed_dead(model: RQVAE, x: torch.Tensor, usage: torch.Tensor, opt: torch.optim.Adam,
                 gen: torch.Generator) -> int:
    """Re-seed codes with zero usage from random current residuals, level by level."""
    total = 0
    state = opt.state.get(model.codebooks, {})
    for l in range(model.levels):
        dead = torch.nonzero(usage[l] == 0).flatten()
        if len(dead) == 0:
            continue
        r = model.residuals(x)[l]  # recomputed: earlier levels may just have changed
        pick = torch.randperm(r.shape[0], generator=gen)[: len(dead)]
        model.codebooks.data[l, dead] = r[pick]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][l, dead] = 0.0
        total += len(dead)
    return total


def fit_rqvae(x: np.ndarray, cfg: QuantizeConfig, seed: int = 0,
              log_every: Optional[int] = None) -> tuple[RQResult, RQVAE]:
    """Train an RQ-VAE on embeddings x [I, d] with the RQ-VAE fields of ``cfg``.

    With ``cfg.collisions_resolved`` items sharing a SID are spread over the last level after training
    (collisions.py) and decoded from their new codes. Returns (codes/codebooks/reconstruction, model).
    """
    torch.manual_seed(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    xt = torch.tensor(np.asarray(x, dtype=np.float32))
    n, d = xt.shape
    if cfg.codebook_size > n:
        raise ValueError(f"codebook_size {cfg.codebook_size} > {n} items")
    model = RQVAE(d, list(cfg.hidden_dims), cfg.latent_dim, cfg.levels, cfg.codebook_size)

    with torch.no_grad():  # k-means initialisation of each codebook on the first-pass residuals
        r = model.encoder(xt)
        for l in range(cfg.levels):
            cent, assign = kmeans(r, cfg.codebook_size, cfg.kmeans_iters, gen, cfg.kmeans_balanced)
            model.codebooks.data[l] = cent
            r = r - cent[assign]

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, n)
    usage = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.long)
    reseeded = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for s in range(0, n, bs):
            batch = xt[perm[s:s + bs]]
            loss, codes, _ = model(batch, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(batch)
            for l in range(cfg.levels):
                usage[l] += torch.bincount(codes[:, l], minlength=cfg.codebook_size)
        if epoch % cfg.dead_code_every == 0:
            if epoch + cfg.dead_code_every <= cfg.epochs:  # never in the last window
                reseeded += _reseed_dead(model, xt, usage, opt, gen)
            usage.zero_()
        if log_every and epoch % log_every == 0:
            log.info("rqvae seed %d epoch %d loss %.5f", seed, epoch, tot / n)

    model.eval()
    codes, x_hat = model.encode_decode(xt)
    codes_np = codes.numpy().astype(np.int64)
    distinct = int(len(np.unique(codes_np, axis=0)))
    info = {"assign": "argmin", "pre_resolution_distinct_sids": distinct, "argmin_distinct_sids": distinct,
            "reassigned_items": 0, "reseeded_codes": reseeded}
    if cfg.collisions_resolved:  # (None = on for RQ-VAE; ``assign`` is an RQ-KMeans option)
        with torch.no_grad():
            last = model.codebooks[-1]
            dists = sq_dists(model.residuals(xt)[-1], last).numpy()
        codes_np, info["reassigned_items"] = resolve_last_level(codes_np, dists)
        with torch.no_grad():
            idx = torch.as_tensor(codes_np)
            z_hat = sum(model.codebooks[l][idx[:, l]] for l in range(model.levels))
            x_hat = model.decoder(z_hat)
    result = RQResult(codes=codes_np,
                      codebooks=model.codebooks.detach().numpy().astype(np.float32).copy(),
                      recon=x_hat.numpy().astype(np.float32), info=info)
    log.debug("rqvae seed %d: %d codes re-seeded", seed, reseeded)
    return result, model
