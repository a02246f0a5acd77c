"""When a Ray Train run stops restarting: the same step failed twice in a row, or a UserError (no Ray needed)."""
from __future__ import annotations

import json

import pytest

from comeir_dist.errors import UserError
from comeir_dist.orchestration import attempts
from comeir_dist.orchestration.ray_train import raise_if_stopped, worker_attempts


def _starts(out, run_id, rank, steps):
    for s in steps:
        attempts.record_start(out, run_id, rank, None if s == 0 else out / "checkpoints" / f"step-{s}", s)


def test_the_same_step_failing_twice_in_a_row_stops(tmp_path):
    _starts(tmp_path, "r1", 0, [0])
    assert not attempts.repeated_failure(attempts.records(tmp_path, "r1", 0), 0)  # the first failure: restart
    _starts(tmp_path, "r1", 0, [0])
    assert attempts.repeated_failure(attempts.records(tmp_path, "r1", 0), 0)  # step 0 failed twice in a row: stop
    assert not attempts.repeated_failure(attempts.records(tmp_path, "r1", 0), 5)  # progress was made: go on
    _starts(tmp_path, "r1", 0, [5])
    assert not attempts.repeated_failure(attempts.records(tmp_path, "r1", 0), 5)  # step 5 failed once so far
    _starts(tmp_path, "r1", 0, [5])
    assert attempts.repeated_failure(attempts.records(tmp_path, "r1", 0), 5)


def test_records_are_scoped_to_the_run_and_rank(tmp_path):
    _starts(tmp_path, "old", 0, [0, 0, 0])  # an earlier run in the same out dir never counts
    _starts(tmp_path, "r2", 1, [0, 0])  # another rank's records of this attempt are not read
    assert not attempts.repeated_failure(attempts.records(tmp_path, "r2", 0), 0)
    attempts.record_error(tmp_path, "r2", 1, 0, RuntimeError("boom\nmore"))
    with (tmp_path / attempts.WORKERS_LOG).open("a") as f:
        f.write('{"event": "start", "run_id": "r2", "ra')  # a worker killed mid-append
    assert len(attempts.records(tmp_path, "r2", 1)) == 2  # the torn line is skipped, error records are not starts
    assert attempts.last_error(tmp_path, "r2") == "RuntimeError: boom"
    assert [a["run_id"] for a in worker_attempts(tmp_path, "r2")] == ["r2", "r2"]
    # the format before run ids ({"rank", "pid", "resume_from", "time"}) still reads as start records
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / attempts.WORKERS_LOG).write_text(json.dumps({"rank": 0, "pid": 1, "resume_from": None}) + "\n")
    assert len(worker_attempts(tmp_path / "legacy")) == 1


def test_driver_reports_a_stopped_run(tmp_path):
    raise_if_stopped(tmp_path, "r3", "run")  # nothing recorded: fine
    attempts.write_stopped(tmp_path, "other", "repeated_failure", 5, "step 5 failed")
    raise_if_stopped(tmp_path, "r3", "run")  # another run's record is ignored
    attempts.write_stopped(tmp_path, "r3", "repeated_failure", 5, "step 5 failed in 2 attempts in a row")
    with pytest.raises(RuntimeError, match="Ray Train run run stopped: step 5 failed in 2 attempts in a row"):
        raise_if_stopped(tmp_path, "r3", "run")
    attempts.write_stopped(tmp_path, "r3", "user_error", 0, "dataset: x not found")
    with pytest.raises(UserError, match="^dataset: x not found$"):
        raise_if_stopped(tmp_path, "r3", "run")
