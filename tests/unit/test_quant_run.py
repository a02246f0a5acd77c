"""run_quantize input validation (fails before any Ray work) and single-restart fitting."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.config.pipeline import QuantizeConfig
from comeir_dist.data.schema import ITEMS_SCHEMA, emb_schema, sids_dir
from comeir_dist.errors import UserError
from comeir_dist.quant.run import fit_quantizer, run_quantize, validate_inputs


def _dataset(tmp_path, emb=None, n=10):
    items = pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)),
                      "raw_id": [str(i) for i in range(n)],
                      "title": [f"item {i}" for i in range(n)],
                      "description": [None] * n, "brand": ["b"] * n, "categories": ["c"] * n},
                     schema=ITEMS_SCHEMA)
    pq.write_table(items, tmp_path / "items.parquet")
    if emb is not None:
        d = emb.shape[1]
        t = pa.Table.from_arrays([pa.array(np.arange(len(emb), dtype=np.int32)),
                                  pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float32)), d)],
                                 schema=emb_schema(d))
        pq.write_table(t, tmp_path / "item_emb.parquet")
    return tmp_path


def test_missing_embeddings(tmp_path):
    _dataset(tmp_path)
    with pytest.raises(UserError, match="run `comeir embed` first"):
        run_quantize(tmp_path, QuantizeConfig(codebook_size=2))


def test_codebook_larger_than_items(tmp_path):
    _dataset(tmp_path, np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(UserError, match=r"codebook_size = 128 exceeds the number of items \(10\)"):
        run_quantize(tmp_path, QuantizeConfig())
    assert not sids_dir(tmp_path, "rqkmeans").exists()


def test_non_finite_embeddings(tmp_path):
    emb = np.random.default_rng(0).normal(size=(10, 4))
    emb[3, 1] = np.nan
    _dataset(tmp_path, emb)
    with pytest.raises(UserError, match=r"NaN/inf.*first item_idx 3"):
        run_quantize(tmp_path, QuantizeConfig(codebook_size=2))


def test_embedding_rows_mismatch(tmp_path):
    _dataset(tmp_path, np.random.default_rng(0).normal(size=(8, 4)), n=10)
    with pytest.raises(UserError, match="8 rows but items.parquet has 10"):
        run_quantize(tmp_path, QuantizeConfig(codebook_size=2))


def test_validate_inputs_ok():
    validate_inputs(np.zeros((5, 3), np.float32), QuantizeConfig(codebook_size=5))


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_fit_quantizer_both_methods(method):
    emb = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    cfg = QuantizeConfig(method=method, levels=2, codebook_size=4, latent_dim=4, hidden_dims=[16],
                         epochs=4, batch_size=8, dead_code_every=2, kmeans_iters=5)
    r = fit_quantizer(emb, cfg, seed=7)
    assert r["seed"] == 7 and r["codes"].shape == (30, 2) and r["codes"].dtype == np.int32
    assert r["codebooks"].shape == (2, 4, 8 if method == "rqkmeans" else 4)
    s = r["summary"]
    assert s["items"] == 30 and len(s["utilisation"]) == 2 and s["recon_mse"] > 0
    r2 = fit_quantizer(emb, cfg, seed=7)
    assert np.array_equal(r["codes"], r2["codes"])
