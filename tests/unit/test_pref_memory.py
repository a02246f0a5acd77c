"""Rec2PM preference memory on tm (model/pref_memory.py, train/archive_samples.py, eval/memory_store.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from comeir_dist.config.run import BackboneConfig
from comeir_dist.decode.trie import PrefixTrie
from comeir_dist.errors import UserError
from comeir_dist.model.backbone import build_backbone
from comeir_dist.model.history import Catalog, HistoryBatch
from comeir_dist.model.pref_memory import (PrefMemorySASRec, PrefMemoryTM, context_items_decoded, global_block_mask,
                                           split_archive)
from comeir_dist.model.pref_memory_config import PrefMemoryConfig
from comeir_dist.train.archive_samples import ArchiveHistory, align_archive
from tests.fixtures import TINY_BACKBONE, make_tiny_dataset, tiny_run_config

N_ITEMS, LEVELS, CB = 30, 3, 8


HOSTS = ["tm", "sasrec", "comeir"]


def tiny_model(mode="overwrite", tokens=3, seg=4, seed=0, host="tm", **pm):
    """A tiny PrefMemoryTM (``host="tm"``), PrefMemorySASRec (``"sasrec"``) or PrefMemoryComeIR (``"comeir"``)."""
    torch.manual_seed(seed)
    cfg = PrefMemoryConfig(enabled=True, tokens=tokens, segment_items=seg, mode=mode, archive_items=40, **pm)
    if host == "sasrec":
        return PrefMemorySASRec(N_ITEMS, build_backbone(BackboneConfig(**TINY_BACKBONE)), cfg)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(CB)] * LEVELS, indexing="ij"), -1).reshape(-1, LEVELS)
    codes = torch.as_tensor(grid[rng.choice(len(grid), N_ITEMS, replace=False)])
    if host == "comeir":
        from comeir_dist.model.pref_memory import build_pref_memory_model

        rc = tiny_run_config(Path("unused"), Path("unused"), variant="comeir", codebook_size=CB)
        rc.model.pref_memory = cfg
        inputs = (codes.numpy(), torch.randn(LEVELS, CB, 8).numpy(), torch.randn(N_ITEMS, 8).numpy())
        m = build_pref_memory_model(rc, *inputs)
        m.built_from = (rc, inputs)  # for the base-model comparison
        return m
    cat = Catalog(codes, torch.randn(N_ITEMS, 8))
    m = PrefMemoryTM(cat, torch.randn(LEVELS, CB, 8), build_backbone(BackboneConfig(**TINY_BACKBONE)), 8, cfg)
    m.trie = PrefixTrie.from_codes(codes, CB)
    return m


def archives(lengths, width=40, seg=4, seed=1):
    rng = np.random.default_rng(seed)
    rows = [align_archive(list(rng.integers(0, N_ITEMS, n)), width, seg) for n in lengths]
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = r
    return torch.as_tensor(out)


def test_split_archive_aligned_from_first_item():
    items = archives([1, 4, 5, 13])
    segs, recent = split_archive(items, 4)
    assert segs.shape == (4, 3, 4)  # 13 items -> recent 1 + 3 complete segments
    assert ((recent >= 0).sum(-1)).tolist() == [1, 4, 1, 1]
    assert ((segs[:, :, 0] >= 0).sum(-1)).tolist() == [0, 0, 1, 3]
    assert torch.equal(segs[3].reshape(-1), items[3, -13:-1]) and recent[3, -1] == items[3, -1]
    assert align_archive(list(range(45)), 40, 4)[-1] == 44 and len(align_archive(list(range(45)), 40, 4)) == 37


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_memory_token_count_and_shapes(mode):
    m = tiny_model(mode, tokens=3).eval()
    mem, mask, recent, blocks = m.compress(archives([2, 9, 13]))
    assert blocks.shape[1:3] == (3, 3)  # K = 3 complete segments of the longest row, C = 3
    if mode == "overwrite":
        assert mem.shape == (3, 3, 32) and mask.sum(-1).tolist() == [0, 3, 3]
    else:
        assert mem.shape == (3, 9, 32) and mask.sum(-1).tolist() == [0, 6, 9]


def test_global_block_mask():
    k, seg, c = 3, 2, 2
    mask = global_block_mask(k, seg, c)
    blk = seg + c
    q = lambda h, i: h * blk + seg + i  # noqa: E731
    item = lambda h, i: h * blk + i  # noqa: E731
    # items see only earlier raw items, never a query token
    assert mask[item(1, 1)].nonzero().flatten().tolist() == [item(0, 0), item(0, 1), item(1, 0), item(1, 1)]
    # query block 1: raw items of segments 0..1, itself causally, no other query block
    assert mask[q(1, 0)].nonzero().flatten().tolist() == [item(0, 0), item(0, 1), item(1, 0), item(1, 1), q(1, 0)]
    assert mask[q(1, 1), q(1, 0)] and not mask[q(1, 0), q(1, 1)]
    assert not mask[q(2, 0), q(1, 0)] and not mask[q(1, 0), item(2, 0)]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_parallel_pass_equals_sequential_recurrence(mode, host):
    """Fed the model's own sequential memories as references, the parallel local pass reproduces them."""
    m = tiny_model(mode, host=host).eval()
    items = archives([3, 8, 17, 25])
    with torch.no_grad():
        _, _, _, blocks = m.compress(items)
        segs, _, own = m._split(items)
        present = own[:, :, 0] >= 0
        upd = m.parallel_updates(blocks, present, *_vectors(m, segs))
    assert torch.allclose(upd[present], blocks[present], atol=1e-5)


@pytest.mark.parametrize("host", ["tm", "sasrec"])
def test_append_groups_equal_one_batch(host, monkeypatch):
    """Append mode pads each group of segments only to its own largest memory: same outputs as one batch."""
    import comeir_dist.model.pref_memory as pm_module

    m = tiny_model("append", host=host).eval()
    items = archives([3, 8, 17, 25, 40])
    segs, _, own = m._split(items)
    present = own[:, :, 0] >= 0
    refs = torch.randn(items.shape[0], segs.shape[1], 3, 32)
    with torch.no_grad():
        monkeypatch.setattr(pm_module, "APPEND_GROUP", 100)
        one_upd, one_states = m.parallel_updates(refs, present, *_vectors(m, segs), item_states=True)
        monkeypatch.setattr(pm_module, "APPEND_GROUP", 3)  # 9 segments -> groups 0-2, 3-5, 6-8
        upd, states = m.parallel_updates(refs, present, *_vectors(m, segs), item_states=True)
    assert segs.shape[1] == 9
    assert torch.allclose(upd, one_upd, atol=1e-5) and torch.allclose(states, one_states, atol=1e-5)


def _vectors(m, segs):
    """(item vectors ``[B, K, seg, d]``, validity) of complete segments given with their context."""
    b, k, w = segs.shape
    own = segs[:, :, m.context_items:]
    return m.segment_vectors(segs.reshape(b * k, w)).reshape(b, k, own.shape[-1], -1), own >= 0


def test_local_pass_sees_only_previous_memory_and_own_segment():
    m = tiny_model("overwrite").eval()
    items = archives([25, 25])
    segs, _ = split_archive(items, 4)
    present = segs[:, :, 0] >= 0
    refs = torch.randn(2, segs.shape[1], 3, 32)
    with torch.no_grad():
        base = m.parallel_updates(refs, present, *_vectors(m, segs))
        refs2, segs2 = refs.clone(), segs.clone()
        refs2[:, 0] += 5.0  # memory written by segment 0: read only by segment 1
        segs2[:, 3] = (segs2[:, 3] + 1) % N_ITEMS  # items of segment 3
        other = m.parallel_updates(refs2, present, *_vectors(m, segs2))
    changed = (base - other).abs().amax(dim=(-1, -2))[0]
    assert changed[1] > 1e-4 and changed[3] > 1e-4
    assert changed[0] < 1e-6 and changed[2] < 1e-6 and changed[4] < 1e-6


def _loss_with_leaf_refs(m, items, target):
    """training_loss with the global pass replaced by a leaf tensor, to see what reaches the references."""
    real = m.global_pass
    holder = {}

    def leaf(vecs, valid):
        holder["refs"] = real(vecs, valid).detach().requires_grad_(True)
        return holder["refs"]

    m.global_pass = leaf
    loss = m.training_loss(HistoryBatch(items, target))
    loss.backward()
    return holder["refs"].grad, m.last_losses


@pytest.mark.parametrize("host", HOSTS)
def test_stop_grad_on_references(host):
    items, target = archives([25, 21, 17]), torch.tensor([1, 2, 3])
    full = tiny_model(stop_grad_refs=True, stop_grad_ref_inputs=True, host=host)
    grad, losses = _loss_with_leaf_refs(full, items, target)
    assert grad is None and losses["con"] > 0  # nothing flows into the reference pass
    assert full.q_mem.grad is not None and full.q_mem.grad.abs().sum() > 0  # the update still trains
    g_stop, _ = _loss_with_leaf_refs(tiny_model(stop_grad_refs=True, host=host), items, target)
    g_free, _ = _loss_with_leaf_refs(tiny_model(stop_grad_refs=False, host=host), items, target)
    assert g_stop is not None and g_free is not None  # memory inputs carry L_AR's gradient ...
    assert not torch.allclose(g_stop, g_free)  # ... and only the un-stopped target adds L_con's pull


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_lcon_computed_and_weighted(mode):
    m = tiny_model(mode)
    items, target = archives([25, 13]), torch.tensor([4, 5])
    total = m.training_loss(HistoryBatch(items, target))
    assert m.last_losses["con"] > 0 and np.isfinite(m.last_losses["ar"])
    assert torch.isclose(total, torch.tensor(m.last_losses["ar"] + m.last_losses["con"]), rtol=1e-4)
    m0 = tiny_model(mode, align_weight=0.0)
    m0.training_loss(HistoryBatch(items, target))
    assert m0.last_losses["con"] == 0.0


@pytest.mark.parametrize("host", HOSTS)
def test_without_complete_segments_equals_the_base_model(host):
    """A history no longer than one segment has no memory: the model is its host (same weights, same scores)."""
    from comeir_dist.model.baselines import GenerativeBaseline
    from comeir_dist.model.sasrec import SASRecModel

    m = tiny_model(host=host, seg=4).eval()
    items = archives([1, 3, 4])
    batch = HistoryBatch(items, torch.tensor([1, 2, 3]))
    if host == "sasrec":
        base = SASRecModel(N_ITEMS, m.backbone)
        base.load_state_dict({k: v for k, v in m.state_dict().items() if k in base.state_dict()})
        with torch.no_grad():
            assert torch.allclose(m.item_logits(batch), base.eval().item_logits(batch), atol=1e-5)
        return
    if host == "comeir":
        from comeir_dist.model.factory import build_model

        rc, inputs = m.built_from
        base = build_model(rc.model_copy(update={"model": rc.model.model_copy(update={"pref_memory": PrefMemoryConfig()})}),
                           *inputs)
        assert base.load_state_dict(m.state_dict(), strict=False).missing_keys == []
        codes = m.catalog.item_codes(batch.target)
        with torch.no_grad():
            for a, b in zip(m.level_logits(batch, codes), base.eval().level_logits(batch, codes)):
                assert torch.allclose(a, b, atol=1e-5)
        return
    base = GenerativeBaseline("tm", m.catalog, m.tokens.codebook.reshape(LEVELS, CB, 8), m.backbone, 8)
    base.load_state_dict({k: v for k, v in m.state_dict().items() if k in base.state_dict()})
    codes = m.catalog.item_codes(batch.target)
    with torch.no_grad():
        for a, b in zip(m.level_logits(batch, codes), base.eval().level_logits(batch, codes)):
            assert torch.allclose(a, b, atol=1e-5)


def test_other_variants_refused(tmp_path):
    from comeir_dist.model.factory import build_model

    cfg = tiny_run_config(tmp_path / "ds", tmp_path / "run", variant="flatten")
    cfg.model.pref_memory.enabled = True
    with pytest.raises(UserError, match="model.pref_memory.enabled applies to model.variant: tm, sasrec or comeir"):
        build_model(cfg, np.zeros((4, 3), np.int64), np.zeros((3, 8, 4), np.float32), np.zeros((4, 4), np.float32))
    cfg = tiny_run_config(tmp_path / "ds", tmp_path / "run", variant="comeir")
    cfg.model.pref_memory.enabled = True
    cfg.model.decoding = "nezha"
    with pytest.raises(UserError, match="needs model.decoding: normal"):
        build_model(cfg, np.zeros((4, 3), np.int64), np.zeros((3, 8, 4), np.float32), np.zeros((4, 4), np.float32))


def test_archive_history_matches_prefixes():
    seqs = [list(range(10)), [7, 8, 9]]
    h = ArchiveHistory(seqs, archive_items=8, seg=3)
    assert len(h) == 9 + 2 and h.target.tolist() == list(range(1, 10)) + [8, 9]
    row = h[np.array([8])][0]  # history 0..8 (n = 9): r = 3, keep 3 + 3 = 6
    assert row.tolist() == [-1, -1, 3, 4, 5, 6, 7, 8]


SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("COMEIR_SLOW_TESTS") != "1",
                                             reason="ComeIR's overfit run takes ~40 s: set COMEIR_SLOW_TESTS=1")]


@pytest.mark.parametrize("host", ["tm", "sasrec", pytest.param("comeir", marks=SLOW)])
def test_overfit_tiny_long_histories(host):
    m = tiny_model("overwrite", tokens=2, seg=4, host=host)
    rng = np.random.default_rng(0)
    n = 16  # users walk a cycle; the target depends on the last item
    lengths = rng.integers(9, 30, n)
    starts = rng.integers(0, N_ITEMS, n)
    rows = [[(s + j) % N_ITEMS for j in range(L + 1)] for s, L in zip(starts, lengths)]
    items = archives([0] * n)
    for i, r in enumerate(rows):
        a = align_archive(r[:-1], 40, 4)
        items[i] = -1
        items[i, 40 - len(a):] = torch.as_tensor(a)
    target = torch.as_tensor([r[-1] for r in rows])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = m.training_loss(HistoryBatch(items, target))
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.2 * first


@pytest.mark.parametrize("host", HOSTS)
def test_train_build_and_stored_memory_eval_equals_recomputed(tmp_path, host):
    """Short training run through the loop (archives from the dataset), `comeir memory build`, then evaluation
    from the stored memories equals evaluation that recomputes them from the archives."""
    from comeir_dist.eval.evaluate import evaluate_arrays
    from comeir_dist.eval.memory_store import evaluate_from_memories, load_memories, run_memory_build
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.archive_samples import run_split_samples
    from comeir_dist.train.loop import train

    ds = make_tiny_dataset(tmp_path, n_users=12, n_items=40, seq_len=26)
    cfg = tiny_run_config(ds, tmp_path / "run", variant=host, max_steps=4, eval_every=4, batch_size=16,
                          eval_users=8)
    cfg.model.pref_memory = PrefMemoryConfig(enabled=True, tokens=2, segment_items=4, archive_items=20)
    cfg.train.log_every = 2
    run = train(cfg)
    import json

    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    parts = [r["loss_parts"] for r in logged if "loss_parts" in r]
    assert len(parts) == 2 and set(parts[0]) == {"ar", "con"} and parts[0]["ar"] > 0  # L_AR / L_con logged apart
    rep = run_memory_build(str(run / "best"), None, str(tmp_path / "mem"))
    assert rep["users"] == 12 and rep["bytes_per_user_max"] == 2 * 32 * 4
    model, rcfg, _, dev = load_model_from_checkpoint(run / "best")
    store = load_memories(tmp_path / "mem")
    stored = evaluate_from_memories(model, store, beam_size=5, batch_size=5)
    _, hist, target = run_split_samples(rcfg, "test")
    assert hist.shape[1] == 20
    recomputed = evaluate_arrays(model, hist, target, beam_size=5, batch_size=7)
    assert np.array_equal(stored["top_items"], recomputed["top_items"])
    assert stored["sums"].means() == pytest.approx(recomputed["sums"].means())
    # a rebuild into its own dir is allowed; a user's non-empty dir is refused before any work
    run_memory_build(str(run / "best"), None, str(tmp_path / "mem"))
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "memory.json").write_text("mine")
    with pytest.raises(UserError):
        run_memory_build(str(run / "best"), None, str(mine))
    assert (mine / "memory.json").read_text() == "mine"


def test_longseq_bench_small(tmp_path):
    from comeir_dist.bench.longseq import kv_bytes, run_longseq_bench

    rep = run_longseq_bench(str(tmp_path / "b.json"), lengths=(20, 40), batch=2, beam=3, tokens=2, seg=5, reps=1,
                            warmup=0, n_items=60, codebook=8, qwen_lengths=())
    assert [r["history"] for r in rep["rows"]] == [20, 40] and (tmp_path / "b.md").is_file()
    last = rep["rows"][-1]
    assert last["full_kv_bytes"] == kv_bytes(2, 2, 16, 40, 4) and last["memory_bytes"] == 2 * 64 * 4
    assert last["kv_memory_bytes"] == 2 * 2 * 2 * 16 * 2 * 4  # K and V x layers x kv_heads x head_dim x C x fp32
    assert rep["storage_ratio_full_over_memory"] == last["ratio"] and rep["latency_ratio_full_over_memory"] > 0
    q = rep["qwen3_0.6b"]["rows"][-1]
    assert q["full_kv_bytes"] == kv_bytes(28, 8, 128, 40, 2) and q["memory_bytes"] == 2 * 1024 * 2
    assert q["kv_memory_bytes"] == kv_bytes(28, 8, 128, 2, 2) and "KV-Mask" in (tmp_path / "b.md").read_text()
    assert "timed_rows" not in rep["qwen3_0.6b"]  # qwen_lengths=(): storage only


def test_longseq_bench_times_the_large_shape_from_its_config_file(tmp_path):
    """The large shape is built from its HF config file and timed at its own lengths and batch (a tiny config here)."""
    import json

    from comeir_dist.bench.longseq import kv_bytes, run_longseq_bench

    conf = json.loads((Path(__file__).resolve().parents[2] / "configs/backbones/qwen3-0.6b.json").read_text())
    conf.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, vocab_size=16)
    (tmp_path / "small.json").write_text(json.dumps(conf))
    rep = run_longseq_bench(str(tmp_path / "b.json"), lengths=(10,), batch=2, beam=3, tokens=2, seg=5, reps=1,
                            warmup=0, n_items=60, codebook=8, qwen_lengths=(6, 12), qwen_batch=3,
                            qwen_config=str(tmp_path / "small.json"))
    q = rep["qwen3_0.6b"]
    assert [r["history"] for r in q["timed_rows"]] == [6, 12] and q["timed_batch"] == 3
    assert q["latency_ratio_full_over_memory"] == q["timed_rows"][-1]["latency_ratio"] > 0
    assert q["beam_cache_bytes"]["bytes"] == 2 * 3 * kv_bytes(1, 1, 16, 12, 4)  # batch x beam rows of fp32 cache
    assert [r["history"] for r in q["rows"]] == [6, 10, 12] and "timed (fp32" in (tmp_path / "b.md").read_text()
    with pytest.raises(UserError, match="--qwen-lengths 4: the longest history must hold at least one segment"):
        run_longseq_bench(None, lengths=(10,), seg=5, qwen_lengths=(4,), qwen_config=str(tmp_path / "small.json"))


def test_longseq_bench_cli_rejects_bad_lengths_in_one_line(tmp_path, capsys):
    from comeir_dist.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "longseq", "--out", str(out), "--lengths", "100,x"]) == 2
    assert main(["bench", "longseq", "--out", str(out), "--lengths", "100", "--qwen-lengths", "0"]) == 2
    assert main(["bench", "longseq", "--out", str(out), "--lengths", "10"]) == 2  # shorter than one segment (20)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--lengths '100,x'" in err[0] and "--qwen-lengths '0'" in err[1]
    assert "--lengths 10: the longest history must hold at least one segment" in err[2] and not out.exists()


def test_split_archive_context_precedes_every_segment():
    items = archives([13, 2])
    segs, recent = split_archive(items, 4, context=3)
    plain, plain_recent = split_archive(items, 4)
    assert segs.shape == (2, 3, 7) and torch.equal(segs[:, :, 3:], plain)
    own = torch.where(recent[:, 3:] >= 0, recent[:, 3:], torch.full_like(plain_recent, -1))
    assert torch.equal(own, plain_recent)  # context marked (< -1): >= 0 still selects the segment's own items
    row = items[0, -13:]  # 13 items: segments 0..2 = items 0-3, 4-7, 8-11, recent = item 12
    assert segs[0, 0, :3].tolist() == [-1, -1, -1] and torch.equal(context_items_decoded(segs[0, 1, :3]), row[1:4])
    assert (segs[0, 1, :3] <= -2).all()
    assert torch.equal(context_items_decoded(recent[0, -4:]), row[9:13]) and recent[0, -1] == row[12]
    assert (recent[0, -4:-1] <= -2).all() and recent[0, :3].tolist() == [-1, -1, -1]
    assert recent[1, -2:].tolist() == items[1, -2:].tolist() and (recent[1, :-2] == -1).all()


def test_comeir_training_forward_equals_the_serving_forward():
    """The training pass encodes all segments and the recent segment in ONE lookup pass; given the same memory, its
    prediction equals level_logits from a stored memory, and its segment vectors equal those encoded alone."""
    from comeir_dist.model.pref_memory import MemoryBatch

    m = tiny_model(host="comeir", seg=4).eval()
    assert m.context_items == 2  # max(largest inter order 3 - 1, window 3 - 1)
    items, target = archives([25, 13, 3]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        mem, mmask, recent, _ = m.compress(items)
        segs, _, own = m._split(items)
        b, k, w = segs.shape
        vecs, predict = m._prepare(segs.reshape(b * k, w), MemoryBatch(recent, target))
        logits, codes = predict(mem, mmask)
        served = m.level_logits(MemoryBatch(recent, target, mem, mmask), m.catalog.item_codes(target))
        alone = m.segment_vectors(segs.reshape(b * k, w))
    assert torch.allclose(vecs, alone, atol=1e-6)
    for a, c in zip(logits, served):
        assert torch.allclose(a, c, atol=1e-5)


def test_comeir_memory_decode_matches_teacher_forcing():
    from comeir_dist.model.pref_memory import MemoryBatch
    from tests.fixtures import assert_decode_matches_teacher_forcing

    m = tiny_model(host="comeir", seg=4).eval()
    items, target = archives([25, 9, 2]), torch.tensor([4, 5, 6])
    with torch.no_grad():
        mem, mmask, recent, _ = m.compress(items)
    assert_decode_matches_teacher_forcing(m, MemoryBatch(recent, target, mem, mmask))
    assert_decode_matches_teacher_forcing(m, HistoryBatch(items, target))  # memory compressed inside
