"""Engram table sizing exactly per paper App. B.2.2 (Eq. 31-38).

One table per (memory, level l, order o, head k):

* intra ("S"): levels 2..L, orders 1..O_l^S with O_l^S = min(l, 3); K_S heads of width d_m/K_S;
  target Γ^S_{l,o} = max(2, min(floor((C s_S)^o), C^o, H_max))                       (Eq. 32-33)
* inter ("T"): levels 1..L, orders 1..O_l^T with (O_1, O_2, O_3) = (3, 2, 1); generalised to
  O_l^T = max(1, 4 - l) for other L (see ``EngramConfig.inter_order_count``); K_T heads of width
  d_m/K_T; target Γ^T_{l,o} = max(2, min(floor(((16 s_T)^l)^o), (C^l)^o, H_max))        (Eq. 36-37)

Prime rule ("each head uses a distinct prime near Γ"): within one memory, tables are visited in
(level, order, head) ascending order, with a set of primes already taken by that memory. Each head
gets the smallest prime p >= Γ_{l,o} that no earlier head of the same memory took; if that prime
would exceed H_max it instead gets the largest untaken prime <= min(Γ, H_max). So the K heads of
one (level, order) are consecutive untaken primes from Γ upward, and all bucket counts of one memory
are pairwise distinct (intra and inter memories choose independently).

Parameter counts (Eq. 34, 38) are Σ rows * dim over the tables of a memory. Real-valued targets are
evaluated exactly with rationals (scale values are read as the decimal they print as).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal

from comeir_dist.engram.config import EngramConfig

Memory = Literal["intra", "inter"]
INTER_BASE = 16  # "base 16" of the inter-item memory (Eq. 36)

# ---- primality (deterministic Miller-Rabin for n < 3.3e24, covers all int64) ------------------
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller-Rabin with the first 13 prime bases)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_free_prime(start: int, used: set[int]) -> int:
    p = max(2, start)
    while not (p not in used and is_prime(p)):
        p += 1
    return p


def _prev_free_prime(start: int, used: set[int]) -> int:
    p = start
    while p >= 2 and not (p not in used and is_prime(p)):
        p -= 1
    if p < 2:
        raise ValueError(f"no unused prime <= {start} left (H_max too small for the number of heads)")
    return p


def pick_primes(target: int, k: int, used: set[int], h_max: int) -> list[int]:
    """K distinct primes for one (memory, level, order); updates ``used`` (see module docstring)."""
    out = []
    for _ in range(k):
        p = _next_free_prime(target, used)
        if p > h_max:
            p = _prev_free_prime(min(target, h_max), used)
        used.add(p)
        out.append(p)
    return out


# ---- specs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """One sparse hash table M_{l,o,k} (Eq. 14): ``rows`` prime buckets of width ``dim``."""

    name: str  # e.g. "intra_l2_o1_h0" (levels/orders 1-based, heads 0-based)
    memory: Memory
    level: int
    order: int
    head: int
    rows: int
    dim: int
    target: int  # Γ_{l,o} before the prime choice

    @property
    def params(self) -> int:
        return self.rows * self.dim


def table_name(memory: str, level: int, order: int, head: int) -> str:
    return f"{memory}_l{level}_o{order}_h{head}"


def _floor_pow(base: Fraction, exp: int) -> int:
    v = base**exp
    return v.numerator // v.denominator


def _scale(s: float) -> Fraction:
    return Fraction(repr(float(s)))


def intra_target(cfg: EngramConfig, order: int) -> int:
    """Γ^S_{l,o}(s_S) of Eq. 33 (independent of the level)."""
    base = cfg.codebook_size * _scale(cfg.s_s)
    return max(2, min(_floor_pow(base, order), cfg.codebook_size**order, cfg.h_max))


def inter_target(cfg: EngramConfig, level: int, order: int) -> int:
    """Γ^T_{l,o}(s_T) of Eq. 37."""
    base = (INTER_BASE * _scale(cfg.s_t)) ** level
    return max(2, min(_floor_pow(base, order), (cfg.codebook_size**level) ** order, cfg.h_max))


def table_specs(cfg: EngramConfig, memory: str | None = None) -> list[TableSpec]:
    """All Engram tables (intra first, then inter), in (memory, level, order, head) order."""
    specs: list[TableSpec] = []
    if memory in (None, "intra"):
        used: set[int] = set()
        for level in range(2, cfg.levels + 1):
            for order in range(1, cfg.intra_orders(level) + 1):
                g = intra_target(cfg, order)
                for k, p in enumerate(pick_primes(g, cfg.k_s, used, cfg.h_max)):
                    specs.append(TableSpec(table_name("intra", level, order, k), "intra", level, order, k,
                                           p, cfg.intra_head_dim, g))
    if memory in (None, "inter"):
        used = set()
        for level in range(1, cfg.levels + 1):
            for order in range(1, cfg.inter_order_count(level) + 1):
                g = inter_target(cfg, level, order)
                for k, p in enumerate(pick_primes(g, cfg.k_t, used, cfg.h_max)):
                    specs.append(TableSpec(table_name("inter", level, order, k), "inter", level, order, k,
                                           p, cfg.inter_head_dim, g))
    if memory not in (None, "intra", "inter"):
        raise ValueError(f"memory must be 'intra' or 'inter', got {memory!r}")
    return specs


def intra_params(cfg: EngramConfig) -> int:
    """P_S(s_S), Eq. 34."""
    return sum(s.params for s in table_specs(cfg, "intra"))


def inter_params(cfg: EngramConfig) -> int:
    """P_T(s_T), Eq. 38."""
    return sum(s.params for s in table_specs(cfg, "inter"))


def params_report(cfg: EngramConfig) -> dict[str, Any]:
    """Every table and the totals; backs ``comeir params --s-s S --s-t T --json``."""
    specs = table_specs(cfg)
    p_s = sum(s.params for s in specs if s.memory == "intra")
    p_t = sum(s.params for s in specs if s.memory == "inter")
    total = p_s + p_t
    return {
        "config": {"levels": cfg.levels, "codebook_size": cfg.codebook_size, "s_s": cfg.s_s, "s_t": cfg.s_t,
                   "d_m": cfg.d_m, "k_s": cfg.k_s, "k_t": cfg.k_t, "h_max": cfg.h_max, "d_max": cfg.d_max},
        "tables": [{**{k: v for k, v in asdict(s).items()}, "params": s.params} for s in specs],
        "intra_params": p_s,
        "inter_params": p_t,
        "total_params": total,
        "num_tables": len(specs),
        "bytes": {"fp32": total * 4, "fp16": total * 2},
        "intra_bytes": {"fp32": p_s * 4, "fp16": p_s * 2},
        "inter_bytes": {"fp32": p_t * 4, "fp16": p_t * 2},
    }


def _human(n: float, unit: str = "") -> str:
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f} {suf}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _human_bytes(n: int) -> str:
    for div, suf in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suf}"
    return f"{n} B"


def format_params_table(report: dict[str, Any]) -> str:
    """Human-readable table of :func:`params_report` output."""
    c = report["config"]
    lines = [f"Engram tables  L={c['levels']} C={c['codebook_size']} s_S={c['s_s']} s_T={c['s_t']} "
             f"d_m={c['d_m']} K_S={c['k_s']} K_T={c['k_t']} H_max={c['h_max']:,}",
             f"{'table':<18} {'mem':<5} {'l':>2} {'o':>2} {'k':>2} {'target Γ':>12} {'rows (prime)':>14} {'dim':>4} {'params':>16}"]
    for t in report["tables"]:
        lines.append(f"{t['name']:<18} {t['memory']:<5} {t['level']:>2} {t['order']:>2} {t['head']:>2} "
                     f"{t['target']:>12,} {t['rows']:>14,} {t['dim']:>4} {t['params']:>16,}")
    lines.append("")
    for key, label in (("intra_params", "intra P_S"), ("inter_params", "inter P_T"), ("total_params", "total")):
        n = report[key]
        lines.append(f"{label:<10} {n:>16,}  ({_human(n)})")
    b = report["bytes"]
    lines.append(f"{'memory':<10} fp32 {_human_bytes(b['fp32'])}, fp16 {_human_bytes(b['fp16'])} "
                 f"(weights only; row-wise Adagrad adds one float per row)")
    return "\n".join(lines)
