"""Engram table sizing (App. B.2.2): anchors, prime rule, config validation, report."""
import json

import pytest

from comeir_dist.config.base import parse_section
from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.sizing import (
    format_params_table,
    inter_params,
    inter_target,
    intra_params,
    intra_target,
    is_prime,
    params_report,
    pick_primes,
    table_specs,
)
from comeir_dist.errors import UserError


def test_paper_anchor_inter_small():
    p = inter_params(EngramConfig(s_t=0.5))
    assert p == 1_380_992
    assert round(p / 1e6, 1) == 1.4


def test_paper_anchor_inter_4_431_billion():
    assert round(inter_params(EngramConfig(s_t=4.0)) / 1e9, 3) == 4.431


def test_other_scales():
    assert round(inter_params(EngramConfig(s_t=8.0)) / 1e9, 1) == 6.2
    assert inter_params(EngramConfig(s_t=2.0)) == 285_779_200
    assert intra_params(EngramConfig(s_s=1.0)) == 545_358_336
    # s_S above 1 is clipped by the exact intra domain C^o
    assert intra_params(EngramConfig(s_s=2.0)) == intra_params(EngramConfig(s_s=1.0))
    # monotone in the scale
    ps = [inter_params(EngramConfig(s_t=s)) for s in (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4)]
    assert ps == sorted(ps)


def test_targets_follow_equations():
    c = EngramConfig(s_t=2.0, s_s=0.5)
    assert [inter_target(c, 1, o) for o in (1, 2, 3)] == [32, 1024, 32768]
    assert [inter_target(c, 2, o) for o in (1, 2)] == [1024, 1024**2]
    assert inter_target(c, 3, 1) == 32768
    assert [intra_target(c, o) for o in (1, 2, 3)] == [64, 64**2, 64**3]
    big = EngramConfig(s_t=8.0)
    assert inter_target(big, 2, 2) == 20_000_000  # H_max cap
    assert inter_target(big, 3, 1) == 128**3  # (C^l)^o cap
    tiny = EngramConfig(s_t=0.01, s_s=0.001)
    assert inter_target(tiny, 1, 1) == 2 and intra_target(tiny, 1) == 2  # floor of 2


def test_layout_per_paper():
    specs = table_specs(EngramConfig())
    intra = [s for s in specs if s.memory == "intra"]
    inter = [s for s in specs if s.memory == "inter"]
    assert {(s.level, s.order) for s in intra} == {(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)}
    assert {(s.level, s.order) for s in inter} == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)}
    assert len(intra) == 5 * 2 and len(inter) == 6 * 4
    assert all(s.dim == 128 for s in intra) and all(s.dim == 64 for s in inter)
    assert specs[0].name == "intra_l2_o1_h0"
    assert len({s.name for s in specs}) == len(specs)


@pytest.mark.parametrize("s_t", [0.5, 2.0, 4.0, 8.0])
def test_prime_rule(s_t):
    cfg = EngramConfig(s_t=s_t, s_s=0.25)
    specs = table_specs(cfg)
    for mem in ("intra", "inter"):
        rows = [s.rows for s in specs if s.memory == mem]
        assert len(set(rows)) == len(rows), "primes must be distinct within a memory"
        for s in specs:
            assert is_prime(s.rows) and s.rows <= cfg.h_max
    # uncapped heads are the consecutive untaken primes >= target
    used = set()
    for s in [s for s in specs if s.memory == "inter"]:
        if s.target < cfg.h_max:
            assert s.rows >= s.target
            between = [p for p in range(s.target, s.rows) if is_prime(p) and p not in used]
            assert between == []
        used.add(s.rows)


def test_prime_rule_cap_goes_below():
    used = set()
    ps = pick_primes(100, 3, used, h_max=103)
    assert ps == [101, 103, 97]
    assert used == {97, 101, 103}


def test_is_prime_matches_sieve_and_large():
    n = 20000
    sieve = [True] * n
    sieve[0] = sieve[1] = False
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = [False] * len(sieve[i * i::i])
    assert [i for i in range(n) if is_prime(i)] == [i for i in range(n) if sieve[i]]
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**61 - 1))
    assert not is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7


def test_generalised_orders():
    c = EngramConfig(levels=4)
    assert [c.inter_order_count(l) for l in (1, 2, 3, 4)] == [3, 2, 1, 1]
    assert [c.intra_orders(l) for l in (1, 2, 3, 4)] == [0, 2, 3, 3]
    c2 = EngramConfig(inter_orders=[2, 2, 2])
    assert {(s.level, s.order) for s in table_specs(c2, "inter")} == {(l, o) for l in (1, 2, 3) for o in (1, 2)}


def test_config_validation():
    with pytest.raises(UserError, match="k_t"):
        parse_section(EngramConfig, {"d_m": 250, "k_s": 2, "k_t": 4}, "engram")
    with pytest.raises(UserError, match="unknown key"):
        parse_section(EngramConfig, {"bogus": 1}, "engram")
    with pytest.raises(UserError, match="table_dtype"):
        parse_section(EngramConfig, {"table_dtype": "bf16"}, "engram")
    with pytest.raises(UserError, match="inter_orders"):
        parse_section(EngramConfig, {"inter_orders": [1, 2]}, "engram")
    assert parse_section(EngramConfig, {"s_t": 4}, "engram").s_t == 4.0


def test_report_and_table():
    rep = params_report(EngramConfig(s_t=4.0))
    json.dumps(rep)
    assert rep["inter_params"] == sum(t["params"] for t in rep["tables"] if t["memory"] == "inter")
    assert rep["total_params"] == rep["intra_params"] + rep["inter_params"]
    assert rep["bytes"]["fp32"] == 4 * rep["total_params"] and rep["bytes"]["fp16"] == 2 * rep["total_params"]
    assert {"memory", "level", "order", "head", "rows", "dim", "params"} <= set(rep["tables"][0])
    txt = format_params_table(rep)
    assert "4.431 B" in txt and "inter_l2_o2_h3" in txt
