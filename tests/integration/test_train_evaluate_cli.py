"""End to end on a tiny synthetic dataset through the CLI: train each variant, evaluate, bad inputs."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

from comeir_dist.cli import main
from tests.fixtures import make_tiny_dataset, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tinycli"))


def _write_cfg(path, ds, out, **kw):
    cfg = tiny_run_config(ds, out, **kw)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cfg = _write_cfg(root / "c.yaml", tiny, root / "run", max_steps=12, eval_every=6)
    assert main(["train", "--config", str(cfg)]) == 0
    return root / "run"


def test_train_writes_checkpoint_logs_summary(trained):
    assert (trained / "best" / "COMMITTED").is_file()
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["validation"]
    logs = [json.loads(l) for l in (trained / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in logs) and any("valid" in r for r in logs)
    assert (trained / "train_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_writes_metrics_and_per_user(trained, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(trained / "best"), "--split", "test", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    m = rep["metrics"]
    assert m["users"] == 24 and 0 <= m["item/hit@10"] <= 1 and m["item/hit@5"] <= m["item/hit@10"]
    users = pq.read_table(out.with_suffix(".users.parquet"))
    assert users.num_rows == 24 and len(users.column("top_items")[0]) == 10


@pytest.mark.parametrize("variant", ["flatten", "tm"])
def test_baselines_train_and_evaluate(tiny, tmp_path, variant):
    cfg = _write_cfg(tmp_path / "c.yaml", tiny, tmp_path / "run", variant=variant, max_steps=4, eval_every=4)
    assert main(["train", "--config", str(cfg)]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best"), "--max-users", "8"]) == 0


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_checkpoint_from_other_sid_table(trained, tmp_path, capsys):
    other = make_tiny_dataset(tmp_path / "other", seed=5)
    assert main(["evaluate", "--checkpoint", str(trained / "best"), "--dataset", str(other)]) == 2
    assert "another SID table" in _err(capsys)


def test_dataset_without_sids(tiny, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", tiny, tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--sid-method", "rqvae"]) == 2
    assert "no SIDs for method rqvae" in _err(capsys)


def test_history_longer_than_positions(tiny, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", tiny, tmp_path / "run")
    data = yaml.safe_load(cfg.read_text())
    data["max_history"] = 500
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "longer than the model's positions" in _err(capsys)


def test_unknown_variant_names(tiny, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", tiny, tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--variant", "tiger"]) == 2
    assert "model.variant" in _err(capsys)
    assert main(["experiment", "--config", str(cfg), "--variants", "comeir,tiger"]) == 2
    assert "tiger" in _err(capsys)
    assert main(["train", "--config", str(cfg), "--ablations", "no_magic"]) == 2
    assert "no_magic" in _err(capsys)


def test_not_a_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "not a committed checkpoint" in _err(capsys)


def test_fixed_seed_reproducible(tiny, tmp_path):
    from comeir_dist.train.loop import train

    logs = []
    for name in ("a", "b"):
        cfg = tiny_run_config(tiny, tmp_path / name, max_steps=6, eval_every=6, log_every=1)
        train(cfg)
        logs.append([json.loads(l).get("loss") for l in (tmp_path / name / "train_log.jsonl").read_text().splitlines()])
    assert logs[0] == logs[1] and any(x is not None for x in logs[0])
