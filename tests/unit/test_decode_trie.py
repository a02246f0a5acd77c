import itertools

import numpy as np
import pytest
import torch

from comeir_dist.decode.trie import PrefixTrie
from comeir_dist.errors import UserError


def _random_codes(n_items=40, L=3, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (n_items, L), generator=g)


def test_valid_mask_matches_brute_force_every_prefix():
    C, L = 4, 3
    codes = _random_codes(C=C, L=L)
    trie = PrefixTrie.from_codes(codes, C)
    sids = {tuple(r) for r in codes.tolist()}
    for level in range(L):
        combos = list(itertools.product(range(C), repeat=level))
        prefixes = torch.tensor(combos, dtype=torch.long).reshape(len(combos), level)
        mask = trie.valid_mask(prefixes)
        assert mask.shape == (prefixes.shape[0], C) and mask.dtype == torch.bool
        for p, row in zip(prefixes.tolist(), mask.tolist()):
            expected = [any(s[:level] == tuple(p) and s[level] == x for s in sids) for x in range(C)]
            assert row == expected, (level, p)
        assert torch.equal(trie.level_mask_fn(level)(prefixes), mask)


def test_valid_mask_level0_and_batched_shapes():
    codes = torch.tensor([[2, 0], [2, 1], [0, 3]])
    trie = PrefixTrie.from_codes(codes, 4)
    m0 = trie.valid_mask(torch.zeros(5, 7, 0, dtype=torch.long))
    assert m0.shape == (5, 7, 4)
    assert m0[0, 0].tolist() == [True, False, True, False]
    m1 = trie.valid_mask(torch.tensor([[[2], [0]], [[1], [3]]]))
    assert m1.shape == (2, 2, 4)
    assert m1[0, 0].tolist() == [True, True, False, False]
    assert m1[0, 1].tolist() == [False, False, False, True]
    assert not m1[1].any()  # prefixes not in the catalog have no children
    # out-of-range prefix codes are never valid (no wrap-around)
    assert not trie.valid_mask(torch.tensor([[-1], [4]])).any()
    with pytest.raises(ValueError):
        trie.valid_mask(torch.tensor([[2]]), level=0)


def test_encode_decode_roundtrip_and_sid_csr():
    codes = torch.tensor([[1, 2, 3], [0, 0, 0], [1, 2, 3], [3, 3, 3], [1, 2, 3], [0, 0, 0]])
    trie = PrefixTrie.from_codes(codes, 4)
    keys = trie.encode(codes)
    assert keys.tolist() == [1 * 16 + 2 * 4 + 3, 0, 27, 63, 27, 0]
    assert torch.equal(trie.decode(keys), codes)
    assert trie.num_sids == 3 and trie.num_items == 6
    assert trie.sid_keys.tolist() == [0, 27, 63]
    assert trie.sid_offsets.tolist() == [0, 2, 5, 6]
    assert trie.sid_items.tolist() == [1, 5, 0, 2, 4, 3]  # ascending item index inside a group
    assert trie.sid_sizes.tolist() == [2, 3, 1]
    assert trie.item_sid.tolist() == [1, 0, 1, 2, 1, 0]
    assert torch.equal(trie.sid_codes, torch.tensor([[0, 0, 0], [1, 2, 3], [3, 3, 3]]))
    assert trie.items_of_codes([1, 2, 3]).tolist() == [0, 2, 4]
    assert trie.items_of_codes([2, 2, 2]).tolist() == []
    rows, found = trie.lookup_sid(torch.tensor([27, 5, 63]))
    assert rows.tolist() == [1, -1, 2] and found.tolist() == [True, False, True]
    assert trie.contains(torch.tensor([[1, 2, 3], [1, 2, 0], [-1, 0, 0]])).tolist() == [True, False, False]
    # every item has exactly one SID
    assert sorted(trie.sid_items.tolist()) == list(range(6))


def test_large_codebook_does_not_allocate_dense_levels():
    C = 100_000  # 3 levels: C**2 = 1e10 rows would never fit; we only keep observed prefixes
    codes = torch.tensor([[5, 99_999, 7], [5, 99_999, 8], [42, 0, 1]])
    trie = PrefixTrie.from_codes(codes, C)
    assert [t.shape[0] for t in trie.child_table] == [1, 2, 2]
    m = trie.valid_mask(torch.tensor([[5, 99_999], [42, 0], [5, 0]]))
    assert m[0].nonzero().flatten().tolist() == [7, 8]
    assert m[1].nonzero().flatten().tolist() == [1]
    assert not m[2].any()


def test_numpy_input_and_to_device():
    codes = np.array([[0, 1], [1, 0]], dtype=np.int32)
    trie = PrefixTrie.from_codes(codes, 2)
    assert trie.device == torch.device("cpu")
    assert trie.to("cpu") is trie
    assert "PrefixTrie" in repr(trie)


def test_invalid_inputs():
    with pytest.raises(UserError):
        PrefixTrie.from_codes(torch.tensor([[0, 4]]), 4)
    with pytest.raises(UserError):
        PrefixTrie.from_codes(torch.tensor([[0, -1]]), 4)
    with pytest.raises(UserError):
        PrefixTrie.from_codes(torch.zeros(0, 3, dtype=torch.long), 4)
    with pytest.raises(UserError):
        PrefixTrie.from_codes(torch.zeros(2, 10, dtype=torch.long), 2 ** 20)
    with pytest.raises(ValueError):
        PrefixTrie.from_codes(torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError):
        PrefixTrie.from_codes(torch.zeros(3, 2), 4)
