"""`comeir analyze memgen` (issue 14 item 1): memorization / generalization labels of next-item instances
(Ding et al., "How Well Does Generative Recommendation Generalize?", the released MemGen-GR definitions),
checked on hand-made toys for every category and hop, against a brute-force pure-Python port of the released
labellers on random data, and end to end through the CLI on a tiny dataset with a run's per-user results."""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import comeir_dist.analysis.memgen as mg
from comeir_dist.analysis.memgen import (CATEGORIES, NONE, TYPE_MIN_HOP, TYPES, Sequences, build_rules,
                                         label_instances, prefix_rules, second_order_symmetry_hop, token_hops,
                                         transitivity_hop)
from comeir_dist.analysis.runs import bootstrap_means, unique_rows
from comeir_dist.cli import main
from comeir_dist.utils.output_guard import MARKER


# ---- brute force: a pure-Python port of the released labellers (sets, loops) -------------------------------
def brute_rules(train, H):
    rules = {h: defaultdict(set) for h in range(1, H + 1)}
    rev = {h: defaultdict(set) for h in range(1, H + 1)}
    for seq in train:
        for i in range(1, len(seq)):
            for dist in range(1, H + 1):
                if i - dist < 0:
                    continue
                for h in range(dist, H + 1):
                    rules[h][seq[i - dist]].add(seq[i])
                    rev[h][seq[i]].add(seq[i - dist])
    return rules, rev


def brute_labels(train, instances, H):
    """[(category, {type: hop})] as genrec/fine_grained_evaluator.py get_case_labels."""
    rules, rev = brute_rules(train, H)
    judge = {
        "substitutability": lambda u, v, h: v in rules[h][u],
        "symmetry": lambda u, v, h: u in rules[h][v],
        "transitivity": lambda u, v, h: bool(rules[h][u] & rev[h][v]),
        "2nd_symmetry": lambda u, v, h: bool(rules[h][v] & rev[h][u]) or bool(rules[h][v] & rules[h][u])
        or bool(rev[h][v] & rev[h][u]),
    }
    out = []
    for hist, v in instances:
        seq = list(hist) + [v]
        if len(seq) >= 2 and v in rules[1][seq[-2]]:
            out.append(("memorization", {}))
            continue
        found = {}
        for t, fn in judge.items():
            for h in range(2 if t == "substitutability" else 1, H + 1):  # substitutability_1 = memorization
                if len(seq) - h - 1 < 0:
                    continue
                if any(fn(seq[-d - 1], v, h) for d in range(1, h + 1)):
                    found[t] = h
                    break
        out.append(("generalization" if found else "uncategorized", found))
    return out


def brute_token_hop(train, instances, prefix, H):
    """Minimum hop of prefix memorization per instance (0 = none), as genrec/token_prefix_evaluator.py."""
    rules = {h: defaultdict(set) for h in range(1, H + 1)}
    for seq in train:
        for i in range(1, len(seq)):
            for dist in range(1, H + 1):
                if i - dist >= 0:
                    for h in range(dist, H + 1):
                        rules[h][prefix(seq[i - dist])].add(prefix(seq[i]))
    out = []
    for hist, v in instances:
        seq = list(hist) + [v]
        best = 0
        for h in range(1, H + 1):
            if any(len(seq) - d - 1 >= 0 and prefix(v) in rules[h][prefix(seq[-d - 1])] for d in range(1, h + 1)):
                best = h
                break
        out.append(best)
    return out


def fast_labels(train, instances, H, n_items):
    rules = build_rules(Sequences.from_lists(train), n_items, H)
    lab = label_instances(rules, Sequences.from_lists([h for h, _ in instances]), [v for _, v in instances])
    return [(CATEGORIES[lab.category[i]], {t: int(lab.type_hop[t][i]) for t in TYPES if lab.type_hop[t][i] > 0})
            for i in range(len(instances))]


def label1(train, hist, target, H=4, n_items=None):
    n = n_items or 1 + max([target, *hist, *(x for s in train for x in s)])
    return fast_labels(train, [(hist, target)], H, n)[0]


# ---- toys: every category, type and hop --------------------------------------------------------------------
def test_memorization_and_uncategorized():
    assert label1([[1, 2]], [5, 1], 2) == ("memorization", {})
    assert label1([[1, 3]], [1], 4) == ("uncategorized", {})  # target never seen in training
    assert label1([], [1], 2, n_items=3) == ("uncategorized", {})  # no rules at all
    assert label1([[1, 2]], [], 2) == ("uncategorized", {})  # empty history


def test_memorization_is_exclusive():
    # 1 -> 2 observed, and also every generalization pattern: still memorization only, no type recorded
    train = [[1, 2], [2, 1], [1, 3, 2], [3, 1]]
    assert label1(train, [3, 1], 2) == ("memorization", {})
    rules = build_rules(Sequences.from_lists(train), 4, 4)
    lab = label_instances(rules, Sequences.from_lists([[3, 1]]), [2])
    assert lab.category[0] == mg.MEMORIZATION and all(lab.type_hop[t][0] == 0 for t in TYPES)


@pytest.mark.parametrize("train, expected", [
    ([[2, 1]], {"symmetry": 1}),                          # v -> u observed
    ([[1, 3], [3, 2]], {"transitivity": 1}),              # u -> x, x -> v (two users: rules are global)
    ([[2, 3], [3, 1]], {"2nd_symmetry": 1}),              # v -> x, x -> u
    ([[2, 3], [1, 3]], {"2nd_symmetry": 1}),              # v -> x, u -> x
    ([[3, 2], [3, 1]], {"2nd_symmetry": 1}),              # x -> v, x -> u
    ([[1, 9, 2]], {"substitutability": 2, "transitivity": 1}),  # u -> v two apart (with its bridge 9)
])
def test_one_hop_types(train, expected):
    hist = [7, 1] if "substitutability" in expected else [1]
    assert label1(train, hist, 2, n_items=10) == ("generalization", expected)
    assert brute_labels(train, [(hist, 2)], 4) == [("generalization", expected)]


def _fresh(start):
    """Fresh filler items (no relation to anything else)."""
    counter = iter(range(start, start + 1000))
    return lambda k: [next(counter) for _ in range(k)]


@pytest.mark.parametrize("h", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", TYPES)
def test_every_type_at_every_hop(kind, h):
    """The relation's legs are exactly h apart in training and u is the last history item: the type holds
    at hop h (other types the fillers create are checked against the brute force)."""
    if h < TYPE_MIN_HOP[kind]:
        pytest.skip("substitutability starts at hop 2")
    fill = _fresh(100)
    u, v, x = 1, 2, 3
    train = {"substitutability": [[u, *fill(h - 1), v]],
             "symmetry": [[v, *fill(h - 1), u]],
             "transitivity": [[u, *fill(h - 1), x], [x, *fill(h - 1), v]],
             "2nd_symmetry": [[x, *fill(h - 1), v], [x, *fill(h - 1), u]]}[kind]
    hist = [*fill(h - 1), u]  # n = h items: hop h is not skipped
    cat, types = label1(train, hist, v, H=4, n_items=1100)
    assert cat == "generalization" and types[kind] == h
    assert (cat, types) == brute_labels(train, [(hist, v)], 4)[0]
    # one item less in the history: hop h is skipped (history shorter than h), the type is lost for h >= 2
    if h >= 2:
        short = label1(train, hist[1:], v, H=4, n_items=1100)[1]
        assert kind not in short or short[kind] < h


def test_hop_from_window_position_and_minimum_hop_kept():
    # v -> u with u two items back: symmetry at hop 2 only
    assert label1([[2, 1]], [1, 5], 2, n_items=10) == ("generalization", {"symmetry": 2})
    # symmetry holds at hop 1 (via x_n = 1) and at hop 3 (via x_{n-2} = 4): the minimum is kept
    train = [[2, 1], [2, 4]]
    cat, types = label1(train, [4, 6, 1], 2, n_items=10)
    assert types["symmetry"] == 1
    # several types at once are all kept, each at its own minimum hop
    train = [[2, 1], [1, 9], [9, 8, 7, 2]]
    cat, types = label1(train, [5, 6, 1], 2, n_items=10)
    assert cat == "generalization" and types == brute_labels(train, [([5, 6, 1], 2)], 4)[0][1]
    assert types["symmetry"] == 1 and types["transitivity"] == 3  # 1 -> 9 (hop 1), 9 -> 2 (hop 3)
    assert "transitivity" not in label1(train, [6, 1], 2, n_items=10)[1]  # 2 items: hop 3 is skipped


def test_max_hop_bounds_the_search():
    train = [[1, 7, 8, 2]]  # 1 -> 2 three apart
    assert label1(train, [5, 6, 1], 2, H=3, n_items=10)[1]["substitutability"] == 3
    assert "substitutability" not in label1(train, [5, 6, 1], 2, H=2, n_items=10)[1]


# ---- rule sets -----------------------------------------------------------------------------------------------
def test_rule_sets_are_cumulative_over_hops():
    train = [[0, 1, 2, 3, 4, 5], [5, 0], [3, 3, 1]]
    H = 4
    rules = build_rules(Sequences.from_lists(train), 6, H)
    b_rules, _ = brute_rules(train, H)
    sizes = [rules.size(h) for h in range(1, H + 1)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    for h in range(1, H + 1):
        got = {(a, b) for a in range(6) for b in range(6) if rules.contains(a, b, h)}
        want = {(a, b) for a, bs in b_rules[h].items() for b in bs}
        assert got == want
        assert rules.size(h) == len(want)
    # a pair first seen at distance d is in R_h exactly for h >= d
    assert [bool(rules.contains(0, 3, h)) for h in range(1, 5)] == [False, False, True, True]
    assert rules.hop(0, 3) == 3 and rules.hop(0, 5) == NONE and rules.hop(-1, 3) == NONE
    assert rules.hop(3, 3) == 1  # a repeated item is a transition too


@pytest.mark.parametrize("dense", [True, False])
def test_composed_hops_are_exact(monkeypatch, dense):
    if not dense:
        monkeypatch.setattr(mg, "_DENSE_MAX", 0)
    monkeypatch.setattr(mg, "_CHUNK_ROWS", 7)  # many pieces
    rng = np.random.default_rng(3)
    N, H = 25, 4
    p = 1 / np.arange(1, N + 1) ** 1.2
    train = [list(rng.choice(N, rng.integers(2, 15), p=p / p.sum())) for _ in range(60)]
    rules = build_rules(Sequences.from_lists(train), N, H)
    a, b = rng.integers(0, N, 400), rng.integers(0, N, 400)
    D = np.full((N, N), NONE, np.int64)  # D[p, q]: smallest hop of p -> q, from the brute-force sets
    b_rules = brute_rules(train, H)[0]
    for h in range(H, 0, -1):
        for p_, qs in b_rules[h].items():
            D[p_, list(qs)] = h
    want_t = np.maximum(D[a, :], D[:, b].T).min(1).tolist()  # min over x of max(u -> x, x -> v)
    want_s = np.minimum(np.minimum(np.maximum(D[b, :], D[:, a].T), np.maximum(D[b, :], D[a, :])),
                        np.maximum(D[:, b].T, D[:, a].T)).min(1).tolist()
    assert transitivity_hop(rules, a, b).tolist() == want_t
    assert second_order_symmetry_hop(rules, a, b).tolist() == want_s


# ---- agreement with the brute force on random data ------------------------------------------------------------
def _check_random(train, instances, H, n_items, codes=None):
    assert fast_labels(train, instances, H, n_items) == brute_labels(train, instances, H)
    if codes is not None:
        by_level = prefix_rules(Sequences.from_lists(train), codes, H)
        got = token_hops(by_level, Sequences.from_lists([h for h, _ in instances]), [v for _, v in instances])
        for level in range(1, codes.shape[1] + 1):
            want = brute_token_hop(train, instances, lambda i, n=level: tuple(codes[i, :n]), H)
            assert got[:, level - 1].tolist() == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_items=st.integers(1, 12), H=st.integers(1, 5))
def test_agrees_with_brute_force_hypothesis(data, n_items, H):
    item = st.integers(0, n_items - 1)
    train = data.draw(st.lists(st.lists(item, max_size=8), max_size=10))
    instances = data.draw(st.lists(st.tuples(st.lists(item, max_size=7), item), min_size=1, max_size=12))
    codes = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n_items,
                               max_size=n_items))
    _check_random(train, instances, H, n_items, np.asarray(codes, np.int64))


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_brute_force_skewed(monkeypatch, seed):
    """Popular items (long neighbour lists: several scan rounds), sparse and dense lookups."""
    if seed % 2:
        monkeypatch.setattr(mg, "_DENSE_MAX", 0)
    rng = np.random.default_rng(seed)
    N, H = int(rng.integers(10, 60)), int(rng.integers(1, 7))
    p = 1 / np.arange(1, N + 1) ** rng.uniform(0.3, 1.5)
    p /= p.sum()
    train = [[int(x) for x in rng.choice(N, rng.integers(0, 16), p=p)] for _ in range(int(rng.integers(5, 80)))]
    instances = [([int(x) for x in rng.choice(N, rng.integers(0, 9), p=p)], int(rng.choice(N, p=p)))
                 for _ in range(150)]
    codes = rng.integers(0, 3, (N, 3))
    _check_random(train, instances, H, N, codes)


# ---- bootstrap -------------------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_matches_the_plain_bootstrap():
    rng = np.random.default_rng(0)
    vals = np.stack([rng.random(400) < 0.2, np.where(rng.random(400) < 0.3, rng.integers(1, 4, 400) / 4, 0)], 1)
    mean, lo, hi = bootstrap_means(vals, 1000, seed=5)
    again = bootstrap_means(vals, 1000, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip((mean, lo, hi), again, strict=True))
    assert np.allclose(mean, vals.mean(0)) and (lo <= mean).all() and (mean <= hi).all()
    plain = np.stack([vals[rng.integers(0, 400, 400)].mean(0) for _ in range(2000)])
    assert np.allclose(lo, np.quantile(plain, 0.025, axis=0), atol=0.012)
    assert np.allclose(hi, np.quantile(plain, 0.975, axis=0), atol=0.012)
    u, inv = unique_rows(vals)
    assert np.array_equal(u[inv], vals)
    assert np.isnan(bootstrap_means(np.zeros((0, 2)))[0]).all()


# ---- dataset level: validation/test transitions never enter the rules -------------------------------------------
def _prepared(tmp_path: Path, inter: dict) -> Path:
    from comeir_dist.config.pipeline import PrepareConfig
    from comeir_dist.data.prepare import run_prepare

    raw = tmp_path / "raw"
    raw.mkdir(parents=True)
    items = sorted({i for seq in inter.values() for i in seq})
    (raw / "T.inter.json").write_text(json.dumps(inter))
    (raw / "T.item.json").write_text(json.dumps({str(i): {"title": f"item {i}"} for i in items}))
    return run_prepare(PrepareConfig(input=str(raw), out=str(tmp_path / "ds"), k_core=1))


def test_valid_and_test_transitions_never_enter_the_rules(tmp_path):
    from comeir_dist.analysis.memgen_report import label_dataset

    # user a's last transitions 3 -> 4 (valid) and 4 -> 5 (test) occur nowhere in training; user b repeats
    # a's training transitions 1 -> 2 -> 3 only
    ds = _prepared(tmp_path, {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 9, 8]})
    splits, sizes, _ = label_dataset(ds, 4, "none", {})
    users = pq.read_table(ds / "users.parquet").to_pylist()
    a = next(u["user_idx"] for u in users if u["raw_id"] == "a")
    for s in ("valid", "test"):
        d = splits[s]
        i = int(np.flatnonzero(d.user_idx == a)[0])
        assert CATEGORIES[d.labels.category[i]] == "uncategorized"
    assert sizes["R_1"] == 2 and sizes["R_4"] == 3  # {1->2, 2->3} + {1->3}: train = all but the last two


# ---- CLI end to end -------------------------------------------------------------------------------------------
def _fake_run(ds: Path, run: Path, split="test", hit_every=3) -> dict:
    """Per-user results as `comeir evaluate --out RUN/<split>.json` writes them: every `hit_every`-th user's
    target at rank (user % 10) + 1, the others not found."""
    t = pq.read_table(ds / f"{split}.parquet")
    users = np.asarray(t.column("user_idx").to_pylist())
    target = np.asarray(t.column("target").to_pylist())
    n_items = pq.read_metadata(ds / "items.parquet").num_rows
    top = (target[:, None] + 1 + np.arange(10)[None, :]) % n_items  # never the target (n_items > 10)
    P = np.full(len(users), 20)
    hit = np.arange(len(users)) % hit_every == 0
    rank = users % 10
    top[hit, rank[hit]] = target[hit]
    P[hit] = rank[hit]
    run.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(target, pa.int32()),
                             "top_items": pa.array(top.tolist(), pa.list_(pa.int32())),
                             "P": pa.array(P, pa.int64()), "G": pa.array(np.ones(len(users)), pa.int64())}),
                   run / f"{split}.users.parquet")
    hit10 = hit.astype(float)
    ndcg10 = np.where(hit, 1 / np.log2(rank + 2), 0.0)
    (run / f"{split}.json").write_text(json.dumps({"split": split, "metrics": {
        "item/hit@10": hit10.mean(), "item/ndcg@10": ndcg10.mean(), "users": len(users)}}))
    return {"users": users, "hit10": hit10, "ndcg10": ndcg10}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.fixtures import make_tiny_dataset

    root = tmp_path_factory.mktemp("memgen")
    return make_tiny_dataset(root, n_users=40, n_items=30, seq_len=7)


def test_cli_end_to_end(tiny, tmp_path, capsys):
    run = tmp_path / "exp" / "m-seed42"
    truth = _fake_run(tiny, run)
    _fake_run(tiny, run, split="valid", hit_every=2)
    out = tmp_path / "analysis"
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--runs", str(run), "--out", str(out),
                 "--max-hop", "3"]) == 0
    printed = capsys.readouterr().out
    assert "## Instances per category" in printed and "m-seed42" in printed
    for f in ("labels.parquet", "summary.json", "summary.md", "summary.png", MARKER):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    n_users = pq.read_metadata(tiny / "test.parquet").num_rows
    labels = pq.read_table(out / "labels.parquet")
    assert labels.num_rows == 2 * n_users
    cols = set(labels.column_names)
    assert {"user", "user_idx", "split", "category", "types", "substitutability_hop", "2nd_symmetry_hop",
            "token_mem_1", "token_mem_3", "token_hop_2"} <= cols
    assert summary["max_hop"] == 3 and summary["sid_levels"] == 3
    for split in ("test", "valid"):
        d = summary["splits"][split]
        assert d["n"] == n_users
        assert sum(d["shares"].values()) == pytest.approx(1.0)
        assert set(d["types"]) == {f"{t}_{h}" for t in TYPES for h in range(TYPE_MIN_HOP[t], 4)}
        rows = [r for r in labels.to_pylist() if r["split"] == split]
        for c in CATEGORIES:
            assert d["counts"][c] == sum(r["category"] == c for r in rows)
        assert d["types"]["symmetry_1"] == pytest.approx(sum(r["symmetry_hop"] == 1 for r in rows) / n_users)
        assert all((r["category"] == "generalization") == bool(r["types"]) for r in rows)
        assert all(r["token_mem_3"] == (r["category"] == "memorization") for r in rows)  # distinct SIDs
        assert "m-seed42" in d["runs"]
    # the test split's metrics per category: the per-user values joined by user
    runs = summary["splits"]["test"]["runs"]["m-seed42"]
    assert runs["users"] == n_users
    m = runs["metrics"]["all"]["item/ndcg@10"]
    assert m["mean"] == pytest.approx(truth["ndcg10"].mean())
    assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    test_rows = {r["user_idx"]: r for r in labels.to_pylist() if r["split"] == "test"}
    for c in CATEGORIES:
        sel = np.array([test_rows[int(u)]["category"] == c for u in truth["users"]])
        got = runs["metrics"][c]
        assert got["n"] == int(sel.sum())
        if sel.any():
            assert got["item/hit@10"]["mean"] == pytest.approx(truth["hit10"][sel].mean())
    # the same command again writes into its own dir; a foreign dir is refused unless --overwrite
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--out", str(out), "--sid-method", "none"]) == 0
    capsys.readouterr()
    assert "token_mem_1" not in pq.read_table(out / "labels.parquet").column_names
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--out", str(foreign)]) == 2
    assert "not written by comeir" in _one_line(capsys)
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--out", str(foreign), "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "keep"
    # an experiment result file resolves to its run dir; an experiment dir to its runs with per-user results
    (tmp_path / "exp" / "results").mkdir()
    (tmp_path / "exp" / "results" / "m-seed42.json").write_text("{}")
    (tmp_path / "exp" / "other-seed42").mkdir()
    capsys.readouterr()
    for spec in (str(tmp_path / "exp" / "results" / "m-seed42.json"), str(tmp_path / "exp"), f"mine={run}"):
        o = tmp_path / f"o{abs(hash(spec))}"
        assert main(["analyze", "memgen", "--dataset", str(tiny), "--runs", spec, "--out", str(o), "--json",
                     "--sid-method", "none", "--bootstrap", "50"]) == 0
        printed = json.loads(capsys.readouterr().out.rsplit("\n{", 1)[0])
        assert list(printed["splits"]["test"]["runs"]) == ["mine" if spec.startswith("mine=") else "m-seed42"]


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    out = str(tmp_path / "o")
    no_results = tmp_path / "run-without"
    no_results.mkdir()
    (no_results / "train_log.jsonl").write_text("")
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--runs", str(no_results), "--out", out]) == 2
    err = _one_line(capsys)
    assert str(no_results) in err and "per-user results" in err
    assert main(["analyze", "memgen", "--dataset", str(tmp_path / "nope"), "--out", out]) == 2
    assert "dataset directory not found" in _one_line(capsys)
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--out", out, "--max-hop", "0"]) == 2
    assert "--max-hop" in _one_line(capsys)
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--out", out, "--sid-method", "rqvae"]) == 2
    assert "--sid-method none" in _one_line(capsys)
    # results of another dataset: the targets differ
    other = tmp_path / "other"
    _fake_run(tiny, other)
    t = pq.read_table(other / "test.users.parquet")
    t = t.set_column(1, "target", pa.array((np.asarray(t.column("target").to_pylist()) + 1) % 30, pa.int32()))
    pq.write_table(t, other / "test.users.parquet")
    assert main(["analyze", "memgen", "--dataset", str(tiny), "--runs", str(other), "--out", out]) == 2
    assert "another dataset" in _one_line(capsys)
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked
