"""``ray.max_failures: -1`` with a deterministic error: Ray Train stops restarting once the same step failed twice.

A private Ray head (tests/ray_head.py: own ports, 127.0.0.1, stopped by PID) runs a 2-worker TorchTrainer whose
attempt goes through the real worker wrapper (``ray_train.run_attempt``) with a body that always fails at the
start (resume step 0). Attempt 1 fails and is restarted; when attempt 2 fails the worker records that step 0
failed twice in a row; attempt 3 finds the record and returns, so ``fit`` ends; the driver check then raises one
line naming the step and the error.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from comeir_dist.orchestration import attempts
from comeir_dist.orchestration.ray_train import raise_if_stopped
from tests.fixtures import tiny_run_config
from tests.ray_head import start_head, venv_env

REPO = Path(__file__).resolve().parents[2]


DRIVER = """
import sys, time
import ray
from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from comeir_dist.config.run import RunConfig


def failing(config):
    from comeir_dist.orchestration.ray_train import run_attempt

    def body(cfg, resume_from):
        raise RuntimeError(f"deterministic failure (resume {resume_from})")

    run_attempt(config, body)


gcs, cfg_json, run_id, storage = sys.argv[1:5]
cfg = RunConfig.model_validate_json(open(cfg_json).read())
ray.init(address=gcs, configure_logging=False, log_to_driver=False)
trainer = TorchTrainer(
    failing, train_loop_config={"run": cfg.model_dump(mode="json"), "run_id": run_id},
    scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
    torch_config=TorchConfig(backend="gloo"),
    run_config=RayRunConfig(name="maxfail", storage_path=storage, failure_config=FailureConfig(max_failures=-1)))
t0 = time.time()
trainer.fit()  # returns: the third attempt stopped instead of training
print(f"elapsed {time.time() - t0:.1f}")
ray.shutdown()
"""


def test_unlimited_restarts_stop_when_the_same_step_fails_twice(tmp_path):
    """The Ray driver runs in its own process: a fresh driver, as under ``ray job submit`` (earlier tests in this
    pytest process have used other Ray instances)."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tmp_path / "ds", out)
    run_id = "max-failures-test"
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "driver.py").write_text(DRIVER)
    head = start_head(num_cpus=2)
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, str(tmp_path / "driver.py"), head.gcs, str(tmp_path / "cfg.json"),
                              run_id, str(tmp_path / "ray_results")], env=venv_env(), capture_output=True, text=True,
                             timeout=600, cwd=str(REPO))
        elapsed = time.time() - t0
    finally:
        head.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    starts = attempts.records(out, run_id)
    per_rank = [sum(1 for r in starts if r["rank"] == k) for k in (0, 1)]
    # a rank torn down before it got going records nothing; the first rank to start step 0 twice stops the run
    assert max(per_rank) == 2 and all(r["resume_step"] == 0 for r in starts), starts
    errors = attempts.records(out, run_id, event="error")
    assert errors and all("deterministic failure" in e["error"] for e in errors)
    with pytest.raises(RuntimeError, match=r"stopped: step 0 failed in 2 attempts in a row \(last error: "
                                           r"RuntimeError: deterministic failure"):
        raise_if_stopped(out, run_id, "maxfail")
    assert elapsed < 400
