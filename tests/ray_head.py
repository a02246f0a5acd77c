"""A private Ray head for tests: `ray start --head --block` as OUR child process (own ports, own temp dir, own
process group), stopped by its PID/process group only, so other Ray instances on the machine are never touched."""
from __future__ import annotations

import os
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


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def venv_env(**extra: str) -> dict:
    """The test interpreter's bin dir first on PATH (jobs run `python ...`), offline, no usage stats."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@dataclass
class RayHead:
    proc: subprocess.Popen
    dashboard: str  # http://127.0.0.1:P (job submission)
    gcs: str  # 127.0.0.1:Q (ray.init / RAY_ADDRESS)
    temp_dir: str
    log: Path

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM our head's process group, SIGKILL what is left; remove the temp dir."""
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 2, timeout: float = 90) -> RayHead:
    gcs, dash, client, agent_grpc, agent_http, metrics, runtime_env, nm, om = _free_ports(9)
    lo, hi = 20000 + (os.getpid() % 200) * 100, 20000 + (os.getpid() % 200) * 100 + 99
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    log = Path(temp_dir) / "head.log"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--min-worker-port={lo}", f"--max-worker-port={hi}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=venv_env(),
                            start_new_session=True)
    head = RayHead(proc, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray head exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2) as r:
                if r.status == 200:
                    return head
        except OSError:
            time.sleep(1)
    head.stop()
    raise RuntimeError(f"ray head did not come up in {timeout}s: {log.read_text()[-2000:]}")
