"""Private Ray nodes for tests: `ray start --block` as OUR child processes (own ports, own temp dir, own process
group and session), stopped by their PID/process group only, so other Ray instances on the machine are never
touched. The dashboard (job submission) listens on 127.0.0.1 only. The nodes are started with
``--node-ip-address 127.0.0.1``, but Ray 2.60 replaces a loopback node address by the host's routable IP
(``ray._private.services.resolve_ip_for_localhost``) and its GCS / raylet gRPC servers listen on every
interface: the token below is what keeps other hosts out of them.

Authentication as users get it (Ray >= 2.59): the heads run with token authentication (``RAY_AUTH_MODE=token``).
The token is this test process's own: a random token in a private temp dir (``auth_token_path()``), handed to
every Ray process through ``RAY_AUTH_TOKEN_PATH`` -- the real ``~/.ray/auth_token`` is never read or written.
The submitting side passes it the documented way, the same two environment variables: ``venv_env()`` sets them
for the subprocesses (``ray job submit``, drivers, jobs), and ``start_head()`` exports them to this process too
(``JobSubmissionClient`` / ``ray.init(address=...)`` in the test process). A second node (``start_node``) joins
with the same token, as every node of a cluster must.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

_TOKEN: dict = {}
_NODE_COUNTER = itertools.count()


_HANDED_PORTS: set[int] = set()


def _free_ports(n: int) -> list[int]:
    """``n`` free ports, none handed out before by this process: a head takes its ports in two calls (node and
    head options), and the OS may return a port it just released (a head once got the same port for its client
    server and its dashboard agent, and Ray refused to start)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held until all are picked, so one call never sees a port twice
        port = s.getsockname()[1]
        if port not in _HANDED_PORTS:
            ports.append(port)
    for s in socks:
        s.close()
    _HANDED_PORTS.update(ports)
    return ports


def auth_token_path() -> Path:
    """This test process's Ray token file (created once, mode 0600, in a private 0700 temp dir; removed at exit)."""
    if "path" not in _TOKEN:
        d = tempfile.mkdtemp(prefix="rtok")
        atexit.register(shutil.rmtree, d, True)
        p = Path(d) / "auth_token"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # the format of `ray get-auth-token --generate`
        _TOKEN["path"] = p
    return _TOKEN["path"]


def auth_env() -> dict:
    """The documented client/node configuration of token authentication, with this process's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(auth_token_path())}


def auth_header() -> dict:
    """HTTP header for raw dashboard requests (what Ray's clients send)."""
    return {"Authorization": f"Bearer {auth_token_path().read_text().strip()}"}


def venv_env(**extra: str) -> dict:
    """The test interpreter's bin dir first on PATH (jobs run `python ...`), offline, no usage stats, token auth
    with this process's token (RAY_AUTH_TOKEN, which would take precedence over the path, is dropped)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu", **auth_env()})
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(extra)
    return env


def use_auth_in_this_process() -> None:
    """Make this (pytest) process a client of our heads the documented way: RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH in its environment. Ray caches the auth mode and the token, so the caches are refreshed --
    only while no Ray driver is connected in this process (a connected driver keeps the settings it started with)."""
    want = auth_env()
    if all(os.environ.get(k) == v for k, v in want.items()) and "RAY_AUTH_TOKEN" not in os.environ:
        return
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(want)
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")  # re-reads RAY_AUTH_MODE (as Ray's own _enable_token_auth does)
        AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: str  # its basename is the node's name (`ray start --node-name`)
    log: Path

    @property
    def name(self) -> str:
        return Path(self.temp_dir).name

    def descendants(self) -> set[int]:
        """PIDs of every process under this node's `ray start` (raylet, agents, and the Ray workers, which the
        raylet puts into process groups of their own)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            ppid = int(text[text.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = set(), [self.proc.pid]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in found:
                    found.add(c)
                    todo.append(c)
        return found

    def kill(self) -> None:
        """A node crash: SIGKILL to the node's process group and to every process under it (its workers too)."""
        pids = self.descendants()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM our node's process group, SIGKILL what is left (also workers in groups of their own); remove
        the temp dir."""
        pids = self.descendants() if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids & self._still_ours(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _still_ours(self, pids: set[int]) -> set[int]:
        """Those of ``pids`` still running under this node's session (not a reused PID)."""
        alive = set()
        for pid in pids:
            try:
                if os.getsid(pid) == self.proc.pid:
                    alive.add(pid)
            except ProcessLookupError:
                pass
        return alive


@dataclass
class RayHead(RayNode):
    dashboard: str = ""  # http://127.0.0.1:P (job submission)
    gcs: str = ""  # 127.0.0.1:Q (ray.init / RAY_ADDRESS / `ray start --address`)

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes (state API; token sent)."""
        req = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100&detail=1", headers=auth_header())
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
        return [n for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _node_cmd(num_cpus: int, resources: Optional[dict], temp_dir: str) -> list[str]:
    """`ray start --block` options shared by head and worker nodes: 127.0.0.1, own ports, own temp dir."""
    agent_grpc, agent_http, metrics, runtime_env, nm, om = _free_ports(6)
    slot = (os.getpid() + 37 * next(_NODE_COUNTER)) % 127  # worker port ranges below Linux's ephemeral ports
    lo = 20000 + slot * 100
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}", f"--temp-dir={temp_dir}",
           f"--node-name={Path(temp_dir).name}", "--disable-usage-stats"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    return cmd


def _spawn(cmd: list[str], temp_dir: str, name: str) -> tuple[subprocess.Popen, Path]:
    log = Path(temp_dir) / f"{name}.log"
    # no drain on SIGTERM (Ray >= 2.5x drains the node first, for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
    # against a GCS that got the same SIGTERM): tests stop their nodes at once
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=venv_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"), start_new_session=True)
    return proc, log


def _fail(node: RayNode, what: str) -> NoReturn:
    """Stop the node and raise with the tail of its log (read before the temp dir is removed)."""
    try:
        tail = node.log.read_text()[-3000:]
    except OSError:
        tail = ""
    node.stop()
    raise RuntimeError(f"{what}: {tail}")


def start_head(num_cpus: int = 2, timeout: float = 90, resources: Optional[dict] = None) -> RayHead:
    """A head with token auth (this process's token), dashboard and GCS on 127.0.0.1; exports the client
    configuration to this process (``use_auth_in_this_process``)."""
    use_auth_in_this_process()
    gcs, dash, client = _free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    cmd = _node_cmd(num_cpus, resources, temp_dir) + [
        "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--include-dashboard=true", f"--ray-client-server-port={client}"]
    proc, log = _spawn(cmd, temp_dir, "head")
    head = RayHead(proc, temp_dir, log, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _fail(head, "ray head exited")
        try:  # the dashboard answers before the head's raylet is up: wait for the node itself
            if any(n.get("node_name") == head.name for n in head.alive_nodes()):
                return head
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    _fail(head, f"ray head did not come up in {timeout}s")


def start_node(head: RayHead, num_cpus: int = 1, resources: Optional[dict] = None,
               timeout: float = 90) -> RayNode:
    """A second Ray node on this machine joining ``head`` (`ray start --address=<gcs> --node-ip-address
    127.0.0.1 --block`, same token); returns once the head lists it as ALIVE."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    proc, log = _spawn(_node_cmd(num_cpus, resources, temp_dir) + [f"--address={head.gcs}"], temp_dir, "node")
    node = RayNode(proc, temp_dir, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _fail(node, "ray node exited")
        try:
            if any(n.get("node_name") == node.name for n in head.alive_nodes()):
                return node
        except OSError:
            pass
        time.sleep(0.25)
    _fail(node, f"ray node did not join in {timeout}s")
