"""NEZHA decoding (App. B.2.3, Eq. 40-42) for comeir / flatten / tm, next to Normal GR: decoding equals teacher
forcing, per-beam recurrent states follow their parents, placeholders leave h_u alone, tiny overfit, config."""
from pathlib import Path

import pytest
import torch

from comeir_dist.decode.beam import beam_search, masked_log_softmax
from comeir_dist.errors import UserError
from comeir_dist.model.backbone import run_backbone
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.loss import constrained_sid_loss
from comeir_dist.train.samples import to_batch, training_samples
from comeir_dist.train.setup import build_sharded_model, dense_parameters, load_inputs
from tests.fixtures import (assert_decode_matches_teacher_forcing, assert_overfits, make_tiny_dataset,
                            tiny_run_config)

VARIANTS = ("comeir", "flatten", "tm")
# (decoding, nezha_delta)
DECODINGS = (("normal", "code"), ("nezha", "code"), ("nezha", "code_context"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _model(ds, tmp_path, variant, decoding="nezha", delta="code", **model):
    cfg = tiny_run_config(ds, tmp_path / variant, variant=variant)
    cfg.model.decoding, cfg.model.nezha_delta = decoding, delta
    for k, v in model.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu")), cfg


def _batch(ds, n=12):
    hist, tgt = training_samples(ds, 8)
    return to_batch(hist[:n], tgt[:n], "cpu")


def _tf_log_probs(model, batch, codes):
    """Teacher-forced per-level log-probabilities (Eq. 11) of ``codes [B, L]``, ``[B, L]``."""
    logits = model.level_logits(batch, codes)
    out = []
    for l, z in enumerate(logits):
        lp = masked_log_softmax(z.float(), model.trie.valid_mask(codes[:, :l], level=l))
        out.append(lp.gather(1, codes[:, l:l + 1])[:, 0])
    return torch.stack(out, 1)


@pytest.mark.parametrize("decoding,delta", DECODINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_matches_teacher_forcing(tiny, tmp_path, variant, decoding, delta):
    """Along the target path (one beam), the decoder's level-l logits equal the training path's."""
    model, _ = _model(tiny, tmp_path, variant, decoding, delta)
    model.eval()
    assert_decode_matches_teacher_forcing(model, _batch(tiny))


@pytest.mark.parametrize("decoding,delta", DECODINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_scores_equal_teacher_forced_log_probs(tiny, tmp_path, variant, decoding, delta):
    """A beam wider than the catalog keeps every SID (beams reordered at each level): each final score (Eq. 28)
    equals the teacher-forced sum of that SID's level log-probabilities."""
    model, _ = _model(tiny, tmp_path, variant, decoding, delta)
    model.eval()
    batch = _batch(tiny, 4)
    n_items = model.catalog.num_items
    with torch.no_grad():
        res = beam_search(model.decoder(batch), model.trie, 4, model.levels, beam_size=n_items + 8)
        assert int(res.valid.sum(1).min()) == n_items  # every catalog SID survived
        b, k = res.valid.nonzero(as_tuple=True)
        rows = HistoryBatch(batch.items[b])
        tf = _tf_log_probs(model, rows, res.codes[b, k]).sum(1)
    torch.testing.assert_close(res.scores[b, k], tf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,delta,extra", [("comeir", "code_context", {}), ("comeir", "code", {}),
                                                 ("comeir", "code", {"head_interaction": "dot"}),
                                                 ("flatten", "code_context", {}), ("tm", "code", {})])
def test_per_beam_states_follow_parents(tiny, tmp_path, variant, delta, extra):
    """Narrow beam (pruning, permuted parents): every beam's logits at every level equal a brute-force
    teacher-forced computation of that beam's prefix alone (one row per beam, no state carried)."""
    model, _ = _model(tiny, tmp_path, variant, "nezha", delta, **extra)
    model.eval()
    batch = _batch(tiny, 6)
    seen = []
    with torch.no_grad():
        step = model.decoder(batch)

        def recording(level, prefixes, parent):
            out = step(level, prefixes, parent)
            seen.append((level, prefixes.clone(), out.clone(), None if parent is None else parent.clone()))
            return out

        beam_search(recording, model.trie, 6, model.levels, beam_size=3)
        assert any(p is not None and (p != torch.arange(p.shape[1])).any() for *_, p in seen)  # beams were reordered
        for level, prefixes, out, _ in seen:
            bsz, k = prefixes.shape[:2]
            users = torch.arange(bsz).repeat_interleave(k)
            pre = prefixes.reshape(bsz * k, level)
            target = torch.cat([pre, torch.zeros(bsz * k, model.levels - level, dtype=torch.long)], 1)
            brute = model.level_logits(HistoryBatch(batch.items[users]), target)[level].reshape(bsz, k, -1)
            valid = model.trie.valid_mask(pre, level=level).reshape(bsz, k, -1)
            torch.testing.assert_close(out[valid], brute[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_placeholders_do_not_change_history_states(tiny, tmp_path, variant):
    """Causal attention: appending p_1..p_L (Eq. 40) leaves every history position's output unchanged, so h_u is
    the Normal-GR h_u; the placeholder outputs h_l do depend on the placeholders."""
    model, _ = _model(tiny, tmp_path, variant)
    model.eval()
    batch = _batch(tiny)
    nezha = model.nezha
    with torch.no_grad():
        if variant == "comeir":
            x = None
            h_nezha = model._encode(batch)["h"]
            model.nezha = None  # the same weights, Normal GR
            h_normal = model._encode(batch)["h"]
            model.nezha = nezha
            torch.testing.assert_close(h_nezha, h_normal, rtol=1e-5, atol=1e-5)
        else:
            x, mask = model.history_inputs(batch)
        if x is None:  # comeir: check every history position on its backbone with random item inputs
            x = torch.randn(batch.items.shape[0], batch.items.shape[1], nezha.d)
            mask = batch.mask
        t = x.shape[1]
        h_plain, _ = run_backbone(model.backbone, x, mask)
        h_plus, _ = run_backbone(model.backbone, *nezha.placeholders(x, mask))
        torch.testing.assert_close(h_plus[:, :t][mask], h_plain[mask], rtol=1e-5, atol=1e-5)
        h_u, h_p = nezha.encode(model.backbone, x, mask)
        torch.testing.assert_close(h_u, h_plain[:, -1], rtol=1e-5, atol=1e-5)
        nezha.placeholders.p.add_(1.0)
        h_u2, h_p2 = nezha.encode(model.backbone, x, mask)
        nezha.placeholders.p.sub_(1.0)
    torch.testing.assert_close(h_u2, h_u, rtol=1e-5, atol=1e-5)
    assert (h_p2 - h_p).abs().max() > 1e-3


@pytest.mark.parametrize("variant,delta", [("comeir", "code_context"), ("tm", "code"), ("flatten", "code_context")])
def test_overfit_handful_of_sequences(tiny, tmp_path, variant, delta):
    """A few sequences are memorised under NEZHA: beam search ranks every target's SID first."""
    model, _ = _model(tiny, tmp_path, variant, "nezha", delta)
    batch = _batch(tiny, 8)
    assert_overfits(model, batch)


def test_nezha_parameters_are_dense_and_trained(tiny, tmp_path):
    model, cfg = _model(tiny, tmp_path, "comeir", delta="code_context")
    names = [n for n, _ in model.named_parameters() if n.startswith("nezha.")]
    assert "nezha.placeholders.p" in names and any(n.startswith("nezha.gru.1.") for n in names)
    assert any(n.startswith("nezha.delta.wq.0") for n in names)
    dense = {id(p) for p in dense_parameters(model)}
    assert all(id(p) in dense for n, p in model.named_parameters() if n.startswith("nezha."))
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie).backward()
    for n, p in model.named_parameters():
        if n.startswith("nezha."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert cfg.model.model_dump()["decoding"] == "nezha"


def test_config_defaults_and_position_check(tiny, tmp_path):
    from comeir_dist.config.run import ModelConfig

    assert ModelConfig().decoding == "normal" and ModelConfig().nezha_delta == "code"
    with pytest.raises(ValueError):
        ModelConfig(decoding="fast")
    with pytest.raises(UserError, match="placeholders"):  # 8 history items + 3 placeholders > 10 positions
        _model(tiny, tmp_path, "tm", backbone={**tiny_run_config(tiny, tmp_path).model.backbone.model_dump(),
                                               "max_positions": 10})


def test_bf16_autocast_training_step(tiny, tmp_path):
    """The GRU / Delta path runs under bf16 autocast (train.bf16) with a finite loss."""
    model, _ = _model(tiny, tmp_path, "comeir", delta="code_context")
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.level_logits(batch, codes)
    loss = constrained_sid_loss(logits, codes, model.trie)
    loss.backward()
    assert torch.isfinite(loss)


def test_latency_bench_times_both_decodings(tmp_path):
    """`comeir bench latency` with decodings [normal, nezha]: one result per (variant, decoding), both ratios."""
    import json

    from comeir_dist.bench.latency import LatencyBenchConfig, build_variants, run_latency_bench
    from tests.unit.test_bench_latency import TINY

    cfg = LatencyBenchConfig.model_validate({**TINY, "decodings": ["normal", "nezha"], "reps": 1, "warmup": 0,
                                             "nezha_delta": "code_context"})
    models = build_variants(cfg)
    assert list(models) == ["flatten", "tm", "comeir", "flatten-nezha", "tm-nezha", "comeir-nezha"]
    assert models["comeir"].tables is models["comeir-nezha"].tables
    assert models["flatten"].backbone is models["comeir-nezha"].backbone
    assert models["tm-nezha"].nezha is not None and models["tm"].nezha is None
    out = tmp_path / "lat.json"
    run_latency_bench(cfg, str(out))
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == set(models)
    assert {v: set(d) for v, d in rep["medians_ms"].items()} == {v: {"normal", "nezha"} for v in ("flatten", "tm", "comeir")}
    for dec in ("normal", "nezha"):
        ratio = rep["medians_ms"]["flatten"][dec] / rep["medians_ms"]["comeir"][dec]
        assert rep[f"speedup_flatten_over_comeir_{dec}"] == ratio and rep[f"speedup_tm_over_comeir_{dec}"] > 0
    assert rep["speedup_flatten_over_comeir"] == rep["speedup_flatten_over_comeir_normal"]
    assert all(r["live_beam_fraction"] == 1.0 for r in rep["results"].values())
    assert rep["shapes"]["flatten-nezha"]["backbone_decode_steps"] == 0
    assert rep["shapes"]["flatten-nezha"]["backbone_prefill_tokens"] == 4 * (15 + 3)
    md = out.with_suffix(".md").read_text()
    assert "| comeir | nezha |" in md and "flatten / comeir, nezha" in md


def test_cli_latency_decodings_flag(tmp_path):
    import argparse

    import yaml

    from comeir_dist.cli_bench import add_bench_commands, latency_config
    from tests.unit.test_bench_latency import TINY

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    ap = argparse.ArgumentParser()
    add_bench_commands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["bench", "latency", "--config", str(cfg), "--out", str(tmp_path / "x.json"),
                          "--decodings", "nezha,normal"])
    assert latency_config(args).decodings == ["nezha", "normal"]
    for shipped in ("configs/bench_latency_tiny.yaml", "configs/bench_latency_qwen3_0.6b.yaml"):
        path = str(Path(__file__).resolve().parents[2] / shipped)
        args = ap.parse_args(["bench", "latency", "--config", path, "--out", str(tmp_path / "x.json")])
        assert latency_config(args).decodings == ["normal", "nezha"]
