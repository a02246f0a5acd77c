"""Early stopping: best-checkpoint selection vs the improvement that resets patience (train.min_delta), and the
plateau schedule's minimum-rate stop (train.min_lr_scale)."""
import json

import pytest

from comeir_dist.errors import UserError
from comeir_dist.train.early_stop import decide, stop_reason
from tests.fixtures import make_tiny_dataset, tiny_run_config


def _run(values, min_delta):
    loop = {"best": -1.0, "bad": 0}
    out = []
    for v in values:
        d = decide(loop, v, min_delta)
        if d.new_best:
            loop["best"] = v
        loop["bad"] = 0 if d.improved else loop["bad"] + 1
        out.append((d.new_best, d.improved, loop["bad"]))
    return out


def test_without_min_delta_every_gain_is_an_improvement():
    values = [0.01, 0.02, 0.015, 0.0201, 0.0201, 0.03]
    assert _run(values, 0.0) == [(True, True, 0), (True, True, 0), (False, False, 1), (True, True, 0),
                                 (False, False, 1), (True, True, 0)]


def test_min_delta_keeps_selecting_the_best_but_creeping_gains_do_not_reset_patience():
    values = [0.05, 0.0501, 0.0502, 0.0503, 0.0512, 0.0530]
    got = _run(values, 0.001)
    assert [g[0] for g in got] == [True] * 6  # selection: every value is a new best
    # improvement is measured from the last improvement (0.05): +0.0012 at 0.0512 is the first one after it
    assert [g[1] for g in got] == [True, False, False, False, True, True]
    assert [g[2] for g in got] == [0, 1, 2, 3, 0, 0]


def test_loop_state_from_before_min_delta_uses_the_best_as_reference():
    loop = {"best": 0.04, "bad": 2}  # a checkpoint's loop state has no 'ref'
    assert not decide(loop, 0.0405, 0.001).improved and "ref" not in loop
    assert decide(loop, 0.0411, 0.001).improved and loop["ref"] == 0.0411


def test_stop_reasons():
    assert stop_reason({"bad": 4}, 4, 1.0, None) == "early_stopping"
    assert stop_reason({"bad": 1}, 4, 0.01, None) is None
    assert stop_reason({"bad": 1}, 4, 0.01, 0.02) == "min_lr"
    assert stop_reason({"bad": 1}, 4, 0.03, 0.02) is None


def test_min_lr_scale_needs_the_plateau_schedule(tmp_path):
    from comeir_dist.config.base import parse_section
    from comeir_dist.config.run import RunConfig

    with pytest.raises(UserError, match="train.min_lr_scale=0.01 needs train.lr_schedule: plateau"):
        parse_section(RunConfig, {"dataset": "d", "out": "o",
                                  "train": {"lr_schedule": "cosine", "min_lr_scale": 0.01}}, source="cfg.yaml")


def test_training_stops_when_the_plateau_rate_falls_below_min_lr_scale(tmp_path):
    from comeir_dist.train.loop import train

    ds = make_tiny_dataset(tmp_path / "tiny")
    # min_delta 1.0: only the first validation improves; the second halves the rate to 0.5 < 0.6 and stops
    cfg = tiny_run_config(ds, tmp_path / "run", max_steps=20, eval_every=2, lr_schedule="plateau", patience=50,
                          min_delta=1.0, min_lr_scale=0.6)
    train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "min_lr" and summary["steps"] == 4
    # the best checkpoint is still the highest validation, whichever of the two it was
    best = max(summary["validation"], key=lambda v: v["item/ndcg@10"])
    assert summary["best_step"] == best["step"]
