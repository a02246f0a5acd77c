"""engram.min_key_users (model/key_support.py): row support counts distinct users exactly, filtered keys are empty
bags, and a trained run evaluates the same after reloading (the filter is recomputed deterministically)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comeir_dist.data.dataset import read_split
from comeir_dist.model.factory import build_model
from comeir_dist.model.key_support import install_key_filter, row_support
from comeir_dist.train.setup import load_inputs
from tests.fixtures import make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("keysupport")
    ds = make_tiny_dataset(root, n_users=14, n_items=30, seq_len=7)
    cfg = tiny_run_config(ds, root / "run")
    sids, emb = load_inputs(cfg)
    seqs = [np.asarray(s, dtype=np.int64) for s in read_split(ds, "train").column("items").to_pylist()]
    return cfg, sids, emb, seqs


def _model(tiny):
    cfg, sids, emb, _ = tiny
    torch.manual_seed(0)
    return build_model(cfg, sids.codes, sids.codebooks, emb)


def _rows_of_one_user(model, seq) -> dict[str, set]:
    """Brute force: the rows the encoder's keys of ONE user's sequence address, per table."""
    sup = row_support(model, [seq], batch_users=1)
    return {name: set(torch.nonzero(v).flatten().tolist()) for name, v in sup.items()}


def test_support_counts_distinct_users_like_one_user_at_a_time(tiny):
    seqs = tiny[3]
    model = _model(tiny)
    batched = row_support(model, seqs, batch_users=4)  # chunks of 4 users: ownership inside a chunk matters
    brute: dict[str, np.ndarray] = {n: np.zeros(v.numel(), np.int64) for n, v in batched.items()}
    for s in seqs:
        for name, rows in _rows_of_one_user(model, s).items():
            brute[name][list(rows)] += 1
    assert any(v.max() > 1 for v in brute.values()) and any(((v == 1).sum()) > 0 for v in brute.values())
    for name, v in batched.items():
        assert np.array_equal(v.numpy().astype(np.int64), brute[name]), name


def test_keys_of_single_user_rows_are_empty_bags(tiny):
    seqs = tiny[3]
    model = _model(tiny)
    support = row_support(model, seqs)
    live = install_key_filter(model, seqs, min_users=2)
    assert live and all(0.0 <= v <= 1.0 for v in live.values())
    idx = model.lookup.index["inter_l2"]
    spec = idx.heads("inter", 2, 1)[0]
    units = torch.arange(40).reshape(-1, 1) % 64  # order-1 keys: one unit each
    batch = idx.new_batch()
    batch.add_key("inter", 2, 1, units, torch.ones(40, dtype=torch.bool))
    kjt = batch.kjt()
    lengths = kjt.lengths().reshape(len(idx.features), -1)[idx.features.index(spec.name)][:40]
    rows = idx.hashers[spec.name](units)
    assert torch.equal(lengths.bool(), support[spec.name][rows] >= 2)  # live iff >= 2 users address the row
    assert 0 < int(lengths.sum()) < 40


def test_min_key_users_one_installs_nothing(tiny):
    model = _model(tiny)
    assert install_key_filter(model, tiny[3], min_users=1) == {}
    assert all(idx.row_filter is None for idx in model.lookup.index.values())


@pytest.mark.parametrize("setting", ["min_key_users", "cross_fit_unwritten"])
def test_trained_run_evaluates_the_same_after_reload(tmp_path, setting):
    """The filters are recomputed on load (nothing stored): the best checkpoint re-evaluated on the validation users
    gives exactly the validation NDCG the training loop recorded for it."""
    from comeir_dist.eval.run_eval import run_evaluate
    from comeir_dist.train.loop import train

    ds = make_tiny_dataset(tmp_path, n_users=16, n_items=30, seq_len=7)
    cfg = tiny_run_config(ds, tmp_path / "run", max_steps=6, eval_every=3, eval_users=None, batch_size=16)
    if setting == "cross_fit_unwritten":
        cfg.engram.cross_fit, cfg.engram.cross_fit_unwritten = True, "empty"
    else:
        cfg.engram.min_key_users = 2
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    rep = run_evaluate(str(run / "best"), "valid", str(tmp_path / "valid.json"))
    assert rep["metrics"]["item/ndcg@10"] == pytest.approx(summary["best_valid_ndcg@10"], abs=1e-9)
    from comeir_dist.eval.run_eval import load_model_from_checkpoint

    model = load_model_from_checkpoint(run / "best")[0]  # the loader installed the same filter again
    if setting == "cross_fit_unwritten":
        assert all(idx.fold_filter is not None and idx.row_filter is None for idx in model.lookup.index.values())
        return
    support = row_support(model, [np.asarray(s) for s in read_split(ds, "train").column("items").to_pylist()])
    for idx in model.lookup.index.values():
        assert idx.row_filter is not None
        for s in idx.specs:
            assert torch.equal(idx.row_filter[s.name].cpu(), support[s.name] >= 2)


def test_analyze_keys_cli(tiny, tmp_path):
    """`comeir analyze keys`: per-group occupancy / private share from the same support counts; JSON + markdown."""
    import contextlib
    import io

    import yaml

    from comeir_dist import cli

    cfg = tiny[0]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "keys.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["analyze", "keys", "--config", str(path), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert "| memory | level | order |" in buf.getvalue() and out.with_suffix(".md").is_file()
    support = row_support(_model(tiny), tiny[3])
    for t in rep["tables"]:
        v = support[t["table"]]
        assert (t["addressed"], t["private"]) == (int((v > 0).sum()), int((v == 1).sum()))
    assert sum(g["heads"] for g in rep["groups"]) == len(rep["tables"])
    # cross-fit reads, brute force one user at a time: a user of fold f reads the other fold's row of each key it
    # addresses; "unwritten" when no user of that other fold addresses the row
    from comeir_dist.engram.cross_fit import sequence_folds

    folds = sequence_folds(tiny[3], cfg.max_history)
    assert rep["users_per_fold"] == [folds.count(0), folds.count(1)] and 0 < folds.count(0) < len(folds)
    per_user = [_rows_of_one_user(_model(tiny), q) for q in tiny[3]]
    for t in rep["tables"]:
        written = [set().union(*(u[t["table"]] for u, f in zip(per_user, folds) if f == k)) for k in (0, 1)]
        reads = sum(len(u[t["table"]]) for u in per_user)
        unwritten = sum(len(u[t["table"]] - written[1 - f]) for u, f in zip(per_user, folds))
        assert (t["cross_fit_reads"], t["cross_fit_unwritten"]) == (reads, unwritten), t["table"]
    assert any(t["cross_fit_unwritten"] > 0 for t in rep["tables"])
    assert all(0 <= g["cross_fit_unwritten_share"] <= 1 for g in rep["groups"])
    assert all(0 <= g["occupancy"] <= 1 and 0 <= g["private_share"] <= 1 for g in rep["groups"])
    # engram.cross_fit_memories: [inter] -- intra keys keep one row per key, so none of their reads is unwritten
    out2 = tmp_path / "keys_inter.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["analyze", "keys", "--config", str(path), "--out", str(out2), "--set", "engram.cross_fit=true",
                         "--set", "engram.cross_fit_memories=[inter]"]) == 0
    rep2 = {t["table"]: t for t in json.loads(out2.read_text())["tables"]}
    for t in rep["tables"]:
        want = 0 if t["memory"] == "intra" else t["cross_fit_unwritten"]
        assert rep2[t["table"]]["cross_fit_unwritten"] == want, t["table"]
    assert any(t["memory"] == "intra" and t["cross_fit_unwritten"] > 0 for t in rep["tables"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["analyze", "keys", "--config", str(path), "--set", "model.variant=tm"]) != 0
        assert cli.main(["analyze", "keys", "--config", str(path), "--out", str(tmp_path)]) != 0
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 2 and "comeir only" in lines[0] and "is a directory" in lines[1]
