"""Ray Train job configs and up-front refusals (no Ray started here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from comeir_dist.config.base import load_yaml, parse_section
from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError
from tests.fixtures import make_tiny_dataset, tiny_run_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["industrial.yaml", "industrial_cpu.yaml"])
def test_industrial_configs_parse(name):
    cfg = parse_section(RunConfig, load_yaml(REPO / "configs" / name), source=name)
    assert (cfg.engram.levels, cfg.engram.codebook_size) == (3, 128)
    assert cfg.parallel.checkpoint_every and cfg.ray.max_failures >= 1
    if name == "industrial.yaml":  # the paper's setting
        assert (cfg.engram.s_s, cfg.engram.s_t, cfg.train.lr, cfg.train.weight_decay) == (1.0, 2.0, 1e-5, 1e-4)
        assert cfg.train.bf16 and cfg.model.backbone.path and cfg.ray.gpus_per_worker == 1
        # 64 per device per micro-batch, 2 micro-batches per optimizer step
        assert cfg.train.grad_accum_steps == 2
        assert cfg.train.batch_size == 64 * cfg.train.grad_accum_steps * cfg.parallel.world_size


def test_grad_accumulation_needs_a_sample_per_micro_batch():
    data = load_yaml(REPO / "configs" / "industrial_cpu.yaml")
    data["train"].update(batch_size=3, grad_accum_steps=4)
    with pytest.raises(UserError, match="grad_accum_steps=4"):
        parse_section(RunConfig, data, source="cfg.yaml")


def test_train_refuses_a_plan_that_cannot_fit(tmp_path):
    from comeir_dist.train.loop import train

    ds = make_tiny_dataset(tmp_path / "d")
    cfg = tiny_run_config(ds, tmp_path / "run", max_steps=2)
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"device_memory_gib": 1e-5,
                                                                             "reserve_gib": 0.0})})
    with pytest.raises(UserError, match="memory plan does not fit"):
        train(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_job_rejects_missing_dataset_and_bad_device(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_industrial", REPO / "jobs" / "train_industrial.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.main(["--config", str(REPO / "configs" / "industrial_cpu.yaml"), "--dataset", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "dataset:" in err[0] and "nope" in err[0]
    ds = make_tiny_dataset(tmp_path / "d")
    rc = job.main(["--config", str(REPO / "configs" / "industrial_cpu.yaml"), "--dataset", str(ds),
                   "--gpus-per-worker", "0", "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "world_size" in err[0]


def test_worker_device_follows_ray_resources(tmp_path):
    from comeir_dist.orchestration.ray_train import resolve_worker_device

    cfg = tiny_run_config(tmp_path, tmp_path / "run")
    gpu = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"gpus_per_worker": 1})})
    r = resolve_worker_device(gpu)
    assert (r.device, r.parallel.backend) == ("cuda", "nccl")
    r = resolve_worker_device(cfg)
    assert (r.device, r.parallel.backend, r.train.num_threads) == ("cpu", "gloo", 1)
    with pytest.raises(UserError, match="gpus_per_worker"):
        resolve_worker_device(cfg.model_copy(update={"device": "cuda"}))
