"""Every pair of an experiment's variants (analysis.pairwise, `comeir analyze pairwise`)."""
import json
import math

import numpy as np
import pytest

from comeir_dist.analysis.pairwise import experiment_variants, pairwise
from comeir_dist.errors import UserError
from tests.fixtures import make_tiny_dataset
from tests.unit.test_paired import _users_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _run(root, label, seed, users, targets, hits, ndcg=None):
    """A finished experiment run: its result file and its run dir with the per-user test results (users in
    ``hits`` are hit at rank 1, the others missed); ``ndcg`` = the result file's test NDCG@10 (default: the run
    dir's)."""
    run_dir = root / f"{label}-seed{seed}"
    run_dir.mkdir(parents=True)
    _users_file(run_dir / "test.users.parquet", users, targets, [0 if u in hits else 10 for u in users])
    mean = sum(u in hits for u in users) / len(users)
    (run_dir / "test.json").write_text(json.dumps({"metrics": {"item/ndcg@10": mean}}))
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"{label}-seed{seed}.json").write_text(json.dumps(
        {"label": label, "seed": seed, "metrics": {"item/ndcg@10": mean if ndcg is None else ndcg}}))


def test_variants_average_their_seeds_and_every_pair_is_paired(tmp_path):
    users, targets = list(range(40)), list(range(40))
    root = tmp_path / "exp"
    _run(root, "a", 42, users, targets, set(range(0, 40, 2)))       # even users
    _run(root, "a", 43, users, targets, set(range(0, 40, 4)))       # every 4th user
    _run(root, "b", 42, users, targets, set(range(30)))
    _run(root, "c", 42, users, targets, set(range(5)))
    _run(root, "c", 43, users, targets, set(range(40)), ndcg=0.5)  # retrained after its result: left out
    (root / "results" / "popular-seed42.json").write_text(json.dumps({"label": "popular", "seed": 42, "metrics": {}}))
    variants = {v.label: v for v in experiment_variants(root)}
    assert sorted(variants) == ["a", "b", "c"] and variants["a"].seeds == [42, 43] and variants["c"].seeds == [42]
    want_a = np.array([1.0 if u % 4 == 0 else 0.5 if u % 2 == 0 else 0.0 for u in users])
    assert np.allclose(variants["a"].values, want_a)
    pairs = {(p["a"], p["b"]): p for p in pairwise(list(variants.values()))}
    assert sorted(pairs) == [("a", "c"), ("b", "a"), ("b", "c")]  # the higher mean first
    d = np.array([1.0 if u < 30 else 0.0 for u in users]) - want_a
    ba = pairs[("b", "a")]
    assert ba["diff"] == pytest.approx(d.mean()) and ba["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(40))
    assert (ba["seeds_a"], ba["seeds_b"], ba["users"]) == (1, 2, 40)
    with pytest.raises(UserError, match="--labels nope: no result files"):
        experiment_variants(root, ["a", "nope"])
    _run(root, "d", 42, users, targets, set(), ndcg=0.3)
    with pytest.raises(UserError, match="d: none of its runs"):
        experiment_variants(root, ["d"])
    # a committed archive of the experiment (docs/results/<name>/: result files, users/<run>/) reads the same
    archive = tmp_path / "archive"
    for f in (root / "results").glob("*.json"):
        (archive / "users" / f.stem).mkdir(parents=True)
        (archive / f.name).write_text(f.read_text())
        if (root / f.stem / "test.users.parquet").is_file():
            (archive / "users" / f.stem / "test.users.parquet").write_bytes((root / f.stem / "test.users.parquet")
                                                                            .read_bytes())
    (archive / "notes.json").write_text("[]")  # other JSON beside the result files is not a run
    # c seed 43's per-user file came from a rerun: its own result file (users/<run>/rerun.json) is what it reports
    (archive / "users" / "c-seed43" / "rerun.json").write_text(json.dumps({"metrics": {"item/ndcg@10": 1.0}}))
    again = {v.label: v for v in experiment_variants(archive, ["a", "b", "c"])}
    assert all(again[k].seeds == variants[k].seeds and np.allclose(again[k].values, variants[k].values)
               for k in ("a", "b"))
    assert again["c"].seeds == [42, 43] and np.allclose(again["c"].values, (variants["c"].values + 1.0) / 2)


def test_analyze_pairwise_cli(tiny, tmp_path, capsys):
    from comeir_dist.cli import main
    from comeir_dist.data.dataset import read_split

    test = read_split(tiny, "test")
    users, targets = test.column("user_idx").to_pylist(), test.column("target").to_pylist()
    root = tmp_path / "exp"
    _run(root, "a", 42, users, targets, set(users))
    _run(root, "b", 42, users, targets, set(users[: len(users) // 2]))
    out = tmp_path / "pairs.json"
    assert main(["analyze", "pairwise", "--experiment", str(root), "--dataset", str(tiny), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| a | b | 1 / 1 |" in table and "| a | popular | 1 / - |" in table and "| b | popular |" in table
    saved = json.loads(out.read_text())
    assert len(saved["pairs"]) == 3 and saved["seeds"] == {"a": [42], "b": [42], "popular": []}
    assert out.with_suffix(".md").read_text().strip() == table.strip()
    assert main(["analyze", "pairwise", "--experiment", str(root), "--labels", "a,zz"]) == 2
    assert "zz" in capsys.readouterr().err
    assert main(["analyze", "pairwise", "--experiment", str(tmp_path / "none")]) == 2
    assert "no results/*.json and no users/ dir" in capsys.readouterr().err
