"""`comeir analyze ensemble`: fusion of a SID model's and SASRec's top-N lists (fixed weight / adaptive on MSP),
chosen on validation only. Synthetic top-N files in the layout `comeir evaluate --save-top` writes."""
import json

import numpy as np

from comeir_dist.analysis.ensemble import (TopN, candidates, choose, fused_order, minmax, run_ensemble,
                                           target_ranks)
from comeir_dist.eval.run_eval import write_top

N_ITEMS, TOP = 30, 8


def _lists(rng, users, target, hit, n_items=N_ITEMS, top=TOP, ties=False, pad=0):
    """Top-``top`` lists; the target is listed first for the users in ``hit``, absent otherwise."""
    items = np.zeros((len(users), top), np.int64)
    for u, t in enumerate(target):
        others = rng.permutation([i for i in range(n_items) if i != t])[:top]
        items[u] = np.concatenate([[t], others[:top - 1]]) if hit[u] else others
    scores = np.sort(rng.normal(size=(len(users), top)), axis=1)[:, ::-1].copy()
    if ties:  # SID collision groups: runs of equal beam scores
        scores[:, 2] = scores[:, 1]
        scores[:, 5] = scores[:, 4] = scores[:, 3]
    if pad:  # dead beams
        items[:, top - pad:], scores[:, top - pad:] = -1, -np.inf
    return items, scores


def _top(split, users, target, items, scores, msp=None, variant="flatten"):
    return TopN(path=None, split=split, variant=variant, users=np.asarray(users), target=np.asarray(target),
                items=items, scores=scores, msp=msp)


def _pair(seed=0, n_users=60):
    """GR lists the target for users with a low SASRec MSP, SASRec (rank 1) for those with a high one."""
    rng = np.random.default_rng(seed)
    users = np.arange(n_users)
    target = rng.integers(0, N_ITEMS, n_users)
    msp = rng.uniform(0, 1, n_users)
    gr = _lists(rng, users, target, msp < 0.5, ties=True, pad=1)
    idm = _lists(rng, users, target, msp >= 0.5)
    return users, target, msp, gr, idm


def test_minmax_per_instance():
    s = np.array([[3.0, 1.0, 2.0], [5.0, 5.0, -np.inf]])
    np.testing.assert_allclose(minmax(s), [[1.0, 0.0, 0.5], [1.0, 1.0, 0.0]])


def test_alpha_one_is_sasrec_and_alpha_zero_the_sid_model():
    users, target, msp, (gi, gs), (ii, is_) = _pair()
    c = candidates(_top("valid", users, target, gi, gs), _top("valid", users, target, ii, is_, msp, "sasrec"), target)
    gr_order, id_order = fused_order(c, 0.0), fused_order(c, 1.0)
    listed = gi >= 0
    for u in range(len(users)):
        assert gr_order[u, :listed[u].sum()].tolist() == gi[u, listed[u]].tolist()  # collision groups keep order
        assert id_order[u, :TOP].tolist() == ii[u].tolist()
    # the fast target ranks are the positions in the full ordering, for any per-instance weights
    for alpha in (0.0, 1.0, 0.3, np.random.default_rng(1).uniform(size=len(users))):
        order = fused_order(c, alpha)
        expect = [(list(order[u]).index(t) + 1) if t in order[u] else 0 for u, t in enumerate(target)]
        assert target_ranks(c, alpha).tolist() == expect


def test_adaptive_weight_takes_the_better_model_per_instance():
    users, target, msp, (gi, gs), (ii, is_) = _pair()
    ch = choose(_top("valid", users, target, gi, gs), _top("valid", users, target, ii, is_, msp, "sasrec"))
    v = ch.valid
    key = "item/ndcg@10"
    assert v["adaptive"][key] > 0.95  # (items both lists hold can still outrank a target near tau)
    assert v["adaptive"][key] > max(v["gr"][key], v["id"][key], v["fixed"][key])
    assert 0.3 <= ch.tau <= 0.7 and ch.alpha in [round(0.1 * i, 1) for i in range(10)]


def _write_run(d, split, users, target, items, scores, msp=None, variant="flatten"):
    d.mkdir(parents=True, exist_ok=True)
    info = {"split": split, "variant": variant, "checkpoint": str(d / "best"), "step": 1, "top_n": TOP,
            "beam_size": TOP, "scores": "logit" if msp is not None else "beam log-probability"}
    write_top(d / f"{split}.top.parquet", users, target, items, scores, msp, info)


def _write_pair(root, seed, split, target_override=None):
    users, target, msp, (gi, gs), (ii, is_) = _pair(seed)
    if target_override is not None:
        target = target_override
    _write_run(root / "gr", split, users, target, gi, gs)
    _write_run(root / "id", split, users, target, ii, is_, msp, "sasrec")
    return target


def test_selection_never_reads_test_targets(tmp_path):
    _write_pair(tmp_path, 0, "valid")
    test_target = _write_pair(tmp_path, 1, "test")
    rep = run_ensemble(str(tmp_path / "gr"), str(tmp_path / "id" / "test.top.parquet"), str(tmp_path / "out"), top=TOP)
    # perturb the test targets (both files, consistently): the chosen parameters stay, the test metrics move
    _write_pair(tmp_path, 1, "test", target_override=(test_target + 7) % N_ITEMS)
    rep2 = run_ensemble(str(tmp_path / "gr"), str(tmp_path / "id"), str(tmp_path / "out2"), top=TOP)
    assert rep2["chosen"] == rep["chosen"] and rep2["selection"] == rep["selection"]
    assert rep2["test"]["metrics"] != rep["test"]["metrics"]
    assert rep["chosen"]["alpha"] in [round(0.1 * i, 1) for i in range(10)]
    for name in ("gr", "id", "fixed", "adaptive"):
        assert 0 <= rep["test"]["metrics"][name]["item/ndcg@10"] <= 1
    assert rep["inputs"]["id"]["variant"] == "sasrec" and rep["test"]["users"] == 60


def test_cli_writes_json_and_markdown_into_an_analysis_dir(tmp_path, capsys):
    from comeir_dist.cli import main

    _write_pair(tmp_path, 0, "valid")
    _write_pair(tmp_path, 1, "test")
    out = tmp_path / "ens"
    assert main(["analyze", "ensemble", "--gr", str(tmp_path / "gr"), "--id", str(tmp_path / "id"), "--top", "6",
                 "--out", str(out), "--k-grid", "5,50"]) == 0
    assert "adaptive k=" in capsys.readouterr().out
    rep = json.loads((out / "ensemble.json").read_text())
    assert rep["top"] == 6 and rep["selection"]["k_grid"] == [5.0, 50.0] and len(rep["selection"]["adaptive_grid"]) == 38
    assert (out / "ensemble.md").read_text().startswith("# Ensemble")
    assert json.loads((out / ".comeir-output.json").read_text())["kind"] == "analysis"
    # bad inputs: one line, exit 2
    assert main(["analyze", "ensemble", "--gr", str(tmp_path / "gr"), "--id", str(tmp_path / "gr"),
                 "--out", str(tmp_path / "e2"), "--top", "6"]) == 2
    assert "no msp column" in capsys.readouterr().err
    assert main(["analyze", "ensemble", "--gr", str(tmp_path / "gr"), "--id", str(tmp_path / "id"),
                 "--out", str(tmp_path / "e3"), "--top", "9"]) == 2
    assert "--save-top 9" in capsys.readouterr().err
    (tmp_path / "gr" / "valid.top.parquet").unlink()
    assert main(["analyze", "ensemble", "--gr", str(tmp_path / "gr"), "--id", str(tmp_path / "id"),
                 "--out", str(tmp_path / "e4")]) == 2
    err = capsys.readouterr().err.strip()
    assert "valid.top.parquet" in err and "\n" not in err


def test_inputs_resolve_from_a_run_dir_its_top_dir_or_one_file(tmp_path):
    from comeir_dist.analysis.ensemble import resolve_top_files

    _write_pair(tmp_path / "run" / "top", 0, "valid")
    _write_pair(tmp_path / "run" / "top", 1, "test")
    top = tmp_path / "run" / "top" / "gr"
    expect = {"valid": top / "valid.top.parquet", "test": top / "test.top.parquet"}
    assert resolve_top_files(str(top), "--gr") == expect
    assert resolve_top_files(str(top / "test.top.parquet"), "--gr") == expect
    run = tmp_path / "r2"
    (run / "top").mkdir(parents=True)
    for f in expect.values():
        (run / "top" / f.name).write_bytes(f.read_bytes())
    assert resolve_top_files(str(run), "--gr") == {s: run / "top" / f"{s}.top.parquet" for s in ("valid", "test")}
