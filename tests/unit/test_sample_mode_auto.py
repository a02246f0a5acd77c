"""``train.sample_mode: auto``: one config for a comparison, each variant trains in the mode it can (issue 11)."""
from __future__ import annotations

import json

import pytest

from comeir_dist.config.run import RunConfig, resolve_sample_mode
from comeir_dist.parallel.activation_plan import run_activations
from comeir_dist.train.sequence_samples import sequence_training_samples
from tests.fixtures import make_tiny_dataset, tiny_run_config

AUTO = {"sample_mode": "auto", "batch_size": 32, "warmup_steps": 7, "sequence_batch_size": 4,
        "sequence_warmup_steps": 3}


def _auto(tmp_path, variant, **model):
    cfg = tiny_run_config(tmp_path / "ds", tmp_path / "r", variant=variant, **AUTO).model_dump()
    cfg["model"].update(model)
    return RunConfig.model_validate(cfg)


@pytest.mark.parametrize("variant,model,mode", [
    ("flatten", {}, "sequence"), ("sasrec", {}, "sequence"),
    ("flatten", {"decoding": "nezha"}, "prefix"), ("flatten", {"decor": {"compose": True}}, "sequence"),
    ("tm", {}, "sequence"), ("comeir", {}, "sequence"), ("comeir", {"decoding": "nezha"}, "prefix"),
    ("tm", {"pref_memory": {"enabled": True}}, "prefix")])
def test_auto_resolves_to_the_mode_the_variant_can_train(tmp_path, variant, model, mode):
    cfg = _auto(tmp_path, variant, **model)  # valid for every variant: no sequence-mode refusal
    run = resolve_sample_mode(cfg)
    assert run.train.sample_mode == mode
    assert (run.train.batch_size, run.train.warmup_steps) == ((4, 3) if mode == "sequence" else (32, 7))
    assert cfg.train.sample_mode == "auto" and cfg.train.batch_size == 32  # the input is not changed
    for explicit in ("prefix", "sequence"):
        if explicit == "sequence" and mode == "prefix":
            continue
        data = cfg.model_dump()
        data["train"]["sample_mode"] = explicit
        fixed = RunConfig.model_validate(data)
        assert resolve_sample_mode(fixed) is fixed  # explicit modes keep their own batch


def test_sequence_batch_is_checked_against_accumulation(tmp_path):
    data = tiny_run_config(tmp_path / "ds", tmp_path / "r", variant="flatten", **AUTO).model_dump()
    data["train"].update(grad_accum_steps=8, sequence_batch_size=4)
    with pytest.raises(ValueError, match="train.sequence_batch_size=4 is smaller than train.grad_accum_steps=8"):
        RunConfig.model_validate(data)


def test_memory_plan_estimates_auto_as_the_variant_trains(tmp_path):
    flat = run_activations(_auto(tmp_path, "flatten"), world=1, num_items=30)
    assert flat is not None and flat.parts[0].micro_batch == 4  # the window batch, L tokens per item
    assert run_activations(_auto(tmp_path, "tm", decoding="nezha"), world=1, num_items=30) is None


def test_experiment_with_auto_trains_flatten_on_windows_and_nezha_on_prefixes(tmp_path):
    from comeir_dist.train.experiment import run_experiment

    ds = make_tiny_dataset(tmp_path, seq_len=10)
    cfg = tiny_run_config(ds, tmp_path / "exp", variant="comeir", max_steps=4, eval_every=2, **AUTO)
    nezha = cfg.model_copy(update={"model": cfg.model.model_copy(update={"decoding": "nezha"})})
    run_experiment(cfg, ["flatten"], 1)
    run_experiment(nezha, ["tm"], 1, label="tm-nezha")
    results = tmp_path / "exp" / "results"
    flat, tm = (json.loads((results / f"{k}-seed42.json").read_text()) for k in ("flatten", "tm-nezha"))
    windows, _ = sequence_training_samples(resolve_sample_mode(_auto(tmp_path, "flatten").model_copy(
        update={"dataset": str(ds)})))
    assert flat["train"]["sample_mode"] == "sequence" and flat["train"]["batch_size"] == 4
    assert flat["train_samples"] == len(windows)
    assert tm["train"]["sample_mode"] == "prefix" and tm["train"]["batch_size"] == 32
    assert tm["train_samples"] > flat["train_samples"]
    best = json.loads((tmp_path / "exp" / "flatten-seed42" / "best" / "meta.json").read_text())["config"]
    assert best["train"]["sample_mode"] == "sequence"  # the checkpoint records what ran
    mtime = (results / "flatten-seed42.json").stat().st_mtime_ns
    run_experiment(cfg, ["flatten"], 1)  # a rerun finds the run finished
    assert (results / "flatten-seed42.json").stat().st_mtime_ns == mtime
