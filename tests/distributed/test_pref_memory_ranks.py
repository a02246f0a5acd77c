"""Rec2PM preference memory (``model.pref_memory``) trained on 1 and 2 gloo ranks: the same losses and validation
metrics for every host (tm, sasrec, comeir: sharded Engram tables, one lookup pass per forward), and the 2-rank
best/ evaluates identically in one process.

Histories of up to 12 training items in segments of 3: the two ranks' halves of the uneven global batch (13 = 7 +
6) hold different numbers of complete segments, so the ranks run global / local passes of different sizes in the
same step (the dense gradients still reduce over the same parameters). The ``-seq`` runs train sasrec (with and
without the memory), flatten (one causal pass over a window's SID tokens), tm (block-masked pass over items and
fed-back codes), comeir (one encoder + backbone pass per window, the memory head per target, the sharded tables
read once per step) and flatten with DECOR composition + BOS (composed per position) on all-position windows
(``train.sample_mode: sequence``).
"""
from __future__ import annotations

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.run_compare import assert_same_training, evaluate_best_in_one_process
from tests.distributed.workers import K, SHAPES, recovery_jobs
from tests.fixtures import make_tiny_dataset

TW = "table_wise"
PM = {"enabled": True, "tokens": 2, "segment_items": 3, "archive_items": 12}
SEQ = {"sample_mode": "sequence"}
# run name -> (model overrides, train overrides); the -seq runs train every position of a window (sample_mode)
JOBS = {"tm": ({"variant": "tm", "pref_memory": PM}, {}),
        "sasrec": ({"variant": "sasrec", "pref_memory": PM}, {}),
        "comeir": ({"variant": "comeir", "pref_memory": PM}, {}),
        "sasrec-seq": ({"variant": "sasrec", "pref_memory": PM}, SEQ),
        "sasrec-plain-seq": ({"variant": "sasrec"}, SEQ),
        "flatten-seq": ({"variant": "flatten"}, SEQ),
        "tm-seq": ({"variant": "tm"}, SEQ),
        "comeir-seq": ({"variant": "comeir"}, SEQ),
        "decor-seq": ({"variant": "flatten", "decor": {"compose": True, "bos_queries": 4}}, SEQ)}
HOSTS = tuple(JOBS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_memory_ranks")
    ds = str(make_tiny_dataset(root / "data", seq_len=14))

    def job(host, world):
        model, train = JOBS[host]
        return {"ds": ds, "out": str(root / f"{host}_w{world}"), "sharding": TW, "model": model, "train": train}

    run_ranks(1, recovery_jobs, [job(h, 1) for h in HOSTS])
    run_ranks(2, recovery_jobs, [job(h, 2) for h in HOSTS])
    return root


@pytest.mark.parametrize("host", HOSTS)
def test_one_and_two_ranks_train_the_same_memory_model(runs, host):
    s1, s2 = assert_same_training(runs / f"{host}_w1", runs / f"{host}_w2", 2 * K, SHAPES[TW][1],
                                  keys=("item/ndcg@10", "item/hit@10", "item/hit@5"))
    assert s1["variant"] == s2["variant"] == JOBS[host][0]["variant"]


@pytest.mark.parametrize("host", HOSTS)
def test_memory_best_from_two_ranks_evaluates_in_one_process(runs, host):
    _, cfg, _ = evaluate_best_in_one_process(runs / f"{host}_w2" / "best", keys=("item/ndcg@10", "item/hit@5"))
    model, train = JOBS[host]
    assert cfg.model.pref_memory.enabled == ("pref_memory" in model) and cfg.model.variant == model["variant"]
    assert cfg.train.sample_mode == train.get("sample_mode", "prefix")
