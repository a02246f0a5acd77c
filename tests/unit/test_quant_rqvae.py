"""RQ-VAE: shapes, ranges, determinism, Eq. 30 loss terms, dead-code re-seeding."""
import numpy as np
import pytest
import torch

from comeir_dist.config.pipeline import QuantizeConfig
from comeir_dist.quant.rqvae import RQVAE, _reseed_dead, fit_rqvae


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run much faster single-threaded (and so do the Ray tasks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw):
    base = dict(method="rqvae", levels=2, codebook_size=4, latent_dim=4, hidden_dims=[16],
                epochs=6, batch_size=16, dead_code_every=2, kmeans_iters=5)
    base.update(kw)
    return QuantizeConfig(**base)


def _x(n=40, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_shapes_and_ranges():
    res, model = fit_rqvae(_x(), _cfg(), seed=1)
    assert res.codes.shape == (40, 2) and res.codes.min() >= 0 and res.codes.max() < 4
    assert res.codebooks.shape == (2, 4, 4) and res.codebooks.dtype == np.float32
    assert res.recon.shape == (40, 12)
    assert isinstance(model, RQVAE)


def test_deterministic_for_seed():
    a, _ = fit_rqvae(_x(), _cfg(), seed=3)
    b, _ = fit_rqvae(_x(), _cfg(), seed=3)
    c, _ = fit_rqvae(_x(), _cfg(), seed=4)
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.codebooks, b.codebooks) and np.array_equal(a.recon, b.recon)
    assert not np.array_equal(a.codebooks, c.codebooks)


def test_loss_terms_and_gradients():
    torch.manual_seed(0)
    m = RQVAE(6, [8], 3, levels=2, codebook_size=4)
    x = torch.randn(10, 6)
    loss, codes, parts = m(x, beta=0.25)
    expected = parts["recon"] + parts["codebook"] + 0.25 * parts["commit"]
    assert torch.allclose(loss, expected)
    # codebook term equals commitment term in value (only the stop-gradients differ)
    assert torch.allclose(parts["codebook"], parts["commit"])
    loss.backward()
    assert m.codebooks.grad is not None and m.codebooks.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.encoder.parameters())
    # codes are the residual argmin of Eq. 29
    z = m.encoder(x).detach()
    c1 = torch.cdist(z, m.codebooks[0].detach()).argmin(1)
    assert torch.equal(codes[:, 0], c1)


def test_training_reduces_reconstruction():
    x = _x(64, 8, seed=5)
    short, _ = fit_rqvae(x, _cfg(epochs=1, codebook_size=8, latent_dim=8, hidden_dims=[32]), seed=0)
    long, _ = fit_rqvae(x, _cfg(epochs=60, codebook_size=8, latent_dim=8, hidden_dims=[32],
                                lr=3e-3), seed=0)
    err = lambda r: float(((x - r.recon) ** 2).mean())
    assert err(long) < err(short)


def test_dead_codes_reseeded_from_residuals():
    torch.manual_seed(0)
    m = RQVAE(5, [8], 3, levels=2, codebook_size=4)
    x = torch.randn(20, 5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    before = m.codebooks.detach().clone()
    usage = torch.ones(2, 4, dtype=torch.long)
    usage[0, 2] = 0
    usage[1, 0] = 0
    n = _reseed_dead(m, x, usage, opt, torch.Generator().manual_seed(0))
    assert n == 2
    after = m.codebooks.detach()
    changed = (after != before).any(-1)
    assert changed.tolist() == [[False, False, True, False], [True, False, False, False]]
    # level-0 dead code now equals one of the encoder outputs (a level-0 residual)
    with torch.no_grad():
        z = m.encoder(x)
    assert torch.isclose(torch.cdist(after[0, 2:3], z).min(), torch.tensor(0.0), atol=1e-5)
