"""Eq. 39 multi-head hashing: vectorised torch == pure-Python reference."""
import random

import pytest
import torch

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.hashing import (
    build_hashers,
    check_multipliers_state,
    hash_keys,
    hash_multipliers,
    hash_reference,
    multipliers_state,
)
from comeir_dist.engram.sizing import table_specs


def test_multipliers_deterministic_odd_and_distinct():
    a = hash_multipliers(0, "inter", 1, 3, 0)
    assert a == hash_multipliers(0, "inter", 1, 3, 0)
    assert len(a) == 3 and all(m % 2 == 1 and 2**20 <= m < 2**31 for m in a)
    assert a != hash_multipliers(1, "inter", 1, 3, 0)
    assert a != hash_multipliers(0, "inter", 1, 3, 1)
    assert a != hash_multipliers(0, "intra", 1, 3, 0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_torch_matches_python_reference(order):
    rng = random.Random(order)
    mult = hash_multipliers(7, "inter", 2, order, 1)
    for modulus in (2, 131, 2_097_169, 19_999_999):
        keys = [[rng.randrange(0, 2_097_152) for _ in range(order)] for _ in range(300)]
        keys += [[0] * order, [2_097_151] * order]
        got = hash_keys(torch.tensor(keys), mult, modulus).tolist()
        want = [hash_reference(k, mult, modulus) for k in keys]
        assert got == want
        assert all(0 <= g < modulus for g in got)


def test_overflowing_products_wrap_identically():
    # keys near 2^62 make x*m overflow int64; the 62-bit mask keeps torch == python
    rng = random.Random(3)
    mult = [rng.randrange(2**20, 2**31) | 1 for _ in range(3)]
    keys = [[rng.randrange(0, 2**62) for _ in range(3)] for _ in range(200)]
    got = hash_keys(torch.tensor(keys), mult, 1_000_003).tolist()
    assert got == [hash_reference(k, mult, 1_000_003) for k in keys]


def test_batched_shapes_and_hashers():
    cfg = EngramConfig(s_t=0.5, s_s=0.125)
    specs = table_specs(cfg)
    hs = build_hashers(specs, cfg.hash_seed)
    s = next(x for x in specs if x.memory == "inter" and x.order == 3)
    keys = torch.randint(0, 128, (4, 5, 3))
    ids = hs[s.name](keys)
    assert ids.shape == (4, 5) and ids.dtype == torch.int64
    assert int(ids.max()) < s.rows and int(ids.min()) >= 0
    flat = [hash_reference(k, hs[s.name].multipliers, s.rows) for k in keys.reshape(-1, 3).tolist()]
    assert ids.reshape(-1).tolist() == flat
    # heads of one key use different functions
    heads = [x for x in specs if (x.memory, x.level, x.order) == (s.memory, s.level, s.order)]
    outs = [hs[h.name](keys) for h in heads]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_state_roundtrip_and_mismatch():
    cfg = EngramConfig(s_t=0.5, s_s=0.125)
    hs = build_hashers(table_specs(cfg), 0)
    st = multipliers_state(hs)
    check_multipliers_state(hs, st)
    with pytest.raises(ValueError, match="hash definition differs"):
        check_multipliers_state(build_hashers(table_specs(cfg), 1), st)
