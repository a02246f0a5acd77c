"""SASRec item-ID baseline (model.variant: sasrec): model-defined training loss (SID models' loss unchanged),
full-catalog ranking with the item-level metric definitions, the training loop / checkpoints / best/ / plan
for a model without Engram tables, `comeir evaluate --save-top`, the experiment runner and the Ray eval worker."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from comeir_dist.model.history import HistoryBatch
from comeir_dist.train.samples import to_batch, training_samples
from comeir_dist.train.setup import build_sharded_model, dense_parameters, load_inputs
from tests.fixtures import make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_sasrec"))


def _model(ds, tmp_path, variant):
    cfg = tiny_run_config(ds, tmp_path / variant, variant=variant)
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu")), cfg


def test_sasrec_overfits_one_batch(tiny, tmp_path):
    from comeir_dist.eval.evaluate import evaluate_arrays
    from comeir_dist.model.sasrec import SASRecModel
    from comeir_dist.parallel.dense import training_loss

    model, _ = _model(tiny, tmp_path, "sasrec")
    assert isinstance(model, SASRecModel) and not hasattr(model, "tables") and model.trie is None
    hist, tgt = training_samples(tiny, 8)
    batch = to_batch(hist[:12], tgt[:12], "cpu")
    opt = torch.optim.AdamW(dense_parameters(model), lr=1e-2)
    first = None
    for _ in range(100):
        loss = training_loss(model, batch)
        first = first if first is not None else loss.item()
        if float(loss) < 0.05:  # memorised: the model evaluated below is the one of this loss
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.05 < first
    res = evaluate_arrays(model, hist[:12], tgt[:12], ks=(1, 10))
    assert (res["per_user"]["P"] == 0).all() and res["sums"].means()["item/hit@1"] == 1.0
    assert (res["top_items"][:, 0] == tgt[:12]).all()
    assert res["msp"].shape == (12,) and ((res["msp"] > 0) & (res["msp"] <= 1)).all()


@pytest.mark.parametrize("variant", ["comeir", "flatten", "tm"])
def test_sid_models_train_on_the_old_loss(tiny, tmp_path, variant):
    """The loop's model-defined loss (parallel.dense.training_loss / TrainForward) is Eq. 12 as before, bit for bit."""
    from comeir_dist.model.loss import constrained_sid_loss
    from comeir_dist.parallel.dense import TrainForward, training_loss

    model, _ = _model(tiny, tmp_path, variant)
    model.eval()  # no dropout draws: the same numbers from both paths
    hist, tgt = training_samples(tiny, 8)
    items, target = torch.as_tensor(hist[:10]), torch.as_tensor(tgt[:10])
    with torch.no_grad():
        codes = model.catalog.item_codes(target)
        old = constrained_sid_loss(model.level_logits(HistoryBatch(items, target), codes), codes, model.trie)
        new = training_loss(model, HistoryBatch(items, target))
        engine_fwd = TrainForward(model, bf16=False)(items, target)
    assert torch.equal(new, old) and torch.equal(engine_fwd, old)


def test_rank_scores_counts_ties_like_the_item_metrics():
    from comeir_dist.eval.metrics import item_hit_at_k, item_ndcg_at_k
    from comeir_dist.eval.ranking import rank_scores

    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    r = rank_scores(scores, torch.tensor([2, 4]), top_n=7)
    assert r.items.tolist() == [[1, 2, 4, 0, 3, -1, -1], [0, 1, 2, 3, 4, -1, -1]]  # ties: ascending item index
    assert r.scores[0, :2].tolist() == [3.0, 3.0] and torch.isinf(r.scores[:, 5:]).all()
    t = r.targets
    assert t.P.tolist() == [0, 4] and t.G.tolist() == [2, 1] and t.found.all() and t.sid_rank.tolist() == [1, 5]
    # target tied with one other item at the top: expected over the two positions, as for a SID collision group
    assert item_hit_at_k(t.P, t.G, t.found, 1).tolist() == [0.5, 0.0]
    assert item_ndcg_at_k(t.P, t.G, t.found, 5)[0] == pytest.approx((1 + 1 / np.log2(3)) / 2)


# ---- the training loop, checkpoints, best/, evaluate, experiment --------------------------------------------------
@pytest.fixture(scope="module")
def experiment(tiny, tmp_path_factory):
    """`comeir experiment --variants sasrec` (1 seed) with step checkpoints: DeepSpeed engine, early-stopping
    bookkeeping, best/, test evaluation."""
    from comeir_dist.train.experiment import run_experiment

    root = tmp_path_factory.mktemp("exp_sasrec")
    cfg = tiny_run_config(tiny, root / "exp", max_steps=6, eval_every=3, batch_size=16)
    cfg.parallel.checkpoint_every = 3
    table = run_experiment(cfg, ["sasrec"], 1)
    return root / "exp", table


def test_experiment_trains_and_tests_sasrec(experiment):
    root, table = experiment
    run = root / "sasrec-seed42"
    res = json.loads((root / "results" / "sasrec-seed42.json").read_text())
    assert res["variant"] == "sasrec" and res["engram"] is None and "| sasrec |" in table
    assert 0 <= res["metrics"]["item/ndcg@10"] <= 1 and res["metrics"]["users"] == 24
    summary = json.loads((run / "summary.json").read_text())
    assert summary["variant"] == "sasrec" and summary["steps"] == 6 and len(summary["validation"]) == 2
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses))
    # no sparse part anywhere: best/ without tables.pt, step checkpoints without tables/
    best = run / "best"
    assert (best / "COMMITTED").is_file() and not (best / "tables.pt").exists()
    assert json.loads((best / "meta.json").read_text())["hash_multipliers"] == {}
    step = run / "checkpoints" / "step-6"
    assert (step / "COMMITTED").is_file() and not (step / "tables").exists()
    state = json.loads((step / "state.json").read_text())
    assert state["variant"] == "sasrec" and state["table_layout"] == {}


def test_best_checkpoint_evaluates_to_the_recorded_validation(experiment):
    from comeir_dist.config.base import parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.eval.evaluate import evaluate_arrays
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.loop import validation_subset

    best = experiment[0] / "sasrec-seed42" / "best"
    model, cfg, meta, _ = load_model_from_checkpoint(best, device="cpu")
    hist, target = validation_subset(parse_section(RunConfig, meta["config"]))
    m = evaluate_arrays(model, hist, target, batch_size=cfg.eval.batch_size, ks=cfg.eval.ks)["sums"].means()
    for key in ("item/ndcg@10", "item/hit@5", "sid/ndcg@10"):
        assert m[key] == pytest.approx(meta["metrics"][key], abs=1e-9), key


def test_evaluate_save_top_sasrec(experiment, tmp_path):
    from comeir_dist.cli import main

    best = experiment[0] / "sasrec-seed42" / "best"
    out = tmp_path / "valid.json"
    assert main(["evaluate", "--checkpoint", str(best), "--split", "valid", "--out", str(out), "--save-top", "13"]) == 0
    rep = json.loads(out.read_text())
    assert rep["variant"] == "sasrec" and rep["top_file"] == str(tmp_path / "valid.top.parquet")
    top = pq.read_table(tmp_path / "valid.top.parquet")
    info = json.loads(top.schema.metadata[b"comeir"])
    assert info["split"] == "valid" and info["top_n"] == 13 and info["scores"] == "logit"
    items, scores = top.column("items").to_pylist(), np.asarray(top.column("scores").to_pylist())
    assert top.num_rows == 24 and all(len(x) == 13 and len(set(x)) == 13 and min(x) >= 0 for x in items)
    assert (np.diff(scores, axis=1) <= 0).all()
    msp = np.asarray(top.column("msp").to_pylist())
    assert ((msp > 0) & (msp <= 1)).all()
    users = pq.read_table(out.with_suffix(".users.parquet"))
    assert len(users.column("top_items")[0]) == 10
    assert [x[:10] for x in items] == users.column("top_items").to_pylist()


def test_evaluate_save_top_sid_model_raises_the_beam(tiny, tmp_path):
    from comeir_dist.eval.run_eval import run_evaluate
    from comeir_dist.train.checkpoint_simple import save_checkpoint

    model, cfg = _model(tiny, tmp_path, "flatten")
    sids, _ = load_inputs(cfg)
    save_checkpoint(tmp_path / "best", model, cfg, 0, {}, sids.fingerprint)
    assert cfg.eval.beam_size == 5
    out = tmp_path / "test.json"
    rep = run_evaluate(str(tmp_path / "best"), "test", str(out), max_users=6, save_top=12)
    assert rep["beam_size"] == 12
    top = pq.read_table(tmp_path / "test.top.parquet")
    assert "msp" not in top.column_names and top.num_rows == 6
    items, scores = top.column("items").to_pylist(), np.asarray(top.column("scores").to_pylist())
    assert all(len(x) == 12 and min(x) >= 0 and len(set(x)) == 12 for x in items)  # distinct SIDs: 12 beams, 12 items
    assert (scores <= 0).all() and (np.diff(scores, axis=1) <= 0).all()  # beam log-probabilities, best first
    assert json.loads(top.schema.metadata[b"comeir"])["scores"] == "beam log-probability"


def test_ray_eval_worker_ranks_all_items(experiment):
    """The Ray actor class (called in-process: same code, no Ray) returns sums, top scores and the MSP."""
    from comeir_dist.eval.ray_eval import EvalWorker
    from comeir_dist.eval.run_eval import run_evaluate
    from comeir_dist.train.samples import split_samples

    best = experiment[0] / "sasrec-seed42" / "best"
    w = EvalWorker(str(best), None, 1)
    _, hist, target = split_samples(w.cfg.dataset, "test", w.cfg.max_history)
    res = w.evaluate(hist, target, 5, 16, [5, 10], top_n=10)
    assert res["msp"].shape == (len(target),) and res["top_scores"].shape == (len(target), 10)
    from comeir_dist.eval.metrics import MetricSums

    sums = MetricSums.merge_all(MetricSums.from_state(b) for b in res["batches"]).means()
    ref = run_evaluate(str(best), "test", batch_size=16)["metrics"]
    assert sums == ref


def test_plan_counts_the_item_table(tiny, tmp_path, capsys):
    from comeir_dist.cli import main
    from comeir_dist.parallel.memory_plan import count_dense_params

    model, cfg = _model(tiny, tmp_path, "sasrec")
    n = model.num_items
    dc = count_dense_params(cfg, item_emb_dim=16, num_items=n)
    assert dc.params == sum(p.numel() for p in model.parameters())
    assert dc.n_trainable == sum(p.numel() for p in dense_parameters(model)) and dc.buffer_bytes == 0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["plan", "--config", str(path), "--num-items", str(n), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tables"] == []
    assert main(["plan", "--config", str(path)]) == 2
    assert "--num-items" in capsys.readouterr().err
