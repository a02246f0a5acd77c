"""engram.cross_fit (engram/cross_fit.py): folds per history, two rows per key, reads of the other fold's row with
gradients into the own fold's row, and the same logits in training, teacher-forced evaluation and decoding."""
from __future__ import annotations

import pytest
import torch

from comeir_dist.engram.cross_fit import fold_rows, history_fold, straight_through
from comeir_dist.model.factory import build_model
from comeir_dist.model.history import HistoryBatch
from comeir_dist.train.samples import pad_left, training_samples
from comeir_dist.train.setup import load_inputs
from tests.fixtures import (assert_decode_matches_teacher_forcing, engram_table_weight, make_tiny_dataset,
                            tiny_run_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossfit")
    ds = make_tiny_dataset(root, n_users=16, n_items=30, seq_len=7)
    cfg = tiny_run_config(ds, root / "run")
    cfg.engram.cross_fit = True
    sids, emb = load_inputs(cfg)
    return cfg, sids, emb


def _model(tiny, cross_fit=True):
    cfg, sids, emb = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.engram.cross_fit = cross_fit
    torch.manual_seed(0)
    return build_model(cfg, sids.codes, sids.codebooks, emb)


def test_history_fold_is_the_oldest_items_and_ignores_later_items():
    items = torch.as_tensor(pad_left([[5, 1, 2], [5, 1], [5], [7, 9], [], [8]], 4))
    f = history_fold(items)
    assert f.dtype == torch.long and set(f.tolist()) <= {0, 1}
    assert f[0] == f[1] == f[2]  # every prefix of one user (same oldest item) is in one fold
    assert f[4] == 0  # an empty row
    folds = history_fold(torch.arange(200).reshape(-1, 1))
    assert 60 < int(folds.sum()) < 140  # both folds are used, about evenly


def test_fold_rows_is_a_permutation_with_two_distinct_rows_per_key():
    rows = 97
    ids = torch.arange(rows)
    f0, f1 = fold_rows(ids, torch.zeros(rows), rows), fold_rows(ids, torch.ones(rows), rows)
    assert torch.equal(f0, ids)
    assert torch.equal(torch.sort(f1).values, ids) and bool((f0 != f1).all())


def test_straight_through_forwards_read_and_trains_write():
    read, write = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    out = straight_through(read, write)
    torch.testing.assert_close(out, read)
    (out * torch.arange(4.0)).sum().backward()
    assert read.grad is None or not read.grad.any()
    torch.testing.assert_close(write.grad, torch.arange(4.0).expand(3, 4))


def test_a_key_reads_the_other_folds_row_and_trains_its_own(tiny):
    model = _model(tiny)
    idx = model.lookup.index["inter_l1"]
    spec = idx.heads("inter", 1, 1)[0]
    keys = torch.arange(6).reshape(6, 1)
    fold = torch.tensor([0, 0, 0, 1, 1, 1])
    lp = model.lookup.new_pass(fold)
    h = lp.add("inter", 1, 1, keys, torch.ones(6, dtype=torch.bool), fold)
    lp.run(model.tables)
    addr = lp[h]  # [6, d_m]: the K_T heads side by side
    w = engram_table_weight(model, spec.name)
    slot = idx.hashers[spec.name](keys)
    read_rows, write_rows = fold_rows(slot, 1 - fold, spec.rows), fold_rows(slot, fold, spec.rows)
    torch.testing.assert_close(addr[:, : spec.dim], w[read_rows].detach())
    addr[:, : spec.dim].sum().backward()
    touched = set(torch.nonzero(w.grad.abs().sum(1)).flatten().tolist())
    assert touched == set(write_rows.tolist()) and not touched & (set(read_rows.tolist()) - touched)
    assert set(read_rows.tolist()) != set(write_rows.tolist())


def test_without_gradients_only_the_read_row_is_looked_up(tiny):
    model = _model(tiny)
    fold = torch.tensor([0, 1])
    keys = torch.arange(2).reshape(2, 1)
    with torch.no_grad():
        lp = model.lookup.new_pass(fold)
        lp.add("inter", 1, 1, keys, torch.ones(2, dtype=torch.bool), fold)
    assert all(r == w for _, r, w in lp.handles)
    assert sum(b.stride for b in lp.batches.values()) == 2


def _samples(tiny, n=12):
    cfg = tiny[0]
    hist, tgt = training_samples(cfg.dataset, cfg.max_history)
    return HistoryBatch(torch.as_tensor(hist[:n]), torch.as_tensor(tgt[:n]))


def test_training_and_evaluation_logits_agree_and_decoding_matches(tiny):
    model = _model(tiny).eval()
    batch = _samples(tiny)
    codes = model.catalog.item_codes(batch.target)
    train_logits = model.level_logits(batch, codes)
    assert train_logits[0].requires_grad
    eval_logits = assert_decode_matches_teacher_forcing(model, batch)
    for a, b in zip(train_logits, eval_logits):
        torch.testing.assert_close(a.detach(), b)


def test_cross_fit_changes_what_the_memories_read(tiny):
    on, off = _model(tiny, True).eval(), _model(tiny, False).eval()
    batch = _samples(tiny)
    codes = on.catalog.item_codes(batch.target)
    with torch.no_grad():
        a, b = on.level_logits(batch, codes), off.level_logits(batch, codes)
    assert any(not torch.allclose(x[torch.isfinite(x)], y[torch.isfinite(y)]) for x, y in zip(a, b))


def test_cross_fit_with_preference_memory_is_refused(tiny):
    from pydantic import ValidationError

    from comeir_dist.config.run import RunConfig

    d = tiny[0].model_dump()
    d["model"]["pref_memory"] = {**d["model"]["pref_memory"], "enabled": True}
    with pytest.raises(ValidationError, match="cross_fit"):
        RunConfig.model_validate(d)


def test_unwritten_without_cross_fit_is_refused(tiny):
    from pydantic import ValidationError

    from comeir_dist.config.run import RunConfig

    d = tiny[0].model_dump()
    d["engram"] = {**d["engram"], "cross_fit": False, "cross_fit_unwritten": "empty"}
    with pytest.raises(ValidationError, match="cross_fit_unwritten"):
        RunConfig.model_validate(d)


def _train_seqs(tiny):
    from comeir_dist.train.samples import train_sequences

    return train_sequences(tiny[0].dataset)


def test_fold_filter_marks_the_rows_each_folds_sequences_produce(tiny):
    from comeir_dist.engram.cross_fit import sequence_folds
    from comeir_dist.model.key_support import install_fold_filter, row_support

    model, max_history = _model(tiny), 4  # the 5-item sequences count in both folds, the 3-item ones in theirs
    seqs = [q if i % 3 == 0 else q[:3] for i, q in enumerate(_train_seqs(tiny))]
    folds = sequence_folds(seqs, max_history)
    live = install_fold_filter(model, seqs, max_history)
    assert live and all(0.0 < v <= 1.0 for v in live.values())
    expect = [{n: torch.zeros_like(v, dtype=torch.bool) for n, v in row_support(model, seqs[:1]).items()}
              for _ in (0, 1)]
    for q, f in zip(seqs, folds):  # one user at a time: its rows count in its fold, or in both when it is long
        for name, v in row_support(model, [q]).items():
            for k in ({0, 1} if len(q) > max_history else {f}):
                expect[k][name] |= v > 0
    for idx in model.lookup.index.values():
        for s in idx.specs:
            assert torch.equal(idx.fold_filter[s.name][0], expect[0][s.name]), s.name
            assert torch.equal(idx.fold_filter[s.name][1], expect[1][s.name]), s.name
    assert any(bool((idx.fold_filter[s.name][0] != idx.fold_filter[s.name][1]).any())
               for idx in model.lookup.index.values() for s in idx.specs)


def test_unwritten_rows_read_empty_and_untrained_rows_get_no_gradient(tiny):
    from comeir_dist.model.key_support import install_fold_filter

    model = _model(tiny)
    install_fold_filter(model, _train_seqs(tiny), tiny[0].max_history)
    idx = model.lookup.index["inter_l1"]
    spec = idx.heads("inter", 1, 1)[0]
    keys = torch.arange(64).reshape(-1, 1) % 64
    fold = torch.arange(64) % 2
    lp = model.lookup.new_pass(fold)
    h = lp.add("inter", 1, 1, keys, torch.ones(64, dtype=torch.bool), fold)
    lp.run(model.tables)
    addr = lp[h][:, : spec.dim]
    w, ff = engram_table_weight(model, spec.name), idx.fold_filter[spec.name]
    slot = idx.hashers[spec.name](keys).flatten()
    read_live, write_live = ff[1 - fold, slot], ff[fold, slot]
    assert bool(read_live.any()) and not bool(read_live.all())  # both cases occur
    read_rows = fold_rows(slot, 1 - fold, spec.rows)
    torch.testing.assert_close(addr[read_live], w[read_rows[read_live]].detach())
    assert not addr[~read_live].any()  # never-trained rows read the zero vector
    addr.sum().backward()
    touched = set(torch.nonzero(w.grad.abs().sum(1)).flatten().tolist())
    assert touched == set(fold_rows(slot, fold, spec.rows)[write_live].tolist())
