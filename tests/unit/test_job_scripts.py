"""Every script in jobs/ turns a user error into one line on stderr and exit code 2, before any work starts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,argv,needle", [
    ("demo", ["--config", "missing.yaml"], "missing.yaml: config file not found"),
    ("demo", ["--pipeline", "nope.yaml"], "nope.yaml: config file not found"),
    ("preprocess", ["--config", "configs/preprocess.yaml", "--methods", "kmeans"], "--methods: unknown method 'kmeans'"),
    ("scaling_sweep", ["--config", "missing.yaml"], "missing.yaml: config file not found"),
    ("evaluate", ["--checkpoint", "no/such/run"], "not a committed checkpoint"),
    ("train_industrial", ["--config", "configs/industrial_cpu.yaml", "--s-t", "-1"], "engram.s_t"),
])
def test_job_user_errors_are_one_line_exit_2(name, argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = _job(name).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{name}: error: ") and needle in err[0], err[0]
