"""ray_session: without an address it starts its OWN local Ray (``ray.init(address="local")``), never the cluster a
leftover ``ray_current_cluster`` file names; with an address (argument or RAY_ADDRESS) it connects there.

No Ray is started here (``ray.init`` is replaced by a recorder); the real start with a stale cluster file is in
tests/integration/test_ray_auth.py. The stale file lives in this test's own RAY_TMPDIR, which Ray 2.60 reads
instead of /tmp (``ray._common.utils.get_default_system_temp_dir``): the machine's /tmp/ray is never touched.
"""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from comeir_dist.errors import UserError  # noqa: E402
from comeir_dist.orchestration import ray_session as rs  # noqa: E402

STALE = "127.0.0.1:9"  # the discard port: nothing answers there


@pytest.fixture
def stale_cluster_file(tmp_path, monkeypatch):
    """RAY_ADDRESS unset, Ray's temp root = tmp_path, its ray_current_cluster naming a dead head."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(STALE)
    return tmp_path / "ray" / "ray_current_cluster"


@pytest.fixture
def calls(monkeypatch):
    """Record ray.init / ray.shutdown instead of starting Ray."""
    seen: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(("init", kw)))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.append(("shutdown", {})))
    return seen


def test_the_stale_file_is_what_a_bare_ray_init_would_join(stale_cluster_file):
    """The premise, in Ray 2.60's own address resolution: no address -> the file's address (ray.init() would then
    try to connect to the dead head); "local" -> None (start a new instance)."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    assert get_ray_address_file(None) == str(stale_cluster_file)
    services.find_gcs_addresses.cache_clear()
    resolved = services.canonicalize_bootstrap_address(None)
    assert resolved is not None and resolved.endswith(":9"), resolved
    assert services.canonicalize_bootstrap_address("local") is None


def test_no_address_starts_a_local_instance(stale_cluster_file, calls):
    with rs.ray_session(num_cpus=1):
        pass
    (kind, kw), last = calls
    assert kind == "init" and kw["address"] == "local" and kw["num_cpus"] == 1 and kw["include_dashboard"] is False
    assert last[0] == "shutdown"
    assert stale_cluster_file.read_text() == STALE  # left alone


def test_local_dashboard_listens_on_loopback(stale_cluster_file, calls):
    with rs.ray_session(dashboard=True):
        pass
    kw = calls[0][1]
    assert kw["address"] == "local" and kw["include_dashboard"] is True and kw["dashboard_host"] == "127.0.0.1"


@pytest.mark.parametrize("how", ["argument", "env"])
def test_an_address_is_joined(stale_cluster_file, calls, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    with rs.ray_session("10.1.2.3:6379" if how == "argument" else None, num_cpus=4):
        pass
    kw = calls[0][1]
    assert kw["address"] == "10.1.2.3:6379" and "num_cpus" not in kw  # a cluster's CPUs are its own


def test_explicit_local_is_local(stale_cluster_file, calls):
    with rs.ray_session("local", num_cpus=2):
        pass
    assert calls[0][1]["address"] == "local" and calls[0][1]["num_cpus"] == 2


def test_an_initialised_ray_is_reused(monkeypatch):
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.append("shutdown"))
    with rs.ray_session():
        pass
    assert seen == []


@pytest.mark.parametrize("address, where", [(None, "start a local Ray instance"),
                                            ("127.0.0.1:9", "connect to the Ray cluster at 127.0.0.1:9")])
def test_a_failed_ray_start_is_one_line_and_shuts_down(monkeypatch, address, where):
    calls = []

    def failing_init(**kwargs):
        calls.append("init")
        raise Exception("The current node timed out during startup.\nmore detail")  # what Ray raises

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with pytest.raises(UserError) as err:
        with rs.ray_session(address, 1):
            pytest.fail("the body must not run")
    msg = str(err.value)
    assert msg.startswith(f"could not {where}: The current node timed out during startup.") and "\n" not in msg
    assert calls == ["init", "shutdown"]
