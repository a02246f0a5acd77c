"""jobs/train_industrial.py under Ray Train: submitted with `ray job submit` to our own head, and fault tolerance.

* ``submitted``: a private Ray head (own ports, temp dir, process group; stopped by PID), `ray job submit
  --working-dir <repo> -- python jobs/train_industrial.py --config <tiny 2-worker config>`; the job must
  succeed and leave committed step checkpoints, a summary and Ray Train's checkpoint manifests.
* ``faulted``: the same config run directly (`python jobs/train_industrial.py`, local Ray) with
  ``ray.max_failures: 1``; as soon as Ray Train's controller has registered a reported step checkpoint,
  rank 1's worker process gets SIGKILL.
  Ray Train restarts the worker group, which resumes from the reported checkpoint and finishes. Its per-step
  losses must equal the uninterrupted (submitted) run's -- same world size, so to 1e-6 -- and the logged
  history must hold every step exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import make_tiny_dataset
from tests.ray_train_runs import EVERY, job_config, logged_losses, registered_checkpoints
from tests.ray_head import start_head, venv_env

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def _config(ds: Path, root: Path, name: str) -> Path:
    return job_config(ds, root, name, STEPS, local_num_cpus=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("raytrain")
    make_tiny_dataset(r / "data")
    return r


@pytest.fixture(scope="module")
def submitted(root):
    cfg = _config(root / "data" / "ds", root, "submitted")
    head = start_head(num_cpus=2)
    try:
        sub_id = f"comeir-test-{os.getpid()}"
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard,
               "--working-dir", str(REPO), "--submission-id", sub_id, "--no-wait", "--",
               "python", "jobs/train_industrial.py", "--config", str(cfg)]
        subprocess.run(cmd, check=True, env=venv_env(), capture_output=True, text=True, timeout=120)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(head.dashboard)
        deadline = time.time() + 600
        while time.time() < deadline:
            status = client.get_job_status(sub_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(0.5)
        logs = client.get_job_logs(sub_id)
        yield status, logs, root / "submitted" / "run", root / "submitted" / "ray_results"
    finally:
        head.stop()


@pytest.fixture(scope="module")
def faulted(root, submitted):  # after `submitted`: the two runs must not compete for the 2 cores
    cfg = _config(root / "data" / "ds", root, "faulted")
    run = root / "faulted" / "run"
    log = (root / "faulted.log").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train_industrial.py"), "--config", str(cfg)],
                            cwd=REPO, env=venv_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and killed is None:
            # a step checkpoint committed on disk AND registered by Ray Train's controller (reports are pulled
            # from the workers asynchronously: a manifest uploaded a moment before the kill may be unknown)
            committed = registered_checkpoints(root / "faulted" / "ray_results" / "run")
            workers = run / "ray_workers.jsonl"
            if committed and workers.is_file():
                ranks = {r["rank"]: r for r in map(json.loads, workers.read_text().splitlines())}
                if 1 in ranks:
                    os.kill(ranks[1]["pid"], signal.SIGKILL)
                    killed = {"pid": ranks[1]["pid"], "registered": committed}
                    break
            time.sleep(0.05)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return rc, killed, run, (root / "faulted.log").read_text()


def test_ray_job_submit_trains_and_checkpoints(submitted):
    status, logs, run, storage = submitted
    assert str(status) in ("SUCCEEDED", "JobStatus.SUCCEEDED"), logs[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    commits = sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/COMMITTED"))
    assert commits and commits[-1] == STEPS
    assert [s for s, _ in logged_losses(run)] == list(range(1, STEPS + 1))
    manifests = sorted((storage / "run").glob("*/comeir_checkpoint.json"))  # Ray Train's reported checkpoints
    assert manifests, list(storage.rglob("*"))[:20]
    last = json.loads(manifests[-1].read_text())
    assert last["step"] == STEPS and Path(last["path"]) == run / "checkpoints" / f"step-{STEPS}"
    assert '"steps": 60' in logs  # the job's printed result


def test_killed_worker_is_restarted_and_resumes_exactly(submitted, faulted):
    _, _, ref_run, _ = submitted
    rc, killed, run, log = faulted
    assert killed is not None, "training finished before a worker could be killed:\n" + log[-3000:]
    assert rc == 0, log[-3000:]
    attempts = [a for a in map(json.loads, (run / "ray_workers.jsonl").read_text().splitlines())
                if a.get("event", "start") == "start"]  # "error" records: the survivor's collective failure
    first = [a for a in attempts if a["resume_from"] is None]
    resumed = [a for a in attempts if a["resume_from"] is not None]
    assert sorted(a["rank"] for a in first) == [0, 1] and sorted(a["rank"] for a in resumed) == [0, 1], attempts
    assert killed["pid"] in {a["pid"] for a in first}
    resume_step = int(Path(resumed[0]["resume_from"]).name.split("-")[1])
    # the survivor may report a later step between our snapshot and the SIGKILL landing (reports are pulled
    # asynchronously): the resume point is the newest registered checkpoint, never older than the snapshot's
    at_kill = max(int(name.split("-")[1]) for name in killed["registered"])
    assert at_kill <= resume_step < STEPS and resume_step % EVERY == 0, (resume_step, killed)
    got, ref = logged_losses(run), dict(logged_losses(ref_run))
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "a step is missing or repeated in the logged history"
    for step, loss in got:
        assert loss == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, loss, ref[step], resume_step)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
