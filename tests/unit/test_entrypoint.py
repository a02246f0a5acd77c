"""The shared entry-point wrapper: exit codes, one-line messages, environment defaults."""
import os

import pytest

from comeir_dist.entrypoint import run_entry, set_env_defaults
from comeir_dist.errors import UserError


def test_user_error_is_one_line_and_exit_2(capsys):
    def body():
        raise UserError("cfg.yaml: key 'x' = 3: too big")

    assert run_entry("prog", body) == 2
    err = capsys.readouterr().err
    assert err == "prog: error: cfg.yaml: key 'x' = 3: too big\n"


def test_interrupt_exits_130_with_hint(capsys):
    def body():
        raise KeyboardInterrupt

    assert run_entry("prog", body, interrupted="interrupted (rerun to continue)") == 130
    assert capsys.readouterr().err == "prog: interrupted (rerun to continue)\n"


def test_body_result_passes_through_and_other_errors_propagate():
    assert run_entry("prog", lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        run_entry("prog", lambda: 1 // 0)


def test_env_defaults_keep_user_values(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    set_env_defaults()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    import torch

    assert os.environ.get("DS_ACCELERATOR") == (None if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    set_env_defaults()
    assert os.environ["DS_ACCELERATOR"] == "cuda"
