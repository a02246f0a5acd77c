"""Property tests over config loading: whatever the YAML holds (random types, nan/inf, negative and huge
numbers, unknown keys, random text), `comeir train|prepare --config F` never shows a traceback. A config
is either accepted -- and then satisfies the invariants training relies on -- or refused with exit 2 and
exactly one `comeir <cmd>: error: ...` line on stderr. Nothing is trained: the training / prepare entry
points are replaced by stubs that record the validated config."""
from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from comeir_dist.config.base import INT64_MAX

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RUN_KEYS = ["dataset", "seed", "max_history", "device", "sid_method", "out", "train.lr", "train.grad_clip",
            "train.batch_size", "train.grad_accum_steps", "train.max_steps", "train.max_minutes", "train.eval_every",
            "train.weight_decay", "train.patience", "engram.sparse_lr", "engram.s_t", "engram.s_s", "engram.levels",
            "engram.d_m", "engram.inter_orders", "engram.hash_seed", "eval.ks", "eval.beam_size",
            "model.backbone.hidden_size", "model.backbone.dropout", "model.variant", "parallel.world_size",
            "parallel.headroom", "parallel.sharding", "parallel.device_memory_gib", "ray.cpus_per_worker",
            "ray.name", "ray.max_failures", "train", "eval", "bogus", "train.bogus", "model.backbone.bogus"]
PIPELINE_KEYS = ["prepare.k_core", "prepare.max_history", "prepare.out", "embed.cpus_per_task", "embed.batch_size",
                 "quantize.seed", "quantize.lr", "quantize.beta", "quantize.levels", "quantize.hidden_dims",
                 "ray_num_cpus", "prepare", "bogus", "quantize.bogus"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 10, 2**32, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=12), st.sampled_from(["nan", "inf", "auto", "row_wise", "comeir", "10", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4),
                   st.dictionaries(st.text(max_size=6), scalars, max_size=3))


def _nest(pairs: dict) -> dict:
    data: dict = {}
    for dotted, value in pairs.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[leaf] = value
    return data


def _yaml_text(data: dict) -> str:
    return yaml.safe_dump(data, allow_unicode=True)  # .nan / .inf for non-finite floats


class Accepted(Exception):
    """Raised by the stubs: validation passed and the command reached the work it would do."""

    def __init__(self, cfg):
        self.cfg = cfg


def run_cli(argv: list[str], text: str) -> tuple[int | None, object, str, str]:
    """``comeir <argv> --config F`` in-process with F = ``text``: (exit code, accepted config, stdout, stderr)."""
    import comeir_dist.data.prepare as prepare
    import comeir_dist.train.loop as loop
    from comeir_dist.cli import main

    def stop(cfg, *args, **kwargs):
        raise Accepted(cfg)

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train", stop)
        mp.setattr(prepare, "run_prepare", stop)
        cfg_path = Path(d) / "cfg.yaml"
        cfg_path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([*argv, "--config", str(cfg_path)])
                accepted = None
            except Accepted as exc:
                rc, accepted = None, exc.cfg
    return rc, accepted, out.getvalue(), err.getvalue()


def assert_refused_one_line(rc, err: str, cmd: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"comeir {cmd}: error: ") and len(err.strip()) > len(f"comeir {cmd}: error: ")


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def assert_run_invariants(cfg) -> None:
    """What training relies on, for any config that validation let through."""
    for path, v in _walk(cfg.model_dump()):
        if isinstance(v, float):
            assert math.isfinite(v), path
        if isinstance(v, int) and not isinstance(v, bool):
            assert -INT64_MAX - 1 <= v <= INT64_MAX, path
    assert 0 <= cfg.seed < 2**32
    ks = cfg.eval.ks
    assert 10 in ks and all(k >= 1 for k in ks) and ks == sorted(set(ks))
    assert cfg.train.lr > 0 and cfg.train.grad_clip > 0 and cfg.engram.sparse_lr > 0


def _non_finite_anywhere(data) -> bool:
    return any(isinstance(v, float) and not math.isfinite(v) for _, v in _walk(data))


# ---- random values at known (and unknown) keys -----------------------------------------------------------
@SETTINGS
@given(pairs=st.dictionaries(st.sampled_from(RUN_KEYS), values, min_size=1, max_size=4))
@example(pairs={"train.lr": math.inf})
@example(pairs={"train.grad_clip": math.nan})
@example(pairs={"engram.sparse_lr": math.inf})
@example(pairs={"eval.ks": [5]})
@example(pairs={"seed": -1})
@example(pairs={"seed": 2**32})
@example(pairs={"train.max_steps": 2**70})
@example(pairs={"bogus": 1})
def test_train_config_values(pairs):
    rc, cfg, out, err = run_cli(["train"], _yaml_text(_nest(pairs)))
    if cfg is None:
        assert_refused_one_line(rc, err, "train")
        assert out == ""
    else:
        assert err == "" and rc is None
        assert_run_invariants(cfg)
        assert not _non_finite_anywhere(_nest(pairs))  # nan/inf is refused wherever it is


BAD_FLAGS = [["--seed", "-2"], ["--seed", "4294967296"], ["--s-t", "inf"], ["--s-s", "nan"],
             ["--max-minutes", "inf"]]
GOOD_FLAGS = [["--max-steps", "5"], ["--batch-size", "8"], ["--variant", "tm"]]


@SETTINGS
@given(pairs=st.dictionaries(st.sampled_from(RUN_KEYS), values, min_size=1, max_size=3),
       flags=st.lists(st.sampled_from(BAD_FLAGS + GOOD_FLAGS), max_size=2))
@example(pairs={"train": 5}, flags=[["--max-steps", "5"]])
@example(pairs={"engram": [1, 2]}, flags=[["--s-t", "1"]])
@example(pairs={"model": "x\ny"}, flags=[["--variant", "tm"]])
def test_train_config_with_flag_overrides(pairs, flags):
    """Flags are set into the YAML's mapping: a section that is not a mapping is one line, not a TypeError."""
    argv = ["train", *[a for f in flags for a in f]]
    rc, cfg, out, err = run_cli(argv, _yaml_text(_nest(pairs)))
    if cfg is None:
        assert_refused_one_line(rc, err, "train")
    else:
        assert_run_invariants(cfg)
        assert not any(f in BAD_FLAGS for f in flags)


@SETTINGS
@given(pairs=st.dictionaries(st.sampled_from(PIPELINE_KEYS), values, min_size=1, max_size=4))
@example(pairs={"quantize.seed": -5})
@example(pairs={"embed.cpus_per_task": math.inf})
@example(pairs={"quantize.lr": math.nan})
def test_pipeline_config_values(pairs):
    rc, cfg, out, err = run_cli(["prepare"], _yaml_text(_nest(pairs)))
    if cfg is None:
        assert_refused_one_line(rc, err, "prepare")
    else:
        assert not _non_finite_anywhere(cfg.model_dump()) and not _non_finite_anywhere(_nest(pairs))
        seed = _nest(pairs).get("quantize", {}).get("seed", 0)  # the stub sees cfg.prepare only
        assert isinstance(seed, bool) or not isinstance(seed, int) or 0 <= seed < 2**32


# ---- random YAML text ------------------------------------------------------------------------------------
yaml_ish = st.lists(st.sampled_from(["train:", "  lr: ", ".nan", ".inf", "-.inf", "eval: {ks: [", "5", "]}",
                                     "seed: ", "-1", "4294967296", "\n", "  ", "- ", "[", "{", "}", ": ", "'", '"',
                                     "!!python/object:os.system", "&a", "*a", "? ", "\t", "#", "---", "...",
                                     "\x00", "\x07", "bogus: 1", "train.lr", "1e999", "0x10"]),
                    max_size=25).map("".join)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), yaml_ish))
@example(text="")
@example(text="[1, 2]")
@example(text="train: [1\n")
@example(text="a: \x00\n")
@example(text="\ud800")
@example(text="[" * 3000)
@example(text="train:\n  lr: .inf\n")
@example(text="? [a, b]\n: c\n")
@example(text="1: 2\n")
def test_random_yaml_text(text):
    rc, cfg, out, err = run_cli(["train"], text)
    if cfg is None:
        assert_refused_one_line(rc, err, "train")
    else:
        assert_run_invariants(cfg)


@SETTINGS
@given(data=st.binary(max_size=80))
@example(data=b"\xff\xfe\x00t")
def test_random_bytes(data):
    rc, cfg, out, err = run_cli(["train"], data)
    if cfg is None:
        assert_refused_one_line(rc, err, "train")
    else:
        assert_run_invariants(cfg)
