"""The fair experiment protocol: schedules, epoch budgets, standard errors, popular baseline, head extension."""
import json
import math

import numpy as np
import pytest
import torch

from comeir_dist.errors import UserError
from comeir_dist.eval.metrics import MetricSums
from comeir_dist.train.schedule import PlateauScale, lr_factor, resolve_budget
from tests.fixtures import assert_decode_matches_teacher_forcing, make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def test_schedules():
    assert lr_factor(0, 4, 100, "constant") == 0.25
    assert lr_factor(50, 4, 100, "constant") == 1.0 and lr_factor(500, 4, 100, "constant") == 1.0
    assert lr_factor(100, 4, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(50, 4, 100, "plateau", scale=0.25) == 0.25
    p = PlateauScale("plateau", 0.5)
    assert not p.after_validation(True) and p.scale == 1.0
    assert p.after_validation(False) and p.after_validation(False) and p.scale == 0.25
    c = PlateauScale("cosine", 0.5)
    assert not c.after_validation(False) and c.scale == 1.0


def test_budget_from_epochs(tiny, tmp_path):
    cfg = tiny_run_config(tiny, tmp_path, batch_size=10, max_epochs=2.5, eval_every_epochs=0.5)
    out = resolve_budget(cfg, 100)  # 10 steps per epoch
    assert (out.train.max_steps, out.train.eval_every) == (25, 5)
    assert cfg.train.max_steps == 20  # the caller's config is not changed
    plain = tiny_run_config(tiny, tmp_path)
    assert resolve_budget(plain, 100) is plain
    # re-initialised tables are complete at epoch ends only: validate there, patience kept in epochs
    reinit = tiny_run_config(tiny, tmp_path, batch_size=10, max_epochs=6, eval_every_epochs=0.5, patience=4)
    reinit.engram.reinit_every_epoch = True
    out = resolve_budget(reinit, 95)  # 9.5 steps per epoch: epochs end after 10, 20, ... steps
    assert (out.train.eval_every, out.train.patience) == (10, 2)


def test_standard_errors_merge_exactly():
    rng = np.random.default_rng(0)
    P, found = rng.integers(0, 15, 200), rng.random(200) < 0.6
    G, r = np.ones(200, np.int64), np.where(found, P + 1, 0)
    whole = MetricSums.from_arrays(P, G, found, r).means()
    parts = MetricSums.from_arrays(P[:70], G[:70], found[:70], r[:70]).merge(
        MetricSums.from_arrays(P[70:], G[70:], found[70:], r[70:]))
    merged = MetricSums.from_state(json.loads(json.dumps(parts.state_dict()))).means()
    hit = np.where(found & (P < 10), 1.0, 0.0)
    assert whole["se/item/hit@10"] == pytest.approx(hit.std(ddof=1) / math.sqrt(200))
    assert merged["se/item/hit@10"] == pytest.approx(whole["se/item/hit@10"], rel=1e-9)


def test_popular_baseline_ranks_unseen_popular_items(tiny, tmp_path):
    from comeir_dist.data.dataset import read_split
    from comeir_dist.eval.popular import item_popularity, popular_metrics

    cfg = tiny_run_config(tiny, tmp_path)
    counts = item_popularity(str(tiny))
    assert counts.sum() == sum(len(s) for s in read_split(tiny, "train").column("items").to_pylist())
    m = popular_metrics(cfg, "test")
    # brute force for one K: the target's position among the most popular items not in the history
    t = read_split(tiny, "test")
    order = np.argsort(-counts, kind="stable")
    hits = []
    for hist, tgt in zip(t.column("history").to_pylist(), t.column("target").to_pylist()):
        cand = [i for i in order if i not in set(hist)][:10]
        hits.append(tgt in cand)
    assert m["item/hit@10"] == pytest.approx(np.mean(hits)) and m["users"] == len(hits)


def test_dot_head_decoding_matches_teacher_forcing(tiny, tmp_path):
    """The extension's prefix-conditioned term is the same in training and in beam-search decoding."""
    from comeir_dist.train.samples import to_batch, training_samples
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    cfg = tiny_run_config(tiny, tmp_path)
    cfg.model.head_interaction = "dot"
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch.device("cpu"))
    for p in model.head.prefix_emb.parameters():  # non-trivial prefix embeddings
        torch.nn.init.normal_(p, std=1.0)
    model.eval()
    hist, tgt = training_samples(tiny, 8)
    batch = to_batch(hist[:12], tgt[:12], "cpu")
    codes = model.catalog.item_codes(batch.target)
    tf = assert_decode_matches_teacher_forcing(model, batch)
    with torch.no_grad():
        # the prefix changes the level-2 scores (the paper form sees it only through the intra memory)
        alt = codes.clone()
        alt[:, 0] = (alt[:, 0] + 1) % cfg.engram.codebook_size
        d1 = model.head._dot_scores(2, torch.zeros(12, 32), codes[:, :1].unsqueeze(1), torch.randn(8, 32))
        d2 = model.head._dot_scores(2, torch.zeros(12, 32), alt[:, :1].unsqueeze(1), torch.randn(8, 32))
        assert not torch.allclose(d1, d2)


def test_set_sparse_lr_reaches_the_fused_kernels():
    from comeir_dist.engram.config import EngramConfig
    from comeir_dist.model.engram_memory import EngramTables
    from comeir_dist.parallel.engram_tables import set_sparse_lr, shard_engram_tables

    cfg = EngramConfig(s_s=0.125, s_t=0.25, d_m=16, sparse_lr=0.1)
    tables = EngramTables(cfg, device="meta")
    shard_engram_tables(tables, cfg, "cpu", init_seed=1)
    assert set_sparse_lr(tables, 0.025) == len(tables.collections())

    def kernels(opt):
        if hasattr(opt, "_emb_module"):
            yield opt._emb_module
        for _, inner in getattr(opt, "_optims", []) or []:
            yield from kernels(inner)

    rates = [k.get_learning_rate() for c in tables.collections().values() for k in kernels(c.fused_optimizer)]
    assert rates and all(r == pytest.approx(0.025) for r in rates)


def test_experiment_is_resumable_from_result_files(tiny, tmp_path, monkeypatch):
    from comeir_dist.train import experiment

    cfg = tiny_run_config(tiny, tmp_path / "exp", max_steps=4, eval_every=2, lr_schedule="plateau")
    table = experiment.run_experiment(cfg, ["popular", "tm"], seeds=2)
    files = sorted(p.name for p in (tmp_path / "exp" / "results").glob("*.json"))
    assert files == ["popular-seed42.json", "tm-seed42.json", "tm-seed43.json"]
    row = json.loads((tmp_path / "exp" / "results" / "tm-seed42.json").read_text())
    assert row["best_step"] in (2, 4) and "se/item/ndcg@10" in row["metrics"] and row["valid_best_se"] >= 0
    assert "| tm |" in table and "| popular |" in table
    # the table's difference to popular has the two seeds averaged per row: its mean is the seeds' mean difference
    rows = experiment.load_results(tmp_path / "exp")
    averaged = experiment.seed_averaged_vs_popular(str(tiny), tmp_path / "exp", rows)["tm"]
    diffs = [r["vs_popular"]["diff"] for r in rows if r["label"] == "tm"]
    assert averaged["diff"] == pytest.approx(sum(diffs) / 2, abs=1e-9) and averaged["users"] == row["vs_popular"]["users"]
    tm_line = next(line for line in table.splitlines() if line.startswith("| tm |"))
    assert f"{averaged['diff']:+.4f} ± {averaged['se']:.4f}" in tm_line and "seeds averaged per row" in tm_line
    # the paired difference to popular over the same test users: its mean is the difference of the means
    pop = json.loads((tmp_path / "exp" / "results" / "popular-seed42.json").read_text())
    paired = row["vs_popular"]
    assert paired["users"] == pop["metrics"]["users"] and paired["se"] >= 0
    assert paired["diff"] == pytest.approx(row["metrics"]["item/ndcg@10"] - pop["metrics"]["item/ndcg@10"], abs=1e-9)
    # a result written before the comparison existed gets it on a rerun, from the run's per-user file
    path = tmp_path / "exp" / "results" / "tm-seed42.json"
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "vs_popular"}))
    monkeypatch.setattr(experiment, "_train_and_test", lambda *a, **k: pytest.fail("finished run retrained"))
    experiment.run_experiment(cfg, ["popular", "tm"], seeds=2)
    assert json.loads(path.read_text())["vs_popular"] == paired
    # a rerun (e.g. on a new machine with the committed result files) trains nothing
    assert experiment.run_experiment(cfg, ["popular", "tm"], seeds=2) == table
    changed = cfg.model_copy(deep=True)
    changed.train.lr = 1e-2
    with pytest.raises(UserError, match="different config"):
        experiment.run_experiment(changed, ["tm"], seeds=1)


def test_experiment_with_several_test_targets_pairs_rows_with_clustered_errors(tmp_path):
    """`prepare --test-targets 2`: the test split has 2 rows per user; the run's test metrics and its paired
    difference to popular are over all rows with standard errors clustered by user."""
    from comeir_dist.analysis.paired import vs_popular
    from comeir_dist.train import experiment

    ds = make_tiny_dataset(tmp_path / "t2", n_users=24, seq_len=8, valid_targets=2, test_targets=2)
    cfg = tiny_run_config(ds, tmp_path / "exp", max_steps=4, eval_every=2, lr_schedule="plateau")
    experiment.run_experiment(cfg, ["popular", "tm"], seeds=1)
    row = json.loads((tmp_path / "exp" / "results" / "tm-seed42.json").read_text())
    pop = json.loads((tmp_path / "exp" / "results" / "popular-seed42.json").read_text())
    assert (row["metrics"]["users"], row["metrics"]["clusters"]) == (48, 24) == (pop["metrics"]["users"],
                                                                               pop["metrics"]["clusters"])
    paired = row["vs_popular"]
    assert (paired["users"], paired["rows"]) == (24, 48) and paired["se"] >= 0
    assert paired["diff"] == pytest.approx(row["metrics"]["item/ndcg@10"] - pop["metrics"]["item/ndcg@10"], abs=1e-9)
    assert vs_popular(str(ds), tmp_path / "exp" / "tm-seed42" / "test.users.parquet") == paired


def test_interrupted_training_resumes_from_its_last_validation(tiny, tmp_path, monkeypatch):
    """Experiment runs checkpoint at every validation: a run killed after its first validation continues from that
    step when the same command is rerun, and ends with the result of an uninterrupted run."""
    from comeir_dist.train import checkpoint as ckpt
    from comeir_dist.train import experiment

    whole = tiny_run_config(tiny, tmp_path / "whole", max_steps=4, eval_every=2, lr_schedule="plateau")
    experiment.run_experiment(whole, ["tm"], seeds=1)
    cut = tiny_run_config(tiny, tmp_path / "cut", max_steps=4, eval_every=2, lr_schedule="plateau")
    save = ckpt.save_run_checkpoint

    def save_then_die(out, step, **kw):
        save(out, step, **kw)
        raise KeyboardInterrupt(f"killed after the checkpoint of step {step}")

    monkeypatch.setattr(ckpt, "save_run_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cut, ["tm"], seeds=1)
    run_dir = tmp_path / "cut" / "tm-seed42"
    assert (run_dir / "checkpoints" / "step-2").is_dir() and not (run_dir / "summary.json").exists()
    monkeypatch.setattr(ckpt, "save_run_checkpoint", save)
    experiment.run_experiment(cut, ["tm"], seeds=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [v["step"] for v in summary["validation"]] == [2, 4]
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the log continues, nothing repeated
    a, b = (json.loads((tmp_path / d / "results" / "tm-seed42.json").read_text()) for d in ("whole", "cut"))
    assert a["config_hash"] == b["config_hash"]
    assert a["best_step"] == b["best_step"] and a["valid_best"] == pytest.approx(b["valid_best"], abs=1e-6)
    assert a["metrics"]["item/ndcg@10"] == pytest.approx(b["metrics"]["item/ndcg@10"], abs=1e-6)
    # how a run saves its state is not part of its identity (committed result files stay valid)
    plain = experiment._run_config(whole, "tm", 42, run_dir)
    quiet = plain.model_copy(deep=True)
    quiet.parallel.checkpoint_at_eval, quiet.parallel.keep_checkpoints = False, 5
    assert plain.parallel.checkpoint_at_eval is True
    assert experiment.config_hash(quiet) == experiment.config_hash(plain) == b["config_hash"]


def test_large_table_runs_train_in_a_fresh_process(tiny, tmp_path, monkeypatch):
    """Above the table-size threshold (here 0 bytes) a run trains in a spawned process, with the result of training
    in this one; tm has no tables and stays in process."""
    from comeir_dist.train import experiment

    here = tiny_run_config(tiny, tmp_path / "here", max_steps=4, eval_every=2, lr_schedule="plateau")
    experiment.run_experiment(here, ["comeir"], seeds=1)
    run_cfg = experiment._run_config(here, "comeir", 42, tmp_path / "x")
    assert experiment.table_bytes(run_cfg) == 4 * sum(
        p.numel() for p in experiment_tables(run_cfg))
    assert experiment.table_bytes(experiment._run_config(here, "tm", 42, tmp_path / "x")) == 0
    monkeypatch.setattr(experiment, "CHILD_EVAL_TABLE_BYTES", 0)
    child = tiny_run_config(tiny, tmp_path / "child", max_steps=4, eval_every=2, lr_schedule="plateau")
    experiment.run_experiment(child, ["comeir"], seeds=1)
    a, b = (json.loads((tmp_path / d / "results" / "comeir-seed42.json").read_text()) for d in ("here", "child"))
    assert a["best_step"] == b["best_step"] and a["valid_best"] == pytest.approx(b["valid_best"], abs=1e-5)
    assert a["metrics"]["item/ndcg@10"] == pytest.approx(b["metrics"]["item/ndcg@10"], abs=1e-5)


def experiment_tables(run_cfg):
    from comeir_dist.model.engram_memory import EngramTables

    return EngramTables(run_cfg.engram).parameters()


def test_interrupted_test_evaluation_reruns_without_training_in_a_fresh_process(tiny, tmp_path, monkeypatch):
    """Training finished but the result file is missing (the test evaluation was killed): a rerun evaluates best/
    only; large tables are tested in a fresh process (here forced by a 0-byte threshold) with the same metrics."""
    import comeir_dist.train.loop as loop
    from comeir_dist.train import experiment

    # an epoch budget: best/ holds it resolved to steps, the rerun's config does not
    cfg = tiny_run_config(tiny, tmp_path / "exp", max_epochs=1.5, eval_every=2, lr_schedule="plateau")
    experiment.run_experiment(cfg, ["comeir"], seeds=1)
    result = tmp_path / "exp" / "results" / "comeir-seed42.json"
    first = json.loads(result.read_text())
    result.unlink()
    (tmp_path / "exp" / "comeir-seed42" / "test.json").unlink()  # the evaluation was killed before writing it
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("finished training retrained"))
    monkeypatch.setattr(experiment, "CHILD_EVAL_TABLE_BYTES", 0)
    experiment.run_experiment(cfg, ["comeir"], seeds=1)
    again = json.loads(result.read_text())
    assert again["metrics"] == first["metrics"] and again["best_step"] == first["best_step"]
    # the evaluation itself had finished (test.json newer than best/): a rerun only collects it
    result.unlink()
    monkeypatch.setattr(experiment, "CHILD_EVAL_TABLE_BYTES", 1 << 40)
    import comeir_dist.eval.run_eval as run_eval
    monkeypatch.setattr(run_eval, "run_evaluate", lambda *a, **k: pytest.fail("finished test evaluation rerun"))
    experiment.run_experiment(cfg, ["comeir"], seeds=1)
    assert json.loads(result.read_text())["metrics"] == first["metrics"]
    test_json = tmp_path / "exp" / "comeir-seed42" / "test.json"
    stale = json.loads(test_json.read_text())
    stale["step"] += 1  # written for another best/ step: evaluated again
    test_json.write_text(json.dumps(stale))
    assert experiment._tested_earlier(test_json.parent / "best", test_json) is None
    changed = cfg.model_copy(deep=True)  # another config in the same run dir is not "trained earlier"
    changed.train.lr = 1e-2
    assert not experiment._trained_earlier(changed, tmp_path / "exp" / "comeir-seed42")
    assert experiment._trained_earlier(experiment._run_config(cfg, "comeir", 42, tmp_path / "exp" / "comeir-seed42"),
                                       tmp_path / "exp" / "comeir-seed42")


def test_tables_freeze_after_the_configured_epochs(tiny, tmp_path):
    """engram.sparse_freeze_epochs: rows move during the first epoch only; dense weights keep training."""
    from comeir_dist.train.loop import train

    cfg = tiny_run_config(tiny, tmp_path / "run", max_steps=6, eval_every=3, lr_schedule="plateau")
    cfg.engram.sparse_freeze_epochs = 1e-9  # frozen after the first step
    seen = []
    import comeir_dist.parallel.engram_tables as et

    real = et.set_sparse_lr
    et.set_sparse_lr = lambda model, lr: seen.append(lr) or real(model, lr)
    try:
        train(cfg)
    finally:
        et.set_sparse_lr = real
    assert seen and seen[0] == 0.0 and all(lr == 0.0 for lr in seen)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("valid" in r for r in log)


def test_protocol_deviations_and_results_plot(tiny, tmp_path):
    from comeir_dist.train.experiment import protocol_deviations
    from comeir_dist.train.experiment_plot import plot_results

    unfair = tiny_run_config(tiny, tmp_path)  # cosine over max_steps, 16 validation users
    assert len(protocol_deviations(unfair)) == 2
    fair = tiny_run_config(tiny, tmp_path, lr_schedule="plateau", eval_users=None, max_epochs=3)
    assert protocol_deviations(fair) == []
    row = {"label": "tm", "metrics": {"item/ndcg@10": 0.05}, "train": {"batch_size": 10}, "train_samples": 100,
           "best_step": 20, "best_epoch": 2.0, "valid_best": 0.06,
           "validation": [{"step": 10, "item/ndcg@10": 0.04}, {"step": 20, "item/ndcg@10": 0.06}]}
    pop = {**row, "label": "popular", "validation": [], "valid_best": 0.02}
    plot_results([row, {**row, "seed": 2}, pop], tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_results_table_means_over_seeds_and_margin_over_popular():
    from comeir_dist.train.experiment import format_table

    def run(label, variant, ndcg, seed=42):
        return {"label": label, "variant": variant, "seed": seed, "engram": None,
                "metrics": {"item/hit@10": 2 * ndcg, "item/ndcg@10": ndcg, "sid/ndcg@10": ndcg,
                            "se/item/ndcg@10": ndcg / 10},
                "valid_best": ndcg, "valid_best_se": 0.001, "best_step": 10, "best_epoch": 1.0, "best_minutes": 1.0,
                "ms_per_user": 1.0}

    rows = [run("tm", "tm", 0.04), run("tm", "tm", 0.06, seed=43), run("popular", "popular", 0.02),
            run("flatten", "flatten", 0.03)]
    rows[0]["vs_popular"], rows[1]["vs_popular"] = ({"diff": d, "se": 0.01, "z": d / 0.01} for d in (0.02, 0.04))
    lines = format_table(rows).splitlines()
    assert "ndcg@10 / popular" in lines[0] and lines[1].count("---") == lines[0].count(" | ") + 1
    tm, flatten, popular = lines[2], lines[3], lines[4]  # sorted by mean test NDCG@10
    assert tm.startswith("| tm | - | 2 | ") and "0.0500 ± 0.0141" in tm and "| 2.50x |" in tm
    assert "| test ndcg@10 s.e. |" in lines[0] and "| 0.0050 | 2.50x |" in tm  # the seeds' mean s.e. over users
    assert "| 1.50x |" in flatten and "| 1.00x |" in popular and "| - |" in flatten  # no per-user results
    # seeds' differences to popular: their mean, or (per-user files at hand) the seeds averaged per row
    assert "| +0.0300 ± 0.0100, 3.0 s.e. (mean over 2 seeds; z per seed 2.0 / 4.0) |" in tm
    averaged = format_table(rows, {"tm": {"diff": 0.03, "se": 0.005}}).splitlines()[2]
    assert "| +0.0300 ± 0.0050, 6.0 s.e. (seeds averaged per row; z per seed 2.0 / 4.0) |" in averaged
    without = format_table([r for r in rows if r["label"] != "popular"]).splitlines()
    assert "popular" not in without[0] and without[1].count("---") == without[0].count(" | ") + 1


def test_head_without_memory_gradient_leaves_its_rows_to_the_encoder(tiny, tmp_path):
    """model.head_memory_grad=False: the head's reads carry no gradient into the tables (same logits)."""
    from comeir_dist.train.samples import to_batch, training_samples
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    hist, tgt = training_samples(tiny, 8)
    batch = to_batch(hist[:12], tgt[:12], "cpu")
    logits = {}
    for grad in (True, False):
        cfg = tiny_run_config(tiny, tmp_path)
        cfg.model.head_memory_grad = grad
        torch.manual_seed(0)
        sids, emb = load_inputs(cfg)
        model = build_sharded_model(cfg, sids, emb, torch.device("cpu"), init_seed=3)
        model.eval()
        codes = model.catalog.item_codes(batch.target)
        out = model.level_logits(batch, codes)
        reads = []
        orig = model.head.reads["inter1"].forward
        model.head.reads["inter1"].forward = lambda q, addr, *a, **k: reads.append(addr) or orig(q, addr, *a, **k)
        model.level_logits(batch, codes)
        assert reads[0].requires_grad and reads[-1].requires_grad == grad  # encoder first, then the head
        logits[grad] = [x.detach() for x in out]
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b)


def test_reinit_tables_restores_initial_values_and_zeroes_adagrad(tiny, tmp_path):
    """engram.reinit_every_epoch: tables return to the seeded initial values and Adagrad forgets its statistics,
    so a re-initialised table takes exactly the first step a fresh one takes."""
    from comeir_dist.model.loss import constrained_sid_loss
    from comeir_dist.parallel.engram_tables import full_tables_state, reinit_tables
    from comeir_dist.train.samples import to_batch, training_samples
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    cfg = tiny_run_config(tiny, tmp_path / "run")
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, "cpu", init_seed=5)
    hist, tgt = training_samples(tiny, 8)
    batch = to_batch(hist[:16], tgt[:16], "cpu")
    codes = model.catalog.item_codes(batch.target)

    def step():
        constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie).backward()
        return full_tables_state(model.tables)

    initial = full_tables_state(model.tables)
    first = step()
    step()  # Adagrad statistics grow: a second step differs from the first
    assert reinit_tables(model, 5, cfg.engram.init_scale) == len(initial)
    again = full_tables_state(model.tables)
    for g in initial:
        for k in initial[g]:
            torch.testing.assert_close(again[g][k], initial[g][k], rtol=0, atol=0)
    model.zero_grad(set_to_none=True)
    replay = step()
    for g in first:
        for k in first[g]:
            torch.testing.assert_close(replay[g][k], first[g][k], rtol=1e-5, atol=1e-7)


def test_loop_reinitialises_tables_at_epoch_starts(tiny, tmp_path, monkeypatch):
    import comeir_dist.train.loop as loop
    from comeir_dist.train.samples import training_samples

    n = len(training_samples(tiny, 8)[1])
    cfg = tiny_run_config(tiny, tmp_path / "run", batch_size=32, max_steps=2 * math.ceil(n / 32) + 1,
                          eval_every=1000, lr_schedule="plateau")
    cfg.engram.reinit_every_epoch = True
    calls = []
    import comeir_dist.parallel.engram_tables as et

    real = et.reinit_tables
    monkeypatch.setattr(et, "reinit_tables", lambda model, seed, scale: calls.append(seed) or real(model, seed, scale))
    loop.train(cfg)
    assert calls == [loop._epoch_seed(cfg.seed, 1), loop._epoch_seed(cfg.seed, 2)]
