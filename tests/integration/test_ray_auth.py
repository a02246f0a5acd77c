"""Ray as users run it (Ray 2.60): `ray start --head` with token authentication, then `ray job submit`.

* A private head (tests/ray_head.py: own ports, temp dir, process group; RAY_AUTH_MODE=token with this test
  process's token file via RAY_AUTH_TOKEN_PATH -- never ~/.ray/auth_token).
* `ray job submit` without the token is refused (401 "Missing authentication token"), also when only the token
  is there but RAY_AUTH_MODE=token is not set (the job CLI sends the token only in token mode); a wrong token
  is refused (403). With RAY_AUTH_MODE=token and the token file (RAY_AUTH_TOKEN_PATH) a tiny job runs and sees
  the cluster; the token itself in RAY_AUTH_TOKEN is accepted as well.
* With no RAY_ADDRESS, ``ray_session`` starts its own local Ray even when Ray's ``ray_current_cluster`` file
  names a dead head (a bare ``ray.init()`` would try to join it and hang, then fail). The stale file is in the
  test's own RAY_TMPDIR (Ray reads ``$RAY_TMPDIR/ray/ray_current_cluster`` instead of /tmp/ray/...).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ray_head import auth_token_path, start_head, venv_env

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
JOB = "import ray; ray.init(); print('RESOURCES', ray.cluster_resources())"


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=1)
    yield h
    h.stop()


def _submit(head, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", head.dashboard, "--", "python", "-c", JOB],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def _without_token(tmp_path, **keep) -> dict:
    """The submitting machine's environment with no token anywhere Ray looks (HOME -> an empty dir)."""
    env = venv_env(HOME=str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    env.update(keep)
    return env


def test_submit_without_token_is_refused(head, tmp_path):
    res = _submit(head, _without_token(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "AuthenticationError" in out and "Missing authentication token" in out, out[-2000:]
    assert "RESOURCES" not in out


def test_token_without_token_mode_is_not_sent(head, tmp_path):
    """The pitfall of the README's old instructions: the token is present, RAY_AUTH_MODE is not `token`."""
    res = _submit(head, _without_token(tmp_path, RAY_AUTH_TOKEN_PATH=str(auth_token_path())))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Missing authentication token" in out, out[-2000:]


def test_wrong_token_is_refused(head, tmp_path):
    res = _submit(head, _without_token(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Invalid authentication token" in out, out[-2000:]


def test_submit_with_token_path_runs_the_job(head, tmp_path):
    res = _submit(head, _without_token(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth_token_path())))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "RESOURCES" in out and "'CPU': 1.0" in out and "succeeded" in out, out[-3000:]


def test_token_in_the_environment_is_accepted(head, tmp_path):
    """RAY_AUTH_TOKEN (the token itself, e.g. from a secret store) instead of a file: the job list is served."""
    env = _without_token(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token_path().read_text().strip())
    res = subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=env, capture_output=True, text=True,
                         timeout=120, cwd=str(REPO))
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "AuthenticationError" not in out, out[-3000:]


def test_job_client_in_this_process_sends_the_token(head):
    """start_head exported RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH to this process: the SDK client authenticates."""
    from ray.job_submission import JobSubmissionClient

    assert isinstance(JobSubmissionClient(head.dashboard).list_jobs(), list)


SESSION = """
import ray
from comeir_dist.orchestration.ray_session import ray_session

with ray_session(num_cpus=1):
    print("LOCAL", ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"))
"""


def test_local_session_ignores_a_stale_cluster_file():
    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: the local Ray's unix sockets live under it
    try:
        (tmp / "ray").mkdir()
        stale = tmp / "ray" / "ray_current_cluster"
        stale.write_text("127.0.0.1:9")  # a head that died (the discard port: nothing answers)
        res = subprocess.run([sys.executable, "-c", SESSION], env=venv_env(RAY_TMPDIR=str(tmp)), cwd=str(REPO),
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("LOCAL"))
        assert not line.split()[1].endswith(":9") and line.split()[2] == "1.0", line
        assert stale.read_text() == "127.0.0.1:9"
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
