"""The real `comeir` console command on the bundled data: --out never destroys what comeir did not write."""
import json
import subprocess
import sys
from pathlib import Path

COMEIR = [sys.executable, "-m", "comeir_dist.cli"]


def _run(*argv, cwd=None):
    r = subprocess.run([*COMEIR, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _error_line(r) -> str:
    lines = [l for l in r.stderr.splitlines() if "error:" in l]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    return lines[0]


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_prepare_bundled_rerun_keeps_artefacts_and_user_files(tmp_path):
    out = tmp_path / "scientific"
    r = _run("prepare", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["users"] == 8317
    assert json.loads((out / ".comeir-output.json").read_text())["kind"] == "dataset"
    (out / "item_emb.parquet").write_bytes(b"embeddings: minutes of work")
    (out / "sids" / "rqkmeans").mkdir(parents=True)
    (out / "sids" / "rqkmeans" / "codes.parquet").write_bytes(b"codes")
    (out / "README.local").write_text("mine")

    r = _run("prepare", "--out", str(out))  # unchanged inputs: nothing is redone or lost
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    assert (out / "item_emb.parquet").read_bytes() == b"embeddings: minutes of work"
    assert (out / "sids" / "rqkmeans" / "codes.parquet").is_file() and (out / "README.local").is_file()

    err = _error_line(_run("prepare", "--out", str(out), "--k-core", "6"))  # other tables: refused
    assert "item_emb.parquet" in err and "sids/rqkmeans" in err and "--overwrite" in err
    assert (out / "item_emb.parquet").is_file()

    r = _run("prepare", "--out", str(out), "--k-core", "6", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "item_emb.parquet").exists() and not (out / "sids").exists()
    assert (out / "README.local").read_text() == "mine"
    assert json.loads((out / "stats.json").read_text())["k_core"] == 6
    assert not _leftovers(out) and not _leftovers(tmp_path)


def test_prepare_refuses_user_dir_file_and_busy_current_dir(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    assert "not written by comeir" in _error_line(_run("prepare", "--out", str(mine)))
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]

    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert "is an existing file" in _error_line(_run("prepare", "--out", str(f)))
    assert f.read_text() == "keep"

    assert "not written by comeir" in _error_line(_run("prepare", "--out", ".", cwd=mine))
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert not _leftovers(tmp_path) and not _leftovers(mine)


def test_evaluate_out_directory_is_one_line(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for out in (str(d), "."):
        err = _error_line(_run("evaluate", "--checkpoint", str(tmp_path / "none"), "--out", out, cwd=tmp_path))
        assert "is a directory" in err
    assert not list(d.iterdir()) and not _leftovers(tmp_path)
