"""`comeir recipe`: configs derived from dataset statistics (issue 11, "a recipe that transfers")."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from comeir_dist.cli import main
from comeir_dist.config.base import load_yaml, parse_section
from comeir_dist.config.recipe import (MARKER, DatasetProfile, dataset_profile, derive_recipe,
                                       suggested_valid_targets, suggested_test_targets, held_out_note)
from comeir_dist.config.run import RunConfig
from tests.fixtures import make_tiny_dataset

REPO = Path(__file__).resolve().parents[2]
BASE = load_yaml(REPO / "configs" / "experiment_cpu.yaml")
# training items per user with the bundled data's totals: 33,541 prefix samples, 8,371 windows of <= 20 items
SCIENTIFIC_LENGTHS = (26,) * 54 + (5,) * 7402 + (4,) * 861
SCIENTIFIC = DatasetProfile(dataset="runs/data/scientific", users=8317, items=4344, train_samples=33541,
                            valid_users=8317, valid_targets=8317, history_p50=5.0, history_p95=12.0, history_max=77, sid_method="rqkmeans",
                            train_lengths=SCIENTIFIC_LENGTHS)
# MovieLens-like: 610 users, 2,072 windows of <= 50 items
MOVIELENS_LENGTHS = (451,) * 110 + (201,) * 194 + (51,) * 306


def test_bundled_data_profile_reproduces_the_hand_set_experiment_config():
    cfg, why = derive_recipe(SCIENTIFIC, BASE)
    assert cfg["max_history"] == BASE["max_history"] == 20
    for key in ("batch_size", "lr", "warmup_steps", "eval_every_epochs", "patience", "eval_users", "lr_schedule"):
        assert cfg["train"][key] == BASE["train"][key], key
    assert cfg["model"]["backbone"]["max_positions"] == 96  # 3*20 + 3 + 1 + 3 placeholders, rounded up to 32
    assert len(why) == 7 and all(" -- " in line for line in why)
    assert SCIENTIFIC.windows(20) == 8371 and sum(n - 1 for n in SCIENTIFIC_LENGTHS) == SCIENTIFIC.train_samples
    # flatten / sasrec train on every position with the batch and warm-up of the README's flatten all-position runs
    assert (cfg["train"]["sample_mode"], cfg["train"]["sequence_batch_size"],
            cfg["train"]["sequence_warmup_steps"]) == ("auto", 64, 50)
    assert BASE["train"]["warmup_steps"] == 50 and BASE["model"]["backbone"]["max_positions"] == 128  # base untouched


def test_long_histories_are_capped_and_positions_follow():
    long = replace(SCIENTIFIC, history_p50=70, history_p95=900.0, history_max=2698, train_samples=88444)
    cfg, _ = derive_recipe(long, BASE)
    assert cfg["max_history"] == 50 and cfg["model"]["backbone"]["max_positions"] == 160
    assert cfg["train"]["warmup_steps"] == 140  # 0.4 x 345 steps
    cfg, _ = derive_recipe(long, BASE, history_cap=100)
    assert cfg["max_history"] == 100 and cfg["model"]["backbone"]["max_positions"] == 320
    for variant in ("flatten", "tm", "comeir"):
        for decoding in ("normal", "nezha"):
            data = {**cfg, "model": {**cfg["model"], "variant": variant, "decoding": decoding}}
            parse_section(RunConfig, data, source="recipe")  # flatten's L * max_history + L + 1 fits


def test_small_data_gets_smaller_batches_scaled_rate_and_epoch_validation():
    small = replace(SCIENTIFIC, train_samples=1000, history_p95=4.0)
    cfg, _ = derive_recipe(small, BASE)
    t = cfg["train"]
    assert t["batch_size"] == 16 and t["lr"] == pytest.approx(2e-3 * 0.25)
    assert (t["eval_every_epochs"], t["patience"]) == (1.0, 2)  # 62 steps per epoch: still 2 epochs of patience
    assert t["lr_schedule"] == "plateau" and 10 <= t["warmup_steps"] <= 30
    mid = replace(SCIENTIFIC, train_samples=5000)
    assert derive_recipe(mid, BASE)[0]["train"]["batch_size"] == 32  # 156 steps; 64 would give 78


def test_few_validation_users_get_a_constant_rate_and_a_longer_patience():
    movielens = replace(SCIENTIFIC, users=610, valid_users=610, valid_targets=610, train_samples=88444,
                        history_p95=900.0, train_lengths=MOVIELENS_LENGTHS)
    cfg, why = derive_recipe(movielens, BASE)
    t = cfg["train"]
    # 2,072 windows of 42.7 targets: 6 windows carry a prefix batch's 256 targets, 345 steps per epoch as on prefixes
    assert movielens.windows(50) == 2072 and (t["sequence_batch_size"], t["sequence_warmup_steps"]) == (6, 140)
    assert t["warmup_steps"] == 140
    assert (t["lr_schedule"], t["eval_every_epochs"], t["patience"], t["max_epochs"]) == ("constant", 1.0, 6, 60)
    assert any("610 validation users" in line for line in why)
    # few users: more validation targets per user are advised (>= 2,000 in all), never more than 10
    assert suggested_valid_targets(movielens) == 4 and suggested_valid_targets(SCIENTIFIC) is None
    assert suggested_valid_targets(replace(movielens, valid_targets=2440)) is None
    assert suggested_valid_targets(replace(movielens, valid_users=50, valid_targets=50)) == 10
    # and more test targets likewise (a profile that does not know its test rows gets no advice)
    assert suggested_test_targets(movielens) is None and suggested_test_targets(SCIENTIFIC) is None
    assert suggested_test_targets(replace(movielens, test_targets=610)) == 4
    assert suggested_test_targets(replace(movielens, test_targets=2440)) is None
    note = held_out_note(replace(movielens, valid_targets=2440, test_targets=610))
    assert "--test-targets 4" in note and "--valid-targets" not in note and "610 test targets" in note
    # the schedule follows distinct users: 4 targets per user do not make 610 users' validation a large one
    assert derive_recipe(replace(movielens, valid_targets=2440), BASE)[0]["train"] == t
    edge = derive_recipe(replace(SCIENTIFIC, valid_users=2000), BASE)[0]["train"]
    assert (edge["lr_schedule"], edge["patience"], edge["max_epochs"]) == ("plateau", 4, BASE["train"]["max_epochs"])
    parse_section(RunConfig, cfg, source="recipe")


def test_recipe_cli_writes_a_valid_config_and_protects_foreign_files(tmp_path, capsys):
    ds = make_tiny_dataset(tmp_path)
    prof = dataset_profile(ds)
    assert prof.users == 24 and prof.sid_method == "rqkmeans" and prof.train_samples > 0
    assert prof.valid_users == prof.valid_targets == 24
    out = tmp_path / "recipe.yaml"
    assert main(["recipe", "--dataset", str(ds), "--out", str(out), "--base", str(REPO / "configs/experiment_cpu.yaml"),
                 "--set", "model.variant=tm"]) == 0
    text = out.read_text()
    assert text.startswith(MARKER) and "train.batch_size: 16" in text
    assert "# NOTE: only 24 validation targets" in text and "--valid-targets 10" in text
    assert "note: only 24 validation targets" in capsys.readouterr().out
    cfg = parse_section(RunConfig, yaml.safe_load(text), source=str(out))
    assert cfg.dataset == str(ds) and cfg.model.variant == "tm" and cfg.train.batch_size == 16
    assert cfg.out.endswith("ds_recipe")
    # rerun replaces its own file; a file it did not write is refused and left as it was
    assert main(["recipe", "--dataset", str(ds), "--out", str(out)]) == 0
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("dataset: mine\n")
    assert main(["recipe", "--dataset", str(ds), "--out", str(foreign)]) == 2
    assert foreign.read_text() == "dataset: mine\n"
    assert "not written by `comeir recipe`" in capsys.readouterr().err
    assert main(["recipe", "--dataset", str(ds), "--out", str(foreign), "--overwrite"]) == 0
    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad.yaml"
    assert main(["recipe", "--dataset", str(ds), "--out", str(bad), "--set", "train.lr=-1"]) == 2
    assert main(["recipe", "--dataset", str(tmp_path / "nope"), "--out", str(bad)]) == 2
    assert not bad.exists() and not list(tmp_path.glob(".tmp-*"))


def test_dataset_without_sids_is_a_one_line_error(tmp_path, capsys):
    import shutil

    ds = make_tiny_dataset(tmp_path)
    shutil.rmtree(ds / "sids")
    assert main(["recipe", "--dataset", str(ds), "--out", str(tmp_path / "r.yaml")]) == 2
    assert "comeir quantize" in capsys.readouterr().err
