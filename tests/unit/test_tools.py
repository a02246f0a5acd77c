"""The maintenance tools in tools/: verify_checkpoint, export_hf, convert_dataset, import_sids.

End to end on tiny data: one real training run (step checkpoints + best/) shared by the checkpoint tests; the tools
run as subprocesses for --help and bad input (one line, no traceback), through their main() otherwise.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.fixtures import make_tiny_dataset, tiny_run_config

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
NAMES = ("verify_checkpoint", "export_hf", "convert_dataset", "import_sids")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"comeir_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


verify_checkpoint, export_hf, convert_dataset, import_sids = (_tool(n) for n in NAMES)


def _env():
    # DS_ACCELERATOR set: the entry wrapper does not import torch just to probe for CUDA (fast error paths)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def _run_all(cmds: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the commands concurrently (each imports torch: the wall time of one, not of all)."""
    procs = [subprocess.Popen([sys.executable, *c], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    out = []
    for c, p in zip(cmds, procs, strict=True):
        so, se = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(c, p.returncode, so, se))
    return out


def _stderr_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and " WARNING " not in ln and " INFO " not in ln]


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(".tmp-*")) + sorted(p.name for p in d.rglob(".old-*"))


# ---- a real run (shared) --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from comeir_dist.train.loop import train

    root = tmp_path_factory.mktemp("tools-run")
    ds = make_tiny_dataset(root)
    cfg = tiny_run_config(ds, root / "run", max_steps=2, eval_every=2, eval_users=8)
    cfg = cfg.model_copy(update={"device": "cpu",
                                 "parallel": cfg.parallel.model_copy(update={"checkpoint_every": 1})})
    run = train(cfg)
    assert (run / "checkpoints" / "step-2" / "COMMITTED").is_file() and (run / "best" / "COMMITTED").is_file()
    return {"ds": ds, "run": Path(run), "cfg": cfg}


# ---- command line: --help and bad input -----------------------------------------------------------------------
def test_every_tool_has_help_and_reports_bad_input_in_one_line(tmp_path):
    helps = _run_all([[str(TOOLS / f"{n}.py"), "--help"] for n in NAMES], cwd=tmp_path)
    for n, r in zip(NAMES, helps, strict=True):
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {n}"), (n, r.stderr[-500:])
    (tmp_path / "idx.json").write_text('{"a": [1, 2]}')
    bad = _run_all([
        [str(TOOLS / "verify_checkpoint.py"), str(tmp_path / "nope")],
        [str(TOOLS / "export_hf.py"), str(tmp_path / "nope"), str(tmp_path / "out")],
        [str(TOOLS / "convert_dataset.py"), "--format", "recbole", str(tmp_path / "nope.inter"), "--out",
         str(tmp_path / "conv")],
        [str(TOOLS / "import_sids.py"), "--dataset", str(tmp_path / "nods"), "--name", "x", str(tmp_path / "idx.json")],
        [str(TOOLS / "convert_dataset.py"), "--format", "parquet", "x", "--out", "y"],  # argparse: choices
    ], cwd=REPO)  # from the repo root, without installing anything beyond the venv
    for r in bad:
        lines = _stderr_lines(r.stderr)
        assert r.returncode == 2, (r.args, r.returncode, r.stderr[-800:])
        assert "Traceback" not in r.stderr and "error: " in lines[-1], r.stderr[-800:]
    for r, name in zip(bad[:4], NAMES, strict=True):  # ours: exactly one line, named after the tool
        lines = _stderr_lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), r.stderr
    assert "nope: not found" in bad[0].stderr and "nope: not found" in bad[1].stderr
    assert "nope.inter: not found" in bad[2].stderr and "dataset directory not found" in bad[3].stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "conv").exists()


# ---- verify_checkpoint ----------------------------------------------------------------------------------------
def test_verify_reports_intact_run_with_manifest(trained, capsys):
    from comeir_dist.quant.sid_table import load_sids
    from comeir_dist.train import checkpoint_integrity as integrity

    run = trained["run"]
    assert verify_checkpoint.main([str(run), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["kind"] == "run" and rep["newest_intact_step"] == str(run / "checkpoints" / "step-2")
    kinds = [(c["kind"], c["manifest"]["step"]) for c in rep["checkpoints"]]
    assert kinds == [("step", 1), ("step", 2), ("best", 2)]
    m = rep["checkpoints"][1]["manifest"]
    listed = integrity.read_checksums(run / "checkpoints" / "step-2")
    assert m["world_size"] == 1 and m["format"] == 2 and m["variant"] == "comeir"
    assert m["sid_fingerprint"] == load_sids(trained["ds"], "rqkmeans").fingerprint
    assert m["file_count"] == len(listed) and m["total_bytes"] == sum(v["bytes"] for v in listed.values())
    assert verify_checkpoint.main([str(run / "checkpoints" / "step-1")]) == 0
    text = capsys.readouterr().out
    assert "step-1: intact" in text and "world size 1" in text and m["sid_fingerprint"] in text


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run / "checkpoints", dst / "checkpoints")
    shutil.copytree(run / "best", dst / "best")
    return dst


def test_verify_catches_a_tampered_byte_and_a_missing_commit(trained, tmp_path, capsys):
    run = _copy_run(trained["run"], tmp_path / "run")
    part = run / "checkpoints" / "step-2" / "dense" / "part-00000.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    part.write_bytes(bytes(data))
    assert verify_checkpoint.main([str(run / "checkpoints" / "step-2")]) == 1
    err = _stderr_lines(capsys.readouterr().err)
    assert err == [f"verify_checkpoint: error: {run / 'checkpoints' / 'step-2'}: dense/part-00000.pt: sha256 "
                   f"mismatch (corrupted or modified)"]
    assert verify_checkpoint.main([str(run), "--json"]) == 1  # the run: damaged newest, step-1 still intact
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert rep["newest_intact_step"] == str(run / "checkpoints" / "step-1") and not rep["ok"]
    assert rep["damaged"] == [str(run / "checkpoints" / "step-2")] and "part-00000.pt" in cap.err
    (run / "checkpoints" / "step-1" / "COMMITTED").unlink()
    assert verify_checkpoint.main([str(run / "checkpoints" / "step-1")]) == 1
    assert "COMMITTED: missing" in capsys.readouterr().err
    meta = run / "best" / "meta.json"
    meta.write_text(meta.read_text().replace('"step"', '"step" ', 1))  # one byte more
    assert verify_checkpoint.main([str(run / "best")]) == 1
    assert "meta.json: " in capsys.readouterr().err


# ---- export_hf --------------------------------------------------------------------------------------------------
def test_export_loads_with_transformers_and_matches_the_product_backbone(trained, tmp_path, capsys):
    from transformers import AutoModel

    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.model.backbone import run_backbone

    best, out = trained["run"] / "best", tmp_path / "hf"
    assert export_hf.main([str(best), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    # without comeir-dist importable: a fresh interpreter that cannot import it (started now, runs meanwhile)
    code = ("import sys, json, torch; sys.modules['comeir_dist'] = None\n"
            "from transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(out)!r}, local_files_only=True).eval()\n"
            "g = torch.Generator().manual_seed(1); x = torch.randn(2, 4, m.config.hidden_size, generator=g)\n"
            "with torch.no_grad(): h = m(inputs_embeds=x).last_hidden_state\n"
            "print(json.dumps(h.flatten().tolist()))\n")
    alone = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    hf = AutoModel.from_pretrained(out, local_files_only=True).eval()
    product, cfg, meta, _ = load_model_from_checkpoint(best, device="cpu")  # how `comeir evaluate` loads it
    product.eval()
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 6, cfg.model.backbone.hidden_size, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    with torch.no_grad():
        want, _ = run_backbone(product.backbone, embeds, mask)
        got, _ = run_backbone(hf, embeds, mask)
    assert torch.allclose(got[mask], want[mask], atol=1e-6, rtol=0)
    info = json.loads((out / "comeir_sid.json").read_text())
    assert info["sid"]["levels"] == 3 and info["sid"]["codebook_size"] == 8 and info["variant"] == "comeir"
    assert info["sid"]["fingerprint"] == meta["sid_fingerprint"] and info["step"] == meta["step"]
    assert info["sid"]["token_embedding"]["rows"] == 24 and info["sid"]["token_embedding"]["codebook_dim"] == 16
    card = (out / "README.md").read_text()
    assert meta["sid_fingerprint"] in card and "rqkmeans" in card and "| levels (L) | 3 |" in card
    from safetensors.torch import load_file

    tok = load_file(out / "comeir_sid_tokens.safetensors")
    assert torch.equal(tok["token.weight"], product.tokens.token.weight.detach())
    so, se = alone.communicate(timeout=180)
    assert alone.returncode == 0, se[-1000:]
    x = torch.randn(2, 4, cfg.model.backbone.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = product.backbone(inputs_embeds=x).last_hidden_state
    assert np.allclose(json.loads(so), h.flatten().numpy(), atol=1e-5)
    # OUT: an earlier export is refused unless --overwrite (then replaced whole); a foreign file is kept
    assert export_hf.main([str(best), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    assert export_hf.main([str(best), str(tmp_path / "other")]) == 2
    assert export_hf.main([str(best), str(tmp_path / "other"), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    assert AutoModel.from_pretrained(tmp_path / "other").dtype == torch.bfloat16
    assert not _leftovers(tmp_path)


def test_export_of_a_tm_nezha_checkpoint_keeps_merge_and_placeholders(tmp_path, capsys):
    """A best/ written by the product's save_checkpoint for another variant (tm) and decoding (NEZHA placeholders)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from comeir_dist.config.run import RunConfig
    from comeir_dist.model.factory import build_model
    from comeir_dist.quant.embed import load_item_embeddings
    from comeir_dist.quant.sid_table import load_sids
    from comeir_dist.train.checkpoint_simple import save_checkpoint

    ds = make_tiny_dataset(tmp_path, n_users=12, n_items=20)
    data = tiny_run_config(ds, tmp_path / "run", variant="tm").model_dump(mode="json")
    data["model"]["decoding"] = "nezha"
    cfg = RunConfig.model_validate(data)
    sids = load_sids(ds, "rqkmeans")
    torch.manual_seed(3)
    model = build_model(cfg, sids.codes, sids.codebooks, load_item_embeddings(ds)).eval()
    save_checkpoint(tmp_path / "run" / "best", model, cfg, 7, {"item/ndcg@10": 0.25}, sids.fingerprint)
    assert export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0  # a run dir: its best/
    capsys.readouterr()
    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 5, cfg.model.backbone.hidden_size)
    with torch.no_grad():
        assert torch.allclose(hf(inputs_embeds=x).last_hidden_state,
                              model.backbone(inputs_embeds=x).last_hidden_state, atol=1e-6)
    tok = load_file(tmp_path / "hf" / "comeir_sid_tokens.safetensors")
    assert torch.equal(tok["placeholders"], model.nezha.placeholders.p.detach())
    assert torch.equal(tok["merge.weight"], model.merge.weight.detach())
    info = json.loads((tmp_path / "hf" / "comeir_sid.json").read_text())
    assert info["variant"] == "tm" and info["inputs"]["decoding"] == "nezha" and info["step"] == 7
    assert info["inputs"]["placeholders"]["shape"] == [3, cfg.model.backbone.hidden_size]
    assert "placeholder vectors" in (tmp_path / "hf" / "README.md").read_text()


def _rechecksum(d: Path, files: list[str]) -> None:
    from comeir_dist.train import checkpoint_integrity as integrity

    integrity.write_checksums(d, integrity.describe(d, files))


def test_export_refuses_a_variant_without_backbone_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    best = tmp_path / "best"
    shutil.copytree(trained["run"] / "best", best)
    meta = json.loads((best / "meta.json").read_text())
    (best / "meta.json").write_text(json.dumps({**meta, "variant": "popular"}))
    _rechecksum(best, ["dense.pt", "meta.json", "tables.pt"])
    assert export_hf.main([str(best), str(tmp_path / "out")]) == 2
    err = _stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and "variant 'popular' has no Hugging Face backbone" in err[0]
    assert export_hf.main([str(trained["run"] / "checkpoints" / "step-2"), str(tmp_path / "out")]) == 2
    assert "is a step checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(export_hf, "model_card", lambda info: 1 / 0)  # a failure while writing
    with pytest.raises(ZeroDivisionError):
        export_hf.export(trained["run"] / "best", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


# ---- convert_dataset --------------------------------------------------------------------------------------------
def _prepare(inp: Path, out: Path):
    from comeir_dist.config.pipeline import PrepareConfig
    from comeir_dist.data.prepare import run_prepare

    return run_prepare(PrepareConfig(input=str(inp), out=str(out), k_core=1))


def _prepared(ds: Path) -> tuple[list, dict]:
    items = pq.read_table(ds / "items.parquet").to_pylist()
    users = pq.read_table(ds / "users.parquet").column("raw_id").to_pylist()
    seqs = pq.read_table(ds / "sequences.parquet").column("items").to_pylist()
    raw = [it["raw_id"] for it in items]
    return items, {u: [raw[i] for i in s] for u, s in zip(users, seqs, strict=True)}


def _jsonl_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_convert_amazon_reviews_and_metadata_are_accepted_by_prepare(tmp_path, capsys):
    src = tmp_path / "amazon"
    src.mkdir()
    reviews = [  # 2018 style; "007" and "7" are two items, ties keep file order
        {"reviewerID": "U1", "asin": "007", "unixReviewTime": 30, "overall": 5.0},
        {"reviewerID": "U1", "asin": "7", "unixReviewTime": 10},
        {"reviewerID": "U1", "asin": "B3", "unixReviewTime": 20},
        {"reviewerID": "U1", "asin": "B4", "unixReviewTime": 20},
        {"reviewerID": "U2", "asin": "7", "unixReviewTime": 5},
        {"reviewerID": "U2", "asin": "007", "unixReviewTime": 6},
        {"reviewerID": "U2", "asin": "B3", "unixReviewTime": 7},
        {"reviewerID": "U2", "asin": "B5", "unixReviewTime": 8},
    ]
    meta = [{"asin": "007", "title": "Bond", "category": ["Tools", "Lab"], "description": ["a", "b"], "brand": "Q"},
            {"asin": "7", "title": "Seven", "categories": [["Tools", "Seven"]]},
            {"asin": "7", "title": "Duplicate (ignored)"},
            {"asin": "B3", "title": "", "description": "only a description"},
            {"asin": "B4", "title": "Four"}, {"asin": "B5", "title": "Five"}, {"asin": "B9", "title": "unused"}]
    _jsonl_gz(src / "Tiny_5.json.gz", reviews)
    _jsonl_gz(src / "meta_Tiny.json.gz", meta)
    out = tmp_path / "raw"
    assert convert_dataset.main(["--format", "amazon", str(src), "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["name"], rep["users"], rep["items"], rep["interactions"]) == ("Tiny_5", 2, 5, 8)
    assert rep["duplicate_metadata_records"] == 1 and rep["unused_metadata_items"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".comeir-output.json", "Tiny_5.inter.json", "Tiny_5.item.json"]
    items, seqs = _prepared(_prepare(out, tmp_path / "ds"))
    assert seqs == {"U1": ["7", "B3", "B4", "007"], "U2": ["7", "007", "B3", "B5"]}
    by_id = {it["raw_id"]: it for it in items}
    assert by_id["007"]["title"] == "Bond" and by_id["007"]["categories"] == "Tools, Lab"
    assert by_id["007"]["description"] == "a b" and by_id["007"]["brand"] == "Q"
    assert by_id["7"]["title"] == "Seven" and by_id["7"]["categories"] == "Tools, Seven"
    assert by_id["B3"]["title"] is None and by_id["B3"]["description"] == "only a description"
    # 2023 layout (user_id / parent_asin / timestamp); an item without metadata is named, or dropped on request
    _jsonl_gz(src / "Tiny_5.json.gz", [{"user_id": "U1", "asin": "x1", "parent_asin": "P1", "timestamp": 1},
                                       {"user_id": "U1", "asin": "x2", "parent_asin": "P2", "timestamp": 2},
                                       {"user_id": "U1", "asin": "x3", "parent_asin": "P3", "timestamp": 3},
                                       {"user_id": "U1", "asin": "x9", "parent_asin": "P9", "timestamp": 4}])
    _jsonl_gz(src / "meta_Tiny.json.gz",
              [{"parent_asin": p, "title": p, "categories": ["c"]} for p in ("P1", "P2", "P3")])
    assert convert_dataset.main(["--format", "amazon", str(src), "--out", str(tmp_path / "raw2")]) == 2
    err = _stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and "1 item(s) in the interactions have no metadata text" in err[0] and "'P9'" in err[0]
    assert not (tmp_path / "raw2").exists()
    assert convert_dataset.main(["--format", "amazon", str(src / "Tiny_5.json.gz"), str(src / "meta_Tiny.json.gz"),
                                 "--out", str(tmp_path / "raw2"), "--drop-items-without-text", "--name", "t23"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dropped_interactions"] == 1
    assert json.loads((tmp_path / "raw2" / "t23.inter.json").read_text()) == {"U1": ["P1", "P2", "P3"]}


def test_convert_recbole_atomic_files_are_accepted_by_prepare(tmp_path, capsys):
    src = tmp_path / "rb"
    src.mkdir()
    (src / "mini.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                    "u1\t10\t4\t300\nu1\t010\t5\t100\nu1\t11\t3\t200\nu1\t12\t2\t400\n"
                                    "u2\t11\t1\t1.5\nu2\t10\t1\t1.5\nu2\t12\t1\t0.5\n")
    (src / "mini.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                   "10\tTen Things\t1999\tDrama Comedy\n010\tZero Ten\t2000\tAction\n"
                                   "11\tEleven\t2001\t\n12\tTwelve\t2002\tHorror\n")
    out = tmp_path / "raw"
    assert convert_dataset.main(["--format", "recbole", str(src), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "mini"
    items, seqs = _prepared(_prepare(out, tmp_path / "ds"))
    assert seqs == {"u1": ["010", "11", "10", "12"], "u2": ["12", "11", "10"]}  # ties (1.5): file order
    by_id = {it["raw_id"]: it for it in items}
    assert by_id["10"]["title"] == "Ten Things" and by_id["10"]["categories"] == "Drama Comedy"
    assert by_id["11"]["categories"] is None and by_id["010"]["title"] == "Zero Ten"
    (src / "mini.inter").write_text("user_id:token\titem_id:token\n1\t10\n")
    assert convert_dataset.main(["--format", "recbole", str(src), "--out", str(tmp_path / "r2")]) == 2
    assert "header lacks timestamp" in capsys.readouterr().err


def test_convert_movielens_gives_the_same_prepared_tables_as_reading_it_directly(tmp_path, capsys):
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.5,100\n1,3,1.0,50\n"
                                    "1,4,2.0,200\n2,2,5.0,10\n2,3,4.0,20\n2,4,3.0,30\n")
    (ml / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Children\n'
                                   '2,"Heat, The (1995)",Action\n3,Z (1969),(no genres listed)\n4,Four (2000),Drama\n')
    out = tmp_path / "raw"
    assert convert_dataset.main(["--format", "movielens", str(ml), "--out", str(out), "--name", "ml"]) == 0
    capsys.readouterr()
    converted = _prepared(_prepare(out, tmp_path / "a"))
    direct = _prepared(_prepare(ml, tmp_path / "b"))
    assert converted == direct and converted[1]["1"] == ["3", "1", "2", "4"]
    # the output guard: the earlier output is refused without --overwrite, a foreign dir keeps its files
    assert convert_dataset.main(["--format", "movielens", str(ml), "--out", str(out)]) == 2
    assert "holds an earlier output of this tool" in capsys.readouterr().err
    assert convert_dataset.main(["--format", "movielens", str(ml), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".comeir-output.json", "ml.inter.json", "ml.item.json"]
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert convert_dataset.main(["--format", "movielens", str(ml), "--out", str(mine)]) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(mine)) == ["notes.txt"]
    assert convert_dataset.main(["--format", "movielens", str(ml), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "ml.inter.json").is_file()
    assert not _leftovers(tmp_path)


# ---- import_sids -------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_ds(tmp_path):
    return make_tiny_dataset(tmp_path, n_users=12, n_items=20)


def _index(ds: Path, fmt: str = "tokens") -> dict:
    from comeir_dist.quant.sid_table import load_sids

    codes = load_sids(ds, "rqkmeans").codes
    raw = pq.read_table(ds / "items.parquet").column("raw_id").to_pylist()
    if fmt == "ints":
        return {r: [int(c) for c in codes[i]] for i, r in enumerate(raw)}
    return {r: [f"<{'abc'[lv]}_{int(c)}>" for lv, c in enumerate(codes[i])] for i, r in enumerate(raw)}


def test_imported_sids_load_through_the_product_loader(tiny_ds, tmp_path, capsys):
    from comeir_dist.quant.embed import load_item_embeddings
    from comeir_dist.quant.sid_table import load_sids

    want = load_sids(tiny_ds, "rqkmeans")
    idx = tmp_path / "idx.json"
    idx.write_text(json.dumps(_index(tiny_ds)))
    assert import_sids.main(["--dataset", str(tiny_ds), "--name", "rqvae", str(idx), "--codebook-size", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    got = load_sids(tiny_ds, "rqvae")
    assert np.array_equal(got.codes, want.codes) and got.fingerprint == want.fingerprint == rep["fingerprint"]
    assert got.codebooks.shape == (3, 8, 16) and rep["collisions"] == 0
    assert sorted(os.listdir(tiny_ds / "sids" / "rqvae")) == sorted(os.listdir(tiny_ds / "sids" / "rqkmeans"))
    emb = load_item_embeddings(tiny_ds)  # level-1 codebook = mean embedding of the items given each code
    c = int(want.codes[0, 0])
    assert np.allclose(got.codebooks[0, c], emb[want.codes[:, 0] == c].mean(0), atol=1e-5)
    residual = emb - got.codebooks[0][want.codes[:, 0]]  # level 2: the mean of what level 1 left
    c = int(want.codes[0, 1])
    assert np.allclose(got.codebooks[1, c], residual[want.codes[:, 1] == c].mean(0), atol=1e-5)
    # plain integer codes with two items sharing a SID: a collision is reported, C inferred (max + 1)
    ints = _index(tiny_ds, "ints")
    keys = list(ints)
    ints[keys[1]] = list(ints[keys[0]])
    idx.write_text(json.dumps(ints))
    assert import_sids.main(["--dataset", str(tiny_ds), "--name", "rqvae", str(idx)]) == 2  # exists
    assert "pass --overwrite" in capsys.readouterr().err
    assert import_sids.main(["--dataset", str(tiny_ds), "--name", "rqvae", str(idx), "--overwrite"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["collisions"] == 1 and rep["items_in_collisions"] == 2
    assert rep["codebook_size"] == int(want.codes.max()) + 1 == load_sids(tiny_ds, "rqvae").codebook_size


@pytest.mark.parametrize("edit, message", [
    (lambda d, k: d.update({k[0]: d[k[0]][:2]}), "different numbers of levels"),
    (lambda d, k: d.update({k[0]: ["<a_1>", "<b_99>", "<c_1>"]}), "code 99 is outside [0, 8)"),
    (lambda d, k: d.pop(k[3]), "1 catalogue item(s) have no SID"),
    (lambda d, k: d.update({"no-such-item": d[k[0]]}), "1 item(s) not in the dataset's catalogue"),
    (lambda d, k: d.update({k[0]: ["<a_1>", "<x_1>", "<c_1>"]}), "token prefix 'x' differs from 'b'"),
    (lambda d, k: d.update({k[0]: [1, True, 2]}), "codes must all be integers"),
])
def test_import_refuses_bad_indexes_in_one_line_and_writes_nothing(tiny_ds, tmp_path, capsys, edit, message):
    data = _index(tiny_ds)
    keys = list(data)
    edit(data, keys)
    idx = tmp_path / "idx.json"
    idx.write_text(json.dumps(data))
    assert import_sids.main(["--dataset", str(tiny_ds), "--name", "rqvae", str(idx), "--codebook-size", "8"]) == 2
    err = _stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    if "no SID" in message:
        assert repr(keys[3]) in err[0]
    assert not (tiny_ds / "sids" / "rqvae").exists() and not _leftovers(tiny_ds)


def test_import_failure_while_writing_leaves_nothing(tiny_ds, tmp_path, monkeypatch):
    import comeir_dist.quant.run as qrun

    def broken(out_dir, codes, codebooks, report):
        (out_dir / "codes.parquet").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qrun, "write_sids", broken)
    idx = tmp_path / "idx.json"
    idx.write_text(json.dumps(_index(tiny_ds)))
    assert import_sids.main(["--dataset", str(tiny_ds), "--name", "rqvae", str(idx)]) == 2
    assert not (tiny_ds / "sids" / "rqvae").exists() and not _leftovers(tiny_ds)
