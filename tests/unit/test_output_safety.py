"""Outputs never destroy what comeir did not write (issue 10): dirs, dataset artefacts, single files."""
import json
import os
from pathlib import Path

import pytest

from comeir_dist.cli import main
from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data import prepare as prepare_mod
from comeir_dist.data.prepare import run_prepare
from comeir_dist.errors import UserError
from comeir_dist.utils.atomic import atomic_dir, atomic_file, atomic_update, write_json, write_json_and_markdown
from comeir_dist.utils.output_guard import MARKER, check_out_dir, inspect_out, read_marker
from tests.fixtures import tiny_run_config


def _raw(d: Path, n_users=8, n_items=8, seq_len=5) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    inter = {str(u): [(u + j) % n_items for j in range(seq_len)] for u in range(n_users)}
    items = {str(i): {"title": f"item {i}", "description": f"desc {i}"} for i in range(n_items)}
    (d / "Toy.inter.json").write_text(json.dumps(inter))
    (d / "Toy.item.json").write_text(json.dumps(items))
    return d


@pytest.fixture
def raw(tmp_path):
    return _raw(tmp_path / "raw")


def _prepare(raw, out, *extra):
    return main(["prepare", "--input", str(raw), "--out", str(out), "--k-core", "2", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def _add_artefacts(ds: Path) -> None:
    """Stand-ins for `comeir embed` / `comeir quantize` outputs (minutes of work in real life)."""
    (ds / "item_emb.parquet").write_bytes(b"emb")
    (ds / "item_emb.json").write_text("{}")
    (ds / "sids" / "rqkmeans").mkdir(parents=True)
    (ds / "sids" / "rqkmeans" / "report.json").write_text("{}")


# ---- prepare --out: directories --------------------------------------------------------------------------
def test_prepare_refuses_dir_with_user_files(raw, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _prepare(raw, out) == 2
    err = _one_line(capsys)
    assert str(out) in err and "notes.txt" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and not _leftovers(tmp_path)


def test_prepare_overwrite_writes_beside_user_files(raw, tmp_path, caplog):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _prepare(raw, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "items.parquet").is_file()
    assert read_marker(out)["kind"] == "dataset"
    assert "notes.txt" in caplog.text  # says what it found there
    assert not _leftovers(tmp_path) and not _leftovers(out)


def test_prepare_out_is_a_file(raw, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("data")
    for extra in ((), ("--overwrite",)):
        assert _prepare(raw, f, *extra) == 2
        assert "is an existing file" in _one_line(capsys)
    assert f.read_text() == "data" and not _leftovers(tmp_path)


def test_prepare_out_dot(raw, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert _prepare(raw, ".") == 0  # an empty current dir is filled in place
    assert (empty / "stats.json").is_file() and not _leftovers(empty) and not _leftovers(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "project.txt").write_text("x")
    monkeypatch.chdir(busy)
    assert _prepare(raw, ".") == 2
    assert "not written by comeir" in _one_line(capsys)
    assert [p.name for p in busy.iterdir()] == ["project.txt"] and not _leftovers(tmp_path)


def test_prepare_refuses_another_kind_of_output(raw, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("{}\n")
    assert _prepare(raw, run) == 2
    assert "holds a training run" in _one_line(capsys)
    assert [p.name for p in run.iterdir()] == ["train_log.jsonl"]


# ---- prepare: artefacts inside a dataset --------------------------------------------------------------------
def test_rerun_with_same_inputs_skips_and_keeps_artefacts(raw, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    assert _prepare(raw, out) == 0
    _add_artefacts(out)
    (out / "my_notes.md").write_text("mine")
    before = (out / "items.parquet").stat().st_mtime_ns
    monkeypatch.setattr(prepare_mod, "read_raw", lambda *a: pytest.fail("unchanged inputs were read again"))
    assert _prepare(raw, out) == 0
    assert (out / "item_emb.parquet").read_bytes() == b"emb" and (out / "sids" / "rqkmeans" / "report.json").is_file()
    assert (out / "my_notes.md").is_file() and (out / "items.parquet").stat().st_mtime_ns == before


def test_dataset_from_before_the_marker_keeps_its_artefacts(raw, tmp_path):
    out = tmp_path / "ds"
    assert _prepare(raw, out) == 0
    (out / MARKER).unlink()  # a dataset prepared by an older version
    _add_artefacts(out)
    assert inspect_out(out).kind == "dataset"
    assert _prepare(raw, out) == 0
    assert (out / "item_emb.parquet").read_bytes() == b"emb" and (out / "sids" / "rqkmeans").is_dir()
    assert read_marker(out)["kind"] == "dataset"


def test_changed_inputs_refused_naming_stale_artefacts(raw, tmp_path, capsys):
    out = tmp_path / "ds"
    assert _prepare(raw, out) == 0
    _add_artefacts(out)
    (out / "my_notes.md").write_text("mine")
    items_before = (out / "items.parquet").read_bytes()
    items = json.loads((raw / "Toy.item.json").read_text())
    items["3"]["title"] = "a renamed item"  # the item text changes: embeddings and SIDs become stale
    (raw / "Toy.item.json").write_text(json.dumps(items))
    assert _prepare(raw, out) == 2
    err = _one_line(capsys)
    assert "item_emb.parquet" in err and "sids/rqkmeans" in err and "--overwrite" in err
    assert (out / "items.parquet").read_bytes() == items_before and (out / "item_emb.parquet").is_file()
    assert _prepare(raw, out, "--overwrite") == 0
    assert not (out / "item_emb.parquet").exists() and not (out / "sids").exists()
    assert (out / "items.parquet").read_bytes() != items_before and (out / "my_notes.md").read_text() == "mine"
    assert not _leftovers(out) and not _leftovers(tmp_path)


def test_changed_parameters_with_the_same_tables_keep_artefacts(raw, tmp_path):
    out = tmp_path / "ds"
    assert _prepare(raw, out) == 0
    _add_artefacts(out)
    assert _prepare(raw, out, "--max-history", "7") == 0  # only stats change: embeddings/SIDs still valid
    assert json.loads((out / "stats.json").read_text())["max_history"] == 7
    assert (out / "item_emb.parquet").is_file() and (out / "sids" / "rqkmeans").is_dir()


def test_a_failed_write_leaves_the_previous_dataset(raw, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    assert _prepare(raw, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []

    def flaky(table, where):
        calls.append(where)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(table, where)

    real = prepare_mod.pq.write_table
    monkeypatch.setattr(prepare_mod.pq, "write_table", flaky)
    with pytest.raises(OSError):
        run_prepare(PrepareConfig(input=str(raw), out=str(out), k_core=3))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not _leftovers(out) and not _leftovers(tmp_path)


# ---- atomic helpers ---------------------------------------------------------------------------------------
def test_atomic_dir_never_replaces_unless_told(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        with atomic_dir(d) as tmp:
            (tmp / "y").write_text("new")
    assert [p.name for p in d.iterdir()] == ["x"] and not _leftovers(tmp_path)
    with atomic_dir(d, overwrite=True) as tmp:  # a directory comeir wrote whole (best/, sids/<method>/)
        (tmp / "y").write_text("new")
    assert [p.name for p in d.iterdir()] == ["y"] and not _leftovers(tmp_path)


def test_atomic_dir_on_a_file_or_the_current_dir(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("data")
    with pytest.raises(UserError, match="existing file"):
        with atomic_dir(f, overwrite=True):
            pytest.fail("body ran")
    assert f.read_text() == "data" and not _leftovers(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="current directory"):
        with atomic_dir(".", overwrite=True):
            pytest.fail("body ran")
    assert not _leftovers(tmp_path) and not _leftovers(tmp_path.parent)


def test_atomic_update_keeps_other_entries(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("k")
    (d / "a.txt").write_text("old")
    with atomic_update(d) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (d / "keep.txt").read_text() == "k" and (d / "a.txt").read_text() == "new" and not _leftovers(d)


@pytest.mark.parametrize("target", ["dir", "."])
def test_json_onto_a_directory_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, target):
    d = tmp_path / "d"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    path = d if target == "dir" else Path(".")
    with pytest.raises(UserError, match="is a directory"):
        write_json(path, {"a": 1})
    with pytest.raises(UserError, match="is a directory"):
        with atomic_file(path):
            pytest.fail("body ran")
    assert not list(d.iterdir()) and not _leftovers(tmp_path)


def test_report_and_markdown_checked_before_either_is_written(tmp_path):
    (tmp_path / "r.md").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        write_json_and_markdown(tmp_path / "r.json", {"a": 1}, "| a |")
    assert not (tmp_path / "r.json").exists() and not _leftovers(tmp_path)


# ---- single-file --out of commands: checked before any work ------------------------------------------------
def test_evaluate_out_directory_refused_before_loading(tmp_path, monkeypatch, capsys):
    d = tmp_path / "d"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    for out in (str(d), "."):
        assert main(["evaluate", "--checkpoint", str(tmp_path / "no-ckpt"), "--out", out]) == 2
        err = _one_line(capsys)
        assert "--out" in err and "is a directory" in err  # not the (later) checkpoint error
    assert not list(d.iterdir()) and not _leftovers(tmp_path)


def test_bench_out_directory_refused_before_running(tmp_path, capsys):
    assert main(["bench", "lookup", "--out", str(tmp_path)]) == 2
    assert "is a directory" in _one_line(capsys)
    assert not _leftovers(tmp_path)


# ---- run / experiment / scaling dirs --------------------------------------------------------------------------
def test_train_refuses_foreign_out_before_any_work(tmp_path):
    from comeir_dist.train.loop import train

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    cfg = tiny_run_config(tmp_path / "no-dataset", out)
    with pytest.raises(UserError, match="not written by comeir"):
        train(cfg)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="dataset directory not found"):  # accepted: fails later, on the dataset
        train(cfg, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep" and read_marker(out)["kind"] == "run"


def test_train_accepts_its_own_run_dir_and_refuses_a_dataset(raw, tmp_path):
    from comeir_dist.train.loop import train

    legacy = tmp_path / "run"
    legacy.mkdir()
    (legacy / "train_log.jsonl").write_text("{}\n")  # a run dir from before the marker
    with pytest.raises(UserError, match="dataset directory not found"):
        train(tiny_run_config(tmp_path / "no-dataset", legacy))
    ds = tmp_path / "ds"
    assert _prepare(raw, ds) == 0
    with pytest.raises(UserError, match="holds a prepared dataset"):
        train(tiny_run_config(ds, ds))


def test_experiment_and_scaling_refuse_foreign_dirs(tmp_path):
    from comeir_dist.scaling.grid import ScalingSettings
    from comeir_dist.scaling.runner import InlineExecutor
    from comeir_dist.scaling.sweep import run_sweep
    from comeir_dist.train.experiment import run_experiment

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    cfg = tiny_run_config(tmp_path / "no-dataset", out)
    with pytest.raises(UserError, match="not written by comeir"):
        run_experiment(cfg, ["tm"], 1)
    with pytest.raises(UserError, match="not written by comeir"):
        run_sweep(cfg, ScalingSettings(s_t=[0.5], s_s=[0.5]), executor=InlineExecutor(),
                  runner=lambda _: pytest.fail("point ran"), device_memory_gib=64.0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("layout,kind", [
    ({"stats.json": "", "items.parquet": "", "sequences.parquet": ""}, "dataset"),
    ({"summary.json": "{}"}, "run"), ({"checkpoints/step-1/x": ""}, "run"), ({"best/meta.json": "{}"}, "run"),
    ({"results.json": "{}"}, "experiment"), ({"comeir-seed42/train_log.jsonl": ""}, "experiment"),
    ({"points/a.json": "{}"}, "scaling"), ({"notes.txt": ""}, None)])
def test_outputs_from_before_the_marker_are_recognised(tmp_path, layout, kind):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert inspect_out(tmp_path).kind == kind


def test_marker_decides_over_layout_and_empty_dirs_are_free(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"kind": "scaling"}))
    (tmp_path / "summary.json").write_text("{}")
    assert inspect_out(tmp_path).kind == "scaling"
    empty = tmp_path / "e"
    empty.mkdir()
    assert check_out_dir(empty, "run").kind is None and not os.listdir(empty)


def _guard_on_rank(rank, world, out, ds):
    from comeir_dist.parallel.dist_env import init_distributed
    from comeir_dist.utils.output_guard import guard_run_dir

    env = init_distributed("cpu", "gloo")  # joins the harness's group
    with pytest.raises(UserError, match="not written by comeir"):  # on every rank, not only rank 0
        guard_run_dir(tiny_run_config(Path(ds), Path(out)), env)


def test_run_dir_refusal_reaches_every_rank(tmp_path):
    from tests.distributed.harness import run_ranks

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    run_ranks(2, _guard_on_rank, str(out), str(tmp_path / "no-dataset"), timeout=120)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_input_fingerprint_follows_content_and_parameters_not_paths(raw, tmp_path):
    import shutil

    from comeir_dist.data.dataset_output import input_fingerprint

    fp = input_fingerprint(PrepareConfig(input=str(raw), k_core=2))
    moved = tmp_path / "elsewhere"
    shutil.copytree(raw, moved)
    assert input_fingerprint(PrepareConfig(input=str(moved), k_core=2)) == fp
    assert input_fingerprint(PrepareConfig(input=str(moved), k_core=3)) != fp
    (moved / "Toy.inter.json").write_text((moved / "Toy.inter.json").read_text().replace("[0,", "[1,", 1))
    assert input_fingerprint(PrepareConfig(input=str(moved), k_core=2)) != fp
