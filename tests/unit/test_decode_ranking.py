import itertools
import math

import pytest
import torch

from comeir_dist.decode.beam import BeamResult, beam_search
from comeir_dist.decode.trie import PrefixTrie
from comeir_dist.eval.metrics import compute_metrics, item_hit_at_k, item_ndcg_at_k
from comeir_dist.eval.ranking import beam_sid_rows, expand_items, locate_targets, rank_items

NEG = float("-inf")

# SIDs: [0,0] -> items {0,2,5}; [1,1] -> {1,4}; [2,3] -> {3}; [3,3] -> {6}
CODES = torch.tensor([[0, 0], [1, 1], [0, 0], [2, 3], [1, 1], [0, 0], [3, 3]])


def _result():
    codes = torch.tensor([
        [[1, 1], [0, 0], [2, 3], [-1, -1]],
        [[3, 3], [2, 3], [1, 1], [0, 0]],
        [[3, 3], [2, 3], [1, 1], [0, 0]],
        [[2, 3], [-1, -1], [-1, -1], [-1, -1]],
    ])
    scores = torch.tensor([
        [-0.1, -0.5, -1.0, NEG],
        [-0.2, -0.3, -0.4, -0.9],
        [-0.2, -0.3, -0.4, -0.9],
        [-0.7, NEG, NEG, NEG],
    ])
    return BeamResult(codes=codes, scores=scores)


def test_expand_items_in_beam_order_with_ties_by_item_index():
    trie = PrefixTrie.from_codes(CODES, 4)
    res = _result()
    rows = beam_sid_rows(res, trie)
    assert rows.tolist() == [[1, 0, 2, -1], [3, 2, 1, 0], [3, 2, 1, 0], [2, -1, -1, -1]]
    r = expand_items(res, trie, top_n=8)
    assert r.items.tolist() == [
        [1, 4, 0, 2, 5, 3, -1, -1],
        [6, 3, 1, 4, 0, 2, 5, -1],
        [6, 3, 1, 4, 0, 2, 5, -1],
        [3, -1, -1, -1, -1, -1, -1, -1],
    ]
    assert r.sid_rank[0].tolist() == [1, 1, 2, 2, 2, 3, 0, 0]
    assert r.scores[0].tolist()[:6] == pytest.approx([-0.1, -0.1, -0.5, -0.5, -0.5, -1.0])
    assert math.isinf(r.scores[0, 6]) and r.scores[0, 6] < 0
    r3 = expand_items(res, trie, top_n=3)
    assert r3.items[1].tolist() == [6, 3, 1]


def test_locate_targets():
    trie = PrefixTrie.from_codes(CODES, 4)
    res = _result()
    t = locate_targets(res, trie, torch.tensor([2, 6, 4, 0]))
    assert t.P.tolist() == [2, 0, 2, 1]
    assert t.G.tolist() == [3, 1, 2, 3]
    assert t.found.tolist() == [True, True, True, False]
    assert t.sid_rank.tolist() == [2, 1, 3, 0]
    both = rank_items(res, trie, targets=[2, 6, 4, 0], top_n=5)
    assert both.items.shape == (4, 5)
    assert torch.equal(both.targets.P, t.P) and torch.equal(both.targets.sid_rank, t.sid_rank)
    m = compute_metrics(t.P, t.G, t.found, t.sid_rank, ks=(1, 5))
    assert m["users"] == 4
    # item hit@5: user0 min(3, 5-2)/3 = 1; user1 1; user2 min(2, 3)/2 = 1; user3 0
    assert m["item/hit@5"] == pytest.approx(3 / 4)
    # item hit@1: user0 0 (P=2); user1 1; user2 0; user3 0
    assert m["item/hit@1"] == pytest.approx(1 / 4)
    assert m["sid/hit@1"] == pytest.approx(1 / 4)
    assert m["sid/ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 + 0.5) / 4)
    with pytest.raises(ValueError):
        locate_targets(res, trie, [0, 1, 2])
    with pytest.raises(ValueError):
        locate_targets(res, trie, [0, 1, 2, 7])


def test_duplicate_and_non_catalog_beams():
    trie = PrefixTrie.from_codes(CODES, 4)
    dup = BeamResult(codes=torch.tensor([[[1, 1], [1, 1], [0, 0]]]), scores=torch.tensor([[-0.1, -0.2, -0.3]]))
    rows = beam_sid_rows(dup, trie)
    assert rows.tolist() == [[1, -1, 0]]  # a repeated SID is only counted at its best position
    assert expand_items(dup, trie, 6).items.tolist() == [[1, 4, 0, 2, 5, -1]]
    bad = BeamResult(codes=torch.tensor([[[1, 2]]]), scores=torch.tensor([[-0.1]]))
    with pytest.raises(ValueError):
        beam_sid_rows(bad, trie)


def _expected_by_permutation(order_groups, target, k):
    """Average Hit/NDCG over every order inside each tie group (exact brute force)."""
    hits, ndcgs, n = 0.0, 0.0, 0
    for perms in itertools.product(*[itertools.permutations(g) for g in order_groups]):
        ranking = [i for p in perms for i in p]
        n += 1
        if target in ranking[:k]:
            r = ranking.index(target) + 1
            hits += 1
            ndcgs += 1 / math.log2(r + 1)
    return hits / n, ndcgs / n


def test_end_to_end_item_metrics_equal_random_tie_expectation():
    g = torch.Generator().manual_seed(4)
    C, L, I, B = 3, 2, 14, 6
    codes = torch.randint(0, C, (I, L), generator=g)
    trie = PrefixTrie.from_codes(codes, C)
    w = torch.randn(L, B, C * C, C, generator=g)

    def step(level, p, parent):
        key = p[..., 0] * C if level == 1 else torch.zeros(p.shape[:2], dtype=torch.long)
        return w[level][torch.arange(B).unsqueeze(1), key]

    res = beam_search(step, trie, B, beam_size=3)
    targets = torch.randint(0, I, (B,), generator=g)
    t = locate_targets(res, trie, targets)
    rows = beam_sid_rows(res, trie)
    for k in (1, 2, 3, 5):
        hit = item_hit_at_k(t.P, t.G, t.found, k)
        ndcg = item_ndcg_at_k(t.P, t.G, t.found, k)
        for b in range(B):
            groups = [tuple(trie.items_of(int(r)).tolist()) for r in rows[b].tolist() if r >= 0]
            if len(groups) > 0 and sum(len(x) for x in groups) > 9:  # keep the enumeration small
                continue
            eh, en = _expected_by_permutation(groups, int(targets[b]), k)
            assert hit[b] == pytest.approx(eh), (b, k)
            assert ndcg[b] == pytest.approx(en), (b, k)
