"""Checkpoint loading without pickle, checksums, damaged-step fallback, retention, torn logs (no process group)."""
from __future__ import annotations

import json
import logging
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from comeir_dist.errors import UserError
from comeir_dist.train import checkpoint_integrity as integrity
from comeir_dist.train import rng_state, train_log
from comeir_dist.train.checkpoint_dirs import COMMIT, choose_resume, require_step_dir, retain, step_dirs


class _Boom:
    """Unpickling this runs code (creates ``path``): what a crafted pickle in a run dir would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# ---- DCP metadata as JSON -----------------------------------------------------------------------------------
def test_dcp_metadata_is_json_and_round_trips(tmp_path):
    import torch.distributed.checkpoint as dcp

    from comeir_dist.train.safe_dcp import METADATA_FILE, JsonMetadataReader, JsonMetadataWriter

    state = {"g/weight/t0": torch.randn(5, 3), "g/optim/t0/momentum": torch.rand(5).half(),
             "h/weight/t1": torch.arange(6, dtype=torch.int64)}
    writer = JsonMetadataWriter(tmp_path / "tables")
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert not (tmp_path / "tables" / ".metadata").exists()  # the stock pickle is never written
    data = json.loads((tmp_path / "tables" / METADATA_FILE).read_text())
    assert set(data["tensors"]) == set(state) and data["tensors"]["g/optim/t0/momentum"]["dtype"] == "float16"
    assert METADATA_FILE in writer.written and any(f.endswith(".distcp") for f in writer.written)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(got, storage_reader=JsonMetadataReader(tmp_path / "tables"), no_dist=True)
    for k in state:
        assert torch.equal(got[k], state[k]), k


def test_dcp_json_metadata_rejects_non_tensor_entries_and_foreign_paths(tmp_path):
    import torch.distributed.checkpoint as dcp

    from comeir_dist.train.safe_dcp import JsonMetadataReader, JsonMetadataWriter, METADATA_FILE, metadata_from_json

    with pytest.raises(BaseException) as e:  # (CheckpointException) a pickled object would need BytesStorageMetadata
        dcp.save({"x": {"python": "object"}, "t": torch.ones(2)}, storage_writer=JsonMetadataWriter(tmp_path / "a"),
                 no_dist=True)
    assert "only tensors" in str(getattr(e.value, "failures", "")) + str(e.value)
    assert not (tmp_path / "a" / METADATA_FILE).exists()
    dcp.save({"t": torch.ones(2)}, storage_writer=JsonMetadataWriter(tmp_path / "b"), no_dist=True)
    data = json.loads((tmp_path / "b" / METADATA_FILE).read_text())
    bad = json.loads(json.dumps(data))
    bad["storage"][0]["file"] = "../../etc/passwd"
    with pytest.raises(ValueError, match="file name"):
        metadata_from_json(bad)
    bad = json.loads(json.dumps(data))
    bad["tensors"]["t"]["dtype"] = "object"
    with pytest.raises(ValueError, match="dtype"):
        metadata_from_json(bad)
    (tmp_path / "b" / METADATA_FILE).unlink()
    import pickle

    (tmp_path / "b" / ".metadata").write_bytes(pickle.dumps(_Boom(tmp_path / "ran")))  # stock layout: not read
    with pytest.raises(ValueError, match="missing"):
        JsonMetadataReader(tmp_path / "b").read_metadata()
    assert not (tmp_path / "ran").exists()


# ---- RNG state as JSON ------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_json_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state
    saved = json.loads(json.dumps(rng_state.capture()))
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(4).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng_state.restore(saved)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(4).tolist())
    assert got == want
    with pytest.raises(ValueError, match="RNG state"):
        rng_state.restore({**saved, "torch": [300] * 10})
    with pytest.raises(ValueError, match="RNG state"):
        rng_state.restore({**saved, "python": {"version": 3, "state": "x"}})


# ---- checksums -------------------------------------------------------------------------------------------
def _files(root: Path) -> dict:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "b.json").write_text('{"x": 1}')
    files = integrity.describe(root, ["a.bin", "sub/b.json"])
    integrity.write_checksums(root, files)
    return files


def test_checksums_catch_truncation_bit_flips_and_missing_files(tmp_path):
    files = _files(tmp_path)
    assert files["a.bin"]["bytes"] == 10240 and integrity.verify(tmp_path) is None
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[5000] ^= 0x10
    (tmp_path / "a.bin").write_bytes(bytes(data))
    assert integrity.verify(tmp_path) == "a.bin: sha256 mismatch (corrupted or modified)"
    (tmp_path / "a.bin").write_bytes(bytes(data[:100]))
    assert integrity.verify(tmp_path).startswith("a.bin: 100 bytes, expected 10240")
    (tmp_path / "sub" / "b.json").unlink()
    assert integrity.verify(tmp_path, only=["sub/b.json"]) == "sub/b.json: missing"
    assert integrity.verify(tmp_path, required=["c.pt"]) == "c.pt: not listed in checksums.json"
    (tmp_path / integrity.CHECKSUMS).write_text('{"algorithm": "sha256", "files": {"../x": {"sha256": "0", "bytes": 1}}}')
    assert "malformed" in integrity.verify(tmp_path)
    (tmp_path / integrity.CHECKSUMS).write_text('{"algori')
    assert "unreadable" in integrity.verify(tmp_path)


# ---- choosing the step to resume from ---------------------------------------------------------------------
def _steps(run: Path, steps, fmt=2) -> None:
    for s in steps:
        d = run / "checkpoints" / f"step-{s}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"format": fmt, "step": s}))
        (d / COMMIT).write_text(str(s))


def test_damaged_newest_step_falls_back_with_a_warning(tmp_path, caplog):
    _steps(tmp_path, [5, 10, 15])
    bad = {15: "tables/__1_0.distcp: 12 bytes, expected 4096 (truncated or overwritten)",
           10: "dense/part-00001.pt: sha256 mismatch (corrupted or modified)"}
    with caplog.at_level(logging.WARNING):
        got = choose_resume(tmp_path, None, None, lambda d: bad.get(int(d.name.split("-")[1])), 2)
    assert got == tmp_path / "checkpoints" / "step-5"
    text = caplog.text
    assert "step-15 is damaged (tables/__1_0.distcp" in text and "step-10 is damaged (dense/part-00001.pt" in text
    assert [s for s, _, _ in step_dirs(tmp_path)] == [5]  # the damaged ones are set aside, kept for inspection
    assert len(list((tmp_path / "checkpoints").glob("step-1[05].damaged-*"))) == 2


def test_no_intact_step_is_one_line_and_moves_nothing(tmp_path):
    _steps(tmp_path, [5, 10])
    with pytest.raises(UserError, match=r"no intact committed checkpoint .*step-10: x.bin: missing") as e:
        choose_resume(tmp_path, None, True, lambda d: "x.bin: missing", 2)
    assert "\n" not in str(e.value)
    assert [s for s, _, _ in step_dirs(tmp_path)] == [5, 10]


def test_old_format_checkpoints_are_refused_clearly(tmp_path):
    _steps(tmp_path, [5], fmt=1)
    with pytest.raises(UserError, match="checkpoint format 1 .*pickled.*parallel.resume: false"):
        choose_resume(tmp_path, None, None, lambda d: "checksums.json: missing", 2)
    assert choose_resume(tmp_path, None, False, lambda d: None, 2) is None  # resume: false sets them aside
    assert not (tmp_path / "checkpoints").exists() and list(tmp_path.glob("checkpoints.stale-*"))


def test_recorded_step_missing_falls_back_and_newer_steps_are_ignored(tmp_path, caplog):
    _steps(tmp_path, [5, 15])
    recorded = tmp_path / "checkpoints" / "step-10"  # e.g. deleted: never trusted blindly, never fatal
    with caplog.at_level(logging.WARNING):
        assert choose_resume(tmp_path, recorded, True, lambda d: None, 2) == tmp_path / "checkpoints" / "step-5"
    assert "missing or not committed" in caplog.text


def test_recorded_path_must_be_a_step_dir_of_this_run(tmp_path):
    run = tmp_path / "run"
    _steps(run, [5])
    (tmp_path / "other" / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "checkpoints" / "step-7").symlink_to(tmp_path / "other" / "checkpoints" / "step-5")
    assert require_step_dir(run, str(run / "checkpoints" / "step-5"), "m") == (run / "checkpoints" / "step-5").resolve()
    for bad in [tmp_path / "other" / "checkpoints" / "step-5", run / "checkpoints" / "step-5" / ".." / ".." / "x",
                run / "checkpoints" / "step-7", run / "best", "checkpoints/step-5", 42]:
        with pytest.raises(UserError, match="refusing"):
            require_step_dir(run, bad if isinstance(bad, int) else str(bad), "Ray Train checkpoint manifest")


def test_ray_manifest_path_outside_out_is_refused(tmp_path):
    from comeir_dist.orchestration.ray_train import manifest_step_dir

    out = tmp_path / "run"
    _steps(out, [5])
    assert manifest_step_dir({"step": 5, "path": str(out / "checkpoints" / "step-5")}, out).name == "step-5"
    assert manifest_step_dir({"step": 0, "path": None}, out) is None
    with pytest.raises(UserError, match="not a step-N directory under .*refusing to load it"):
        manifest_step_dir({"step": 5, "path": str(tmp_path / "elsewhere" / "step-5")}, out)


# ---- retention --------------------------------------------------------------------------------------------
def test_retention_keeps_the_step_ray_may_still_hand_back(tmp_path):
    _steps(tmp_path, [5, 10, 15])
    (tmp_path / "checkpoints" / "step-20").mkdir()  # uncommitted
    assert retain(tmp_path, keep=1, protect=[15, 10]) == [5]  # keep_checkpoints: 1 with Ray: newest + last reported
    assert [(s, ok) for s, _, ok in step_dirs(tmp_path)] == [(10, True), (15, True)]
    assert retain(tmp_path, keep=1, protect=[15]) == [10]
    (tmp_path / "checkpoints" / "step-3.deleting-1").mkdir()  # left by a crash mid-delete: removed next time
    assert retain(tmp_path, keep=1, protect=[15]) == []
    assert not list((tmp_path / "checkpoints").glob("*deleting*"))


# ---- logs ------------------------------------------------------------------------------------------------
def test_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in train_log.read(log)] == [1, 2]
    assert "torn final line" in caplog.text
    assert train_log.keep_until(log, 1) == 1
    train_log.append(log, {"step": 2, "loss": 1.25})
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.25}\n'
    assert train_log.keep_until(log, None) == 0 and log.read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---- best/ -----------------------------------------------------------------------------------------------
def _tiny_best(tmp_path: Path):
    from comeir_dist.train.checkpoint_simple import save_checkpoint

    model = torch.nn.Linear(3, 2)
    cfg = types.SimpleNamespace(model_dump=lambda mode: {"x": 1}, model=types.SimpleNamespace(variant="tm"))
    path = save_checkpoint(tmp_path / "best", model, cfg, 7, {"m": 1.0}, "fp")
    return path, model


def test_best_checkpoint_has_checksums_and_a_tampered_file_is_refused_before_torch_load(tmp_path, monkeypatch):
    from comeir_dist.train import checkpoint_simple as cs

    path, model = _tiny_best(tmp_path)
    assert set(json.loads((path / "checksums.json").read_text())["files"]) == {"dense.pt", "meta.json"}
    meta = cs.read_meta(path)
    cs.load_checkpoint_into(path, torch.nn.Linear(3, 2), meta, "fp")  # intact: loads
    torch.save({"weight": _Boom(tmp_path / "ran")}, path / "dense.pt")  # crafted pickle in place of the weights
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(UserError, match="dense.pt: .*(mismatch|bytes)"):
        cs.load_checkpoint_into(path, torch.nn.Linear(3, 2), meta, "fp")
    assert loads == [] and not (tmp_path / "ran").exists()
