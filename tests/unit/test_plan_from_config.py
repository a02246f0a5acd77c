"""`comeir plan` from the config alone: `model.backbone.config_file` (a Hugging Face config.json, no weights)
gives the dense-parameter count when `model.backbone.path` is unset or not on this machine."""
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from comeir_dist.config.run import BackboneConfig
from comeir_dist.errors import UserError

REPO = Path(__file__).resolve().parents[2]
INDUSTRIAL = REPO / "configs" / "industrial.yaml"
# parameters of the bare decoders (AutoModel = Qwen3Model / LlamaModel: token table + layers + final norm; the
# LM head is tied to the token table, so Qwen3ForCausalLM / LlamaForCausalLM have the same count):
# Qwen3-0.6B "0.6B, 0.44B non-embedding"; Llama-3.2-1B "1.23B"
QWEN3_06B = 596_049_920
LLAMA32_1B = 1_235_814_400


def run_cli(argv):
    """`comeir plan ...` through the real `comeir` entry point (cli.main), stdout and stderr captured."""
    from comeir_dist import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["plan", *argv])
    return rc, out.getvalue(), err.getvalue()


def meta_numel(conf) -> int:
    from comeir_dist.model.backbone import backbone_from_config
    from comeir_dist.parallel.memory_plan import _params_on_meta

    with _params_on_meta():
        return sum(p.numel() for p in backbone_from_config(conf).parameters())


# ---- shipped architecture files ---------------------------------------------------------------------
@pytest.mark.parametrize("name,expect,numel", [
    ("qwen3-0.6b.json", dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                             tie_word_embeddings=True, rope_theta=1_000_000, max_position_embeddings=40960,
                             rms_norm_eps=1e-6), QWEN3_06B),
    ("llama3-1b.json", dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                            tie_word_embeddings=True, rope_theta=500_000, max_position_embeddings=131072,
                            rms_norm_eps=1e-5), LLAMA32_1B),
])
def test_shipped_backbone_configs_are_the_public_architectures(name, expect, numel):
    from comeir_dist.model.backbone import load_config_file

    raw = json.loads((REPO / "configs" / "backbones" / name).read_text())
    assert {k: raw[k] for k in expect} == expect
    if raw["model_type"] == "llama":
        assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_scaling"]["factor"] == 32
    conf = load_config_file(f"configs/backbones/{name}")
    assert conf.hidden_size == expect["hidden_size"] and conf.tie_word_embeddings
    assert meta_numel(conf) == numel


# ---- the count equals the real model's ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_config_file_count_equals_the_real_model(tmp_path, arch):
    """A tiny HF model saved as a checkpoint (weights) and as a bare config.json: counting from the checkpoint
    dir, from config_file (no path, or a path missing on this machine) and the real model built from the
    checkpoint all agree, parameters and trainable parameters."""
    import numpy as np
    import torch
    from transformers import AutoModel, LlamaConfig, Qwen3Config

    from comeir_dist.model.backbone import build_backbone
    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.memory_plan import count_dense_params
    from tests.fixtures import tiny_run_config

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    hf_conf = Qwen3Config(head_dim=16, **sizes) if arch == "qwen3" else LlamaConfig(**sizes)
    torch.manual_seed(0)
    ck = tmp_path / "checkpoint"
    AutoModel.from_config(hf_conf).save_pretrained(ck)
    cfg_file = tmp_path / "elsewhere" / "tiny.json"
    cfg_file.parent.mkdir()
    shutil.copy(ck / "config.json", cfg_file)

    base = tiny_run_config(tmp_path, tmp_path / "out")

    def with_backbone(**kw):
        bb = base.model.backbone.model_copy(update={"arch": arch, **kw})
        return base.model_copy(update={"model": base.model.model_copy(update={"backbone": bb})})

    D = 16
    by_path = count_dense_params(with_backbone(path=str(ck)), item_emb_dim=D)
    by_file = count_dense_params(with_backbone(config_file=str(cfg_file)), item_emb_dim=D)
    missing = count_dense_params(with_backbone(path=str(tmp_path / "not-here"), config_file=str(cfg_file)),
                                 item_emb_dim=D)
    both = count_dense_params(with_backbone(path=str(ck), config_file=str(cfg_file)), item_emb_dim=D)
    assert (by_file.params, by_file.trainable) == (by_path.params, by_path.trainable)
    assert (missing.params, missing.trainable) == (both.params, both.trainable) == (by_path.params, by_path.trainable)
    assert "config_file" in by_file.source and "config_file" in missing.source

    # the real model (weights loaded from the checkpoint), as training builds it
    L, C = base.engram.levels, base.engram.codebook_size
    codes = np.stack([np.arange(C)] * L, axis=1)
    real = build_model(with_backbone(path=str(ck)), codes, np.zeros((L, C, D), np.float32),
                       np.zeros((C, D), np.float32), sparse_device="meta")
    dense = [(n, p) for n, p in real.named_parameters() if not n.startswith("tables.")]
    assert by_file.params == sum(p.numel() for _, p in dense)
    assert by_file.trainable == sum(p.numel() for _, p in dense if p.requires_grad)
    # config_file alone (no path) builds the same architecture (random init); only the unused token table is frozen
    from_file = build_backbone(with_backbone(config_file=str(cfg_file)).model.backbone)
    from_ck = AutoModel.from_pretrained(ck, local_files_only=True)
    assert type(from_file) is type(from_ck)
    assert {n: p.shape for n, p in from_file.named_parameters()} == {n: p.shape for n, p in from_ck.named_parameters()}
    frozen = [n for n, p in from_file.named_parameters() if not p.requires_grad]
    assert frozen == ["embed_tokens.weight"]
    assert by_file.params - by_file.trainable == from_file.embed_tokens.weight.numel()


def test_training_keeps_the_missing_path_error():
    from comeir_dist.model.backbone import build_backbone

    bb = BackboneConfig(path="/nonexistent/models/Qwen3-0.6B", config_file="configs/backbones/qwen3-0.6b.json")
    with pytest.raises(UserError, match=r"^model\.backbone\.path: /nonexistent/models/Qwen3-0\.6B is not a local "):
        build_backbone(bb)


def test_industrial_config_plans_from_its_config_file():
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    cfg = parse_section(RunConfig, load_yaml(INDUSTRIAL))
    assert cfg.model.backbone.path == "/shared/models/Qwen3-0.6B"  # training still loads the checkpoint
    assert cfg.model.backbone.config_file == "configs/backbones/qwen3-0.6b.json"


@pytest.mark.parametrize("value", ["configs/backbones/qwen3-0.6b.json", "qwen3-0.6b.json"])
def test_relative_config_file_resolves_from_any_working_directory(tmp_path, monkeypatch, value):
    from comeir_dist.model.backbone import resolve_config_file

    monkeypatch.chdir(tmp_path)
    assert resolve_config_file(value) == REPO / "configs" / "backbones" / "qwen3-0.6b.json"
    (tmp_path / "configs" / "backbones").mkdir(parents=True)
    local = tmp_path / "configs" / "backbones" / "qwen3-0.6b.json"
    local.write_text("{}")
    if "/" in value:  # a file in the working directory wins, as for every other relative path
        assert resolve_config_file(value) == Path(value)


# ---- the CLI ------------------------------------------------------------------------------------------
def test_plan_industrial_fits_on_16_gpus_with_the_real_qwen3_share(tmp_path):
    import numpy as np

    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.memory_plan import _params_on_meta

    rc, out, err = run_cli(["--config", str(INDUSTRIAL), "--s-t", "8", "--world-size", "16", "--device", "cuda",
                            "--device-memory", "80"])
    assert rc == 0 and err == "", err
    lines = out.strip().splitlines()
    assert lines[0].startswith("memory plan: 16 x cuda rank(s), 80.00 GiB each")
    assert lines[-1].startswith("OK: memory plan fits")
    dense = re.search(r"^dense: ([\d,]+) params \(([\d,]+) trainable, model comeir \(meta build, backbone from "
                      r"config_file \S*configs/backbones/qwen3-0\.6b\.json\)\), bf16, ZeRO-2", out, re.M)
    assert dense, out
    params = int(dense.group(1).replace(",", ""))
    # the same model built directly (every parameter on meta): Qwen3-0.6B + ComeIR's dense modules
    cfg = parse_section(RunConfig, load_yaml(INDUSTRIAL))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": cfg.model.backbone.model_copy(
        update={"path": None})})})
    L, C, D = cfg.engram.levels, cfg.engram.codebook_size, 384
    with _params_on_meta():
        model = build_model(cfg, np.stack([np.arange(C)] * L, axis=1), np.zeros((L, C, D), np.float32),
                            np.zeros((C, D), np.float32), sparse_device="meta")
    assert params == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tables."))
    assert sum(p.numel() for p in model.backbone.parameters()) == QWEN3_06B
    assert QWEN3_06B < params < QWEN3_06B * 1.2


def test_plan_industrial_on_one_small_gpu_refuses_with_what_would_fit():
    rc, out, err = run_cli(["--config", str(INDUSTRIAL), "--s-t", "8", "--world-size", "1", "--device", "cuda",
                            "--device-memory", "8"])
    assert rc == 1 and err == ""
    last = out.strip().splitlines()[-1]
    assert last.startswith("DOES NOT FIT: memory plan does not fit: rank 0 needs")
    assert re.search(r"Try: world size >= \d+", last), last
    assert "backbone from config_file" in out


def _plan_with_backbone(tmp_path, backbone: dict):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": {"backbone": backbone}}))  # JSON is YAML
    return run_cli(["--config", str(cfg), "--device", "cpu", "--device-memory", "24"])


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("dir", "is a directory"),
    ("{not json", "malformed JSON (line 1)"),
    ("[1, 2]", "top level must be a JSON object"),
    ('{"hidden_size": 64}', "no 'model_type'; allowed values: qwen3, llama"),
    ('{"model_type": "gpt2"}', "model_type 'gpt2'; allowed values: qwen3, llama"),
    ('{"model_type": "qwen3", "hidden_size": -4}', "model.backbone.config_file"),
    (b"\xff\xfe{", "not a UTF-8 text file"),
])
def test_bad_config_file_is_one_line_naming_key_and_path(tmp_path, content, needle):
    f = tmp_path / "backbone.json"
    if content == "dir":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    rc, out, err = _plan_with_backbone(tmp_path, {"config_file": str(f)})
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("comeir plan: error: model.backbone.config_file: "), err
    assert str(f) in err and needle in err


def test_relative_missing_config_file_says_where_it_looked(tmp_path):
    rc, _, err = _plan_with_backbone(tmp_path, {"config_file": "no-such-backbone.json"})
    assert rc == 2 and err.count("\n") == 1
    assert "model.backbone.config_file: no-such-backbone.json not found (looked in the working directory" in err
    assert str(REPO / "configs" / "backbones") in err


def test_empty_config_file_and_missing_path_alone(tmp_path):
    rc, _, err = _plan_with_backbone(tmp_path, {"config_file": ""})
    assert rc == 2 and err.count("\n") == 1 and "'model.backbone.config_file'" in err
    # a path missing here without a config_file stays the error it was
    rc, _, err = _plan_with_backbone(tmp_path, {"path": str(tmp_path / "Qwen3-0.6B")})
    assert rc == 2 and err.count("\n") == 1
    assert f"model.backbone.path: {tmp_path / 'Qwen3-0.6B'} is not a local directory" in err


def test_plan_counts_the_rec2pm_global_pass(tmp_path):
    """model.pref_memory: the archive-quadratic global-pass activations join the reserve; a long archive that does
    not fit says so and names the knobs that shrink it."""
    from comeir_dist.config.run import RunConfig
    from comeir_dist.parallel.activation_plan import global_pass_activations

    pm = {"enabled": True, "tokens": 4, "segment_items": 20, "archive_items": 1000}
    model = {"variant": "tm", "backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                           "intermediate_size": 128}, "pref_memory": pm}
    data = {"model": model, "train": {"batch_size": 256}}
    acts = global_pass_activations(RunConfig(**data), world=2)
    t = 49 * 24  # (1000 - 1) // 20 complete segments of 20 items + 4 queries
    assert (acts.positions, acts.micro_batch, acts.layers, acts.heads) == (t, 128, 2, 4)
    assert acts.total == 128 * t * t + 2 * 2 * 128 * 4 * t * t * 4
    assert global_pass_activations(RunConfig(**{**data, "model": {**model, "pref_memory": {}}}), 1) is None

    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(data))
    rc, out, _ = run_cli(["--config", str(cfg), "--device", "cpu", "--device-memory", "64", "--world-size", "2",
                          "--json"])
    plan = json.loads(out)
    assert rc == 0 and plan["activation_bytes"] == acts.total and "Rec2PM global pass" in plan["activation_note"]
    assert plan["reserve_bytes"] == 2 * 2**30 + acts.total
    rc, out, _ = run_cli(["--config", str(cfg), "--device", "cpu", "--device-memory", "8", "--world-size", "2"])
    assert rc == 1 and "Rec2PM global pass" in out
    assert "Try: more train.grad_accum_steps or a shorter model.pref_memory.archive_items" in out.splitlines()[-1]


def test_plan_counts_all_position_training(tmp_path):
    """train.sample_mode: sequence -- the [window, items] logits of every window (and plain sasrec's window
    attention) join the reserve; a window that does not fit names the knobs."""
    from comeir_dist.config.run import RunConfig
    from comeir_dist.parallel.activation_plan import run_activations

    model = {"variant": "sasrec", "backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                               "intermediate_size": 128, "max_positions": 1024}}
    data = {"model": model, "max_history": 1000, "train": {"batch_size": 64, "sample_mode": "sequence"}}
    acts = run_activations(RunConfig(**data), world=2, num_items=3650)
    (seq,) = acts.parts
    assert seq.logits_bytes == 12 * 32 * 1000 * 3650 and seq.attention_bytes == 2 * 2 * 32 * 4 * 1000 ** 2 * 4
    assert run_activations(RunConfig(**{**data, "train": {"batch_size": 64}}), 1, 3650) is None  # prefix mode
    pm = {**data, "model": {**model, "pref_memory": {"enabled": True, "archive_items": 1000}}}
    both = run_activations(RunConfig(**pm), world=2, num_items=3650)
    assert [type(p).__name__ for p in both.parts] == ["GlobalPassActivations", "SequenceActivations"]
    assert both.parts[1].attention_bytes == 0  # the global pass term covers the memory's long pass
    # flatten: 3 tokens per item, every token scores one level's 128 codes
    flat = {**data, "max_history": 300, "model": {**model, "variant": "flatten"}}
    (fseq,) = run_activations(RunConfig(**flat), world=2, num_items=3650).parts
    assert fseq.logits_bytes == 12 * 32 * 900 * 128 and fseq.attention_bytes == 2 * 2 * 32 * 4 * 900 ** 2 * 4
    # tm: 1 input + 2 fed-back codes per position (block mask, code_sequence.py): the same token count
    (tseq,) = run_activations(RunConfig(**{**flat, "model": {**model, "variant": "tm"}}), 2, 3650).parts
    assert (tseq.logits_bytes, tseq.attention_bytes) == (fseq.logits_bytes, fseq.attention_bytes)
    # comeir: 300 backbone inputs; the head's [d] state per (target, code) pair at level 1 joins the logits
    (cseq,) = run_activations(RunConfig(**{**flat, "model": {**model, "variant": "comeir"}}), 2, 3650).parts
    assert cseq.window == 300 and cseq.attention_bytes == 2 * 2 * 32 * 4 * 300 ** 2 * 4
    assert cseq.logits_bytes == fseq.logits_bytes + 6 * 4 * 32 * 300 * 128 * 64

    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(data))
    rc, out, _ = run_cli(["--config", str(cfg), "--device", "cpu", "--device-memory", "64", "--world-size", "2",
                          "--num-items", "3650", "--json"])
    plan = json.loads(out)
    assert rc == 0 and plan["activation_bytes"] == acts.total and "all-position training" in plan["activation_note"]
    rc, out, _ = run_cli(["--config", str(cfg), "--device", "cpu", "--device-memory", "4", "--world-size", "2",
                          "--num-items", "3650"])
    assert rc == 1 and "a shorter window (max_history" in out.splitlines()[-1]
