"""Model behaviour on tiny configs: training/decoding consistency, KV cache, masking, overfitting."""
import pytest
import torch

from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.loss import constrained_sid_loss
from comeir_dist.train.samples import training_samples, to_batch
from comeir_dist.train.setup import build_sharded_model, dense_parameters, load_inputs
from tests.fixtures import assert_overfits, make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _model(ds, tmp_path, variant, **kw):
    cfg = tiny_run_config(ds, tmp_path / variant, variant=variant, **kw)
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu")), cfg


def _batch(ds):
    hist, tgt = training_samples(ds, 8)
    return to_batch(hist[:12], tgt[:12], "cpu")


@pytest.mark.parametrize("variant", ["comeir", "flatten", "tm"])
def test_decode_step_matches_teacher_forcing(tiny, tmp_path, variant):
    """Level-l logits of the decoder (KV cache / candidate memory reads) equal the training path."""
    model, _ = _model(tiny, tmp_path, variant)
    model.eval()
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    with torch.no_grad():
        tf = model.level_logits(batch, codes)
        step = model.decoder(batch)
        b = codes.shape[0]
        parent = None
        for l in range(model.levels):
            prefixes = codes[:, :l].unsqueeze(1)
            out = step(l, prefixes, parent)[:, 0]
            valid = model.trie.valid_mask(codes[:, :l], level=l)
            torch.testing.assert_close(out[valid], tf[l][valid], rtol=1e-4, atol=1e-4)
            parent = torch.zeros(b, 1, dtype=torch.long)


def test_history_padding_does_not_change_output(tiny, tmp_path):
    model, _ = _model(tiny, tmp_path, "comeir")
    model.eval()
    batch = _batch(tiny)
    items = batch.items
    more_pad = torch.cat([torch.full((items.shape[0], 3), -1), items], dim=1)
    codes = model.catalog.item_codes(batch.target)
    with torch.no_grad():
        a = model.level_logits(batch, codes)
        b = model.level_logits(HistoryBatch(more_pad, batch.target), codes)
    for x, y in zip(a, b):
        v = torch.isfinite(x)
        torch.testing.assert_close(x[v], y[v], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["comeir", "tm"])
def test_overfit_handful_of_sequences(tiny, tmp_path, variant):
    """A few sequences are memorised: beam search ranks every target's SID first."""
    model, cfg = _model(tiny, tmp_path, variant)
    hist, tgt = training_samples(tiny, 8)
    batch = to_batch(hist[:8], tgt[:8], "cpu")
    assert_overfits(model, batch)


def test_tables_trained_by_fused_optimizer_not_dense(tiny, tmp_path):
    from comeir_dist.parallel.engram_tables import full_tables_state

    model, _ = _model(tiny, tmp_path, "comeir")
    dense = {id(p) for p in dense_parameters(model)}
    table_params = [p for m in model.tables.collections().values() for p in m.parameters()]
    assert table_params and not any(id(p) in dense for p in table_params)
    before = full_tables_state(model.tables)
    batch = _batch(tiny)
    codes = model.catalog.item_codes(batch.target)
    constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie).backward()  # no optimizer.step()
    after = full_tables_state(model.tables)
    changed = sum(int((after[g][k] != before[g][k]).any(dim=1).sum()) for g in before for k in before[g])
    assert changed > 0, "fused row-wise Adagrad must update looked-up rows inside backward"
    total = sum(before[g][k].shape[0] for g in before for k in before[g])
    assert changed < total
