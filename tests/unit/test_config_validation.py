"""Configs that used to be accepted and then crash mid-run are refused up front, one line naming the key,
the value and the allowed range (issue 10, item 4), and the Ray run name is unique per `out` (item 7)."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from comeir_dist.config.base import Section, load_yaml, parse_section
from comeir_dist.config.pipeline import PipelineConfig, PrepareConfig
from comeir_dist.config.ray_job import RayTrainConfig, default_run_name
from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def refused(cls, data, source="cfg.yaml") -> str:
    with pytest.raises(UserError) as exc:
        parse_section(cls, data, source=source)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{source}: ")
    return msg


def cli(argv) -> tuple[int, str, str]:
    from comeir_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ---- eval.ks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ks,why", [
    ([5], "10 is missing"),             # KeyError 'item/ndcg@10' at the first validation before
    ([1, 5, 20], "10 is missing"),
    ([], "10 is missing"),
    ([10, 5], "not strictly increasing"),
    ([5, 10, 10], "not strictly increasing"),
    ([0, 10], "K=0 is not positive"),
    ([-5, 10], "not positive"),
])
def test_eval_ks_must_be_increasing_positive_and_include_10(ks, why):
    msg = refused(RunConfig, {"eval": {"ks": ks}})
    assert f"key 'eval.ks' = {ks!r}" in msg and why in msg and "include 10" in msg


@pytest.mark.parametrize("ks", [[10], [5, 10], [1, 5, 10, 20]])
def test_eval_ks_accepted(ks):
    assert parse_section(RunConfig, {"eval": {"ks": ks}}).eval.ks == ks


def test_default_ks_and_repo_configs_still_valid():
    assert 10 in RunConfig().eval.ks
    for name in ("comeir_cpu.yaml", "experiment_cpu.yaml", "experiment_small_budget.yaml", "industrial.yaml",
                 "industrial_cpu.yaml", "scaling_cpu.yaml"):
        data = load_yaml(REPO / "configs" / name)
        data.pop("scaling", None)
        parse_section(RunConfig, data, source=name)


# ---- seed ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_seed_range(seed):
    msg = refused(RunConfig, {"seed": seed})
    assert f"key 'seed' = {seed}" in msg and "an integer >= 0 and < 4294967296" in msg
    msg = refused(PipelineConfig, {"quantize": {"seed": seed}})
    assert f"key 'quantize.seed' = {seed}" in msg and "< 4294967296" in msg


def test_largest_seed_accepted_and_derived_rank_seeds_work():
    from comeir_dist.train.setup import seed_everything

    top = 2**32 - 1
    assert parse_section(RunConfig, {"seed": top}).seed == top
    seed_everything(top + 7919 * 4)  # the loop's per-rank seed: numpy used to raise "Seed must be between 0 and 2**32 - 1"


def test_cli_train_bad_seed_exits_2_before_training(monkeypatch):
    import comeir_dist.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("training started"))
    rc, out, err = cli(["train", "--seed", "-3", "--dataset", "/nonexistent"])
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("comeir train: error: flags: key 'seed' = -3") and ">= 0 and < 4294967296" in err


# ---- finite floats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("train.lr", float("inf")), ("train.lr", float("nan")), ("train.grad_clip", float("inf")),
    ("engram.sparse_lr", float("inf")), ("engram.sparse_lr", float("nan")), ("train.weight_decay", float("inf")),
    ("train.max_minutes", float("inf")), ("ray.cpus_per_worker", float("inf")), ("parallel.reserve_gib", float("inf")),
])
def test_inf_nan_refused_with_key_value_and_range(key, value):
    section, field = key.split(".")
    msg = refused(RunConfig, {section: {field: value}})
    assert f"key '{key}' = {value!r}" in msg and "allowed: a finite number" in msg
    assert (">= 0" if field in ("weight_decay", "reserve_gib") else "> 0") in msg


def test_inf_in_yaml_file_refused(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lr: .inf\n  grad_clip: .nan\n")
    msg = refused(RunConfig, load_yaml(p), source=str(p))
    assert "key 'train.lr' = inf" in msg


def _section_classes() -> list[type]:
    for mod in ("comeir_dist.config.run", "comeir_dist.config.pipeline", "comeir_dist.config.parallel",
                "comeir_dist.config.ray_job", "comeir_dist.engram.config", "comeir_dist.scaling.grid",
                "comeir_dist.bench.lookup", "comeir_dist.bench.latency", "comeir_dist.bench.train",
                "comeir_dist.cli_plan"):
        importlib.import_module(mod)
    seen, todo = [], [Section]
    while todo:
        c = todo.pop()
        for sub in c.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


def _has_float(annotation) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


def _non_finite(annotation) -> list:
    """inf, -inf and nan in the shape the annotation takes (float, Optional[float], list[float])."""
    values = [float("inf"), float("-inf"), float("nan")]
    return [[v] for v in values] if typing.get_origin(annotation) is list else values


def test_every_float_field_of_every_config_class_must_be_finite():
    classes = _section_classes()
    assert {"RunConfig", "TrainConfig", "EngramConfig", "ParallelConfig", "RayTrainConfig", "QuantizeConfig",
            "ScalingSettings", "LatencyBenchConfig"} <= {c.__name__ for c in classes}
    checked = []
    for cls in classes:
        for name, info in cls.model_fields.items():
            if not _has_float(info.annotation):
                continue
            for bad in _non_finite(info.annotation):
                with pytest.raises(UserError) as exc:
                    parse_section(cls, {name: bad}, source="x")
                assert str(exc.value).startswith(f"x: key '{name}") and "\n" not in str(exc.value), (cls, name)
            checked.append(f"{cls.__name__}.{name}")
    assert {"TrainConfig.lr", "TrainConfig.grad_clip", "EngramConfig.sparse_lr", "ScalingSettings.s_t"} <= set(checked)


def test_huge_ints_refused_as_int64():
    msg = refused(RunConfig, {"train": {"max_steps": 10**30}})
    assert "key 'train.max_steps' = 10000" in msg and "int64" in msg
    msg = refused(RunConfig, {"engram": {"levels": 3, "inter_orders": [3, 2, 2**70]}})
    assert "key 'engram.inter_orders'" in msg and "int64" in msg
    assert parse_section(RunConfig, {"train": {"max_steps": 2**63 - 1}}).train.max_steps == 2**63 - 1


# ---- one-line messages -----------------------------------------------------------------------------
def test_messages_stay_one_line_and_name_the_key():
    assert refused(RunConfig, {"a\nb": 1}) == "cfg.yaml: unknown key 'a\\nb'"
    msg = refused(RunConfig, {"dataset": "x\ny", "eval": {"ks": [1]}})
    assert "key 'eval.ks'" in msg
    # union member labels are not part of the key; the most specific member error is shown
    assert refused(RunConfig, {"parallel": {"sharding": {"t": "diagonal"}}}).startswith(
        "cfg.yaml: key 'parallel.sharding.t' = 'diagonal': allowed values:")
    # model-level checks: no empty key
    assert refused(RunConfig, {"max_history": 300}).startswith("cfg.yaml: max_history=300")
    assert "Value error" not in refused(RunConfig, {"model": {"backbone": {"hidden_size": 30}}})


@pytest.mark.parametrize("content", [b"train: {lr: 1}\n\xff\xfe\n", b"a: \x00b\n", b"[" * 5000, b"a: [1\n"])
def test_bad_yaml_files_one_line(tmp_path, content):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    with pytest.raises(UserError) as exc:
        load_yaml(p)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(p))


# ---- datasets without training samples ---------------------------------------------------------------
def _three_item_users(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    inter = {str(u): [(u + j) % 6 for j in range(3)] for u in range(6)}
    items = {str(i): {"title": f"item {i}"} for i in range(6)}
    (raw / "T.inter.json").write_text(json.dumps(inter))
    (raw / "T.item.json").write_text(json.dumps(items))
    return raw


def test_prepare_refuses_users_with_exactly_three_items(tmp_path):
    from comeir_dist.data.prepare import run_prepare

    raw = _three_item_users(tmp_path)
    with pytest.raises(UserError, match=r"no training sample: all 6 user\(s\) have exactly 3 items") as exc:
        run_prepare(PrepareConfig(input=str(raw), out=str(tmp_path / "ds"), k_core=1))
    assert "\n" not in str(exc.value) and ">= 4 items" in str(exc.value)
    assert not (tmp_path / "ds").exists()


def test_prepare_cli_exit_2(tmp_path):
    raw = _three_item_users(tmp_path)
    rc, out, err = cli(["prepare", "--input", str(raw), "--out", str(tmp_path / "ds"), "--k-core", "1"])
    assert rc == 2 and out == "" and err.count("\n") == 1 and "no training sample" in err


def _zero_sample_dataset(tmp_path: Path) -> Path:
    """A prepared dataset (SIDs, embeddings) whose train split lost every training pair (e.g. an old prepare)."""
    from tests.fixtures import make_tiny_dataset

    ds = make_tiny_dataset(tmp_path / "d")
    t = pq.read_table(ds / "train.parquet")
    pq.write_table(pa.table({"user_idx": t.column("user_idx"), "items": [s[:1] for s in t.column("items").to_pylist()]},
                            schema=t.schema), ds / "train.parquet")
    return ds


def test_training_refuses_zero_samples_before_any_step(tmp_path):
    from comeir_dist.train.loop import train
    from comeir_dist.train.samples import count_training_samples, require_training_samples, training_samples
    from tests.fixtures import tiny_run_config

    ds = _zero_sample_dataset(tmp_path)
    assert count_training_samples(ds) == 0
    with pytest.raises(UserError, match="0 training samples"):
        require_training_samples(ds)
    with pytest.raises(UserError, match="0 training samples"):
        training_samples(ds, 8)
    cfg = tiny_run_config(ds, tmp_path / "run", max_steps=2)
    with pytest.raises(UserError, match="train.parquet: 0 training samples") as exc:
        train(cfg)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "run" / "train_log.jsonl").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_ray_driver_refuses_zero_samples_before_workers(tmp_path):
    from comeir_dist.orchestration.ray_train import absolute_paths
    from tests.fixtures import tiny_run_config

    ds = _zero_sample_dataset(tmp_path)
    with pytest.raises(UserError, match="0 training samples"):
        absolute_paths(tiny_run_config(ds, tmp_path / "run"))


def test_sample_count_matches_training_samples(tmp_path):
    from comeir_dist.train.samples import count_training_samples, training_samples
    from tests.fixtures import make_tiny_dataset

    ds = make_tiny_dataset(tmp_path / "d")
    assert count_training_samples(ds) == len(training_samples(ds, 8)[1]) > 0


# ---- Ray run name ----------------------------------------------------------------------------------
def test_default_run_name_unique_per_out_path(tmp_path, monkeypatch):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    na, nb = default_run_name(str(a)), default_run_name(str(b))
    assert na != nb and na.startswith("run-") and nb.startswith("run-") and len(na) == len("run-") + 8
    monkeypatch.chdir(tmp_path / "..")
    rel = Path(tmp_path.name) / "x" / "run"
    assert default_run_name(str(rel)) == na == default_run_name(str(a) + "/")  # stable for the same directory
    assert RayTrainConfig().run_name(str(a)) == na
    assert RayTrainConfig(name="mine").run_name(str(a)) == "mine"
    assert default_run_name("s3://bucket/runs/run").startswith("run-")
    assert default_run_name("s3://bucket/a/run") != default_run_name("s3://bucket/b/run")


def test_run_ray_train_uses_the_unique_default_name(tmp_path, monkeypatch):
    """Two runs with the same `out` basename in different folders used to share storage_path/<basename>."""
    import ray
    import ray.train.torch

    import comeir_dist.orchestration.ray_session as session
    from comeir_dist.orchestration import ray_train
    from tests.fixtures import make_tiny_dataset, tiny_run_config

    names = []

    class FakeTrainer:
        def __init__(self, *args, run_config, **kw):
            names.append((run_config.name, run_config.storage_path))

        def fit(self):
            raise KeyboardInterrupt  # stop here: nothing is trained

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(session, "ray_session", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64})
    ds = make_tiny_dataset(tmp_path / "d")
    for folder in ("a", "b"):
        cfg = tiny_run_config(ds, tmp_path / folder / "run")
        cfg = cfg.model_copy(update={"device": "cpu", "train": cfg.train.model_copy(update={"check_memory": False})})
        with pytest.raises(KeyboardInterrupt):
            ray_train.run_ray_train(cfg)
    (na, sa), (nb, sb) = names
    assert sa == sb and na != nb
    assert na == default_run_name(str(tmp_path / "a" / "run")) and nb == default_run_name(str(tmp_path / "b" / "run"))


def test_job_flag_name_still_wins(tmp_path):
    data = {"ray": {"name": "fixed"}, "out": str(tmp_path / "run")}
    cfg = parse_section(RunConfig, data)
    assert cfg.ray.run_name(cfg.out) == "fixed"
    assert yaml.safe_dump(cfg.model_dump(mode="json"))  # still serialisable for the workers
