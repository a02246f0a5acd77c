"""DECOR (/work/shared/papers/decor.md): token fusion modes (model.token_fusion), decomposed embedding fusion
(Eq. 9-11), contextualized token composition (Eq. 12-18) with BOS queries (Eq. 19), experiment arms."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comeir_dist.decode.beam import beam_search, masked_log_softmax
from comeir_dist.errors import UserError
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.loss import constrained_sid_loss
from comeir_dist.train.samples import to_batch, training_samples
from comeir_dist.train.setup import build_sharded_model, load_inputs
from tests.fixtures import (assert_decode_matches_teacher_forcing, assert_overfits, make_tiny_dataset,
                            tiny_run_config, train_dense_steps)

FULL = {"compose": True, "alpha": 0.4, "bos_queries": 4}
# (variant, decor section) of the composition settings checked for decoder == teacher forcing and causality
COMPOSED = [("flatten", FULL), ("flatten", {"compose": True, "alpha": 0.4, "context_current": False}),
            ("tm", FULL), ("tm", {"compose": True, "alpha": 1.0})]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _model(ds, tmp_path, variant="flatten", fusion="decor", decor=None, decoding="normal", token_dim=8):
    cfg = tiny_run_config(ds, tmp_path / variant, variant=variant)
    cfg.model.token_fusion, cfg.model.decoding, cfg.model.token_dim = fusion, decoding, token_dim
    cfg.model.decor = decor or {}
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu")), cfg


def _batch(ds, n=12):
    hist, tgt = training_samples(ds, 8)
    return to_batch(hist[:n], tgt[:n], "cpu")


def _step(model, batch, steps=1, lr=1e-2):
    return train_dense_steps(model, batch, steps, lr, weight_decay=0.1)


# ---- config ------------------------------------------------------------------------------------------------------
def test_config_defaults_and_checks(tiny, tmp_path):
    from comeir_dist.config.run import ModelConfig
    from comeir_dist.train.experiment import config_hash

    m = ModelConfig()
    assert m.token_fusion == "concat" and not m.decor.compose and m.decor.bos_queries == 0
    with pytest.raises(ValueError):
        ModelConfig(token_fusion="sum")
    with pytest.raises(ValueError, match="needs compose"):
        ModelConfig(decor={"bos_queries": 4})
    with pytest.raises(ValueError):
        ModelConfig(decor={"compose": True, "alpha": 1.5})
    cfg = tiny_run_config(tiny, tmp_path)
    assert "decor" not in cfg.model_dump(exclude_defaults=True)["model"]  # old result files keep their hash
    other = cfg.model_copy(deep=True)
    other.model.decor = {"alpha": 0.5}
    assert config_hash(other) != config_hash(cfg)
    # composition needs a variant that feeds generated codes back to the backbone
    for variant, decoding in (("comeir", "normal"), ("flatten", "nezha")):
        with pytest.raises(UserError, match="compose"):
            _model(tiny, tmp_path, variant, decor={"compose": True}, decoding=decoding)


def test_shipped_decor_config_parses():
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    root = Path(__file__).resolve().parents[2]
    cfg = parse_section(RunConfig, load_yaml(str(root / "configs" / "decor_cpu.yaml")))
    ref = parse_section(RunConfig, load_yaml(str(root / "configs" / "experiment_cpu.yaml")))
    assert cfg.model.variant == "flatten" and cfg.model.token_fusion == "decor" and cfg.model.decor.compose
    assert cfg.model.decor.bos_queries == 32 and cfg.model.decor.alpha == 0.25
    assert cfg.train == ref.train and cfg.eval == ref.eval and cfg.model.backbone == ref.model.backbone  # same protocol
    assert (cfg.dataset, cfg.sid_method, cfg.max_history) == (ref.dataset, ref.sid_method, ref.max_history)


# ---- fusion ------------------------------------------------------------------------------------------------------
def test_decor_fusion_with_identity_projections_reduces_to_concat():
    """W_pre = W_collab = I, LN off, e_collab = e^T, W_fuse = W_E: Eq. 11 is Eq. 2."""
    from comeir_dist.model.decor_config import DecorConfig
    from comeir_dist.model.token_embedding import SidTokenEmbedding

    torch.manual_seed(0)
    codebooks = torch.randn(3, 8, 16)
    concat = SidTokenEmbedding(codebooks, 16, 32, "concat")
    decor = SidTokenEmbedding(codebooks, 16, 32, "decor", DecorConfig(fuse_dim=16, collab_dim=16, fusion_ln=False))
    f = decor.fuse
    with torch.no_grad():
        f.w_pre.weight.copy_(torch.eye(16))
        f.w_collab.weight.copy_(torch.eye(16))
        f.collab.weight.copy_(concat.token.weight)
        f.w_fuse.weight.copy_(concat.proj.weight)
        f.w_fuse.bias.copy_(concat.proj.bias)
    codes = torch.randint(0, 8, (5, 7, 3))
    torch.testing.assert_close(decor(codes), concat(codes), rtol=0, atol=1e-6)
    torch.testing.assert_close(decor.level_table(2), concat.level_table(2), rtol=0, atol=1e-6)
    # with the LayerNorms of Eq. 10 it is a different function
    ln = SidTokenEmbedding(codebooks, 16, 32, "decor", DecorConfig(fuse_dim=16, collab_dim=16))
    assert isinstance(ln.fuse.ln_pre, torch.nn.LayerNorm)


@pytest.mark.parametrize("variant,fusion,decoding", [
    ("flatten", "learned", "normal"), ("flatten", "pretrained", "normal"), ("tm", "decor", "nezha"),
    ("comeir", "decor", "normal"), ("comeir", "pretrained", "nezha")])
def test_every_fusion_trains_every_variant(tiny, tmp_path, variant, fusion, decoding):
    model, _ = _model(tiny, tmp_path, variant, fusion, decoding=decoding)
    names = {n for n, _ in model.named_parameters()}
    expect = {"learned": "tokens.token.weight", "pretrained": "tokens.proj.weight", "decor": "tokens.fuse.collab.weight"}
    assert expect[fusion] in names and not any(n.startswith("composer.") for n in names)
    batch = _batch(tiny)
    loss = _step(model, batch)
    assert torch.isfinite(loss)
    if variant == "comeir":  # e_x of the head (Eq. 10) is the fused embedding
        model.eval()
        with torch.no_grad():
            codes = model.catalog.item_codes(batch.target)[:1]
            torch.testing.assert_close(model.tokens.level_table(1)[codes[0, 1]], model.tokens(codes)[0, 1])


def test_pretrained_codebooks_bit_identical_after_training(tiny, tmp_path):
    """e_pre is the frozen quantizer codebook: never a parameter, not in the checkpointed state, unchanged by AdamW
    steps with weight decay (every fusion that reads it)."""
    from comeir_dist.quant.sid_table import load_sids

    cfg = tiny_run_config(tiny, tmp_path)
    original = torch.as_tensor(np.asarray(load_sids(cfg.dataset, cfg.sid_method).codebooks))
    for variant, fusion, decor in (("flatten", "decor", FULL), ("tm", "pretrained", None), ("comeir", "decor", None)):
        model, _ = _model(tiny, tmp_path, variant, fusion, decor=decor)
        tok = model.tokens
        assert not any(p.data_ptr() == tok.codebook.data_ptr() for p in model.parameters())
        assert not any("codebook" in k for k in model.state_dict()) and not tok.codebook.requires_grad
        before = tok.codebook.clone()
        _step(model, _batch(tiny), steps=3)
        assert torch.equal(tok.codebook, before)
        assert torch.equal(tok.codebook.reshape(original.shape), original.float())
        codes = torch.tensor([[1, 2, 3]])
        assert torch.equal(tok.pretrained(codes), original[torch.arange(3), codes[0]].float().unsqueeze(0))


# ---- composition -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["flatten", "tm"])
def test_alpha_zero_without_bos_gives_exactly_the_plain_logits(tiny, tmp_path, variant):
    """alpha = 0 (Eq. 18) and no BOS: the composition is computed but weighs 0 -> the plain model's logits, bit for
    bit (the composer is built last, so the same seed gives the same other weights)."""
    plain, _ = _model(tiny, tmp_path, variant, "concat")
    comp, _ = _model(tiny, tmp_path, variant, "concat", decor={"compose": True, "alpha": 0.0})
    assert comp.composer is not None
    for k, v in plain.state_dict().items():
        assert torch.equal(v, comp.state_dict()[k]), k
    plain.eval(), comp.eval()
    batch = _batch(tiny)
    codes = plain.catalog.item_codes(batch.target)
    with torch.no_grad():
        for a, b in zip(plain.level_logits(batch, codes), comp.level_logits(batch, codes)):
            assert torch.equal(a, b)
        a = beam_search(plain.decoder(batch), plain.trie, len(codes), plain.levels, 5)
        b = beam_search(comp.decoder(batch), comp.trie, len(codes), comp.levels, 5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scores, b.scores)


def test_composition_weights_sum_to_one_over_same_level_codes(tiny, tmp_path):
    model, _ = _model(tiny, tmp_path, "flatten", decor=FULL)
    model.eval()
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    comp = model.composer
    with torch.no_grad():
        _, _, _, tok = model._inputs(batch, with_items=False)
        st = model._history_pool(tok, batch.mask)
        gen = model.tokens(codes[:, :2])
        tables = model._level_tables()
        out, ws = comp.compose(st, gen, tables, with_weights=True)
        ws_model, wb = model.composition_weights(batch, codes)
        for j, w in enumerate(ws):
            assert w.shape == (len(codes), model.codebook_size) and (w > 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(len(codes)))
            torch.testing.assert_close(ws_model[j], w)
            # Eq. 17-18: the composition is a convex combination of level j's codes only
            torch.testing.assert_close(out[:, j], comp.alpha * (w @ tables[j]) + (1 - comp.alpha) * gen[:, j])
            other = [t if i == j else t + 100.0 for i, t in enumerate(tables)]  # change every other level's codes
            torch.testing.assert_close(comp.compose(st, gen, other, positions=[j])[:, 0], out[:, j])
        assert wb.shape == (len(codes), 4)
        torch.testing.assert_close(wb.sum(-1), torch.ones(len(codes)))


def _tf_log_probs(model, batch, codes):
    logits = model.level_logits(batch, codes)
    out = []
    for l, z in enumerate(logits):
        lp = masked_log_softmax(z.float(), model.trie.valid_mask(codes[:, :l], level=l))
        out.append(lp.gather(1, codes[:, l:l + 1])[:, 0])
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant,decor", COMPOSED)
def test_kv_cached_decoder_equals_teacher_forcing(tiny, tmp_path, variant, decor):
    """Along the target path the cached decoder's logits equal the teacher-forced ones; a beam wider than the catalog
    (beams reordered at every level) scores every SID with its teacher-forced log-probability."""
    model, _ = _model(tiny, tmp_path, variant, decor=decor)
    _step(model, _batch(tiny), steps=2)  # away from the initialisation
    model.eval()
    batch = _batch(tiny)
    assert_decode_matches_teacher_forcing(model, batch)
    with torch.no_grad():
        small = HistoryBatch(batch.items[:3])
        res = beam_search(model.decoder(small), model.trie, 3, model.levels, beam_size=model.catalog.num_items + 8)
        assert int(res.valid.sum(1).min()) == model.catalog.num_items
        b, k = res.valid.nonzero(as_tuple=True)
        ref = _tf_log_probs(model, HistoryBatch(small.items[b]), res.codes[b, k]).sum(1)
    torch.testing.assert_close(res.scores[b, k], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,decor", COMPOSED)
def test_level_logits_do_not_depend_on_codes_at_or_after_their_level(tiny, tmp_path, variant, decor):
    model, _ = _model(tiny, tmp_path, variant, decor=decor)
    model.eval()
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref = model.level_logits(batch, codes)
        for l in range(model.levels):
            changed = codes.clone()
            changed[:, l:] = torch.randint(0, model.codebook_size, changed[:, l:].shape, generator=g)
            assert (changed[:, l:] != codes[:, l:]).any()
            got = model.level_logits(batch, changed)
            for i in range(l + 1):
                torch.testing.assert_close(got[i], ref[i], rtol=0, atol=1e-6)
            if l + 1 < model.levels:  # ... but the next level does see code l (the fed-back, composed token)
                assert (got[l + 1] - ref[l + 1]).abs().max() > 1e-6


def test_context_includes_the_current_code(tiny, tmp_path):
    """context_current (default): the composed embedding of c^l depends on c^l through u_c, not only through the
    residual; without it the composed part is the same for every code at that position."""
    for current in (True, False):
        model, _ = _model(tiny, tmp_path, "flatten", decor={"compose": True, "alpha": 1.0, "context_current": current})
        model.eval()
        batch = _batch(tiny, 2)
        with torch.no_grad():
            _, _, _, tok = model._inputs(batch, with_items=False)
            st = model._history_pool(tok, batch.mask)
            a = model.composer.compose(st, model.tokens(torch.tensor([[1], [1]])), model._level_tables())
            b = model.composer.compose(st, model.tokens(torch.tensor([[5], [5]])), model._level_tables())
        assert ((a - b).abs().max() > 1e-6) == current


def test_overfit_tiny_catalogue_with_full_decor(tiny, tmp_path):
    """Fusion + composition + BOS: a handful of sequences is memorised; beam search ranks every target first."""
    model, _ = _model(tiny, tmp_path, "flatten", decor=FULL)
    assert_overfits(model, _batch(tiny, 8), steps=150, weight_decay=0.1)


def test_composer_parameters_train_and_usage_report(tiny, tmp_path):
    from comeir_dist.model.decor import composition_usage

    model, _ = _model(tiny, tmp_path, "flatten", decor=FULL)
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie).backward()
    for n, p in model.named_parameters():
        if n.startswith("composer.") or n.startswith("tokens.fuse."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    hist, tgt = training_samples(tiny, 8)
    rep = composition_usage(model, hist[:20], tgt[:20], batch_size=8)
    assert model.training and rep["users"] == 20 and [r["level"] for r in rep["levels"]] == [1, 2]
    for r in rep["levels"]:
        assert r["candidates"] == 8 and r["tokens"] == 20
        assert 1 <= r["above_uniform_mean"] <= r["above_uniform_any"] <= 8 and 1 <= r["static_codes_used"] <= 8
    assert rep["bos"]["candidates"] == 4


# ---- experiment arms ---------------------------------------------------------------------------------------------
def test_arms_table_and_errors(tiny, tmp_path):
    from comeir_dist.train.experiment import ARMS, arm_config, run_experiment

    cfg = tiny_run_config(tiny, tmp_path / "exp")
    rows = {a: arm_config(cfg, a).model for a in ("decor-base", "decor-comp", "decor-comp-bos", "decor-pre",
                                                    "decor-pre-comp", "decor-full", "decor-frozen")}
    assert {a: (m.token_fusion, m.decor.compose, m.decor.bos_queries) for a, m in rows.items()} == {
        "decor-base": ("learned", False, 0), "decor-comp": ("learned", True, 0),
        "decor-comp-bos": ("learned", True, 32), "decor-pre": ("decor", False, 0),
        "decor-pre-comp": ("decor", True, 0), "decor-full": ("decor", True, 32), "decor-frozen": ("pretrained", False, 0)}
    cfg.model.decor = {"compose": True, "bos_queries": 8, "alpha": 0.5}
    full = arm_config(cfg, "decor-full").model.decor
    assert (full.bos_queries, full.alpha) == (8, 0.5)  # the config's N and alpha are kept
    assert arm_config(cfg, "decor-base").model.decor.bos_queries == 0
    assert len(ARMS) >= 6
    with pytest.raises(UserError, match="unknown arm"):
        run_experiment(cfg, ["flatten"], 1, arms=["decor-nope"])
    with pytest.raises(UserError, match="compose"):  # checked before anything trains
        run_experiment(cfg, ["flatten", "comeir"], 1, arms=["decor-base", "decor-comp"])
    assert not (tmp_path / "exp" / "results").exists()
    with pytest.raises(UserError, match="--label"):
        run_experiment(cfg, ["flatten"], 1, label="x", arms=["decor-base"])


def test_experiment_runs_arms_side_by_side(tiny, tmp_path):
    from comeir_dist.train.experiment import run_experiment

    cfg = tiny_run_config(tiny, tmp_path / "exp", max_steps=2, eval_every=2, lr_schedule="plateau")
    cfg.model.variant = "flatten"
    table = run_experiment(cfg, ["flatten"], 1, arms=["decor-pre", "decor-comp-bos"])
    res = tmp_path / "exp" / "results"
    assert sorted(p.name for p in res.glob("*.json")) == ["decor-comp-bos-seed42.json", "decor-pre-seed42.json"]
    row = json.loads((res / "decor-comp-bos-seed42.json").read_text())
    assert row["arm"] == "decor-comp-bos" and row["model"]["decor"]["bos_queries"] == 32
    assert row["arm_overrides"]["model.token_fusion"] == "learned"
    usage = row["composition_usage"]
    assert usage == json.loads((tmp_path / "exp" / "decor-comp-bos-seed42" / "composition_usage.json").read_text())
    assert [r["level"] for r in usage["levels"]] == [1, 2] and usage["bos"]["candidates"] == 32
    assert "composition_usage" not in json.loads((res / "decor-pre-seed42.json").read_text())
    assert "| decor-pre |" in table and "| decor-comp-bos |" in table


def test_cli_experiment_arms_flag(tiny, tmp_path, monkeypatch):
    import yaml

    from comeir_dist.cli import main
    from comeir_dist.train import experiment

    seen = {}
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda cfg, variants, seeds, label=None, overwrite=False, arms=None: seen.update(
                            variants=variants, arms=arms, alpha=cfg.model.decor.alpha) or "table")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(tiny, tmp_path / "exp").model_dump(mode="json")))
    assert main(["experiment", "--config", str(cfg), "--arms", "decor-base,decor-full", "--seeds", "1",
                 "--set", "model.decor.alpha=0.55"]) == 0
    assert seen == {"variants": ["flatten"], "arms": ["decor-base", "decor-full"], "alpha": 0.55}
