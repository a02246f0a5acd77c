"""All-position training (``train.sample_mode: sequence``): windows, and the loss equals the prefix samples' losses
(sasrec, the preference memory, flatten, tm)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comeir_dist.config.run import BackboneConfig, RunConfig
from comeir_dist.errors import UserError
from comeir_dist.model.backbone import build_backbone
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.pref_memory import PrefMemorySASRec
from comeir_dist.model.pref_memory_config import PrefMemoryConfig
from comeir_dist.model.sasrec import SASRecModel, trim_left_padding
from comeir_dist.train.samples import count_training_samples
from comeir_dist.train.sequence_samples import sequence_training_samples, sequence_windows
from tests.fixtures import TINY_BACKBONE, make_tiny_dataset, tiny_run_config

N_ITEMS = 30


def _seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, N_ITEMS, n)) for n in lengths]


@pytest.mark.parametrize("width,seg", [(5, 1), (12, 4), (40, 4)])
def test_windows_partition_every_transition_once_aligned_to_segments(width, seg):
    seqs = [list(range(100 * u, 100 * u + n)) for u, n in enumerate([1, 2, 5, 13, 30])]  # distinct items
    x, y = sequence_windows(seqs, width, seg)
    assert x.shape == y.shape and x.shape[1] == width
    assert np.array_equal(x >= 0, y >= 0)  # same left padding: the same segmentation of inputs and targets
    pairs = sorted((int(a), int(b)) for a, b in zip(x[x >= 0], y[y >= 0]))
    assert pairs == sorted((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))  # each once
    for row in x:
        real = row[row >= 0]
        assert np.all(np.diff(real) == 1)  # a contiguous piece of one user's sequence
        start = int(real[0]) % 100  # position of the window's first item in the user's sequence
        assert start % seg == 0  # windows start at a segment boundary (segments aligned from the first item)


def test_dataset_windows_cover_the_prefix_samples(tmp_path):
    ds = make_tiny_dataset(tmp_path, seq_len=9)
    cfg = tiny_run_config(ds, tmp_path / "run", variant="sasrec", sample_mode="sequence")
    x, y = sequence_training_samples(cfg)
    assert int((y >= 0).sum()) == count_training_samples(ds)  # every prefix sample's target, once
    data = tiny_run_config(ds, tmp_path / "run", variant="comeir").model_dump()
    data["model"]["decoding"], data["train"]["sample_mode"] = "nezha", "sequence"
    with pytest.raises(Exception, match="sample_mode=sequence with comeir needs model.decoding: normal"):
        RunConfig.model_validate(data)


def _sasrec(seed=0):
    torch.manual_seed(seed)
    return SASRecModel(N_ITEMS, build_backbone(BackboneConfig(**TINY_BACKBONE))).eval()


def _pm_sasrec(mode, seed=0, seg=4, width=24, align_weight=0.0):
    torch.manual_seed(seed)
    cfg = PrefMemoryConfig(enabled=True, tokens=2, segment_items=seg, mode=mode, archive_items=width,
                           align_weight=align_weight)
    return PrefMemorySASRec(N_ITEMS, build_backbone(BackboneConfig(**TINY_BACKBONE)), cfg).eval()


def _prefix_sum(model, x: torch.Tensor, y: torch.Tensor, loss=None) -> torch.Tensor:
    """Sum over rows and positions of the prefix samples' losses (history = row[:i+1], target y[i])."""
    total = torch.zeros(())
    width = x.shape[1]
    for row, tgt in zip(x, y):
        hist, targets = [], []
        for i in torch.nonzero(tgt >= 0).flatten().tolist():
            h = torch.full((width,), -1, dtype=torch.long)
            h[width - i - 1:] = row[:i + 1]
            hist.append(h)
            targets.append(tgt[i])
        batch = HistoryBatch(torch.stack(hist), torch.stack(targets))
        batch_loss = loss(model, batch) if loss else model.training_loss(batch)
        total = total + batch_loss * len(targets)  # prefix loss = mean over its samples
    return total


def test_sasrec_sequence_loss_equals_the_prefix_losses():
    model = _sasrec()
    x, y = (torch.as_tensor(a) for a in sequence_windows(_seqs([3, 7, 12, 20]), 8))
    seq = float(model.training_loss(HistoryBatch(x, y)))
    assert seq == pytest.approx(float(_prefix_sum(model, x, y) / 8 / len(x)), rel=1e-5)
    # extra all-padding columns are trimmed: the same states, the loss scales with the stated width only
    wide = torch.cat([torch.full((len(x), 5), -1), x], 1), torch.cat([torch.full((len(y), 5), -1), y], 1)
    assert float(model.training_loss(HistoryBatch(*wide))) * 13 == pytest.approx(seq * 8, rel=1e-5)
    assert trim_left_padding(*wide)[0].shape[1] == 8


def _sid_model(tmp_path, sample_mode="sequence", variant="flatten", **model):
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    ds = make_tiny_dataset(tmp_path, seq_len=14)
    data = tiny_run_config(ds, tmp_path / "run", variant=variant, sample_mode=sample_mode).model_dump()
    data["engram"].update(model.pop("engram", {}))
    data["model"].update(model)
    cfg = RunConfig.model_validate(data)
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    return build_sharded_model(cfg, sids, emb, torch.device("cpu")).eval(), cfg


COMPOSE = {"compose": True, "alpha": 0.5}


@pytest.mark.parametrize("variant,model", [
    ("flatten", {}), ("tm", {}), ("comeir", {}), ("comeir", {"head_interaction": "dot"}),
    ("comeir", {"comeir_head": "decoder"}), ("comeir", {"engram": {"cross_fit": True}}), ("flatten", {"decor": COMPOSE}), ("tm", {"decor": COMPOSE}),
    ("flatten", {"token_fusion": "decor", "decor": {**COMPOSE, "bos_queries": 4}}),
    ("tm", {"decor": {**COMPOSE, "bos_queries": 4, "context_current": False}})])
def test_sid_sequence_loss_equals_the_prefix_losses(tmp_path, variant, model):
    """One pass over a window scores every target exactly as the prefix sample (window[:i+1], target i) of prefix
    training does (Eq. 12 with the catalog masks of Eq. 11), positions counted from the window's first real token:
    flatten's causal pass over the SID tokens, tm's block-masked pass over items + fed-back codes (code_sequence.py),
    comeir's window encoder with the head per target (comeir_sequence.py; with engram.cross_fit every target keeps
    its window's fold), DECOR's per-position composition and BOS (decor_sequence.py)."""
    from comeir_dist.parallel.dense import sid_training_loss

    model, cfg = _sid_model(tmp_path, variant=variant, **model)
    x, y = (torch.as_tensor(a) for a in sequence_training_samples(cfg))
    x, y = x[:9], y[:9]
    assert int((x >= 0).sum(-1).min()) < 4 < int((x >= 0).sum(-1).max())  # short and long windows mixed
    seq = float(sid_training_loss(model, HistoryBatch(x, y)))
    assert seq == pytest.approx(float(_prefix_sum(model, x, y, sid_training_loss) / x.shape[1] / len(x)), rel=1e-5)
    # extra all-padding columns are trimmed: the loss scales with the stated width only
    wide = torch.cat([torch.full((len(x), 3), -1), x], 1), torch.cat([torch.full((len(y), 3), -1), y], 1)
    assert float(sid_training_loss(model, HistoryBatch(*wide))) * (x.shape[1] + 3) == pytest.approx(
        seq * x.shape[1], rel=1e-5)
    if variant == "tm" and not model:  # the block mask as an additive float mask (eager attention): the same loss
        model.backbone.config._attn_implementation = "eager"
        assert float(sid_training_loss(model, HistoryBatch(x, y))) == pytest.approx(seq, rel=1e-5)


@pytest.mark.parametrize("variant", ["flatten", "tm", "comeir"])
def test_sid_sequence_mode_refuses_what_it_cannot_train(tmp_path, variant):
    base = tiny_run_config(make_tiny_dataset(tmp_path), tmp_path / "r", variant=variant).model_dump()
    cases = [{"decoding": "nezha"}] + ([{"pref_memory": {"enabled": True}}] if variant != "flatten" else [])
    for model in cases:
        with pytest.raises(Exception, match=f"sample_mode=sequence with {variant} needs model.decoding: normal"):
            RunConfig.model_validate({**base, "model": {**base["model"], **model},
                                      "train": {**base["train"], "sample_mode": "sequence"}})
    model, _ = _sid_model(tmp_path / "nezha", "prefix", variant, decoding="nezha")  # past the config check: the model
    x, y = torch.tensor([[0, 1]]), torch.tensor([[1, 2]])
    with pytest.raises(UserError, match=f"trains {variant} with model.decoding: normal"):
        model.sequence_training_loss(HistoryBatch(x, y))


@pytest.mark.parametrize("align_weight", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_memory_sequence_loss_equals_the_prefix_training_losses(mode, align_weight):
    """The global pass is causal over segments: the state at window position i reads the reference memory of the
    segments before i's segment, exactly as the prefix sample (window[:i+1], target i) of prefix training; with
    the consistency term too (each target's prefix sample carries L_con over the segments before its own)."""
    model = _pm_sasrec(mode, align_weight=align_weight)
    x, y = (torch.as_tensor(a) for a in sequence_windows(_seqs([2, 5, 11, 26]), 24, 4))
    assert int((x >= 0).sum(-1).max()) > 12  # several complete segments
    seq = float(model.training_loss(HistoryBatch(x, y)))
    if align_weight:
        assert model.last_losses["con"] > 1e-4
    assert seq == pytest.approx(float(_prefix_sum(model, x, y) / 24 / len(x)), rel=1e-5)


def test_memory_sequence_loss_adds_the_consistency_term():
    model = _pm_sasrec("overwrite")
    model.pm = model.pm.model_copy(update={"align_weight": 1.0})
    x, y = (torch.as_tensor(a) for a in sequence_windows(_seqs([26, 19]), 24, 4))
    loss = model.training_loss(HistoryBatch(x, y))
    assert model.last_losses["con"] > 0
    assert float(loss) == pytest.approx(model.last_losses["ar"] + model.last_losses["con"], rel=1e-5)


@pytest.mark.parametrize("variant", ["sasrec", "flatten", "tm", "comeir"])
def test_sequence_training_learns(tmp_path, variant):
    from comeir_dist.train.loop import train
    import json

    ds = make_tiny_dataset(tmp_path, seq_len=12)
    cfg = tiny_run_config(ds, tmp_path / "run", variant=variant, sample_mode="sequence", max_steps=60,
                          eval_every=30, batch_size=8, lr=1e-2, warmup_steps=0)
    cfg.model.backbone.dropout = 0.0
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_valid_ndcg@10"] > 0.5  # users walk a fixed item cycle: learnable


def test_length_buckets_permute_every_sample_once_and_group_lengths():
    from comeir_dist.train.archive_samples import ArchiveHistory, align_archive
    from comeir_dist.train.samples import EpochSampler, row_lengths

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, 203)
    plain, bucketed = (EpochSampler(203, 10, 7, lengths=lengths, buckets=b) for b in (0, 5))
    for sampler in (plain, bucketed):
        order = np.concatenate([sampler.next() for _ in range(21)])  # 20 full batches + the remainder of 3
        assert sorted(order.tolist()) == list(range(203))
    spread = lambda s: np.mean([np.ptp(lengths[s._perm[i:i + 10]]) for i in range(0, 200, 10)])  # noqa: E731
    assert spread(bucketed) < 0.5 * spread(plain)
    again = EpochSampler(203, 10, 7, epoch=bucketed.epoch, offset=0, lengths=lengths, buckets=5)
    assert np.array_equal(again._perm, bucketed._perm)  # deterministic in (seed, epoch): exact resume
    # archive rows: lengths without building them
    seqs = _seqs([1, 5, 30, 61])
    hist = ArchiveHistory(seqs, 24, 4)
    assert row_lengths(hist).tolist() == [len(align_archive(s[:e], 24, 4)) for s in seqs for e in range(1, len(s))]
    assert row_lengths(np.array([[-1, 3, 4], [-1, -1, 2]])).tolist() == [2, 1]


def test_experiment_with_a_sequence_config_checks_variants_and_runs_popular(tmp_path):
    from comeir_dist.train.experiment import run_experiment

    ds = make_tiny_dataset(tmp_path)
    cfg = tiny_run_config(ds, tmp_path / "exp", variant="sasrec", sample_mode="sequence")
    cfg.model.pref_memory.enabled = True  # sasrec's archives; tm cannot train on every position with them
    with pytest.raises(UserError, match="--variants tm.*sample_mode=sequence with tm needs"):
        run_experiment(cfg, ["popular", "tm"], 1)
    assert not (tmp_path / "exp" / "results").exists()  # checked before anything runs
    table = run_experiment(cfg, ["popular"], 1)
    assert table.splitlines()[2].startswith("| popular | - | 1 |")
