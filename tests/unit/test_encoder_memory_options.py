"""Round-22 encoder-memory options: engram.cross_fit_memories (which memories are cross-fitted),
model.encoder_memory_grad (the encoder reads the tables without writing them) and model.merge_gate_bias (the
initial b_l of the Eq. 7 merge gate)."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from comeir_dist.config.run import RunConfig
from comeir_dist.engram.cross_fit import fold_rows
from comeir_dist.errors import UserError
from comeir_dist.model.factory import build_model
from comeir_dist.model.history import HistoryBatch
from comeir_dist.train.samples import training_samples
from comeir_dist.train.setup import load_inputs
from tests.fixtures import (assert_decode_matches_teacher_forcing, engram_table_weight, make_tiny_dataset,
                            tiny_run_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("encmem")
    ds = make_tiny_dataset(root, n_users=16, n_items=30, seq_len=7)
    cfg = tiny_run_config(ds, root / "run")
    sids, emb = load_inputs(cfg)
    return cfg, sids, emb


def _model(tiny, **changes):
    cfg, sids, emb = tiny
    d = cfg.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        d[section][key] = value
    cfg = RunConfig.model_validate(d)
    torch.manual_seed(0)
    return build_model(cfg, sids.codes, sids.codebooks, emb)


def _batch(tiny, n=12):
    hist, tgt = training_samples(tiny[0].dataset, tiny[0].max_history)
    return HistoryBatch(torch.as_tensor(hist[:n]), torch.as_tensor(tgt[:n]))


def _touched_rows(model) -> dict[str, set[int]]:
    out = {}
    for ebc in model.tables.collections().values():
        for t, cfg in zip(ebc.embedding_bags.values(), ebc.embedding_bag_configs()):
            if t.weight.grad is not None:
                out[cfg.name] = set(torch.nonzero(t.weight.grad.abs().sum(1)).flatten().tolist())
    return out


def test_cross_fit_memories_inter_keeps_one_intra_row_per_key(tiny):
    model = _model(tiny, engram__cross_fit=True, engram__cross_fit_memories=["inter"])
    fold = torch.tensor([0, 0, 1, 1])
    keys = torch.arange(4).reshape(4, 1)
    ones = torch.ones(4, dtype=torch.bool)
    lp = model.lookup.new_pass(fold)
    h_intra = lp.add("intra", 2, 1, keys, ones, fold)
    h_inter = lp.add("inter", 1, 1, keys, ones, fold)
    assert lp.handles[h_intra][1] == lp.handles[h_intra][2]  # intra: one request, read row == written row
    assert lp.handles[h_inter][1] != lp.handles[h_inter][2]  # inter: still cross-fitted
    lp.run(model.tables)
    idx = model.lookup.index["intra_l2"]
    spec = idx.heads("intra", 2, 1)[0]
    slot = idx.hashers[spec.name](keys)
    torch.testing.assert_close(lp[h_intra][:, : spec.dim], engram_table_weight(model, spec.name)[slot.flatten()].detach())
    lp[h_intra].sum().backward()
    assert _touched_rows(model)[spec.name] == set(slot.flatten().tolist())  # the same rows, whatever the fold
    inter_spec = model.lookup.index["inter_l1"].heads("inter", 1, 1)[0]
    inter_slot = model.lookup.index["inter_l1"].hashers[inter_spec.name](keys)
    torch.testing.assert_close(lp[h_inter][:, : inter_spec.dim],
                               engram_table_weight(model, inter_spec.name)[fold_rows(inter_slot, 1 - fold, inter_spec.rows)
                                                               .flatten()].detach())


def test_cross_fit_memories_changes_logits_and_decoding_still_matches(tiny):
    both = _model(tiny, engram__cross_fit=True).eval()
    inter = _model(tiny, engram__cross_fit=True, engram__cross_fit_memories=["inter"]).eval()
    batch = _batch(tiny)
    codes = both.catalog.item_codes(batch.target)
    with torch.no_grad():
        a, b = both.level_logits(batch, codes), inter.level_logits(batch, codes)
    assert any(not torch.allclose(x[torch.isfinite(x)], y[torch.isfinite(y)]) for x, y in zip(a, b))
    assert_decode_matches_teacher_forcing(inter, batch)


@pytest.mark.parametrize("value,match", [([], "cross_fit_memories"), (["inter", "inter"], "cross_fit_memories"),
                                         (["outer"], "cross_fit_memories")])
def test_bad_cross_fit_memories_are_refused(tiny, value, match):
    d = tiny[0].model_dump()
    d["engram"] = {**d["engram"], "cross_fit": True, "cross_fit_memories": value}
    with pytest.raises(ValidationError, match=match):
        RunConfig.model_validate(d)


def test_unwritten_empty_needs_both_memories_cross_fitted(tiny):
    d = tiny[0].model_dump()
    d["engram"] = {**d["engram"], "cross_fit": True, "cross_fit_unwritten": "empty", "cross_fit_memories": ["inter"]}
    with pytest.raises(ValidationError, match="cross_fit_memories"):
        RunConfig.model_validate(d)


def _encoder_only_loss(model, batch):
    """A loss through the encoder's output alone (the head is not run): which rows does the encoder write?"""
    enc = model.encoder_pass(batch.items)
    return enc["r"].pow(2).sum()


def test_encoder_memory_grad_false_reads_but_never_writes(tiny):
    batch = _batch(tiny)
    writing, reading = _model(tiny), _model(tiny, model__encoder_memory_grad=False)
    _encoder_only_loss(writing, batch).backward()
    _encoder_only_loss(reading, batch).backward()
    assert any(_touched_rows(writing).values())  # the paper's encoder trains the rows it reads
    assert not any(_touched_rows(reading).values())
    with torch.no_grad():  # same forward values: only the gradient path differs
        torch.testing.assert_close(writing.encoder_pass(batch.items)["r"], reading.encoder_pass(batch.items)["r"])
    assert reading.encoder.w_mm.weight.grad is not None  # the dense encoder still trains


def test_encoder_memory_grad_false_still_trains_rows_through_the_head(tiny):
    model = _model(tiny, model__encoder_memory_grad=False)
    batch = _batch(tiny)
    logits = model.level_logits(batch, model.catalog.item_codes(batch.target))
    sum(x[torch.isfinite(x)].sum() for x in logits).backward()
    assert any(_touched_rows(model).values())


@pytest.mark.parametrize("model_changes", [{"comeir_head": "decoder"}, {"head_memory_grad": False}])
def test_encoder_memory_grad_false_needs_a_writing_head(tiny, model_changes):
    d = tiny[0].model_dump()
    d["model"] = {**d["model"], "encoder_memory_grad": False, **model_changes}
    with pytest.raises(ValidationError, match="encoder_memory_grad"):
        RunConfig.model_validate(d)


def test_merge_gate_bias_sets_the_initial_gate(tiny):
    batch = _batch(tiny)
    open_, closed = _model(tiny), _model(tiny, model__merge_gate_bias=-30.0)
    assert torch.equal(closed.encoder.b_m.detach(), torch.full_like(closed.encoder.b_m, -30.0))
    assert torch.equal(open_.encoder.b_m.detach(), torch.zeros_like(open_.encoder.b_m))
    with torch.no_grad():
        enc = closed.encoder_pass(batch.items)
        s0_only = closed.encoder.out_ln(enc["s0"]) * enc["mask"].unsqueeze(-1)
        # a closed gate (omega ~ e^-30) leaves r = LN(s^0): the memories do not reach the item vector
        torch.testing.assert_close(enc["r"], s0_only, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(open_.encoder_pass(batch.items)["r"], s0_only, atol=1e-3)


def test_merge_value_init_zero_starts_as_ln_of_s0_and_learns_w_v(tiny):
    batch = _batch(tiny)
    model = _model(tiny, model__merge_value_init="zero")
    assert all(not w.weight.any() for w in model.encoder.wv_m)
    enc = model.encoder_pass(batch.items)
    s0_only = model.encoder.out_ln(enc["s0"]) * enc["mask"].unsqueeze(-1)
    torch.testing.assert_close(enc["r"], s0_only)
    enc["r"].pow(3).sum().backward()
    assert any(w.weight.grad is not None and w.weight.grad.any() for w in model.encoder.wv_m)
    d = tiny[0].model_dump()
    d["model"] = {**d["model"], "merge_value_init": "small"}
    with pytest.raises(ValidationError, match="merge_value_init"):
        RunConfig.model_validate(d)


def test_merge_input_norm_starts_the_merge_from_ln_of_s0(tiny):
    batch = _batch(tiny)
    model = _model(tiny, model__merge_input_norm=True, model__merge_gate_bias=-30.0)
    with torch.no_grad():
        enc = model.encoder_pass(batch.items)
        ln = model.encoder.merge_in_ln(enc["s0"])
        # closed gate: r = LN_out(LN_in(s^0)); with the paper's merge (no input norm) r = LN_out(s^0)
        torch.testing.assert_close(enc["r"], model.encoder.out_ln(ln) * enc["mask"].unsqueeze(-1), atol=1e-5, rtol=1e-5)
    assert _model(tiny).encoder.merge_in_ln is None


def test_analyze_merge_reports_gate_and_memory_scale(tiny):
    from comeir_dist.analysis.merge_gate import format_merge_stats, merge_gate_stats

    batch = _batch(tiny)
    rows = merge_gate_stats(_model(tiny).eval(), batch.items, batch_size=5)
    closed = merge_gate_stats(_model(tiny, model__merge_gate_bias=-30.0).eval(), batch.items)
    real = int((batch.items >= 0).sum())
    assert [r["level"] for r in rows] == [1, 2, 3] and all(r["positions"] == real for r in rows)
    assert all(0 < r["omega_mean"] < 1 and r["memory_to_s0_median"] > 0 for r in rows)
    assert all(r["omega_mean"] < 1e-9 and r["memory_to_s0_median"] < 1e-9 for r in closed)
    assert "| 3 |" in format_merge_stats(rows, "t")
    # the paper's merge adds to s^0 itself; under merge_input_norm to LN(s^0), whose norm the second ratio uses
    assert all(r["merge_start"] == "s0" and r["memory_to_start_median"] == pytest.approx(r["memory_to_s0_median"])
               for r in rows)
    normed = merge_gate_stats(_model(tiny, model__merge_input_norm=True).eval(), batch.items)
    d = _model(tiny).encoder.out_ln.normalized_shape[0]
    assert all(r["merge_start"] == "LN(s0)" and r["start_norm_median"] == pytest.approx(d ** 0.5, rel=1e-3)
               for r in normed)
    assert all(r["memory_to_start_median"] < r["memory_to_s0_median"] for r in normed)
    with pytest.raises(UserError, match="memory-conditioned merge"):
        merge_gate_stats(_model(tiny, model__ablations=["no_memory_merge"]), batch.items)
