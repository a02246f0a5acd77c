"""Report schema of `comeir bench latency` / `comeir bench lookup` on tiny configs (timings are not checked)."""
import argparse
import json

import numpy as np
import pytest
import yaml

from comeir_dist.bench.latency import LatencyBenchConfig, build_variants, run_latency_bench, synthetic_catalog
from comeir_dist.errors import UserError

TINY = {"backbone": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
                     "max_positions": 32, "dropout": 0.0},
        "engram": {"levels": 3, "codebook_size": 8, "s_s": 0.5, "s_t": 0.5, "d_m": 16},
        "num_items": 60, "item_emb_dim": 16, "history": 5, "token_dim": 8, "window": 3, "batch_size": 4,
        "beam_size": 3, "warmup": 1, "reps": 2, "sparse": "unsharded"}
STATS = {"median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "reps"}


def test_synthetic_catalog_distinct_uniform():
    cfg = LatencyBenchConfig.model_validate(TINY)
    codes, codebooks, emb = synthetic_catalog(cfg, np.random.default_rng(0))
    assert codes.shape == (60, 3) and len({tuple(c) for c in codes}) == 60
    assert codes.min() >= 0 and codes.max() < 8 and len(np.unique(codes[:, 0])) > 4
    assert codebooks.shape == (3, 8, 16) and emb.shape == (60, 16)


def test_variants_share_backbone():
    models = build_variants(LatencyBenchConfig.model_validate(TINY))
    assert list(models) == ["flatten", "tm", "comeir"]
    assert models["flatten"].backbone is models["tm"].backbone is models["comeir"].backbone
    assert not any(m.training for m in models.values())


def test_latency_report_schema(tmp_path):
    out = tmp_path / "lat.json"
    rep = run_latency_bench(LatencyBenchConfig.model_validate(TINY), str(out))
    on_disk = json.loads(out.read_text())
    assert on_disk["results"].keys() == rep["results"].keys() == {"flatten", "tm", "comeir"}
    for r in on_disk["results"].values():
        assert STATS <= set(r) and r["reps"] == 2 and len(r["samples_ms"]) == 2
        assert r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] <= r["max_ms"]
        assert r["live_beam_fraction"] == 1.0  # 60 items, beam 3: every slot holds a real SID
    for k in ("speedup_flatten_over_comeir", "speedup_tm_over_comeir"):
        assert on_disk[k] > 0
    assert on_disk["config"]["batch_size"] == 4 and on_disk["config"]["backbone"]["hidden_size"] == 32
    assert {"cpu", "cpu_count", "torch", "torch_threads", "peak_rss_gib"} <= set(on_disk["machine"])
    assert on_disk["shapes"]["flatten"]["input_tokens_per_user"] == 15
    assert on_disk["shapes"]["comeir"]["backbone_decode_steps"] == 0
    md = out.with_suffix(".md").read_text()
    assert "| flatten |" in md and "| comeir |" in md and "flatten / comeir" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_latency_config_errors():
    with pytest.raises(ValueError, match="max_positions"):
        LatencyBenchConfig.model_validate({**TINY, "history": 20})
    with pytest.raises(ValueError, match="distinct"):
        LatencyBenchConfig.model_validate({**TINY, "num_items": 600})


def _parser():
    from comeir_dist.cli_bench import add_bench_commands

    ap = argparse.ArgumentParser()
    add_bench_commands(ap.add_subparsers(dest="cmd", required=True))
    return ap


def test_cli_bench_latency_and_lookup(tmp_path, capsys):
    from comeir_dist.cli import _COMMANDS

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "lat.json"
    args = _parser().parse_args(["bench", "latency", "--config", str(cfg), "--out", str(out), "--reps", "1",
                                 "--warmup", "0", "--variants", "tm,comeir"])
    assert _COMMANDS["bench"](args) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"tm", "comeir"} and "speedup_flatten_over_comeir" not in rep
    assert rep["results"]["tm"]["reps"] == 1

    out = tmp_path / "lookup.json"
    args = _parser().parse_args(["bench", "lookup", "--out", str(out), "--tables", "2", "--rows", "1000",
                                 "--dim", "8", "--batch", "64", "--iters", "2", "--reps", "2", "--warmup", "1",
                                 "--copy-mib", "16", "--paths", "nn_dense_sgd,nn_sparse_adagrad,nn_sparse_adam"])
    assert _COMMANDS["bench"](args) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"nn_dense_sgd", "nn_sparse_adagrad", "nn_sparse_adam"}
    assert rep["lookups_per_iter"] == 128 and rep["roofline_copy"]["gb_s"] > 0
    for r in rep["results"].values():
        for mode in ("forward", "train"):
            assert {"ms_per_iter", "mlookups_s", "row_gb_s", "roofline_fraction"} <= set(r[mode])
    assert "| nn_dense_sgd |" in out.with_suffix(".md").read_text()

    args = _parser().parse_args(["bench", "latency", "--config", str(cfg), "--out", str(out), "--variants", "tiger"])
    with pytest.raises(UserError, match="variants"):
        _COMMANDS["bench"](args)
