"""``model.comeir_head: decoder`` (extension): ComeIR's inputs R^I with the Normal-GR decoder of tm / flatten.

The KV-cached decoder equals teacher forcing, level-l logits do not depend on codes at levels >= l, the training
path reads the Engram tables (sparse gradients flow), a handful of sequences is memorised, and the config refuses the
head options that do not apply with a one-line error.
"""
import pytest
import torch

from comeir_dist.config.run import RunConfig
from comeir_dist.model.loss import constrained_sid_loss
from comeir_dist.train.samples import to_batch, training_samples
from comeir_dist.train.setup import build_sharded_model, load_inputs
from tests.fixtures import (assert_decode_matches_teacher_forcing, assert_overfits, make_tiny_dataset,
                            tiny_run_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _cfg(ds, out, **model):
    d = tiny_run_config(ds, out).model_dump()
    d["model"].update({"comeir_head": "decoder", **model})
    return RunConfig.model_validate(d)


def _model(ds, tmp_path):
    cfg = _cfg(ds, tmp_path / "run")
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu"))


def _batch(ds, n=12):
    hist, tgt = training_samples(ds, 8)
    return to_batch(hist[:n], tgt[:n], "cpu")


def test_decoder_head_replaces_the_memory_head(tiny, tmp_path):
    model = _model(tiny, tmp_path)
    assert model.head is None and len(model.out) == model.levels
    assert all(o.out_features == model.codebook_size for o in model.out)


def test_cached_decode_equals_teacher_forcing(tiny, tmp_path):
    model = _model(tiny, tmp_path)
    model.eval()
    assert_decode_matches_teacher_forcing(model, _batch(tiny))


def test_level_logits_do_not_see_codes_at_or_after_their_level(tiny, tmp_path):
    model = _model(tiny, tmp_path)
    model.eval()
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    with torch.no_grad():
        ref = model.level_logits(batch, codes)
        for l in range(model.levels):
            changed = codes.clone()
            changed[:, l:] = (changed[:, l:] + 1) % model.codebook_size
            out = model.level_logits(batch, changed)
            for j in range(l + 1):
                torch.testing.assert_close(out[j], ref[j])
            if l + 1 < model.levels:  # the next level does see code l
                assert not torch.allclose(out[l + 1], ref[l + 1])


def test_training_reads_and_writes_the_engram_tables(tiny, tmp_path):
    """The encoder's memory reads stay in the graph: backward (fused row-wise Adagrad) changes touched rows."""
    from comeir_dist.parallel.engram_tables import full_tables_state

    model = _model(tiny, tmp_path)
    batch = _batch(tiny)
    before = full_tables_state(model.tables)
    codes = model.catalog.item_codes(batch.target)
    constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie).backward()
    after = full_tables_state(model.tables)
    changed = sum(int((after[g][k] != before[g][k]).any(dim=1).sum()) for g in before for k in before[g])
    assert changed > 0, "no Engram table row was updated"


def test_overfit_handful_of_sequences(tiny, tmp_path):
    model = _model(tiny, tmp_path)
    batch = _batch(tiny, 8)
    assert_overfits(model, batch)


@pytest.mark.parametrize("model, field", [({"decoding": "nezha"}, "decoding"),
                                          ({"head_interaction": "dot"}, "head_interaction"),
                                          ({"ablations": ["no_d_inter"]}, "ablations"),
                                          ({"variant": "tm"}, "variant")])
def test_config_refuses_head_options_that_do_not_apply(tiny, tmp_path, model, field):
    with pytest.raises(ValueError, match=f"comeir_head=decoder .*conflicting: {field}"):
        _cfg(tiny, tmp_path / "bad", **model)
