"""quantize.assign = argmin: balanced-k-means centroids, nearest-centroid codes (paper Eq. 29), collisions kept.

* every item's code is its nearest centroid at every level, with residuals from those codes (brute force);
* the centroids are exactly those of assign=balanced (same seed);
* collision groups are reported (sid_stats, fit_quantizer, report.json) and the SID fingerprint carries
  the assignment rule;
* the prefix tree and the item-level metrics handle a known collision group.
"""
import json
import math

import numpy as np
import pytest
import torch

from comeir_dist.config.pipeline import QuantizeConfig
from comeir_dist.decode.beam import BeamResult
from comeir_dist.decode.trie import PrefixTrie
from comeir_dist.eval.metrics import compute_metrics, item_hit_at_k, item_ndcg_at_k
from comeir_dist.eval.ranking import rank_items
from comeir_dist.quant.report import codes_fingerprint, sid_stats
from comeir_dist.quant.rqkmeans import fit_rqkmeans

NEG = float("-inf")


def _data(n=120, d=6, seed=0):
    """Unequal clusters plus near-duplicates: balancing moves items off their nearest centroid, and the
    duplicates collide under plain assignment."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(4, d))
    sizes = [60, 30, 20, 10]
    x = np.concatenate([c + rng.normal(size=(s, d)) for c, s in zip(centers, sizes)])
    x[-6:] = x[-7]  # seven identical items
    return x[:n].astype(np.float32)


@pytest.mark.parametrize("levels,size", [(2, 4), (3, 5)])
def test_every_code_is_the_nearest_centroid(levels, size):
    x = _data()
    res = fit_rqkmeans(x, levels, size, iters=15, seed=3, balanced=True, assign="argmin")
    assert res.info["assign"] == "argmin" and res.info["reassigned_items"] == 0
    r = x.astype(np.float64)
    recon = np.zeros_like(r)
    for l in range(levels):
        cb = res.codebooks[l].astype(np.float64)
        d = ((r[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
        chosen = d[np.arange(len(x)), res.codes[:, l]]
        assert np.all(chosen <= d.min(1) + 1e-4), f"level {l + 1}: an item is not at its nearest centroid"
        r = r - cb[res.codes[:, l]]
        recon += cb[res.codes[:, l]]
    np.testing.assert_allclose(res.recon, recon, atol=1e-4)  # x_hat = sum of the chosen codewords (Eq. 29)


def test_argmin_keeps_the_balanced_centroids_and_changes_codes():
    x = _data()
    bal = fit_rqkmeans(x, 2, 4, iters=15, seed=5, balanced=True, assign="balanced")
    arg = fit_rqkmeans(x, 2, 4, iters=15, seed=5, balanced=True, assign="argmin")
    np.testing.assert_array_equal(bal.codebooks, arg.codebooks)  # same fitted (balanced k-means) centroids
    assert not np.array_equal(bal.codes, arg.codes)  # the capacity constraint moved items off their nearest code
    # balanced clusters hold at most ceil(I/C) items per code at level 1; argmin is free to exceed it
    assert np.bincount(bal.codes[:, 0]).max() <= math.ceil(len(x) / 4)
    assert np.bincount(arg.codes[:, 0]).max() > math.ceil(len(x) / 4)
    with pytest.raises(ValueError):
        fit_rqkmeans(x, 2, 4, iters=2, seed=5, assign="nearest")


def test_collisions_kept_unless_resolved():
    x = _data()
    kept = fit_rqkmeans(x, 2, 4, iters=15, seed=1, balanced=True, assign="argmin")
    s = sid_stats(kept.codes, 4)
    assert s["max_items_per_sid"] >= 7  # the seven identical items share one SID
    res = fit_rqkmeans(x, 2, 4, iters=15, seed=1, balanced=True, assign="argmin", resolve_collisions=True)
    assert res.info["reassigned_items"] > 0
    assert sid_stats(res.codes, 4)["items_in_collisions"] < s["items_in_collisions"]
    np.testing.assert_array_equal(res.codes[:, 0], kept.codes[:, 0])  # only the last level moves


def test_default_combination():
    assert QuantizeConfig().assign == "balanced" and QuantizeConfig().collisions_resolved  # as before
    assert not QuantizeConfig(assign="argmin").collisions_resolved  # the paper: collisions kept
    assert QuantizeConfig(assign="argmin", resolve_collisions=True).collisions_resolved
    assert not QuantizeConfig(resolve_collisions=False).collisions_resolved
    assert QuantizeConfig(method="rqvae", assign="argmin").collisions_resolved  # RQ-VAE: unchanged default
    with pytest.raises(ValueError):
        QuantizeConfig(assign="lloyd")
    # the JSON round trip of a Ray task keeps the effective choice
    cfg = QuantizeConfig(assign="argmin")
    assert not QuantizeConfig.model_validate_json(cfg.model_dump_json()).collisions_resolved


def test_sid_stats_collision_groups():
    # SIDs: (0,0) x3, (1,1) x2, (2,3) x1, (3,3) x1, (0,1) x4
    codes = np.array([[0, 0], [1, 1], [0, 0], [2, 3], [1, 1], [0, 0], [3, 3], [0, 1], [0, 1], [0, 1], [0, 1]])
    s = sid_stats(codes, 4)
    assert s["distinct_sids"] == 5 and s["collision_groups"] == 3
    assert s["items_in_collisions"] == 9 and s["max_items_per_sid"] == 4
    assert s["collision_group_sizes"] == {"2": 1, "3": 1, "4": 1}
    assert sid_stats(np.array([[0, 1], [1, 0]]), 2)["collision_groups"] == 0
    json.dumps(s)  # report.json material


def test_fingerprint_changes_with_the_rule():
    codes = np.array([[0, 1], [1, 0]])
    assert QuantizeConfig().sid_tag is None and QuantizeConfig(method="rqvae", assign="argmin").sid_tag is None
    tag = QuantizeConfig(assign="argmin").sid_tag
    assert tag == "assign=argmin"
    assert codes_fingerprint(codes) == codes_fingerprint(codes, None)  # old SID tables keep their fingerprint
    assert codes_fingerprint(codes, tag) != codes_fingerprint(codes)


def test_quantize_report_and_load(tmp_path, monkeypatch):
    """run_quantize (restarts run in-process here instead of Ray) writes the collision groups, the rule and a
    tagged fingerprint; load_sids recomputes the same fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from comeir_dist.data.schema import ITEMS_SCHEMA, emb_schema
    from comeir_dist.quant import run as qrun
    from comeir_dist.quant.sid_table import load_sids

    x = _data()
    n, d = x.shape
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)), "raw_id": [str(i) for i in range(n)],
                             "title": [f"t{i}" for i in range(n)], "description": [None] * n, "brand": ["b"] * n,
                             "categories": ["c"] * n}, schema=ITEMS_SCHEMA), tmp_path / "items.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int32)),
                                         pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)],
                                        schema=emb_schema(d)), tmp_path / "item_emb.parquet")
    monkeypatch.setattr(qrun, "_run_restarts", lambda emb, cfg, *a: [qrun.fit_quantizer(emb, cfg, cfg.seed + i)
                                                                    for i in range(cfg.restarts)])
    fps = {}
    for assign in ("balanced", "argmin"):
        cfg = QuantizeConfig(levels=2, codebook_size=4, kmeans_iters=10, restarts=1, assign=assign)
        out = qrun.run_quantize(tmp_path, cfg)
        rep = json.loads((out / "report.json").read_text())
        assert rep["assign"] == assign and rep["resolve_collisions"] == (assign == "balanced")
        for k in ("collision_groups", "max_items_per_sid", "items_in_collisions", "collision_group_sizes",
                  "pre_resolution_distinct_sids"):
            assert k in rep
        sids = load_sids(tmp_path, "rqkmeans")
        assert sids.fingerprint == rep["fingerprint"]
        assert (rep["sid_tag"] is None) == (assign == "balanced")
        if assign == "balanced":
            assert rep["fingerprint"] == codes_fingerprint(sids.codes)  # unchanged definition
        else:
            assert rep["collision_groups"] > 0 and rep["items_in_collisions"] >= 7
        fps[assign] = rep["fingerprint"]
    assert fps["balanced"] != fps["argmin"]


# ---- a collision group through the catalogue and the item-level metrics ----------------------------------
# items 0..6; SID (1,2) is shared by items 2, 4 and 5 (a hand-made collision group of three)
GROUP_CODES = torch.tensor([[0, 0], [0, 1], [1, 2], [2, 0], [1, 2], [1, 2], [3, 3]])


def test_trie_maps_a_sid_to_its_group():
    trie = PrefixTrie.from_codes(GROUP_CODES, 4)
    assert trie.num_sids == 5 and trie.num_items == 7
    assert trie.items_of_codes([1, 2]).tolist() == [2, 4, 5]
    assert int(trie.sid_sizes[trie.item_sid[4]]) == 3
    assert trie.valid_mask(torch.tensor([[1]])).tolist() == [[False, False, True, False]]  # one child, three items


def test_item_level_metrics_with_a_known_collision_group():
    trie = PrefixTrie.from_codes(GROUP_CODES, 4)
    # user 0: beams (0,1), (1,2), (3,3) -> item 1, then the group {2, 4, 5}, then item 6; target 4 (in the group)
    # user 1: same beams, target 3 (SID (2,0) not returned)
    # user 2: beams (1,2), (0,0): target 5 (in the group, group first)
    res = BeamResult(codes=torch.tensor([[[0, 1], [1, 2], [3, 3]], [[0, 1], [1, 2], [3, 3]],
                                         [[1, 2], [0, 0], [-1, -1]]]),
                     scores=torch.tensor([[-0.1, -0.2, -0.3], [-0.1, -0.2, -0.3], [-0.1, -0.4, NEG]]))
    ranking = rank_items(res, trie, targets=[4, 3, 5], top_n=6)
    # the group is expanded in ascending item index at the SID's position (display order only)
    assert ranking.items[0].tolist() == [1, 2, 4, 5, 6, -1]
    assert ranking.items[2].tolist() == [2, 4, 5, 0, -1, -1]
    t = ranking.targets
    assert t.P.tolist() == [1, 5, 0] and t.G.tolist() == [3, 1, 3]
    assert t.found.tolist() == [True, False, True] and t.sid_rank.tolist() == [2, 0, 1]
    # expected value over the target's position inside its tie group (positions P+1..P+G), not the display order
    assert item_hit_at_k(t.P, t.G, t.found, 1).tolist() == [0.0, 0.0, pytest.approx(1 / 3)]
    assert item_hit_at_k(t.P, t.G, t.found, 2).tolist() == [pytest.approx(1 / 3), 0.0, pytest.approx(2 / 3)]
    assert item_hit_at_k(t.P, t.G, t.found, 4).tolist() == [1.0, 0.0, 1.0]
    ndcg3 = item_ndcg_at_k(t.P, t.G, t.found, 3)
    assert ndcg3[0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert ndcg3[2] == pytest.approx((1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    m = compute_metrics(t.P, t.G, t.found, t.sid_rank, ks=(1, 5))
    assert m["sid/hit@1"] == pytest.approx(1 / 3)  # SID level: user 2's SID is first
    assert m["item/hit@1"] == pytest.approx((1 / 3) / 3)  # item level: 1 of its 3 tied items
    assert m["item/hit@5"] == pytest.approx(2 / 3)


def test_argmin_sids_through_the_trie():
    """Collision groups produced by argmin SIDs survive the catalogue: every item maps to its own SID row,
    each group is one SID whose size is the group size."""
    x = _data()
    res = fit_rqkmeans(x, 2, 4, iters=15, seed=1, balanced=True, assign="argmin")
    trie = PrefixTrie.from_codes(res.codes, 4)
    s = sid_stats(res.codes, 4)
    assert trie.num_sids == s["distinct_sids"] and int(trie.sid_sizes.max()) == s["max_items_per_sid"]
    assert int((trie.sid_sizes > 1).sum()) == s["collision_groups"]
    for i in range(len(x)):
        assert i in trie.items_of(int(trie.item_sid[i])).tolist()


def test_quantize_flags_select_the_assignment(tmp_path, monkeypatch, capsys):
    """`comeir quantize --assign argmin --resolve-collisions true` reaches the quantizer config; a bad value is one
    line and exit 2."""
    from comeir_dist.cli import main
    from comeir_dist.quant import run as qrun
    from tests.fixtures import make_tiny_dataset

    ds = str(make_tiny_dataset(tmp_path))
    seen = {}

    def fake(dataset_dir, cfg, **kw):
        seen["cfg"] = cfg
        out = tmp_path / "sids"
        out.mkdir(exist_ok=True)
        (out / "report.json").write_text("{}")
        return out

    monkeypatch.setattr(qrun, "run_quantize", fake)
    assert main(["quantize", "--dataset", ds, "--assign", "argmin"]) == 0
    assert seen["cfg"].assign == "argmin" and seen["cfg"].collisions_resolved is False
    assert main(["quantize", "--dataset", ds, "--assign", "argmin", "--resolve-collisions", "true"]) == 0
    assert seen["cfg"].collisions_resolved is True
    assert main(["quantize", "--dataset", ds, "--assign", "nearest"]) == 2
    assert "quantize.assign" in capsys.readouterr().err
